"""Lingshu-Cell's on-disk training format: count tokens of every cell, read batch by batch.

The tokenise stage reads the processed counts one row block at a time and writes, beside them,
the nonzero count tokens (SPEC 1.1) in CSR layout, with plain sequential writes:

- ``indptr.npy`` (int64, n_cells + 1): where each cell's genes start;
- ``indices.npy`` (uint16; uint32 past 65,535 genes): the gene of each nonzero token;
- ``values.npy`` (uint16): the token (1..280; a zero count is token 0 and is not stored);
- ``meta.json``: format, shape, genes, a hash of the cell names and of the arrays.

At 18,080 genes and ~15% detected genes a cell costs about 11 KB instead of 36 KB as dense
uint16 tokens. Training reads, for each mini-batch, only the rows it draws and builds their
dense (B, G) token matrix (:meth:`TokenStore.dense`), so memory holds
one batch, not the data (positioned reads, no memory map: the process's resident memory stays
at the batch whatever the file's size); the operating system's page cache does the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from lingshu.data.rows import PositionedArray
from lingshu.errors import input_error
from lingshu.tokens import quantize_counts

FORMAT = "lingshu-tokens/1"
BLOCK_VALUES = 1 << 24  # nonzero counts read per block while tokenising
ARRAYS = ("indptr", "indices", "values")


def _index_dtype(n_genes: int) -> np.dtype:
    return np.dtype(np.uint16) if n_genes <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _combined(digests: list[str]) -> str:
    """One hash of the three arrays from their own hashes (indptr, indices, values)."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class _NpyWriter:
    """Write a 1-D .npy file of known length block by block with plain writes (no memory map,
    so the writer's memory does not grow with the file), hashing the bytes as they go."""

    def __init__(self, path: Path, dtype, n: int) -> None:
        self.dtype, self.n, self.done = np.dtype(dtype), int(n), 0
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_2_0(
            self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.n,)})
        self.sha = hashlib.sha256()

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self.fh.write(data)
        self.sha.update(data)
        self.done += len(values)

    def close(self) -> str:
        self.fh.close()
        if self.done != self.n:
            raise ValueError(f"tokenise: wrote {self.done} values of {self.n}")
        return self.sha.hexdigest()


class NpyRanges(PositionedArray):
    """A 1-D .npy file on disk read by positioned reads (:class:`PositionedArray`)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if len(shape) != 1 or fortran:
            raise ValueError(f"{path}: expected a 1-D array")
        super().__init__(path, dtype, shape[0])
        expected = self.offset + shape[0] * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected}")

    def _spans(self, start: int, n: int) -> list[tuple[int, int]]:
        size = self.dtype.itemsize
        return [(self.offset + start * size, n * size)]


def names_sha256(names) -> str:
    """A hash of cell (or gene) names, to check that two files describe the same cells."""
    return hashlib.sha256("\x1f".join(map(str, names)).encode()).hexdigest()


class TokenStore:
    """Count tokens of a set of cells (CSR), in memory or on disk, maybe a row subset.

    On disk (:meth:`open`) the row pointers are read into memory (8 bytes per cell) and a
    batch's genes and tokens are read with one positioned read per cell and array.

    n_cells / n_genes: the shape seen by the caller (after :meth:`subset`).
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_genes: int,
                 fingerprint: str, rows: np.ndarray | None = None) -> None:
        self.indptr, self.indices, self.values = indptr, indices, values
        self.n_genes = int(n_genes)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._fingerprint = fingerprint

    # -------------------------------------------------------------- construction
    @classmethod
    def from_counts(cls, counts: sp.spmatrix) -> TokenStore:
        """Tokens of in-memory raw counts (small data; the same layout as on disk)."""
        csr = sp.csr_matrix(counts, copy=True)
        csr.eliminate_zeros()  # a zero count is token 0: never stored
        csr.sort_indices()
        arrays = (np.asarray(csr.indptr, dtype=np.int64),
                  csr.indices.astype(_index_dtype(csr.shape[1])),
                  quantize_counts(csr.data, dtype=np.uint16))
        digests = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]
        return cls(*arrays, csr.shape[1], fingerprint=_combined(digests))

    @classmethod
    def open(cls, path: str | os.PathLike, obs_names=None, genes=None) -> TokenStore:
        """Open the store written by :func:`write_tokens`; check it matches the data.

        obs_names / genes: when given, the processed data's cell and gene names; a store made
        from other data raises InputError.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise input_error(str(path), "tokens", "no meta.json: not a token store written by "
                              "`python -m lingshu tokenize`", "re-run the tokenize rule")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise input_error(str(meta_path), "format", f"format {meta.get('format')!r}, expected "
                              f"{FORMAT!r}", "re-run the tokenize rule with this version")
        if obs_names is not None and names_sha256(obs_names) != meta["obs_names_sha256"]:
            raise input_error(str(path), "tokens", "the tokens were made from other cells than the "
                              "processed data", "re-run the tokenize rule after preprocessing")
        if genes is not None and [str(g) for g in genes] != meta["genes"]:
            raise input_error(str(path), "tokens", "the tokens were made over other genes than the "
                              "processed data", "re-run the tokenize rule after preprocessing")
        try:
            indptr = np.load(path / "indptr.npy")
            indices, values = NpyRanges(path / "indices.npy"), NpyRanges(path / "values.npy")
        except (OSError, ValueError) as err:
            raise input_error(str(path), "tokens", f"unreadable arrays ({err})",
                              "delete the folder and re-run the tokenize rule") from err
        if indptr.shape != (meta["n_cells"] + 1,) or len(indices) != meta["nnz"] \
                or len(values) != meta["nnz"] or int(indptr[-1]) != meta["nnz"]:
            raise input_error(str(path), "tokens",
                              "the arrays do not match meta.json (a partial or damaged store)",
                              "delete the folder and re-run the tokenize rule")
        return cls(indptr, indices, values, n_genes=meta["n_genes"], fingerprint=meta["sha256"])

    def subset(self, rows: np.ndarray) -> TokenStore:
        """The cells ``rows`` (indices into this store), without copying any token."""
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self.rows is None else self.rows[rows]
        return TokenStore(self.indptr, self.indices, self.values, self.n_genes,
                          self._fingerprint, rows=base)

    # -------------------------------------------------------------- reading
    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1 if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_cells, self.n_genes

    def fingerprint(self) -> str:
        """A hash of the tokens and the selected rows (for resumable training state)."""
        h = hashlib.sha256(self._fingerprint.encode())
        if self.rows is not None:
            h.update(self.rows.tobytes())
        return h.hexdigest()

    def dense(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), n_genes) int64 tokens of the cells ``idx`` (in the order given)."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = idx if self.rows is None else self.rows[idx]
        starts = np.asarray(self.indptr[rows], dtype=np.int64)
        lengths = np.asarray(self.indptr[rows + 1], dtype=np.int64) - starts
        out = np.zeros((len(rows), self.n_genes), dtype=np.int64)
        total = int(lengths.sum())
        if total == 0:
            return out
        which = np.repeat(np.arange(len(rows)), lengths)  # the output row of each stored token
        if isinstance(self.indices, NpyRanges):
            order = np.argsort(starts, kind="stable")  # read the files in file order
            genes = self.indices.ranges(starts[order], lengths[order])
            tokens = self.values.ranges(starts[order], lengths[order])
            which = np.repeat(order, lengths[order])
        else:  # in memory: positions of every stored token of the chosen rows, row after row
            pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
            genes, tokens = self.indices[pos], self.values[pos]
        out[which, genes.astype(np.int64)] = tokens
        return out


def write_tokens(processed: str | os.PathLike, out_dir: str | os.PathLike,
                 progress: bool = False) -> dict:
    """Tokenise the processed h5ad's counts into ``out_dir``, streaming; return meta.json's dict.

    The counts are read one row block (about BLOCK_VALUES nonzeros) at a time and written into
    sequentially written .npy files; the folder appears only when complete.
    """
    processed, out_dir = str(processed), Path(out_dir)
    with h5py.File(processed, "r") as f:
        obs_names = ad.io.read_elem(f["obs"]).index
        genes = [str(g) for g in ad.io.read_elem(f["var"]).index]
        if f["X"].attrs.get("encoding-type") != "csr_matrix":
            raise input_error(processed, "X", "the counts are not stored as CSR",
                              "re-run the preprocess rule (it writes CSR int32 counts)")
        X = ad.io.sparse_dataset(f["X"])
        n_cells, n_genes = X.shape
        nnz = int(f["X"]["data"].shape[0])
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            indptr = _NpyWriter(tmp / "indptr.npy", np.int64, n_cells + 1)
            indices = _NpyWriter(tmp / "indices.npy", _index_dtype(n_genes), nnz)
            values = _NpyWriter(tmp / "values.npy", np.uint16, nnz)
            indptr.write(np.zeros(1, dtype=np.int64))
            step = max(1, int(BLOCK_VALUES // max(1.0, nnz / max(1, n_cells))))
            for start in tqdm(range(0, n_cells, step), desc="tokenising", unit="block",
                              disable=not progress):
                block = sp.csr_matrix(X[start:start + step])
                block.sort_indices()
                if block.nnz and (block.data <= 0).any():
                    raise input_error(processed, "X", "zero or negative stored counts",
                                      "re-run the preprocess rule (it removes explicit zeros)")
                indptr.write(indices.done + np.asarray(block.indptr[1:], dtype=np.int64))
                indices.write(block.indices)
                values.write(quantize_counts(block.data, dtype=np.uint16))
            digests = [w.close() for w in (indptr, indices, values)]
            meta = {"format": FORMAT, "n_cells": int(n_cells), "n_genes": int(n_genes), "nnz": nnz,
                    "index_dtype": _index_dtype(n_genes).name, "sha256": _combined(digests),
                    "obs_names_sha256": names_sha256(obs_names), "genes": genes,
                    "processed": os.path.abspath(processed)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            os.chmod(tmp, 0o777 & ~_umask())
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
