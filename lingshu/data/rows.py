"""The training cells' raw counts as rows read on demand (SPEC 1.1's data path at any scale).

A model never needs a dataset's whole count matrix at once: the baselines need per-condition
sums, scLDM needs mini-batches and encoder chunks, STATE needs its training file written. So
:class:`TrainingData.counts <lingshu.models.base.TrainingData>` may be a :class:`CountRows`:

- :class:`MemoryRows`: a CSR matrix in memory (tests, small data);
- :class:`FileRows`: chosen rows of a processed h5ad (CSR ``X``, as ``preprocess`` writes it),
  of which only the row pointers (8 bytes a cell) are held; every read takes just the rows it
  asks for, each run of consecutive rows in one positioned read per array.

Both give the same matrices and the same :meth:`CountRows.fingerprint`, so a model's numbers do
not depend on where its counts live.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

BLOCK_ROWS = 4096  # rows a block of :meth:`CountRows.blocks` holds


class CountRows:
    """Rows of a (n_cells, n_genes) raw count matrix, read on demand."""

    shape: tuple[int, int]

    def read(self, idx) -> sp.csr_matrix:
        """The rows ``idx`` (positions in this set, any order, repeats allowed) as CSR."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def read_all(self) -> sp.csr_matrix:
        """Every row (loads the whole matrix: for small data only)."""
        return self.read(np.arange(self.shape[0]))

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first row, CSR block) of consecutive rows, ``size`` (default
        :data:`BLOCK_ROWS`) rows at a time."""
        size = int(size or BLOCK_ROWS)
        for start in range(0, self.shape[0], size):
            yield start, self.read(np.arange(start, min(start + size, self.shape[0])))

    def fingerprint(self) -> str:
        """sha256 of the rows' contents (shape, value type, per-row lengths, indices, values);
        computed once (one pass over the rows)."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(repr((tuple(self.shape), str(self.dtype))).encode())
            for _, block in self.blocks():
                block.sort_indices()
                h.update(np.diff(block.indptr).astype(np.int64).tobytes())
                h.update(block.indices.astype(np.int64).tobytes())
                h.update(np.ascontiguousarray(block.data).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def as_count_rows(counts) -> CountRows:
    """``counts`` as a :class:`CountRows` (a CSR/dense matrix is wrapped, not copied)."""
    if isinstance(counts, CountRows):
        return counts
    if counts is None:
        raise ValueError("the training data carries no counts (a model that trains from "
                         "count tokens was handed its tokens instead)")
    return MemoryRows(counts)


class MemoryRows(CountRows):
    """A count matrix held in memory."""

    def __init__(self, counts) -> None:
        self.counts = counts if sp.isspmatrix_csr(counts) else sp.csr_matrix(counts)
        self.shape, self.dtype = tuple(self.counts.shape), self.counts.dtype

    def read(self, idx) -> sp.csr_matrix:
        return self.counts[np.asarray(idx, dtype=np.int64)]


class PositionedArray:
    """A 1-D array stored in a file, read by positioned reads (``os.pread``): only the ranges
    asked for ever reach memory. Unlike a memory map, nothing is mapped into the process, so
    its resident memory does not grow with the file as random batches touch it. Subclasses
    say where element ranges lie in the file (:meth:`_spans`)."""

    def __init__(self, path: Path, dtype, length: int) -> None:
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), (int(length),)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _spans(self, start: int, n: int) -> list[tuple[int, int]]:
        """(byte offset, byte count) pieces of the elements [start, start + n)."""
        raise NotImplementedError

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a new descriptor after a fork
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def ranges(self, starts, lengths) -> np.ndarray:
        """The values [s, s + n) of every (s, n), concatenated in the order given."""
        fd = self._descriptor()
        parts = [os.pread(fd, size, offset)
                 for s, n in zip(starts, lengths, strict=True) if n
                 for offset, size in self._spans(int(s), int(n))]
        return np.frombuffer(bytearray(b"".join(parts)), dtype=self.dtype)  # writable

    def __getstate__(self) -> dict:  # picklable (e.g. DataLoader workers): no descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}


class H5Ranges(PositionedArray):
    """A 1-D HDF5 dataset without filters (contiguous or chunked), read by positioned reads at
    the byte offsets HDF5 reports for its storage (chunks located once, at opening)."""

    def __init__(self, path: Path, dataset: h5py.Dataset) -> None:
        super().__init__(path, dataset.dtype, dataset.shape[0])
        if dataset.id.get_create_plist().get_nfilters():
            raise ValueError(f"{path}: {dataset.name} is stored with filters (compressed); "
                             "positioned reads need plain storage")
        self.chunk = int(dataset.chunks[0]) if dataset.chunks else 0
        if self.chunk:
            offsets = np.full(-(-self.shape[0] // self.chunk), -1, dtype=np.int64)
            for i in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(i)
                offsets[info.chunk_offset[0] // self.chunk] = info.byte_offset
            if (offsets < 0).any():
                raise ValueError(f"{path}: {dataset.name} has unwritten chunks")
            self.offsets = offsets
        else:
            base = dataset.id.get_offset()
            if base is None and self.shape[0]:
                raise ValueError(f"{path}: {dataset.name} has no storage")
            self.offsets = np.array([base or 0], dtype=np.int64)

    def _spans(self, start: int, n: int) -> list[tuple[int, int]]:
        size = self.dtype.itemsize
        if not self.chunk:
            return [(int(self.offsets[0]) + start * size, n * size)]
        out, end = [], start + n
        while start < end:
            k = start // self.chunk
            stop = min(end, (k + 1) * self.chunk)
            out.append((int(self.offsets[k]) + (start - k * self.chunk) * size,
                        (stop - start) * size))
            start = stop
        return out


class FileRows(CountRows):
    """Rows ``rows`` of the CSR count matrix ``X`` of an h5ad file, read on demand.

    Holds the file's row pointers (8 bytes a cell); the values and gene indices stay on disk
    and a read fetches only its rows' bytes, one positioned read per run of consecutive rows
    and array (h5py reads where the file's arrays are compressed).
    """

    def __init__(self, path: str | Path, rows=None) -> None:
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            x = f.get("X")
            kind = x.attrs.get("encoding-type") if isinstance(x, h5py.Group) else None
            if kind != "csr_matrix":
                raise ValueError(f"{self.path}: X is not a CSR matrix (encoding {kind!r}); "
                                 "read counts from the processed file the preprocess rule wrote")
            n_rows, n_cols = (int(v) for v in x.attrs["shape"])
            self.indptr = np.asarray(x["indptr"][:], dtype=np.int64)
            try:
                self.arrays = (H5Ranges(self.path, x["data"]), H5Ranges(self.path, x["indices"]))
            except ValueError:
                self.arrays = None  # filtered storage: h5py reads
            self.dtype = x["data"].dtype
        self.rows = (np.arange(n_rows, dtype=np.int64) if rows is None
                     else np.asarray(rows, dtype=np.int64))
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n_rows):
            raise IndexError(f"{self.path}: rows outside 0..{n_rows - 1}")
        self.shape = (int(self.rows.size), n_cols)

    def subset(self, idx) -> FileRows:
        """The rows ``idx`` of this set, still on disk."""
        out = copy.copy(self)
        out.rows = self.rows[np.asarray(idx, dtype=np.int64)]
        out.shape = (int(out.rows.size), self.shape[1])
        out._fingerprint = None
        return out

    def _read_ranges(self, starts: np.ndarray, lengths: np.ndarray):
        if self.arrays is not None:
            return tuple(a.ranges(starts, lengths) for a in self.arrays)
        with h5py.File(self.path, "r") as f:
            x = f["X"]
            spans = list(zip(starts, lengths, strict=True))
            return tuple(np.concatenate([x[key][s:s + n] for s, n in spans]
                                        or [np.zeros(0, x[key].dtype)])
                         for key in ("data", "indices"))

    def read(self, idx) -> sp.csr_matrix:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        wanted, inverse = np.unique(self.rows[idx], return_inverse=True)  # sorted file rows
        lengths = self.indptr[wanted + 1] - self.indptr[wanted]
        # Runs of consecutive file rows: one range of each array per run.
        first = np.flatnonzero(np.r_[True, np.diff(wanted) != 1])
        last = np.r_[first[1:], wanted.size] - 1
        starts = self.indptr[wanted[first]]
        data, indices = self._read_ranges(starts, self.indptr[wanted[last] + 1] - starts)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        unique = sp.csr_matrix((data, indices.astype(np.int32, copy=False), indptr),
                               shape=(wanted.size, self.shape[1]))
        return unique if np.array_equal(inverse, np.arange(wanted.size)) else unique[inverse]


def column_sums(rows: CountRows, select=None) -> np.ndarray:
    """(n_genes,) float64 sum over rows, streaming.

    select: an optional boolean mask over the rows; only those rows count.
    """
    total = np.zeros(rows.shape[1], dtype=np.float64)
    for start, block in rows.blocks():
        if select is not None:
            block = block[np.asarray(select[start:start + block.shape[0]], dtype=bool)]
        total += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
    return total


def row_sums(rows: CountRows) -> np.ndarray:
    """(n_cells,) float64 sum of each row (library sizes), streaming."""
    return np.concatenate([np.asarray(b.sum(axis=1), dtype=np.float64).ravel()
                           for _, b in rows.blocks()] or [np.zeros(0)])


def group_means(rows: CountRows, labels, transform: Callable | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean row per label, streaming over row blocks.

    labels: (n_cells,) one label per row. transform: applied to each block first (e.g.
    ``log1p_cp10k``). Returns (unique labels (k,), means (k, n_genes) float64).
    """
    labels = np.asarray(labels)
    if labels.shape[0] != rows.shape[0]:
        raise ValueError(f"group_means: {labels.shape[0]} labels for {rows.shape[0]} rows")
    uniq, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]), dtype=np.float64)
    for start, block in rows.blocks():
        inv = inverse[start:start + block.shape[0]]
        x = transform(block) if transform is not None else block
        indicator = sp.csr_matrix((np.ones(inv.size), (inv, np.arange(inv.size))),
                                  shape=(len(uniq), inv.size))
        part = indicator @ x
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
    counts = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    return uniq, sums / counts[:, None]


def read_rows(adata, rows: np.ndarray) -> sp.csr_matrix:
    """The counts of ``rows`` of an AnnData in memory or backed (then only those rows are read)."""
    x = adata.X[rows]
    return sp.csr_matrix(x) if not sp.isspmatrix_csr(x) else x


def rows_on_demand(adata, rows: np.ndarray):
    """The counts of ``rows``: a :class:`FileRows` when ``adata`` is backed (read on demand, so
    no model needs them all in memory), else a CSR matrix in memory."""
    if adata.isbacked:
        return FileRows(adata.filename, rows)
    return read_rows(adata, rows)
