"""Figures of the report (PNG, matplotlib Agg): metric bars, predicted vs observed change,
per-condition distributions. Each function draws one file and writes it atomically."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL  # noqa: E402
from lingshu.evaluate.perturbation import PAPER_METRICS  # noqa: E402
from lingshu.io import atomic_path  # noqa: E402
from lingshu.report.tables import CEILING_ROW  # noqa: E402

DPI = 120
# Per-condition metrics of the paper (the Spearman of #DEG exists only across conditions).
PER_CONDITION_METRICS = {label: col for label, col in PAPER_METRICS.items() if col != "spearman_nsig"}


def _save(fig: plt.Figure, path: str | Path) -> None:
    """Write a figure as PNG atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _colors(models: list[str]) -> dict[str, tuple]:
    """One stable colour per model (tab10 cycles after ten)."""
    cmap = plt.get_cmap("tab10")
    return {model: cmap(i % 10) for i, model in enumerate(models)}


def _grid(n_panels: int, n_cols: int, panel_size: tuple[float, float]) -> tuple[plt.Figure, np.ndarray]:
    """A figure with ``n_panels`` axes in rows of ``n_cols``; unused axes hidden."""
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows), squeeze=False
    )
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def metric_bars(table: pd.DataFrame, path: str | Path) -> None:
    """One panel per paper metric, a bar per model with its 95% CI; the ceiling dashed.

    ``table`` is :func:`lingshu.report.tables.paper_table`.
    """
    models_table = table[table["model"] != CEILING_ROW]
    ceiling = table[table["model"] == CEILING_ROW]
    models = models_table["model"].tolist()
    colors = _colors(models)
    fig, axes = _grid(len(PAPER_METRICS), 4, (3.4, 3.0))
    x = np.arange(len(models))
    for ax, (label, column) in zip(axes, PAPER_METRICS.items()):
        values = models_table[label].to_numpy(float)
        low = models_table[f"{label} low"].to_numpy(float)
        high = models_table[f"{label} high"].to_numpy(float)
        # Error bars must be non-negative and finite; a missing CI draws no bar.
        yerr = np.nan_to_num(np.vstack([values - low, high - values]).clip(min=0), nan=0.0)
        ax.bar(x, np.nan_to_num(values), yerr=yerr, capsize=3, color=[colors[m] for m in models])
        if len(ceiling) and math.isfinite(ceiling[label].iloc[0]):
            ax.axhline(ceiling[label].iloc[0], color="black", linestyle="--", linewidth=1, label="data ceiling")
            ax.legend(fontsize=7, loc="best")
        better = "lower is better" if column == "mae" else "higher is better"
        ax.set_title(f"{label}\n({better})", fontsize=10)
        ax.set_xticks(x, models, rotation=40, ha="right", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.5)
    fig.suptitle("Paper metrics (mean over test conditions, 95% bootstrap CI)", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def _condition_keys(adata: ad.AnnData) -> pd.Series:
    """``context␟perturbation`` per cell, the key of a test condition."""
    obs = adata.obs[[CONTEXT_COL, PERT_COL]].astype(str)
    return obs[CONTEXT_COL] + "\x1f" + obs[PERT_COL]


def pseudobulks(adata: ad.AnnData) -> pd.DataFrame:
    """Mean expression per (context, perturbation): groups x genes, index ``context␟pert``.

    One sparse indicator product, so it works on dense or CSR ``X`` without densifying it.
    """
    keys = _condition_keys(adata)
    codes, groups = pd.factorize(keys)
    indicator = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(groups), len(codes))
    )
    sums = indicator @ adata.X
    means = np.asarray(sums.todense() if sp.issparse(sums) else sums) / np.bincount(codes)[:, None]
    return pd.DataFrame(means, index=groups, columns=adata.var_names)


def _split_key(key: str) -> tuple[str, str]:
    context, pert = key.split("\x1f", 1)
    return context, pert


def observed_deltas(truth_bulk: pd.DataFrame) -> pd.DataFrame:
    """Change from the context's control pseudobulk for every test condition of the truth."""
    deltas = {}
    for key in truth_bulk.index:
        context, pert = _split_key(key)
        if pert != CONTROL:
            deltas[key] = truth_bulk.loc[key] - truth_bulk.loc[f"{context}\x1f{CONTROL}"]
    return pd.DataFrame(deltas).T


def strongest_conditions(deltas: pd.DataFrame, n: int = 4) -> list[str]:
    """The ``n`` conditions whose pseudobulk moves furthest from control (L2 norm)."""
    norms = np.sqrt((deltas**2).sum(axis=1))
    return norms.sort_values(ascending=False).index[:n].tolist()


def delta_scatter(truth_path: str, pred_paths: dict[str, str], path: str | Path, n_top: int = 4) -> None:
    """Predicted vs observed change from control per gene for the strongest perturbations.

    One row per perturbation (the ``n_top`` largest real effects), one column per model; the
    predicted change is taken against the real control pseudobulk, the title gives Pearson r.
    """
    truth_bulk = pseudobulks(ad.read_h5ad(truth_path))
    observed = observed_deltas(truth_bulk)
    chosen = strongest_conditions(observed, n_top)
    predicted = {model: _predicted_deltas(p, truth_bulk, chosen) for model, p in pred_paths.items()}
    models = list(pred_paths)
    fig, axes = plt.subplots(
        len(chosen), max(len(models), 1), figsize=(3.0 * max(len(models), 1), 2.9 * len(chosen)), squeeze=False
    )
    for row, key in enumerate(chosen):
        context, pert = _split_key(key)
        for col, model in enumerate(models):
            _scatter_panel(axes[row, col], observed.loc[key], predicted[model].get(key))
            r = _pearson(observed.loc[key], predicted[model].get(key))
            axes[row, col].set_title(f"{model}\n{pert} ({context}): r = {r:.2f}", fontsize=9)
            if col == 0:
                axes[row, col].set_ylabel("predicted change", fontsize=9)
            if row == len(chosen) - 1:
                axes[row, col].set_xlabel("observed change", fontsize=9)
    fig.suptitle("Change from control per gene, strongest perturbations", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def _predicted_deltas(pred_path: str, truth_bulk: pd.DataFrame, keys: list[str]) -> dict[str, pd.Series]:
    """A model's pseudobulk change from the real control pseudobulk for the chosen conditions."""
    pred_bulk = pseudobulks(ad.read_h5ad(pred_path))
    deltas = {}
    for key in keys:
        if key in pred_bulk.index:
            context, _ = _split_key(key)
            deltas[key] = pred_bulk.loc[key] - truth_bulk.loc[f"{context}\x1f{CONTROL}"]
    return deltas


def _pearson(x: pd.Series, y: pd.Series | None) -> float:
    """Pearson r; NaN when either side is missing or constant."""
    if y is None or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _scatter_panel(ax: plt.Axes, observed: pd.Series, predicted: pd.Series | None) -> None:
    """Genes as points, the identity line dashed."""
    if predicted is None:
        ax.text(0.5, 0.5, "not predicted", ha="center", va="center", transform=ax.transAxes)
        return
    ax.scatter(observed, predicted, s=6, alpha=0.6, linewidths=0)
    limits = [min(observed.min(), predicted.min()), max(observed.max(), predicted.max())]
    ax.plot(limits, limits, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0, color="lightgrey", linewidth=0.5)
    ax.axvline(0, color="lightgrey", linewidth=0.5)
    ax.tick_params(labelsize=7)


def per_condition_distributions(per_condition: dict[str, pd.DataFrame], path: str | Path, seed: int = 0) -> None:
    """Box plot per model of each per-condition paper metric, conditions as jittered points."""
    models = list(per_condition)
    colors = _colors(models)
    rng = np.random.default_rng(seed)  # jitter only; fixed so reruns give the same picture
    fig, axes = _grid(len(PER_CONDITION_METRICS), 3, (3.8, 3.2))
    for ax, (label, column) in zip(axes, PER_CONDITION_METRICS.items()):
        data = [
            per_condition[m][column].dropna().to_numpy(float) if column in per_condition[m] else np.array([])
            for m in models
        ]
        positions = np.arange(1, len(models) + 1)
        ax.boxplot(
            [d if d.size else [np.nan] for d in data], positions=positions, widths=0.6, showfliers=False
        )
        for pos, values, model in zip(positions, data, models):
            jitter = rng.uniform(-0.15, 0.15, values.size)
            ax.scatter(pos + jitter, values, s=8, alpha=0.6, color=colors[model], linewidths=0)
        ax.set_xticks(positions, models, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle("Per-condition distributions", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def context_score_bars(scores: pd.DataFrame, path: str | Path) -> None:
    """Average score (vs control_mean) per held-out context, one bar per model: the paper's
    PBMC cytokine figure in the identity x perturbation protocol.

    ``scores`` is :func:`lingshu.report.tables.context_scores`.
    """
    contexts = [c for c in scores.columns if c != "model"]
    models = scores["model"].tolist()
    colors = _colors(models)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(contexts) * max(1, len(models)) / 3), 3.4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(contexts))
    for i, model in enumerate(models):
        values = scores.loc[scores["model"] == model, contexts].to_numpy(float).ravel()
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model,
               color=colors[model])
    ax.set_xticks(x, contexts, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("average score vs control_mean")
    ax.set_title("Held-out conditions per context (identity x perturbation)", fontsize=10)
    ax.axhline(0, color="#888", linewidth=0.8)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    fig.tight_layout()
    _save(fig, path)
