"""Tests of lingshu.data.download against a throwaway HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from pathlib import Path

import pytest

from lingshu.data.download import fetch, materialize_source
from lingshu.errors import InputError
from lingshu.io import sha256_file


class _State:
    """What the test server serves: files by URL path, and how many requests to fail first."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_first: dict[str, int] = {}
        self.requests: dict[str, int] = {}


def _make_handler(state: _State) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            n = state.requests.get(self.path, 0)
            state.requests[self.path] = n + 1
            if n < state.fail_first.get(self.path, 0):
                self.send_error(503, "try again")
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "no such file")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def server(monkeypatch):
    """Yield (base_url, state) of an HTTP server bound to 127.0.0.1 on a free port."""
    # A proxy from the environment must not intercept requests to the local server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    state = _State()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


PAYLOAD = b"not really an h5ad, but bytes are bytes\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_with_checksum(server, tmp_path):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    dest = tmp_path / "raw" / "data.h5ad"
    out = fetch(f"{base}/data.h5ad", dest, PAYLOAD_SHA, progress=False)
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.h5ad"]  # no temp left


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(InputError) as err:
        fetch(f"{base}/data.h5ad", tmp_path / "data.h5ad", wrong, progress=False, retries=0)
    msg = str(err.value)
    assert f"{base}/data.h5ad" in msg and wrong in msg and PAYLOAD_SHA in msg
    assert "Fix:" in msg and "sha256" in msg
    assert list(tmp_path.iterdir()) == []


def test_stale_file_with_wrong_hash_is_replaced(server, tmp_path):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    dest = tmp_path / "data.h5ad"
    dest.write_bytes(b"half a download from some older tool")
    fetch(f"{base}/data.h5ad", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_retries_on_503_then_succeeds(server, tmp_path):
    base, state = server
    state.files["/flaky.h5ad"] = PAYLOAD
    state.fail_first["/flaky.h5ad"] = 2
    dest = tmp_path / "flaky.h5ad"
    fetch(f"{base}/flaky.h5ad", dest, PAYLOAD_SHA, retries=3, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert state.requests["/flaky.h5ad"] == 3


def test_gives_up_after_retries(server, tmp_path):
    base, state = server
    state.files["/down.h5ad"] = PAYLOAD
    state.fail_first["/down.h5ad"] = 10
    with pytest.raises(InputError, match="503"):
        fetch(f"{base}/down.h5ad", tmp_path / "down.h5ad", PAYLOAD_SHA, retries=2, backoff=0.01, progress=False)
    assert state.requests["/down.h5ad"] == 3
    assert list(tmp_path.iterdir()) == []


def test_404_is_clear_and_not_retried(server, tmp_path):
    base, state = server
    with pytest.raises(InputError) as err:
        fetch(f"{base}/missing.h5ad", tmp_path / "x.h5ad", PAYLOAD_SHA, backoff=0.01, progress=False)
    msg = str(err.value)
    assert "404" in msg and f"{base}/missing.h5ad" in msg and "Fix:" in msg and "url" in msg
    assert state.requests["/missing.h5ad"] == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_right_hash_not_downloaded(server, tmp_path):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    dest = tmp_path / "data.h5ad"
    dest.write_bytes(PAYLOAD)
    fetch(f"{base}/data.h5ad", dest, PAYLOAD_SHA, progress=False)
    assert "/data.h5ad" not in state.requests


def test_no_checksum_warns_with_hash(server, tmp_path, caplog):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    with caplog.at_level(logging.WARNING, logger="lingshu.data.download"):
        fetch(f"{base}/data.h5ad", tmp_path / "data.h5ad", None, progress=False)
    assert PAYLOAD_SHA in caplog.text and "NO CHECKSUM" in caplog.text


def test_bad_checksum_format(tmp_path):
    with pytest.raises(InputError, match="not a sha256"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", "abc", progress=False)


def test_file_url(tmp_path):
    src = tmp_path / "src.h5ad"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "dest.h5ad"
    fetch(src.as_uri(), dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_materialize_url_source(server, tmp_path):
    base, state = server
    state.files["/data.h5ad"] = PAYLOAD
    dest = tmp_path / "data.h5ad"
    materialize_source({"url": f"{base}/data.h5ad", "sha256": PAYLOAD_SHA}, dest)
    assert dest.read_bytes() == PAYLOAD


def test_materialize_local_path_symlinks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine" / "cells.h5ad"
    user.parent.mkdir()
    user.write_bytes(PAYLOAD)
    dest = tmp_path / "results" / "raw.h5ad"
    out = materialize_source({"path": "mine/cells.h5ad", "sha256": PAYLOAD_SHA}, dest)
    assert out == dest and dest.is_symlink()
    assert Path(dest.readlink()) == user.resolve()  # absolute target, survives a cwd change
    assert dest.read_bytes() == PAYLOAD
    assert user.read_bytes() == PAYLOAD and not user.is_symlink()
    # Linking again (e.g. a re-run) replaces the link without touching the user's file.
    materialize_source({"path": str(user)}, dest)
    assert dest.is_symlink() and user.read_bytes() == PAYLOAD


def test_materialize_dest_is_the_user_file(tmp_path):
    user = tmp_path / "cells.h5ad"
    user.write_bytes(PAYLOAD)
    materialize_source({"path": str(user)}, user)
    assert user.read_bytes() == PAYLOAD and not user.is_symlink()


def test_materialize_missing_local_path(tmp_path):
    with pytest.raises(InputError) as err:
        materialize_source({"path": str(tmp_path / "nope.h5ad")}, tmp_path / "raw.h5ad", config_path="config/my.yaml")
    msg = str(err.value)
    assert "config/my.yaml" in msg and "source.path" in msg and "nope.h5ad" in msg and "Fix:" in msg
    assert not (tmp_path / "raw.h5ad").exists()


def test_materialize_local_checksum_mismatch(tmp_path):
    user = tmp_path / "cells.h5ad"
    user.write_bytes(PAYLOAD)
    with pytest.raises(InputError, match="checksum mismatch"):
        materialize_source({"path": str(user), "sha256": "1" * 64}, tmp_path / "raw.h5ad")
    assert not (tmp_path / "raw.h5ad").exists()
    assert sha256_file(user) == PAYLOAD_SHA


def test_materialize_rejects_simulate_and_ambiguous(tmp_path):
    with pytest.raises(ValueError, match="simulat"):
        materialize_source({"simulate": {"n_cells": 10}}, tmp_path / "raw.h5ad")
    with pytest.raises(InputError, match="exactly one"):
        materialize_source({"path": "a.h5ad", "url": "http://127.0.0.1/a"}, tmp_path / "raw.h5ad")
