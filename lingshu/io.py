"""Atomic file output: every writer puts its bytes under a temporary name, then renames.

A crash or a validation error therefore never leaves a half-written output where Snakemake
(or a person) would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


CHUNK_BYTES = 1 << 20  # 1 MiB: large enough to stream fast, small enough to hash incrementally


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of the file at ``path``, read in chunks (files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Write ``adata`` to ``path`` atomically (gzip-free, so reads stay fast). Text in pandas'
    string dtype (pandas 3's default) is written too: anndata refuses it unless told to."""
    with atomic_path(path) as tmp, ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(tmp)


H5_CHUNK = 1 << 18  # elements per HDF5 chunk of the growing count arrays


class CsrAppender:
    """Write a CSR matrix into an open HDF5 group row block by row block (anndata's layout).

    The arrays grow as blocks arrive; ``indptr`` is int64 so that more than 2**31 stored
    values fit. Call :meth:`close` to set the final shape.
    """

    def __init__(self, group: h5py.Group, n_cols: int, dtype: Any = np.int32) -> None:
        self.group, self.n_cols, self.n_rows, self.nnz = group, int(n_cols), 0, 0
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        kw = {"maxshape": (None,), "chunks": (H5_CHUNK,)}
        group.create_dataset("data", shape=(0,), dtype=dtype, **kw)
        group.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        group.create_dataset("indptr", shape=(1,), dtype=np.int64, maxshape=(None,), chunks=(H5_CHUNK,))

    def append(self, block: sp.csr_matrix) -> None:
        """Append the rows of ``block`` (CSR with ``n_cols`` columns)."""
        if block.shape[1] != self.n_cols:
            raise ValueError(f"CsrAppender: block has {block.shape[1]} columns, expected {self.n_cols}")
        n, nnz = block.shape[0], int(block.nnz)
        data, indices, indptr = (self.group[k] for k in ("data", "indices", "indptr"))
        data.resize((self.nnz + nnz,))
        indices.resize((self.nnz + nnz,))
        data[self.nnz:] = block.data[:nnz]
        indices[self.nnz:] = block.indices[:nnz]
        indptr.resize((self.n_rows + n + 1,))
        indptr[self.n_rows + 1:] = self.nnz + np.asarray(block.indptr[1:], dtype=np.int64)
        self.n_rows += n
        self.nnz += nnz

    def close(self) -> None:
        self.group.attrs["shape"] = (self.n_rows, self.n_cols)


def write_h5ad_streaming(path: str | os.PathLike, obs: pd.DataFrame, var: pd.DataFrame,
                         blocks: Iterable[sp.csr_matrix | np.ndarray], uns: dict | None = None,
                         obsm: dict | None = None, dtype: Any = np.int32,
                         dense: bool = False) -> None:
    """Write an h5ad whose X (CSR, of ``dtype``) arrives as row blocks, never held whole.

    dense: write X as a dense (n_obs, n_vars) array instead (contiguous, so that a reader
    fetching one cell reads one run of bytes); the blocks may then be sparse or dense.
    ``path`` is written in place (callers wrap it in :func:`atomic_path`). The blocks' rows
    must add up to ``len(obs)``; the file reads back with ``anndata.read_h5ad``.
    """
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        ad.io.write_elem(f, "uns", dict(uns or {}))
        ad.io.write_elem(f, "obsm", dict(obsm or {}))
        for key in ("layers", "obsp", "varm", "varp"):
            ad.io.write_elem(f, key, {})
        if dense:
            X = f.create_dataset("X", shape=(len(obs), len(var)), dtype=dtype)
            X.attrs["encoding-type"] = "array"
            X.attrs["encoding-version"] = "0.2.0"
            n_rows = 0
            for block in blocks:
                block = block.toarray() if sp.issparse(block) else np.asarray(block)
                if block.shape[1] != len(var) or n_rows + block.shape[0] > len(obs):
                    raise ValueError(f"write_h5ad_streaming: block of shape {block.shape} does "
                                     f"not fit {len(obs)} x {len(var)} at row {n_rows}")
                X[n_rows:n_rows + block.shape[0]] = block
                n_rows += block.shape[0]
        else:
            X = CsrAppender(f.create_group("X"), n_cols=len(var), dtype=dtype)
            for block in blocks:
                X.append(block)
            X.close()
            n_rows = X.n_rows
        if n_rows != len(obs):
            raise ValueError(f"write_h5ad_streaming: {n_rows} rows of counts for {len(obs)} cells")


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
