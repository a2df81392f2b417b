"""Expression space shared by the truth, the predictions and the baselines: log1p(CP10k)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lingshu.constants import TARGET_SUM


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


def group_means(x, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean row of ``x`` per label without densifying ``x``.

    x: (n_cells, n_genes) sparse or dense; labels: (n_cells,) hashable.
    Returns (unique_labels (k,), means (k, n_genes) float64).
    """
    uniq, inverse = np.unique(np.asarray(labels), return_inverse=True)
    n = len(labels)
    indicator = sp.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(len(uniq), n))
    sums = indicator @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    counts = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    return uniq, sums / counts[:, None]
