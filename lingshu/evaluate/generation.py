"""Generation fidelity (SPEC 2.2): generated cells scored against real cells no model trained on.

generation/<run>.h5ad (the ``generate`` rule, one per generating run) + processed.h5ad + split
-> generation/table.tsv, cell_types.tsv, reference.h5ad (the ``generation_eval`` rule, one per
dataset). The report draws the figures from those files (:mod:`lingshu.report.generation`).

The real cells are the split's *reference* cells: a seeded random sample of the cells of
training conditions that no model trained on. Each model generates as many cells as there are
reference cells. A ``real (training cells)`` row compares an equally large random sample of
training cells with the same reference: the sampling floor no model can beat at that size. An
``independent genes`` row scores cells whose every gene is drawn on its own from the training
cells (:func:`independent_genes`): each gene's marginal exactly and no dependence between genes,
so a model that scores no better on a metric has learnt no gene-gene dependence it measures
(on cell-type shares, for instance: which type a cell is).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.constants import CONTEXT_COL, SPLIT_REFERENCE, SPLIT_TRAIN
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import Split
from lingshu.evaluate.fidelity import (
    CELL_TYPE,
    FIDELITY_METRICS,
    celltype_proportions,
    fidelity_metrics,
)
from lingshu.io import write_h5ad, write_table

log = logging.getLogger(__name__)

REAL_FLOOR = "real (training cells)"
REAL_REFERENCE = "real (reference cells)"
INDEPENDENT = "independent genes (training marginals)"
MAX_CLASSIFIER_CELLS = 4000  # training cells the cell-type classifier learns from (at most)
TABLE_COLUMNS = FIDELITY_METRICS  # the layout of the paper's Table 1
TABLE, CELL_TYPES, REFERENCE = "table.tsv", "cell_types.tsv", "reference.h5ad"


def _real(adata: ad.AnnData, rows: np.ndarray) -> ad.AnnData:
    counts = sp.csr_matrix(adata.X[rows], dtype=np.float32)
    out = ad.AnnData(X=sp.csr_matrix(log1p_cp10k(counts), dtype=np.float32),
                     obs=pd.DataFrame({CELL_TYPE: adata.obs[CONTEXT_COL].astype(str)
                                       .to_numpy()[rows]}, index=adata.obs_names[rows]),
                     var=pd.DataFrame(index=adata.var_names.astype(str)))
    out.layers["counts"] = counts
    return out


def independent_genes(pool: ad.AnnData, n_cells: int, rng: np.random.Generator) -> ad.AnnData:
    """``n_cells`` cells whose count of each gene is that gene's count in a random cell of
    ``pool`` (raw counts in ``layers['counts']``), drawn for every gene on its own: the pool's
    marginal of every gene and no dependence between genes. Same layout as the real sets
    (log1p(CP10k) in X, counts in ``layers['counts']``)."""
    counts = sp.csc_matrix(pool.layers["counts"])  # (pool, G): one column per gene
    picks = rng.integers(0, pool.n_obs, size=(n_cells, pool.n_vars))  # (n, G) pool rows
    drawn = np.empty((n_cells, pool.n_vars), dtype=np.float32)
    for g in range(pool.n_vars):
        drawn[:, g] = counts[:, g].toarray().ravel()[picks[:, g]]
    out = sp.csr_matrix(drawn)
    cells = ad.AnnData(X=sp.csr_matrix(log1p_cp10k(out), dtype=np.float32),
                       obs=pd.DataFrame(index=[f"independent_{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=pool.var_names))
    cells.layers["counts"] = out
    return cells


def count_profile(cells: ad.AnnData) -> dict[str, float]:
    """Median library size (total counts) and mean number of detected genes (count > 0) per
    cell, from ``layers['counts']``; NaN for both when the cells carry no counts."""
    counts = cells.layers.get("counts") if cells.layers is not None else None
    if counts is None or cells.n_obs == 0:
        return {"library_size": np.nan, "detected_genes": np.nan}
    counts = sp.csr_matrix(counts)
    return {"library_size": float(np.median(np.asarray(counts.sum(axis=1)).ravel())),
            "detected_genes": float(np.mean(np.diff((counts > 0).tocsr().indptr)))}


def evaluate_generation(adata: ad.AnnData, split: Split, generated: dict[str, str],
                        outdir: str | Path, seed: int = 0) -> pd.DataFrame:
    """Score every run's generated cells against the reference cells.

    adata: the processed data (raw counts); generated: run -> generation/<run>.h5ad.
    Writes into ``outdir``: ``table.tsv`` (one row per run with the fidelity metrics and each
    set's median library size and mean detected genes per cell, then the sampling floor, the
    independent-genes row (:func:`independent_genes`) and the reference cells' cell-type
    shares as the same classifier labels them, which every row's ``celltype_tvd`` is
    measured against), ``cell_types.tsv`` (the cell type the real-cell
    classifier gives each generated cell: run, cell, cell_type) and ``reference.h5ad`` (the
    reference cells: log1p(CP10k) in X, counts in ``layers['counts']``, obs ``cell_type``).
    Returns the table.
    """
    out = Path(outdir)
    ref_rows = split.rows(SPLIT_REFERENCE, adata.obs_names)
    if ref_rows.size < 10:
        raise ValueError(f"only {ref_rows.size} reference cells; set split.reference_fraction "
                         "(and max_reference_cells) so that at least 10 cells are kept out")
    rng = np.random.default_rng(seed)
    train_rows = split.rows(SPLIT_TRAIN)
    shuffled = rng.permutation(train_rows)
    floor_rows = np.sort(shuffled[: ref_rows.size])
    clf_rows = np.sort(shuffled[ref_rows.size:][:MAX_CLASSIFIER_CELLS])
    if clf_rows.size < 10:  # tiny data: the classifier shares cells with the floor sample
        clf_rows = np.sort(shuffled[:MAX_CLASSIFIER_CELLS])
    reference, floor, clf = _real(adata, ref_rows), _real(adata, floor_rows), _real(adata, clf_rows)
    ref_labels = reference.obs[CELL_TYPE].to_numpy()

    sets: dict[str, ad.AnnData] = {}
    for run, path in generated.items():
        gen = ad.read_h5ad(path)
        if list(gen.var_names) != list(reference.var_names):
            raise ValueError(f"{path}: its genes differ from the processed data's; re-run the "
                             "generate rule")
        sets[run] = gen
    sets[REAL_FLOOR] = floor
    # drawn from the classifier's training cells, by a generator of its own so that every
    # other draw (and so every other row) is as it was without this row
    sets[INDEPENDENT] = independent_genes(clf, ref_rows.size, np.random.default_rng([seed, 1]))

    rows, labels = [], []
    for name, cells in sets.items():
        start = time.perf_counter()
        metrics = fidelity_metrics(reference.X, cells.X, seed=seed)
        props = celltype_proportions(clf.X, clf.obs[CELL_TYPE].to_numpy(), reference.X,
                                     ref_labels, cells.X, seed=seed)
        metrics.update(celltype_tvd=props["tvd"], celltype_accuracy=props["accuracy"])
        if name not in (REAL_FLOOR, INDEPENDENT):
            labels.append(pd.DataFrame({"run": name, "cell": cells.obs_names.astype(str),
                                        CELL_TYPE: np.asarray(props["predicted_labels"])}))
        rows.append({"model": name, **{k: metrics.get(k, np.nan) for k in TABLE_COLUMNS},
                     "celltype_accuracy": metrics.get("celltype_accuracy", np.nan),
                     "n_cells": cells.n_obs, **count_profile(cells),
                     "generate_seconds": cells.uns.get("lingshu", {}).get("generate_seconds",
                                                                          np.nan),
                     **{f"share {k}": v for k, v in sorted(props["generated"].items())}})
        log.info("%s scored in %.1f s: %s", name, time.perf_counter() - start, rows[-1])
    real_shares = celltype_proportions(clf.X, clf.obs[CELL_TYPE].to_numpy(), reference.X,
                                       ref_labels, reference.X, seed=seed)["real"]
    rows.append({"model": REAL_REFERENCE, "n_cells": reference.n_obs, **count_profile(reference),
                 **{f"share {k}": v for k, v in sorted(real_shares.items())}})
    table = pd.DataFrame(rows)
    write_table(table, out / TABLE)
    write_table(pd.concat(labels, ignore_index=True) if labels
                else pd.DataFrame(columns=["run", "cell", CELL_TYPE]), out / CELL_TYPES)
    write_h5ad(reference, out / REFERENCE)
    return table
