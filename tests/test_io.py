"""Atomic writes: all or nothing, and the permissions of an ordinary file."""

import os
import stat

import pytest

from lingshu.io import atomic_path


def test_atomic_path_writes_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "x"
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
