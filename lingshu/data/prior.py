"""Prior gene sets for Lingshu-Cell's prior injection (SPEC 1.4).

For a genetic perturbation, the genes that the same target strongly down-regulates in *other*
data (other cell lines, an external screen) are known before sampling: the sampler starts them
at count 1 and keeps them fixed. This module finds those genes in an external AnnData and turns
them into one gene list per perturbation label of the model's dataset.

- :func:`prior_genes` runs a pdex-style differential expression per context (cell line): each
  perturbation's cells against that context's control cells, a two-sided Wilcoxon rank-sum
  (Mann-Whitney U) test per gene on log1p(CP10k), Benjamini-Hochberg across genes, and keeps the
  strongly down-regulated genes (plus the target gene itself).
- :func:`prior_table_for` maps the model's perturbation labels (combinations included) to
  sorted gene lists.
- :func:`write_prior` / :func:`read_prior` store the table as TSV.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import false_discovery_control, mannwhitneyu

from lingshu.config import DatasetEntry
from lingshu.constants import PERT_COL, TARGET_SUM
from lingshu.errors import configured_source, input_error
from lingshu.io import read_table, write_table

log = logging.getLogger(__name__)

PRIOR_COLUMNS = ["perturbation", "gene", "reason", "context", "n_contexts",
                 "log2fc", "control_mean", "perturbed_mean", "padj"]
REASON_TARGET = "target"  # the perturbation's own target gene: included whatever the test says
REASON_DE = "de"  # passed the down-regulation thresholds in at least one context
LOG2FC_EPS = 1e-9  # added to both CP10k means so that log2fc stays finite when one is zero
BLOCK_ELEMENTS = 1 << 24  # dense values per gene block of one context: bounds the temporary memory
N_SHOWN = 8  # how many labels an error message lists

_STRING_COLUMNS = ["perturbation", "gene", "reason", "context"]
_FLOAT_COLUMNS = ["log2fc", "control_mean", "perturbed_mean", "padj"]


def _shown(items: Iterable[object]) -> str:
    items = [str(x) for x in items]
    head = ", ".join(repr(x) for x in items[:N_SHOWN])
    return head + (f" (+{len(items) - N_SHOWN} more)" if len(items) > N_SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _labels(obs: pd.DataFrame, col: str, arg: str, path: object) -> np.ndarray:
    """obs[col] as strings; errors when the column is missing or has unlabelled cells."""
    if col not in obs.columns:
        raise input_error(path, f"obs[{col!r}]",
                          f"the column named by `{arg}` is not in obs; "
                          f"obs columns: {_shown(obs.columns)}",
                          f"pass `{arg}=` one of the obs columns")
    n_missing = int(obs[col].isna().sum())
    if n_missing:
        raise input_error(path, f"obs[{col!r}]", f"{n_missing} cells have no label (NaN)",
                          "label every cell, or drop the unlabelled cells first")
    return obs[col].astype(str).to_numpy()


def _check_counts(x: sp.csr_matrix | np.ndarray, path: object) -> None:
    """Raw counts only: non-negative integers (log-normalised input would give wrong means)."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if values.size == 0:
        return
    if np.any(values < 0) or np.any(values != np.round(values)):
        raise input_error(path, "X",
                          "the matrix holds negative or non-integer values, not raw counts",
                          "pass an AnnData whose X holds the raw UMI counts "
                          "(e.g. copy layers['counts'] to X)")


def _check_thresholds(fdr: float, min_abs_log2fc: float, path: object) -> None:
    if not 0 < fdr <= 1:
        raise input_error(path, "fdr", f"{fdr} is not in (0, 1]",
                          "pass a false discovery rate such as 0.05")
    if min_abs_log2fc < 0:
        raise input_error(path, "min_abs_log2fc", f"{min_abs_log2fc} is negative",
                          "pass the absolute log2 fold change, e.g. 1.0")


# ---------------------------------------------------------------------------------------------
# Differential expression of one context
# ---------------------------------------------------------------------------------------------


def _context_tests(counts: sp.csc_matrix, library: np.ndarray, is_control: np.ndarray,
                   groups: dict[str, np.ndarray], progress: bool = False,
                   desc: str = "prior tests") -> dict[str, dict[str, np.ndarray]]:
    """Wilcoxon tests of each perturbation against the controls of one context.

    counts: (n_cells, n_genes) raw counts of the context (CSC, so that gene blocks slice fast);
    library: (n_cells,) total counts per cell; is_control: (n_cells,) bool;
    groups: perturbation -> row indices of its cells.
    Returns perturbation -> {"log2fc", "control_mean", "perturbed_mean", "padj"}, each (n_genes,).
    progress: a bar over the tests (gene blocks x perturbations), with its ETA.
    """
    from tqdm.auto import tqdm

    n_cells, n_genes = counts.shape
    scale = np.divide(TARGET_SUM, library, out=np.zeros(n_cells), where=library > 0)
    block = max(1, BLOCK_ELEMENTS // max(n_cells, 1))
    keys = ("log2fc", "control_mean", "perturbed_mean", "pvalue")
    stats = {p: {k: np.empty(n_genes) for k in keys} for p in groups}
    bar = tqdm(total=-(-n_genes // block) * len(groups), desc=desc, unit="test",
               disable=not progress)
    for start in range(0, n_genes, block):
        cols = slice(start, min(start + block, n_genes))
        raw = counts[:, cols].toarray().astype(np.float64)  # (n_cells, block)
        cp10k = raw * scale[:, None]
        logx = np.log1p(cp10k)
        ctrl_raw, ctrl_cp = raw[is_control].mean(0), cp10k[is_control].mean(0)
        ctrl_log = logx[is_control]
        for pert, rows in groups.items():
            out = stats[pert]
            out["control_mean"][cols] = ctrl_raw
            out["perturbed_mean"][cols] = raw[rows].mean(0)
            pert_cp = cp10k[rows].mean(0)
            out["log2fc"][cols] = np.log2((pert_cp + LOG2FC_EPS) / (ctrl_cp + LOG2FC_EPS))
            with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                # constant genes (all zero in both groups) give NaN: no evidence, p = 1
                p = mannwhitneyu(logx[rows], ctrl_log, axis=0, alternative="two-sided",
                                 method="asymptotic").pvalue
            out["pvalue"][cols] = np.nan_to_num(p, nan=1.0)
            bar.update(1)
    bar.close()
    for out in stats.values():
        out["padj"] = false_discovery_control(out.pop("pvalue"), method="bh")
    return stats


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def prior_genes(adata: ad.AnnData, perturbation_col: str, control_label: str,
                context_col: str | None = None, genes: Sequence[str] | None = None,
                fdr: float = 0.05, min_abs_log2fc: float = 1.0, min_control_mean: float = 2.0,
                max_perturbed_mean: float = 1.0, combo_separator: str = "+", min_cells: int = 3,
                path: object = "<external AnnData>", progress: bool = False) -> pd.DataFrame:
    """Genes each perturbation strongly down-regulates in external data, plus its target(s).

    adata: (n_cells, n_genes) raw integer counts in X (CSR, CSC or dense), in memory.
    perturbation_col: obs column of the perturbation label; ``control_label`` marks the
    control cells; combination labels ``"A+B"`` (``combo_separator``) are tested as one label.
    context_col: obs column of the cell line; each context is tested against its own controls.
    genes: the model's gene panel; rows for other genes are dropped (the tests themselves, and
    so the Benjamini-Hochberg correction, run over all genes of ``adata``, as pdex does).

    Per context and perturbation with at least ``min_cells`` cells: a two-sided Wilcoxon
    rank-sum test per gene on log1p(CP10k) against the context's controls (CP10k over the
    library of all genes in ``adata``), BH across genes. ``log2fc`` is log2 of the ratio of mean
    CP10k (perturbed over control, each + 1e-9). ``control_mean`` and ``perturbed_mean`` are
    mean **raw counts per cell** (not CP10k): "control mean > 2, perturbed mean < 1" then reads
    as "expressed at a few UMIs per control cell and nearly silenced".

    A gene is kept (``reason`` = "de") when in at least one context
    ``padj < fdr``, ``log2fc < -min_abs_log2fc``, ``control_mean > min_control_mean`` and
    ``perturbed_mean < max_perturbed_mean``; its statistics are those of the context where it
    falls most (``context``; ``n_contexts`` counts the contexts where it passed). Each target of
    a perturbation is kept (``reason`` = "target") when it is in ``genes`` (or, without a panel,
    in ``adata``), with the statistics of its most down-regulated context, or NaN when
    ``adata`` does not measure it. Up-regulated genes are never kept.

    Returns a DataFrame with columns :data:`PRIOR_COLUMNS`, one row per (perturbation, gene),
    sorted by perturbation, target rows first, then by log2fc.
    """
    _check_thresholds(fdr, min_abs_log2fc, path)
    obs = adata.obs
    perts = _labels(obs, perturbation_col, "perturbation_col", path)
    contexts = (_labels(obs, context_col, "context_col", path) if context_col
                else np.full(adata.n_obs, "(all cells)", dtype=object))
    control_label = str(control_label)
    if control_label not in set(perts):
        from lingshu.data.preprocess import _did_you_mean

        counts = pd.Series(perts).value_counts()
        guess = _did_you_mean(control_label, [str(x) for x in counts.index])
        hint = f"did you mean {guess!r}? " if guess is not None else ""
        raise input_error(path, f"obs[{perturbation_col!r}]",
                          f"no cell has the control label {control_label!r}; {hint}most frequent "
                          "labels: " + _shown(counts.index),
                          "pass `control_label=` the label of the control cells (in the config: "
                          "the prior's `columns.control`)")
    var_names = pd.Index(adata.var_names.astype(str))
    if var_names.has_duplicates:
        dup = var_names[var_names.duplicated()]
        raise input_error(path, "var_names", f"gene names occur more than once, e.g. {_shown(dup)}",
                          "make the gene names unique (adata.var_names_make_unique())")
    panel = None if genes is None else pd.Index(pd.unique(np.asarray(genes, dtype=str)))
    if panel is not None and len(panel) and not panel.isin(var_names).any():
        raise input_error(path, "var_names",
                          f"none of the {len(panel)} panel genes (e.g. {_shown(panel)}) "
                          "is measured",
                          "name genes the same way in both datasets (symbols vs Ensembl IDs)")
    x = adata.X
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    _check_counts(x, path)

    allowed = var_names if panel is None else panel
    in_allowed = var_names.isin(allowed)
    rows: list[pd.DataFrame] = []  # per (context, perturbation): genes that pass, and the targets
    for ctx in pd.unique(contexts):
        in_ctx = np.flatnonzero(contexts == ctx)
        ctx_perts = perts[in_ctx]
        is_control = ctx_perts == control_label
        if not is_control.any():
            raise input_error(path, f"obs[{perturbation_col!r}]",
                              f"context {ctx!r} (obs[{context_col!r}]) has no control cells "
                              f"labelled {control_label!r}",
                              "drop that context's cells, or add its control cells")
        labels, sizes = np.unique(ctx_perts[~is_control], return_counts=True)
        groups = {p: np.flatnonzero(ctx_perts == p)
                  for p, n in zip(labels, sizes, strict=True) if n >= min_cells}
        if not groups:
            continue
        counts = sp.csc_matrix(x[in_ctx], dtype=np.float64)
        library = np.asarray(counts.sum(axis=1)).ravel()
        for pert, stats in _context_tests(counts, library, is_control, groups, progress,
                                          f"prior tests ({ctx})").items():
            passed = ((stats["padj"] < fdr) & (stats["log2fc"] < -min_abs_log2fc)
                      & (stats["control_mean"] > min_control_mean)
                      & (stats["perturbed_mean"] < max_perturbed_mean))
            keep = in_allowed & (passed | var_names.isin(pert.split(combo_separator)))
            rows.append(pd.DataFrame({"perturbation": pert, "gene": var_names[keep],
                                      "context": ctx, "passed": passed[keep],
                                      **{k: v[keep] for k, v in stats.items()}}))

    labels = sorted(set(perts) - {control_label})
    targets = pd.DataFrame([(p, t) for p in labels for t in dict.fromkeys(p.split(combo_separator))
                            if t in allowed], columns=["perturbation", "gene"])
    return _select(rows, targets)


def _select(rows: list[pd.DataFrame], targets: pd.DataFrame) -> pd.DataFrame:
    """One row per (perturbation, gene) from the per-context rows; see :func:`prior_genes`.

    rows: per-context statistics of the genes that passed (``passed``) and of the targets;
    targets: (perturbation, gene) of every target in the panel, measured or not.
    """
    columns = ["perturbation", "gene", "context", "passed", *_FLOAT_COLUMNS]
    tests = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    tests = tests.sort_values("log2fc", kind="stable")  # first row of a pair: its strongest context
    key = ["perturbation", "gene"]
    de = tests[tests["passed"].astype(bool)]
    n_contexts = de.groupby(key).size().rename("n_contexts")
    de = de.drop_duplicates(key).join(n_contexts, on=key)
    de["reason"] = REASON_DE

    targets = targets.merge(tests.drop_duplicates(key), on=key, how="left")
    targets = targets.join(n_contexts, on=key)
    targets["n_contexts"] = targets["n_contexts"].fillna(0)
    targets["context"] = targets["context"].fillna("")  # a target the external data lacks
    targets["reason"] = REASON_TARGET

    de = de.merge(targets[key], on=key, how="left", indicator=True)
    de = de[de["_merge"] == "left_only"]
    frames = [f[PRIOR_COLUMNS] for f in (targets, de) if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PRIOR_COLUMNS)
    out = out.astype({c: str for c in _STRING_COLUMNS} | {c: float for c in _FLOAT_COLUMNS}
                     | {"n_contexts": int})
    out["is_de"] = out["reason"] != REASON_TARGET
    out = out.sort_values(["perturbation", "is_de", "log2fc", "gene"], kind="stable")
    return out.drop(columns="is_de").reset_index(drop=True)


def prior_table_for(targets_of: dict[str, list[str]], prior: pd.DataFrame) -> dict[str, list[str]]:
    """Prior genes of each perturbation label of the model's dataset.

    targets_of: label -> its single targets, e.g. ``{"A+B": ["A", "B"], "C": ["C"]}``
    (see :func:`targets_of_labels`). prior: a table from :func:`prior_genes` / :func:`read_prior`.
    A label gets the union of the prior genes of its targets and of the label itself, sorted and
    unique; a label with no external evidence gets ``[]`` (its target is added only when the
    external data perturbs that target).
    """
    labels = prior["perturbation"].astype(str)
    by_pert = prior["gene"].astype(str).groupby(labels).agg(set)
    table = {}
    for label, targets in targets_of.items():
        genes: set[str] = set()
        for key in dict.fromkeys([str(label), *map(str, targets)]):
            genes |= by_pert.get(key, set())
        table[str(label)] = sorted(genes)
    return table


def targets_of_labels(labels: Iterable[str], combo_separator: str = "+") -> dict[str, list[str]]:
    """label -> its single targets (``"A+B"`` -> ``["A", "B"]``), for :func:`prior_table_for`."""
    return {str(label): list(dict.fromkeys(str(label).split(combo_separator))) for label in labels}


def _check_columns(df: pd.DataFrame, path: object) -> None:
    missing = [c for c in PRIOR_COLUMNS if c not in df.columns]
    if missing:
        raise input_error(path, "columns", f"the prior table lacks columns {_shown(missing)}",
                          "write it with lingshu.data.prior.write_prior (columns: "
                          + ", ".join(PRIOR_COLUMNS) + ")")


def write_prior(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a prior table (columns :data:`PRIOR_COLUMNS`) as TSV, atomically."""
    _check_columns(df, path)
    write_table(df[PRIOR_COLUMNS], path)


def read_prior(path: str | os.PathLike) -> pd.DataFrame:
    """Read a prior table written by :func:`write_prior`, checking its columns."""
    df = read_table(path)
    _check_columns(df, path)
    df = df[PRIOR_COLUMNS].copy()
    for col in _STRING_COLUMNS:
        df[col] = df[col].fillna("").astype(str)  # "" (a target not measured) reads back as NaN
    return df.astype({c: float for c in _FLOAT_COLUMNS} | {"n_contexts": int})


def external_prior(external: ad.AnnData, adata: ad.AnnData, entry: DatasetEntry,
                   path: str, progress: bool = False) -> pd.DataFrame:
    """The prior table of the dataset's perturbations from external data (SPEC 1.4).

    external: raw counts (maybe backed); only its control cells and the cells of the
    dataset's targets are read; the entry's ``prior`` block says which columns hold what.
    Genes outside the dataset's panel are dropped.
    """
    spec = entry.prior
    if spec is None:
        raise ValueError(f"dataset {entry.name} has no prior block")
    cols = spec["columns"]
    sep = entry.combo_separator
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
                       path=path, progress=progress)


def prior_of_labels(table: pd.DataFrame, labels, entry: DatasetEntry) -> dict[str, list[str]]:
    """perturbation label -> its prior genes, from a prior table (combinations: the union)."""
    return prior_table_for(targets_of_labels(labels, entry.combo_separator), table)


def prior_job(external_path: str, processed_path: str, entry: DatasetEntry, out: str) -> None:
    """The ``prior`` rule: the prior genes of the dataset's perturbations, to ``out``."""
    from lingshu.data.preprocess import _open_h5

    # Errors name the dataset entry and the file the user configured, not the pipeline's link.
    where = configured_source(entry.name, (entry.prior or {}).get("source"), external_path,
                              block="prior.source")
    _open_h5(external_path, where).close()  # a clear error for a missing or unreadable file
    external = ad.read_h5ad(external_path, backed="r")
    processed = ad.read_h5ad(processed_path, backed="r")
    table = external_prior(external, processed, entry, path=where, progress=True)
    write_prior(table, out)
    n = table.groupby("perturbation").size()
    log.info("prior: %d genes for %d perturbations (median %.0f per perturbation)", len(table),
             len(n), float(n.median()) if len(n) else 0.0)
