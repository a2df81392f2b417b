"""Expression space shared by the truth, the predictions and the baselines: log1p(CP10k)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lingshu.constants import TARGET_SUM


def dense64(x) -> np.ndarray:
    """``x`` (sparse or dense) as a dense float64 array (a copy only when needed)."""
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def log1p_cp10k(counts, target_sum: float = TARGET_SUM) -> sp.csr_matrix | np.ndarray:
    """Return log1p(counts / library_size * target_sum) as float32, keeping sparsity.

    counts: (n_cells, n_genes) integer or float counts, CSR/CSC or dense.
    Cells with zero counts stay all-zero (no division by zero).
    """
    if sp.issparse(counts):
        x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        lib = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
        np.log1p(x.data, out=x.data)
        return x
    x = np.asarray(counts, dtype=np.float32)
    lib = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale)
