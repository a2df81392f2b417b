"""The pipeline's stages as plain functions over files: what each Snakemake rule calls.

processed.h5ad + split -> features.tsv -> model.npz -> predictions/<model>.h5ad, and
processed.h5ad + split -> truth.h5ad. The evaluation and the report live in
:mod:`lingshu.evaluate` and :mod:`lingshu.report`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.constants import (
    BATCH_COL,
    CONTEXT_COL,
    PERT_COL,
    SPLIT_CONTROL_INPUT,
    SPLIT_TEST,
    SPLIT_TRAIN,
)
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import Split
from lingshu.errors import input_error
from lingshu.io import read_table, write_table
from lingshu.models.base import ConditionInput, PerturbationModel, TrainingData
from lingshu.models.features import SOURCE_COL, embedding_rows, perturbation_features

log = logging.getLogger(__name__)


def _rows(adata: ad.AnnData, split: Split, column: str) -> np.ndarray:
    """Integer rows of ``adata`` whose cells have ``column`` True in the split."""
    if not adata.obs_names.equals(pd.Index(split.cells.index)):
        raise ValueError("the split does not match the processed data (cell names differ); "
                         "re-run the split rule after preprocessing")
    return np.flatnonzero(split.cells[column].to_numpy())


def _count_rows(adata: ad.AnnData, rows: np.ndarray):
    """The counts of ``rows``: read on demand when ``adata`` is backed
    (:class:`~lingshu.data.rows.FileRows`: no model needs them all in memory), else in memory."""
    if adata.isbacked:
        from lingshu.data.rows import FileRows

        return FileRows(adata.filename, rows)
    return _counts(adata, rows)


def _counts(adata: ad.AnnData, rows: np.ndarray) -> sp.csr_matrix:
    """The counts of ``rows`` (in memory, or read from a backed file: only those rows)."""
    x = adata.X[rows]
    return sp.csr_matrix(x) if not sp.isspmatrix_csr(x) else x


def compute_features(adata: ad.AnnData, split: Split, entry: dict, n_components: int,
                     seed: int) -> pd.DataFrame:
    """Perturbation features of every perturbation, from training cells only (SPEC 1.2a).

    Only the training cells the gene embedding samples are read (:func:`embedding_rows`).
    """
    train = _rows(adata, split, SPLIT_TRAIN)
    train = train[embedding_rows(train.size, seed)]
    return perturbation_features(
        perturbations=sorted(set(adata.obs[PERT_COL].astype(str))),
        genes=adata.var_names.to_numpy(),
        train_log=log1p_cp10k(_counts(adata, train)),
        perturbation_type=entry.get("perturbation_type", "genetic"),
        combo_separator=entry.get("combo_separator", "+"),
        n_components=n_components,
        feature_file=entry.get("perturbation_features"),
        seed=seed,
    )


def perturbation_targets(labels, genes, entry: dict) -> dict[str, list[str]]:
    """Each perturbation's target genes that are in the panel (genetic data only)."""
    if entry.get("perturbation_type", "genetic") != "genetic":
        return {str(p): [] for p in labels}
    panel = set(map(str, genes))
    sep = entry.get("combo_separator", "+")
    return {str(p): [t for t in str(p).split(sep) if t in panel] for p in labels}


def training_data(adata: ad.AnnData, split: Split, features: pd.DataFrame | None,
                  seed: int, entry: dict | None = None, workdir: str | None = None,
                  threads: int = 1, include_control_input: bool = False,
                  tokens=None) -> TrainingData:
    """The training cells' counts and labels, with the shared perturbation features.

    include_control_input: also hand over the control input cells (for unconditional
    pre-training on every cell that is not held-out truth).
    tokens: a :class:`~lingshu.data.tokenstore.TokenStore` of every processed cell; the
        training cells' rows of it are handed over instead of their counts (which are then
        never read).
    With ``adata`` backed the counts are handed over as rows of the file, read on demand.
    """
    entry = entry or {}
    train = _rows(adata, split, SPLIT_TRAIN)  # also checks that the split matches the data
    if include_control_input:
        train = np.union1d(train, _rows(adata, split, SPLIT_CONTROL_INPUT))
    cols = [c for c in (PERT_COL, CONTEXT_COL, BATCH_COL) if c in adata.obs]
    obs = adata.obs.iloc[train][cols].astype(str).reset_index(drop=True)
    labels = sorted(set(adata.obs[PERT_COL].astype(str)))
    return TrainingData(counts=_count_rows(adata, train) if tokens is None else None, obs=obs,
                        genes=adata.var_names.to_numpy(), features=features, seed=seed,
                        targets=perturbation_targets(labels, adata.var_names, entry),
                        perturbation_type=entry.get("perturbation_type", "genetic"),
                        workdir=Path(workdir) if workdir else None, threads=threads,
                        tokens=None if tokens is None else tokens.subset(train))


def external_prior(external: ad.AnnData, adata: ad.AnnData, spec: dict, entry: dict,
                   path: str) -> pd.DataFrame:
    """The prior table of the dataset's perturbations from external data (SPEC 1.4).

    external: raw counts (maybe backed); only its control cells and the cells of the
    dataset's targets are read. spec: the entry's ``prior`` block. Genes outside the dataset's
    panel are dropped.
    """
    from lingshu.data.prior import prior_genes

    cols = spec["columns"]
    sep = entry.get("combo_separator", "+")
    labels = set(adata.obs[PERT_COL].astype(str))
    targets = {t for label in labels for t in label.split(sep)} | labels
    if cols["perturbation"] not in external.obs:
        raise input_error(path, "prior.columns.perturbation",
                          f"obs column {cols['perturbation']!r} is not in the external data; "
                          f"obs columns: {', '.join(map(str, external.obs.columns[:8]))}",
                          "set prior.columns.perturbation to the column of the target labels")
    ext = external.obs[cols["perturbation"]].astype(str).to_numpy()
    rows = np.flatnonzero(np.isin(ext, list(targets)) | (ext == str(cols["control"])))
    subset = external[rows]
    subset = subset.to_memory() if subset.isbacked else subset.copy()
    if spec.get("layer"):
        if spec["layer"] not in subset.layers:
            raise input_error(path, "prior.layer", f"layer {spec['layer']!r} is not in the file; "
                              f"layers: {', '.join(subset.layers) or '(none)'}",
                              "set prior.layer to the layer of raw counts, or remove it")
        subset.X = subset.layers[spec["layer"]]
    if spec.get("gene_column"):
        if spec["gene_column"] not in subset.var:
            raise input_error(path, "prior.gene_column",
                              f"var column {spec['gene_column']!r} is not in the file; var "
                              f"columns: {', '.join(map(str, subset.var.columns[:8])) or '(none)'}",
                              "set prior.gene_column to the var column of gene symbols, or remove it")
        subset.var_names = ad.utils.make_index_unique(
            pd.Index(subset.var[spec["gene_column"]].astype(str)))
    log.info("prior: %d external cells of %d (controls and the dataset's %d perturbations)",
             rows.size, external.n_obs, len(labels))
    return prior_genes(subset, cols["perturbation"], cols["control"],
                       context_col=cols.get("context"), genes=list(map(str, adata.var_names)),
                       fdr=spec["fdr"], min_abs_log2fc=spec["min_abs_log2fc"],
                       min_control_mean=spec["min_control_mean"],
                       max_perturbed_mean=spec["max_perturbed_mean"], combo_separator=sep,
                       path=path)


def prior_of_labels(table: pd.DataFrame, labels, entry: dict) -> dict[str, list[str]]:
    """perturbation label -> its prior genes, from a prior table (combinations: the union)."""
    from lingshu.data.prior import prior_table_for, targets_of_labels

    return prior_table_for(targets_of_labels(labels, entry.get("combo_separator", "+")), table)


def build_truth(adata: ad.AnnData, split: Split) -> ad.AnnData:
    """The evaluation truth: held-out cells plus the test contexts' control input cells.

    Returns log1p(CP10k) float32 CSR with obs ``perturbation``, ``context``,
    ``is_real_control``; the genes are those of the processed data, in its order.
    """
    test = _rows(adata, split, SPLIT_TEST)
    test_contexts = set(split.cells[CONTEXT_COL].to_numpy()[test])
    ctrl = _rows(adata, split, SPLIT_CONTROL_INPUT)
    ctrl = ctrl[np.isin(split.cells[CONTEXT_COL].to_numpy()[ctrl], list(test_contexts))]
    rows = np.concatenate([test, ctrl])
    obs = pd.DataFrame({
        PERT_COL: adata.obs[PERT_COL].astype(str).to_numpy()[rows],
        CONTEXT_COL: adata.obs[CONTEXT_COL].astype(str).to_numpy()[rows],
        "is_real_control": np.r_[np.zeros(test.size, bool), np.ones(ctrl.size, bool)],
    }, index=adata.obs_names[rows])
    truth = ad.AnnData(X=log1p_cp10k(_counts(adata, rows)), obs=obs,
                       var=pd.DataFrame(index=adata.var_names.copy()))
    truth.uns["lingshu"] = {"dataset": adata.uns.get("lingshu", {}).get("dataset", ""),
                            "space": "log1p_cp10k"}
    return truth


def predict_conditions(model: PerturbationModel, adata: ad.AnnData, split: Split,
                       truth: ad.AnnData, seed: int, progress: bool = True,
                       prior: dict[str, list[str]] | None = None) -> ad.AnnData:
    """Predict every test condition and append the truth's real control cells.

    Each condition gets as many cells as the truth holds for it; the model sees that context's
    control input cells (raw counts) and, with a ``prior`` (perturbation -> genes, see
    :func:`prior_of_labels`), the perturbation's prior genes. Returns an AnnData in the
    truth's gene order.
    """
    ctrl_rows = _rows(adata, split, SPLIT_CONTROL_INPUT)
    ctrl_context = split.cells[CONTEXT_COL].to_numpy()[ctrl_rows]
    conditions = split.test_conditions()
    blocks, obs_rows = [], []
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    inputs, controls_of = [], {}
    for row in conditions.itertuples(index=False):
        ctx, pert, n = getattr(row, CONTEXT_COL), getattr(row, PERT_COL), int(row.n_cells)
        if ctx not in controls_of:
            controls_of[ctx] = _counts(adata, ctrl_rows[ctrl_context == ctx])
        inputs.append(ConditionInput(ctx, pert, controls_of[ctx], n,
                                     prior_genes=tuple((prior or {}).get(pert, ()))))
    outputs = iter(model.predict_many(inputs, rng, progress=progress))
    for cond in inputs:
        x = next(outputs, None)
        if x is None:
            raise ValueError(f"{model.name} returned fewer predictions than the "
                             f"{len(inputs)} conditions")
        ctx, pert, n = cond.context, cond.perturbation, cond.n_cells
        if x.shape != (n, adata.n_vars):
            raise ValueError(f"{model.name} returned shape {x.shape} for {ctx}/{pert}; "
                             f"expected {(n, adata.n_vars)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{model.name} returned non-finite values for {ctx}/{pert}")
        blocks.append(sp.csr_matrix(x.astype(np.float32)))
        obs_rows.append(pd.DataFrame({PERT_COL: pert, CONTEXT_COL: ctx,
                                      "is_real_control": False}, index=range(n)))
    controls = truth[truth.obs["is_real_control"].to_numpy()]
    pred_obs = pd.concat(obs_rows, ignore_index=True)
    pred_obs.index = [f"pred_{i}" for i in range(len(pred_obs))]
    ctrl_obs = controls.obs[[PERT_COL, CONTEXT_COL, "is_real_control"]].copy()
    x = sp.vstack(blocks + [sp.csr_matrix(controls.X)], format="csr")
    pred = ad.AnnData(X=x, obs=pd.concat([pred_obs, ctrl_obs]),
                      var=pd.DataFrame(index=truth.var_names.copy()))
    pred.uns["lingshu"] = {"model": model.name, "space": "log1p_cp10k",
                           "predict_seconds": time.perf_counter() - start}
    return pred


def write_features_used(features: pd.DataFrame | None, conditions: pd.DataFrame,
                        path: str) -> None:
    """Write, for each test condition, which perturbation features the models were given."""
    table = conditions[[CONTEXT_COL, PERT_COL]].copy()
    if features is None:
        table[SOURCE_COL] = "none"
    else:
        table[SOURCE_COL] = [features[SOURCE_COL].get(p, "unknown") for p in table[PERT_COL]]
    write_table(table, path)


def read_features(path: str) -> pd.DataFrame:
    """Read the features table written by the features rule."""
    table = read_table(path).set_index("perturbation")
    table.index = table.index.astype(str)
    return table
