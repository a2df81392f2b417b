"""Atomic file output: every writer puts its bytes under a temporary name, then renames.

A crash or a validation error therefore never leaves a half-written output where Snakemake
(or a person) would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import anndata as ad
import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the same directory (so the rename is atomic on POSIX) and is
    removed if the block raises; the result gets the permissions of a file made by ``open()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file owner-only; give it the mode a plain open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` atomically (gzip-free, so reads stay fast)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def write_table(df: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> None:
    """Write a DataFrame as TSV (or CSV when the name ends in .csv) atomically."""
    sep = "," if str(path).endswith(".csv") else "\t"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=sep, index=index)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TSV/CSV written by :func:`write_table`, keeping string columns as strings."""
    sep = "," if str(path).endswith(".csv") else "\t"
    return pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""])
