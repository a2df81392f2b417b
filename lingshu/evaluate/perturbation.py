"""Perturbation-prediction metrics: cell-eval per context, the paper's summaries and scores.

The metrics themselves are cell-eval's (``MetricsEvaluator``, full profile); this module only
feeds it one context at a time, gathers its per-condition tables and turns them into the figures
the paper reports (SPEC 2.1):

- :func:`evaluate_predictions` -> one row per (context, perturbation), every cell-eval metric;
- :func:`summarize` -> mean per context, then mean over contexts, plus the Spearman of #DEG;
- :func:`average_score` / :func:`vcc_score` -> improvement over a baseline, via
  ``cell_eval.score_agg_metrics``;
- :func:`bootstrap_ci` -> 95% interval over test conditions.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp
from scipy.stats import ConstantInputWarning, rankdata, spearmanr
from tqdm.auto import tqdm

from lingshu.constants import CONTEXT_COL, CONTROL, NOT_ENCODED, PERT_COL
from lingshu.data.normalize import dense64
from lingshu.errors import input_error
from lingshu.io import write_json, write_table

log = logging.getLogger(__name__)

# The paper's seven metrics (Table 2) -> the column that holds them. "spearman_nsig" is not a
# cell-eval column: it is computed across conditions by summarize().
PAPER_METRICS = {
    "DES": "overlap_at_N",
    "PDS": "discrimination_score_l1",
    "MAE": "mae",
    "Spearman #DEG": "spearman_nsig",
    "Spearman LFC": "de_spearman_lfc_sig",
    "AUPRC": "pr_auc",
    "Pearson-delta": "pearson_delta",
}
# The Virtual Cell Challenge score uses these three only, against the cell-mean baseline.
VCC_METRICS = {"DES": "overlap_at_N", "PDS": "discrimination_score_l1", "MAE": "mae"}
# Metrics where lower is better (ranked ascending, improvement measured as (b - m) / b).
LOWER_IS_BETTER = {"mae", "mse", "mae_delta", "mse_delta"}

SPEARMAN_NSIG = "spearman_nsig"
NSIG_REAL, NSIG_PRED = "de_nsig_counts_real", "de_nsig_counts_pred"
ID_COLUMNS = [CONTEXT_COL, PERT_COL]
DISTRIBUTION = "distribution.tsv"  # per condition: predicted vs real cells' distribution
# Rows checked for the log1p format: enough to catch raw counts, cheap on any file size.
FORMAT_CHECK_ROWS = 2000


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _read(data: ad.AnnData | str, what: str, label: str | None = None) -> tuple[ad.AnnData, str]:
    """Return ``(adata, label)``; the label names the file in error messages (an AnnData
    read elsewhere keeps the ``label`` its reader gives, else ``<what AnnData>``)."""
    if isinstance(data, ad.AnnData):
        return data, label or f"<{what} AnnData>"
    path = Path(data)
    if not path.exists():
        raise input_error(path, "file", "does not exist", f"run the stage that writes the {what}")
    return ad.read_h5ad(path), str(path)


def _check_obs(adata: ad.AnnData, label: str) -> None:
    """Require the canonical obs columns (constants.PERT_COL, constants.CONTEXT_COL)."""
    for col in ID_COLUMNS:
        if col not in adata.obs.columns:
            raise input_error(
                label, f"obs['{col}']", "column missing", f"add obs['{col}'] (see lingshu.constants)"
            )


def _check_log1p(adata: ad.AnnData, label: str) -> None:
    """Reject raw counts: cell-eval would silently re-normalise integer data its own way."""
    rows = adata.X[: min(adata.n_obs, FORMAT_CHECK_ROWS)]
    values = rows.data if sp.issparse(rows) else np.asarray(rows).ravel()
    if values.size == 0:
        return
    fix = "store log1p(CP10k) float expression in X"
    if np.nanmin(values) < 0 or np.nanmax(values) >= 15:
        raise input_error(label, "X", "values outside the log1p range [0, 15)", fix)
    if not np.any(np.abs(np.modf(values)[0]) > 1e-3):
        raise input_error(label, "X", "looks like integer counts, not log1p(CP10k)", fix)


def _perturbations_by_context(adata: ad.AnnData) -> dict[str, set[str]]:
    """Map each context to the set of perturbation labels seen in it (control included)."""
    obs = adata.obs[ID_COLUMNS].astype(str)
    return {ctx: set(group[PERT_COL]) for ctx, group in obs.groupby(CONTEXT_COL)}


def not_encoded(pred: ad.AnnData) -> list[dict[str, str]]:
    """The conditions (context, perturbation, reason) the prediction's model could not encode
    (:class:`lingshu.models.base.ConditionNotEncodable`), from ``uns['lingshu']``."""
    value = pred.uns.get("lingshu", {}).get(NOT_ENCODED)
    return json.loads(value) if value else []


def without_conditions(truth: ad.AnnData, conditions: list[dict[str, str]]) -> ad.AnnData:
    """The truth without the cells of ``conditions``, and without the control cells of a
    context none of whose conditions is left (the model is scored on the rest only)."""
    if not conditions:
        return truth
    obs = truth.obs[ID_COLUMNS].astype(str)
    pairs = set(zip(obs[CONTEXT_COL], obs[PERT_COL]))
    drop = {(c["context"], c["perturbation"]) for c in conditions}
    unknown = sorted(drop - pairs)
    if unknown:
        raise ValueError(f"the prediction lists conditions as not encoded that the truth does "
                         f"not hold: {unknown[:5]}")
    keep = ~pd.Series(list(zip(obs[CONTEXT_COL], obs[PERT_COL])), index=obs.index).isin(drop)
    left = {c for c, p in pairs - drop if p != CONTROL}
    keep &= obs[CONTEXT_COL].isin(left)
    return truth[keep.to_numpy()].copy()


def validate_inputs(truth: ad.AnnData, pred: ad.AnnData, truth_label: str, pred_label: str) -> None:
    """Check that a prediction can be scored against the truth; raise InputError otherwise.

    Checked: obs columns, gene names and order, log1p format, control cells in every context
    of the truth, and the same perturbation labels per context (the truth's test conditions).
    The prediction holds the predicted cells only: cell-eval's input gets the truth's real
    control cells (:func:`context_pair`); control cells a prediction carries are not used.
    """
    for adata, label in ((truth, truth_label), (pred, pred_label)):
        _check_obs(adata, label)
        _check_log1p(adata, label)
    if not np.array_equal(truth.var_names.to_numpy(), pred.var_names.to_numpy()):
        first = next(
            (i for i, (a, b) in enumerate(zip(truth.var_names, pred.var_names)) if a != b),
            min(truth.n_vars, pred.n_vars),
        )
        raise input_error(
            pred_label,
            "var_names",
            f"genes differ from the truth ({pred.n_vars} vs {truth.n_vars} genes, first "
            f"difference at position {first})",
            "write predictions with the truth's genes in the truth's order",
        )
    truth_perts = _perturbations_by_context(truth)
    pred_perts = {ctx: labels - {CONTROL} for ctx, labels in _perturbations_by_context(pred).items()}
    pred_perts = {ctx: labels for ctx, labels in pred_perts.items() if labels}
    if set(truth_perts) != set(pred_perts):
        raise input_error(
            pred_label,
            f"obs['{CONTEXT_COL}']",
            f"contexts {sorted(pred_perts)} differ from the truth's {sorted(truth_perts)}",
            "predict every test context of the truth, and only those",
        )
    for ctx, labels in truth_perts.items():
        if CONTROL not in labels:
            raise input_error(
                truth_label,
                f"obs['{PERT_COL}']",
                f"no '{CONTROL}' cells in context '{ctx}'",
                "include the real control cells of every test context",
            )
        if labels - {CONTROL} != pred_perts[ctx]:
            missing = sorted(labels - {CONTROL} - pred_perts[ctx])
            extra = sorted(pred_perts[ctx] - labels)
            raise input_error(
                pred_label,
                f"obs['{PERT_COL}']",
                f"context '{ctx}': missing {missing[:5]}, unexpected {extra[:5]}",
                "predict exactly the truth's test conditions",
            )


# --------------------------------------------------------------------------------------------
# One context through cell-eval
# --------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    """A context label usable as a folder name (cell lines like 'HepG2/C3A' contain slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def _stack(blocks: list) -> np.ndarray | sp.csr_matrix:
    """Stack expression blocks row-wise as float32, sparse if any block is sparse."""
    if any(sp.issparse(b) for b in blocks):
        return sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr", dtype=np.float32)
    return np.vstack([np.asarray(b, dtype=np.float32) for b in blocks])


def _minimal(X, perts: np.ndarray, genes: pd.Index) -> ad.AnnData:
    """An AnnData holding only what cell-eval reads: X, obs['perturbation'] and the genes."""
    obs = pd.DataFrame({PERT_COL: perts.astype(str)}, index=[str(i) for i in range(len(perts))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes.astype(str)))


def context_pair(
    truth: ad.AnnData, pred: ad.AnnData | None, context: str
) -> tuple[ad.AnnData, ad.AnnData | None]:
    """Build cell-eval's (real, pred) pair for one context.

    real = the context's held-out cells + its control cells. pred = the context's predicted
    cells + the truth's control cells: a prediction file holds only what the model predicted,
    and the evaluation adds the real controls itself (PDS and DES compare against the
    *submitted* controls, so a model that supplied or edited its own could game them, SPEC
    2.1). Control cells a prediction does carry are not used (a differing copy logs a warning).
    """
    t_obs = truth.obs[ID_COLUMNS].astype(str)
    t_mask = (t_obs[CONTEXT_COL] == context).to_numpy()
    real = _minimal(truth.X[t_mask], t_obs.loc[t_mask, PERT_COL].to_numpy(), truth.var_names)
    if pred is None:
        return real, None
    is_ctrl = (real.obs[PERT_COL] == CONTROL).to_numpy()
    p_obs = pred.obs[ID_COLUMNS].astype(str)
    p_ctx = (p_obs[CONTEXT_COL] == context).to_numpy()
    p_pert = p_ctx & (p_obs[PERT_COL] != CONTROL).to_numpy()
    if (p_ctx & ~p_pert).any():
        _warn_if_controls_edited(real.X[is_ctrl], pred.X[p_ctx & ~p_pert], context)
    X = _stack([pred.X[p_pert], real.X[is_ctrl]])
    labels = np.concatenate([p_obs.loc[p_pert, PERT_COL].to_numpy(), np.full(is_ctrl.sum(), CONTROL)])
    return real, _minimal(X, labels, truth.var_names)


def _warn_if_controls_edited(real_ctrl, pred_ctrl, context: str) -> None:
    """Warn when the prediction's controls are not the truth's (their pseudobulks differ)."""
    real_mean = np.asarray(real_ctrl.mean(axis=0)).ravel()
    pred_mean = np.asarray(pred_ctrl.mean(axis=0)).ravel()
    gap = float(np.max(np.abs(real_mean - pred_mean))) if real_mean.size else 0.0
    if gap > 1e-4:
        log.warning(
            "context %s: predicted control cells differ from the real ones (max pseudobulk gap "
            "%.3g); scoring against the real controls",
            context,
            gap,
        )


def _run_cell_eval(
    real: ad.AnnData,
    pred: ad.AnnData | None,
    outdir: Path,
    threads: int,
    profile: str,
    ceiling: bool,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run cell-eval on one context; return its per-condition and aggregate tables (pandas)."""
    # Imported here: cell-eval pulls in numba-compiled pdex, slow to import for CLI --help.
    from cell_eval import MetricsEvaluator

    evaluator = MetricsEvaluator(
        adata_pred=None if ceiling else pred,
        adata_real=real,
        control_pert=CONTROL,
        pert_col=PERT_COL,
        num_threads=threads,
        outdir=str(outdir),
    )
    with warnings.catch_warnings():
        # Constant predictions (the control-mean baseline) leave pearson_edistance undefined:
        # cell-eval records NaN, the per-call scipy warning adds nothing.
        warnings.simplefilter("ignore", ConstantInputWarning)
        if ceiling:
            results, agg = evaluator.compute_ceiling(profile=profile, seed=seed)
        else:
            results, agg = evaluator.compute(profile=profile)
    return results.to_pandas(), agg.to_pandas()


def evaluate_predictions(
    truth: ad.AnnData | str,
    pred: ad.AnnData | str | None,
    outdir: str,
    threads: int = 1,
    profile: str = "full",
    ceiling: bool = False,
    seed: int = 0,
    progress: bool = True,
    labels: tuple[str | None, str | None] = (None, None),
) -> pd.DataFrame:
    """Score a prediction against the truth with cell-eval, one context at a time.

    Args:
        truth: held-out cells of every test condition plus the real control cells (path or AnnData).
        pred: the predicted cells of every test condition (control cells it carries are not
            used: the truth's are); ignored (may be None) when ``ceiling``.
        outdir: receives ``per_condition.tsv`` and cell-eval's own CSVs under
            ``cell_eval/<context>/``; with ``ceiling`` also ``ceiling_agg.tsv``.
        threads: threads for cell-eval's differential expression (pdex).
        profile: cell-eval metric profile.
        ceiling: estimate the data ceiling from the truth alone (split-half) instead.
        seed: seed of the ceiling's split.
        progress: show a progress bar over contexts.
        labels: the files ``truth`` and ``pred`` were read from, when given as AnnData, for
            error messages.

    Returns:
        One row per (context, perturbation): ``context``, ``perturbation``, then every metric
        cell-eval produced. With ``ceiling`` these are the raw half-depth self-split scores.
    """
    truth, truth_label = _read(truth, "truth", labels[0])
    if ceiling:
        _check_obs(truth, truth_label)
        _check_log1p(truth, truth_label)
        if CONTROL not in set(truth.obs[PERT_COL].astype(str)):
            raise input_error(truth_label, f"obs['{PERT_COL}']", f"no '{CONTROL}' cells", "include the control cells")
        pred = None
    else:
        if pred is None:
            raise ValueError("evaluate_predictions: pred is required unless ceiling=True")
        pred, pred_label = _read(pred, "prediction", labels[1])
        truth = without_conditions(truth, not_encoded(pred))
        validate_inputs(truth, pred, truth_label, pred_label)

    out = Path(outdir)
    contexts = sorted(truth.obs[CONTEXT_COL].astype(str).unique())
    tables, aggs = [], []
    for ctx in tqdm(contexts, desc="cell-eval contexts", disable=not progress):
        real, pred_ctx = context_pair(truth, pred, ctx)
        results, agg = _run_cell_eval(
            real, pred_ctx, out / "cell_eval" / _safe_name(ctx), threads, profile, ceiling, seed
        )
        results.insert(0, CONTEXT_COL, ctx)
        tables.append(results)
        aggs.append(agg.assign(**{CONTEXT_COL: ctx}))

    per_condition = pd.concat(tables, ignore_index=True)
    per_condition[PERT_COL] = per_condition[PERT_COL].astype(str)
    write_table(per_condition, out / "per_condition.tsv")
    if ceiling:
        ceiling_agg = pd.concat(aggs, ignore_index=True)
        ceiling_agg = ceiling_agg[[CONTEXT_COL] + [c for c in ceiling_agg.columns if c != CONTEXT_COL]]
        write_table(ceiling_agg, out / "ceiling_agg.tsv")
    return per_condition


# --------------------------------------------------------------------------------------------
# Summaries and scores
# --------------------------------------------------------------------------------------------


def metric_columns(per_condition: pd.DataFrame) -> list[str]:
    """The numeric metric columns of a per-condition table (identifiers excluded)."""
    return [
        c
        for c in per_condition.columns
        if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(per_condition[c])
    ]


def spearman_nsig(per_condition: pd.DataFrame) -> float:
    """Spearman of the number of DEGs, real vs predicted, across all test conditions.

    NaN with fewer than 3 conditions or when either side is constant (no defined rank order).
    """
    if NSIG_REAL not in per_condition or NSIG_PRED not in per_condition:
        return float("nan")
    counts = per_condition[[NSIG_REAL, NSIG_PRED]].dropna()
    if len(counts) < 3 or counts[NSIG_REAL].nunique() < 2 or counts[NSIG_PRED].nunique() < 2:
        return float("nan")
    return float(spearmanr(counts[NSIG_REAL], counts[NSIG_PRED]).statistic)


def _context_balanced_mean(per_condition: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Mean per context, then mean over contexts, so every context weighs the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return per_condition.groupby(CONTEXT_COL)[columns].mean().mean()


def summarize(per_condition: pd.DataFrame) -> dict[str, float]:
    """Summarise a per-condition table: every metric's context-balanced mean + ``spearman_nsig``."""
    means = _context_balanced_mean(per_condition, metric_columns(per_condition))
    summary = {name: float(value) for name, value in means.items()}
    summary[SPEARMAN_NSIG] = spearman_nsig(per_condition)
    return summary


def spearman_brown(r: float) -> float:
    """Half-depth reliability -> full depth, ``2r / (1 + r)``; NaN where r <= 0.

    The same rule cell-eval applies to its ceiling aggregate (``_spearman_brown_correct``),
    repeated here for the Spearman of #DEG, which cell-eval does not aggregate.
    """
    return 2 * r / (1 + r) if np.isfinite(r) and r > 0 else float("nan")


def sampler_gene_error(cells: np.ndarray) -> np.ndarray:
    """(G,) each gene's expected |mean of n fresh cells - mean of these n cells| when the
    fresh cells come from the same distribution as ``cells`` (n, G): sqrt(2 / pi) *
    sqrt(2 var / n), var the gene's variance over ``cells`` (normal approximation). What a
    perfect sampler of a condition pays per gene in cell-eval's MAE (gene means)."""
    x = np.asarray(cells, dtype=np.float64)
    return np.sqrt(2.0 / np.pi) * np.sqrt(2.0 * x.var(axis=0, ddof=1) / x.shape[0])


def sampler_mae_floor(truth: ad.AnnData) -> float:
    """The MAE a perfect generative model expects: one that draws as many cells as the truth
    holds from each held-out condition's own distribution (the truth's cells are one such
    draw): :func:`sampler_gene_error` averaged over genes, then over conditions within a
    context, then over contexts (as :func:`summarize` averages). A model that predicts every
    condition's true mean exactly expects 1/sqrt(2) of it. Conditions with fewer than 2 cells
    are skipped; NaN if none is left.
    """
    obs = truth.obs
    keep = (obs[PERT_COL].astype(str) != CONTROL).to_numpy()
    if "is_real_control" in obs:
        keep &= ~obs["is_real_control"].to_numpy(dtype=bool)
    rows = []
    groups = obs[keep].groupby([CONTEXT_COL, PERT_COL], observed=True).indices
    positions = np.flatnonzero(keep)
    for (ctx, _pert), idx in groups.items():
        if len(idx) < 2:
            continue
        x = truth.X[positions[idx]]
        rows.append((ctx, float(sampler_gene_error(dense64(x)).mean())))
    if not rows:
        return float("nan")
    table = pd.DataFrame(rows, columns=[CONTEXT_COL, "floor"])
    return float(table.groupby(CONTEXT_COL)["floor"].mean().mean())


def ceiling_summary(ceiling_agg: pd.DataFrame, per_condition: pd.DataFrame) -> dict[str, float]:
    """The data ceiling: cell-eval's Spearman-Brown corrected aggregate, averaged over contexts.

    Metrics with no defensible ceiling (MAE, counts) come out NaN, as cell-eval emits them
    (:func:`evaluate_to_dir` then sets MAE to :func:`sampler_mae_floor`).
    ``spearman_nsig`` is the pooled split-half Spearman of #DEG, corrected the same way.
    """
    columns = [c for c in metric_columns(ceiling_agg) if c in per_condition.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = ceiling_agg[columns].mean()
    summary = {name: float(value) for name, value in means.items()}
    summary[SPEARMAN_NSIG] = spearman_brown(spearman_nsig(per_condition))
    return summary


def _agg_frame(summary: dict[str, float], metrics: list[str]) -> pl.DataFrame:
    """One summary as cell-eval's aggregate layout (``pl.describe``: a 'statistic' column)."""
    columns = {m: [float(summary.get(m, np.nan))] for m in metrics}
    return pl.DataFrame({"statistic": ["mean"], **columns})


def _improvement(model: float, base: float, lower_is_better: bool) -> float:
    """One term of the paper's score: the formula of ``score_agg_metrics``, clipped, NaN -> 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (base - model) / base if lower_is_better else (model - base) / (1 - base)
    return 0.0 if not np.isfinite(value) else max(float(value), 0.0)


def _scores_vs_baseline(model: dict, baseline: dict, metrics: list[str]) -> dict[str, float]:
    """Per-metric improvement over a baseline, clipped at 0; registered metrics via cell-eval."""
    from cell_eval import metrics_registry, score_agg_metrics

    registered = [m for m in metrics if m in metrics_registry.list_metrics()]
    scores: dict[str, float] = {}
    if registered:
        with np.errstate(divide="ignore", invalid="ignore"):
            scored = score_agg_metrics(_agg_frame(model, registered), _agg_frame(baseline, registered))
        scores.update(zip(scored["metric"].to_list(), scored["from_baseline"].to_list()))
    for m in metrics:
        if m not in registered:  # spearman_nsig: same formula, higher is better
            scores[m] = _improvement(model.get(m, np.nan), baseline.get(m, np.nan), m in LOWER_IS_BETTER)
    # score_agg_metrics clips at 0 but lets +inf through (baseline exactly 1 or 0): treat as 0.
    return {m: float(scores[m]) if np.isfinite(scores[m]) else 0.0 for m in metrics}


def average_score(model: dict[str, float], control_baseline: dict[str, float]) -> dict[str, float]:
    """The paper's average score over its seven metrics against the control-mean baseline.

    Per metric: MAE ``(b - m) / b``, others ``(m - b) / (1 - b)``; each clipped at 0, NaN -> 0.
    Returns those seven terms (keyed by column name) and their mean as ``average_score``.
    """
    scores = _scores_vs_baseline(model, control_baseline, list(PAPER_METRICS.values()))
    scores["average_score"] = float(np.mean(list(scores.values())))
    return scores


def vcc_score(model: dict[str, float], cell_mean_baseline: dict[str, float]) -> dict[str, float]:
    """The Virtual Cell Challenge score: DES, PDS and MAE against the perturbation-mean baseline."""
    scores = _scores_vs_baseline(model, cell_mean_baseline, list(VCC_METRICS.values()))
    scores["vcc_score"] = float(np.mean(list(scores.values())))
    return scores


def bootstrap_ci(
    per_condition: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of a summary statistic, resampling conditions.

    Conditions are drawn with replacement within each context (so every context keeps its
    size and weight), then the statistic of :func:`summarize` is recomputed: the
    context-balanced mean, or for ``spearman_nsig`` the pooled Spearman. NaN if undefined.
    When every context holds a single condition (e.g. one stimulation held out per cell
    type), within-context draws could not vary, so the conditions are pooled and drawn
    across contexts instead.
    """
    if n_boot < 1 or len(per_condition) == 0:
        return float("nan"), float("nan")
    if metric != SPEARMAN_NSIG and metric not in per_condition:
        raise KeyError(f"metric '{metric}' not in the per-condition table")
    if metric == SPEARMAN_NSIG and {NSIG_REAL, NSIG_PRED} <= set(per_condition.columns):
        per_condition = per_condition.dropna(subset=[NSIG_REAL, NSIG_PRED])  # as spearman_nsig does
    rng = np.random.default_rng(seed)
    groups = [g.reset_index(drop=True) for _, g in per_condition.groupby(CONTEXT_COL, sort=True)]
    if len(groups) > 1 and all(len(g) == 1 for g in groups):
        groups = [pd.concat(groups, ignore_index=True)]
    draws = [rng.integers(0, len(g), size=(n_boot, len(g))) for g in groups]
    if metric == SPEARMAN_NSIG:
        stats = _bootstrap_spearman_nsig(groups, draws)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_context = [np.nanmean(g[metric].to_numpy(float)[d], axis=1) for g, d in zip(groups, draws)]
            stats = np.nanmean(np.vstack(per_context), axis=0)
    if not np.any(np.isfinite(stats)):
        return float("nan"), float("nan")
    low, high = np.nanpercentile(stats, [2.5, 97.5])
    return float(low), float(high)


def _bootstrap_spearman_nsig(groups: list[pd.DataFrame], draws: list[np.ndarray]) -> np.ndarray:
    """Pooled Spearman of #DEG for every bootstrap draw at once: Pearson of row-wise ranks."""
    if NSIG_REAL not in groups[0] or NSIG_PRED not in groups[0]:
        return np.full(len(draws[0]), np.nan)
    real = np.hstack([g[NSIG_REAL].to_numpy(float)[d] for g, d in zip(groups, draws)])
    pred = np.hstack([g[NSIG_PRED].to_numpy(float)[d] for g, d in zip(groups, draws)])
    if real.shape[1] < 3 or np.isnan(real).any() or np.isnan(pred).any():
        return np.full(len(real), np.nan)
    ranks_real = rankdata(real, axis=1) - (real.shape[1] + 1) / 2  # centred ranks
    ranks_pred = rankdata(pred, axis=1) - (pred.shape[1] + 1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (ranks_real * ranks_pred).sum(1) / np.sqrt((ranks_real**2).sum(1) * (ranks_pred**2).sum(1))
    return np.where(np.isfinite(r), r, np.nan)  # a constant draw has no rank order


# --------------------------------------------------------------------------------------------
# CLI entry
# --------------------------------------------------------------------------------------------


def _run_record(pred_path: str) -> dict[str, object]:
    """The run that made a prediction: ``uns['lingshu']``'s ``run`` (else ``model``, else the
    file's stem) and its sampling settings (a dict; empty when none are recorded); for
    predictions made outside the pipeline (``external``), ``external``: their source file, its
    sha256 and the entry's note."""
    import h5py

    def text(handle, key):
        node = handle.get(f"uns/lingshu/{key}")
        value = node[()] if isinstance(node, h5py.Dataset) else None
        return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))

    with h5py.File(pred_path, "r") as handle:
        run = text(handle, "run") or text(handle, "model") or Path(pred_path).stem
        sampling = text(handle, "sampling")
        external = text(handle, "external") == "True"
        source = {k: text(handle, k) or "" for k in ("source", "source_sha256", "note")}
    record: dict[str, object] = {"run": run, "sampling": json.loads(sampling) if sampling else {}}
    if external:
        record["external"] = {"source": source["source"], "sha256": source["source_sha256"],
                              "note": source["note"]}
    return record


def evaluate_to_dir(
    truth_path: str, pred_path: str | None, outdir: str, threads: int = 1, ceiling: bool = False,
    seed: int = 0,
) -> None:
    """Evaluate one prediction file (or the data ceiling) and write its folder.

    Writes ``per_condition.tsv``, ``cell_eval/<context>/``, ``ceiling_agg.tsv`` (ceiling only),
    ``summary.json``: ``{"model" (the run's name), "sampling", "ceiling", "metrics": summary
    dict, "n_conditions" (scored), "n_contexts", "not_encoded" (the conditions the model
    could not encode, not scored), "seconds"}`` (and "external": source, sha256 and note of
    predictions made outside the pipeline), and for a prediction
    ``distribution.tsv``: per held-out condition, the predicted cells' distribution against the
    real ones (:func:`lingshu.evaluate.fidelity.condition_fidelity`). For the ceiling,
    ``metrics`` is the Spearman-Brown corrected ceiling (:func:`ceiling_summary`), not the raw
    half-depth means, with MAE the perfect sampler's (:func:`sampler_mae_floor`).
    """
    start = time.perf_counter()
    truth, truth_label = _read(truth_path, "truth")  # each file read once
    pred, pred_label = (None, None) if ceiling or pred_path is None else _read(pred_path, "prediction")
    per_condition = evaluate_predictions(truth, pred, outdir, threads=threads, ceiling=ceiling,
                                         seed=seed, labels=(truth_label, pred_label))
    if ceiling:
        agg = pd.read_csv(Path(outdir) / "ceiling_agg.tsv", sep="\t")
        metrics = ceiling_summary(agg, per_condition)
        metrics["mae"] = sampler_mae_floor(truth)
        record: dict[str, object] = {"run": "data ceiling", "sampling": {}}
    else:
        from lingshu.evaluate.fidelity import condition_fidelity

        metrics = summarize(per_condition)
        record = _run_record(pred_path)
        record["not_encoded"] = not_encoded(pred)
        distribution = condition_fidelity(truth, pred, seed=seed)
        write_table(distribution, Path(outdir) / DISTRIBUTION)
    summary = {
        "model": record["run"],
        "sampling": record["sampling"],
        "ceiling": ceiling,
        "metrics": {k: (None if not np.isfinite(v) else v) for k, v in metrics.items()},
        "n_conditions": int(len(per_condition)),
        "n_contexts": int(per_condition[CONTEXT_COL].nunique()),
        "not_encoded": record.get("not_encoded", []),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if "external" in record:  # predictions made outside the pipeline: where they came from
        summary["external"] = record["external"]
    write_json(summary, Path(outdir) / "summary.json")


def read_summary(eval_dir: str) -> dict:
    """Read ``summary.json`` of an evaluation folder; JSON nulls come back as NaN."""
    summary = json.loads((Path(eval_dir) / "summary.json").read_text())
    summary["metrics"] = {k: (np.nan if v is None else float(v)) for k, v in summary["metrics"].items()}
    return summary
