"""Getting a dataset's raw h5ad onto disk: download by URL (checksummed) or link a local file.

Two entry points:

- :func:`fetch` downloads one URL to one path, streaming and hashing as it goes, retrying
  transient failures, and never leaving a partial or unverified file where the next stage
  would take it for a finished download.
- :func:`materialize_source` turns a dataset entry's ``source`` (``{url, sha256}`` or
  ``{path}``) into a file at ``dest``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from lingshu.errors import InputError, input_error
from lingshu.io import CHUNK_BYTES, atomic_path, sha256_file

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SCHEMES = ("http", "https", "file")
_SHA_FIX = "update `sha256:` in the dataset entry of the config, or check that `url:` points to the intended file"


def _normalise_sha256(sha256: str | None, where: str) -> str | None:
    """Lower-case and check an expected checksum; ``None`` stays ``None``."""
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if not _SHA256_RE.match(value):
        raise input_error(
            where,
            "sha256",
            f"{sha256!r} is not a sha256 checksum (64 hexadecimal characters)",
            "paste the output of `sha256sum <file>`, or remove `sha256:` to have it computed and printed",
        )
    return value


def _warn_unpinned(url: str, actual: str) -> None:
    """Log loudly that a download was not verified, with the hash to pin."""
    logger.warning(
        "NO CHECKSUM for %s: the file was not verified. Pin it by adding to the dataset entry:\n"
        "    sha256: %s",
        url,
        actual,
    )


def _is_retryable(exc: BaseException) -> bool:
    """Transient failures worth another try: server errors, rate limits, dropped connections."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(
        exc,
        (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError),
    )


def _stream_to(response: BinaryIO, out: BinaryIO, total: int | None, desc: str, progress: bool) -> tuple[str, int]:
    """Copy ``response`` to ``out`` in chunks; return (sha256 hex, bytes written)."""
    digest = hashlib.sha256()
    n_bytes = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            out.write(chunk)
            n_bytes += len(chunk)
            bar.update(len(chunk))
    return digest.hexdigest(), n_bytes


def _download_once(url: str, tmp: Path, timeout: float, progress: bool) -> str:
    """One download attempt of ``url`` into ``tmp``; return its sha256.

    Raises ``http.client.IncompleteRead`` when the server sends fewer bytes than it announced,
    so that a truncated transfer is retried rather than mistaken for a checksum mismatch.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        desc = Path(urllib.parse.urlparse(url).path).name or url
        actual, n_bytes = _stream_to(response, out, total, desc, progress)
    if total is not None and n_bytes != total:
        raise http.client.IncompleteRead(b"", total - n_bytes)
    return actual


def _fatal_download_error(url: str, exc: BaseException, attempts: int) -> InputError:
    """Turn the last download failure into an InputError that says what to do."""
    if isinstance(exc, urllib.error.HTTPError):
        problem = f"download failed with HTTP {exc.code} {exc.reason}"
        if exc.code in (401, 403, 404, 410):
            fix = "check `url:` in the dataset entry (the file may have moved or need access rights)"
        else:
            fix = "retry later, or download the file by hand and use `source: {path: ...}`"
    else:
        problem = f"download failed after {attempts} attempt(s): {type(exc).__name__}: {exc}"
        fix = ("check the network connection and `url:` in the dataset entry, or download the file "
               "by hand and use `source: {path: ...}`")
    return input_error(url, "source.url", problem, fix)


def _check_url(url: str) -> str:
    """Return the URL's scheme, refusing those we do not download from."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise input_error(
            url, "source.url", f"unsupported URL scheme {scheme!r} (supported: {', '.join(_SCHEMES)})",
            "use an http(s):// or file:// URL, or `source: {path: ...}` for a local file",
        )
    return scheme


def _existing_is_valid(dest: Path, expected: str | None, url: str) -> bool:
    """True when ``dest`` already holds the wanted file, so the download can be skipped.

    A file with the wrong checksum is removed: it is known bad and must not survive a failed
    re-download. Without an expected checksum an existing file is kept (it was written
    atomically, so it is complete) but reported as unverified.
    """
    if not dest.exists():
        return False
    actual = sha256_file(dest)
    if expected is None:
        logger.warning("%s exists and is reused without verification (no sha256 given)", dest)
        _warn_unpinned(url, actual)
        return True
    if actual == expected:
        logger.info("%s already present with the expected sha256; not downloading", dest)
        return True
    logger.warning("%s exists with sha256 %s, expected %s: downloading again", dest, actual, expected)
    dest.unlink()
    return False


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` and verify its sha256; return ``dest`` as a Path.

    - Streams into a temporary file beside ``dest`` and renames it only once the checksum
      matches, so ``dest`` is either absent or complete and verified.
    - Retries up to ``retries`` more times (waiting ``backoff * 2**k`` seconds) on dropped
      connections, timeouts, truncated transfers, HTTP 5xx and 429; other HTTP errors
      (404, 403, ...) fail at once.
    - Skips the download when ``dest`` already has the expected checksum.
    - ``sha256=None`` downloads without verification, logging a warning and the computed
      hash so the user can pin it.

    Raises :class:`InputError` on a checksum mismatch (no file left behind), an HTTP client
    error, an unsupported scheme, or when all attempts fail.
    """
    dest = Path(dest)
    expected = _normalise_sha256(sha256, url)
    scheme = _check_url(url)
    if _existing_is_valid(dest, expected, url):
        return dest

    attempts = 1 + max(0, int(retries))
    for attempt in range(attempts):
        try:
            with atomic_path(dest) as tmp:
                actual = _download_once(url, tmp, timeout, progress)
                if expected is not None and actual != expected:
                    # Raising inside atomic_path removes the temporary file: nothing is left.
                    raise input_error(
                        url, "sha256",
                        f"checksum mismatch: expected {expected}, downloaded file has {actual}",
                        _SHA_FIX,
                    )
            if expected is None:
                _warn_unpinned(url, actual)
            logger.info("downloaded %s to %s", url, dest)
            return dest
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified just below
            # A missing local file (file://) will not appear by retrying.
            retryable = _is_retryable(exc) and not (scheme == "file" and isinstance(exc, urllib.error.URLError))
            if not retryable or attempt == attempts - 1:
                raise _fatal_download_error(url, exc, attempt + 1) from exc
            wait = backoff * (2**attempt)
            logger.warning("download of %s failed (%s: %s); retry %d/%d in %.1fs",
                           url, type(exc).__name__, exc, attempt + 1, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _source_kind(source: dict, config_path: str) -> str:
    """Return which of ``url``, ``path``, ``simulate`` the source names (exactly one)."""
    if not isinstance(source, dict):
        raise input_error(config_path, "source", f"expected a mapping, got {type(source).__name__}",
                          "write `source: {url: ..., sha256: ...}` or `source: {path: ...}`")
    kinds = [k for k in ("url", "path", "simulate") if k in source]
    if len(kinds) != 1:
        raise input_error(
            config_path, "source",
            f"must name exactly one of url, path, simulate; got keys {sorted(source)}",
            "write `source: {url: ..., sha256: ...}`, `source: {path: ...}` or `source: {simulate: {...}}`",
        )
    return kinds[0]


def _link_local(source: dict, dest: Path, config_path: str) -> Path:
    """Verify a local ``{path, sha256?}`` source and symlink ``dest`` to its absolute path."""
    src = Path(os.path.expanduser(str(source["path"])))
    if not src.is_file():
        raise input_error(
            config_path, "source.path",
            f"file {str(src)!r} does not exist (resolved to {src.absolute()}, relative paths are "
            f"taken from the working directory {Path.cwd()})",
            "correct `path:` in the dataset entry, or give an absolute path",
        )
    expected = _normalise_sha256(source.get("sha256"), config_path)
    if expected is not None:
        actual = sha256_file(src)
        if actual != expected:
            raise input_error(
                src, "source.sha256", f"checksum mismatch: expected {expected}, file has {actual}",
                "update `sha256:` in the dataset entry if the file changed on purpose, or restore the original file",
            )
    target = src.resolve()
    if dest.exists() and not dest.is_symlink() and dest.resolve() == target:
        # dest *is* the user's file: replacing it by a link to itself would destroy it.
        return dest
    with atomic_path(dest) as tmp:
        tmp.unlink()  # atomic_path made an empty file; put the link in its place
        tmp.symlink_to(target)
    logger.info("linked %s -> %s", dest, target)
    return dest


def materialize_source(source: dict, dest: str | Path, config_path: str = "config") -> Path:
    """Put the raw h5ad named by a dataset entry's ``source`` at ``dest``; return ``dest``.

    - ``{"url": ..., "sha256": ...}``: downloaded with :func:`fetch`.
    - ``{"path": ..., "sha256"?: ...}``: checked to exist (and to match ``sha256`` if given),
      then ``dest`` becomes a symlink to its absolute path; the user's file is never copied
      or modified.
    - ``{"simulate": {...}}``: not handled here (ValueError); simulated data is generated by
      the simulation step.

    ``config_path`` names the config file in error messages.
    """
    dest = Path(dest)
    kind = _source_kind(source, config_path)
    if kind == "simulate":
        raise ValueError(
            f"{config_path}: source.simulate: materialize_source only handles `url` and `path` sources; "
            "simulated datasets are generated by the simulation step, route them there"
        )
    if kind == "url":
        return fetch(str(source["url"]), dest, source.get("sha256"))
    return _link_local(source, dest, config_path)

