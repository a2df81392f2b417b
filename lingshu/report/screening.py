"""The report's screening section: table, figure and text from the screening job's two tables
(:func:`lingshu.evaluate.screening.screening_job`: ``eval/screening.tsv`` and
``eval/screening_effects.tsv``)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lingshu.evaluate.screening import (  # noqa: E402
    CEILING_RUN,
    EFFECT_LABELS,
    EFFECTS,
    MIN_CONDITIONS,
    PRIMARY,
    SCORE_LABELS,
    SCORES,
)
from lingshu.io import read_table, write_table  # noqa: E402
from lingshu.report.figures import _grid, _save  # noqa: E402

TABLE = "screening.tsv"
EFFECTS_TABLE = "screening_effects.tsv"
FIGURE = "screening.png"
LOG_SPAN = 20.0  # an axis is logarithmic when its positive values span more than this ratio


def read_screening(screening_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(score table, effects table) of a screening job's folder."""
    folder = Path(screening_dir)
    return read_table(folder / TABLE), read_table(folder / EFFECTS_TABLE)


def _interval(row: pd.Series, score: str) -> str:
    value, low, high = (row.get(score), row.get(f"{score}_low"), row.get(f"{score}_high"))
    if value is None or not np.isfinite(value):
        return "—"
    text = f"{value:.3f}"
    if low is not None and np.isfinite(low) and np.isfinite(high):
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def display_table(table: pd.DataFrame, effect: str = PRIMARY) -> pd.DataFrame:
    """One effect's rows as shown: run, each score with its 95% interval, k, counts."""
    rows = []
    for _, row in table[table["effect"] == effect].iterrows():
        shown = {"model": row["run"]}
        shown.update({SCORE_LABELS[s]: _interval(row, s) for s in SCORES})
        shown.update({"k": int(row["k"]), "conditions": int(row["n_conditions"]),
                      "hits": int(row["n_hits"]), "chance": f"{row['prevalence']:.3f}"})
        if table["not_encoded"].fillna(0).any():
            shown["not encoded"] = int(row["not_encoded"])
        rows.append(shown)
    return pd.DataFrame(rows)


def _table_html(shown: pd.DataFrame) -> str:
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for _, row in shown.iterrows():
        css = ' class="ceiling"' if row["model"] == CEILING_RUN else ""
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _flags(column: pd.Series) -> np.ndarray:
    """A hit column as booleans, however the TSV reader typed it."""
    return column.astype(str).str.lower().isin(["true", "1", "1.0"]).to_numpy()


def _axis_scale(ax: plt.Axes, values: np.ndarray, which: str) -> None:
    """Logarithmic when every value is positive and they span more than ``LOG_SPAN``."""
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > LOG_SPAN:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    else:  # plain numbers: an offset label ("1e-6") would sit on the title
        (ax.xaxis if which == "x" else ax.yaxis).set_major_formatter(FormatStrFormatter("%.4g"))


def screening_figure(effects: pd.DataFrame, table: pd.DataFrame, path: str | Path,
                     effect: str = PRIMARY) -> None:
    """Predicted vs measured effect per held-out condition, one panel per run (the data
    ceiling last), hits in red; each axis logarithmic when its effects span orders of
    magnitude. The title gives the run's Spearman and precision@k."""
    runs = [r for r in dict.fromkeys(effects["run"]) if isinstance(r, str) and r]
    runs = [r for r in runs if r != CEILING_RUN] + [r for r in runs if r == CEILING_RUN]
    n_cols = min(4, max(1, len(runs)))
    fig, axes = _grid(max(1, len(runs)), n_cols, (3.2, 3.0))
    scores = table[table["effect"] == effect].set_index("run")
    for ax, run in zip(axes, runs):
        rows = effects[effects["run"] == run]
        x = rows[f"measured_{effect}"].to_numpy(float)
        y = rows[f"predicted_{effect}"].to_numpy(float)
        hit = _flags(rows[f"hit_{effect}"])
        ax.scatter(x[~hit], y[~hit], s=14, color="#999999", linewidths=0, label="other")
        ax.scatter(x[hit], y[hit], s=18, color="#d62728", linewidths=0, label="hit")
        _axis_scale(ax, x, "x")
        _axis_scale(ax, y, "y")
        title = run
        if run in scores.index:
            row = scores.loc[run]
            rho = row["spearman"]
            title += (f"\nSpearman {rho:.2f}, " if np.isfinite(rho) else "\nSpearman —, ")
            title += f"P@{int(row['k'])} {row['precision_at_k']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("measured" if run != CEILING_RUN else "measured (half B)", fontsize=8)
        ax.set_ylabel("predicted" if run != CEILING_RUN else "half A", fontsize=8)
        ax.tick_params(labelsize=7)
    if runs:
        axes[0].legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(f"Screening: predicted vs measured {EFFECT_LABELS[effect]} per held-out "
                 "condition (hits: measured top quarter)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def draw_screening(screening_dir: str | Path, outdir: str | Path) -> dict:
    """Copy the score table to ``outdir/screening.tsv`` and draw ``figures/screening.png``
    (when there are scores). Returns what the page needs: ``table``, ``effects``, ``figure``
    (a Path or None) and ``n_conditions`` (held-out conditions with measured effects)."""
    table, effects = read_screening(screening_dir)
    out = Path(outdir)
    write_table(table, out / TABLE)
    figure = None
    if len(table):
        figure = out / "figures" / FIGURE
        screening_figure(effects, table, figure)
    measured = effects[effects["run"] != CEILING_RUN].drop_duplicates(
        subset=["context", "perturbation"])
    return {"table": table, "effects": effects, "figure": figure,
            "n_conditions": int(len(measured)),
            "n_hits": int(_flags(measured[f"hit_{PRIMARY}"]).sum())}


def screening_html(screening: dict | None, embed) -> str:
    """The report's "Screening" section; ``embed`` turns a PNG path into an <img>."""
    if screening is None:
        return ""
    table: pd.DataFrame = screening["table"]
    head = "<h2>Screening: finding the strong hits among the held-out conditions</h2>"
    if not len(table):
        n = screening["n_conditions"]
        return head + (
            f"<p>Not scored: this dataset holds {n} held-out condition(s) (context x "
            f"perturbation); the screening scores need at least {MIN_CONDITIONS}, so that "
            "the top quarter is a set to find.</p>")
    n, hits = screening["n_conditions"], screening["n_hits"]
    prevalence = hits / n if n else math.nan
    text = (
        f"<p>Would a model's screen of the {n} held-out conditions (context x perturbation) "
        "pick the strong ones? Each run's <b>predicted effect</b> of a condition is the "
        "<b>L2 norm of the shift of the mean log1p(CP10k) profile</b> of its predicted cells "
        "from the real control cells of the context (the primary effect); the <b>measured "
        "effect</b> is the same on the real held-out cells, less the sampling noise of the "
        "two means (the square root of the squared norm less each side's summed variance / "
        "cells, at least 0), so that conditions with few cells do not look strong. "
        "<b>Hits</b>: the measured top "
        f"quarter, {hits} of {n} conditions; <b>k</b> = {hits} (the number of hits, so "
        "precision@k = recall@k). <b>Spearman</b>: of predicted vs measured effects across "
        "conditions (average ranks). <b>AUPRC</b>: average precision of calling the hits by "
        "predicted effect. Ties in predicted effects: precision@k and recall@k take their "
        "expected value under random tie-breaking, the AUPRC takes a tied group at once, so "
        "a model that predicts one shared shift for every condition scores chance. "
        "<b>Chance</b>: "
        f"precision@k = recall@k = AUPRC = the hit prevalence, {prevalence:.3f} here "
        "(<code>chance</code> column: a run that could not encode some conditions is scored "
        "on the others, with the hits among them); Spearman 0. Brackets: 95% bootstrap "
        "interval over conditions (drawn within hits and within the others). The <b>data "
        "ceiling</b>: each condition's real cells and each context's controls split in two "
        "seeded halves, half A's effects ranking half B's (half the cells a side: a "
        f"conservative ceiling). <code>{TABLE}</code> holds every score.</p>")
    figure = screening["figure"]
    others = "".join(
        f"<h3>{html.escape(EFFECT_LABELS[e])}</h3>" + _table_html(display_table(table, e))
        for e in EFFECTS if e != PRIMARY)
    details = (
        "<details><summary>the same scores on the other effect quantities</summary>"
        "<p><b>Energy distance</b>: Euclidean, between the cells and the real controls in a "
        "50-component PCA fitted on the truth's real cells (scikit-learn, ARPACK, seeded), at "
        "most 500 cells a side, within-set terms over distinct pairs (unbiased at any number "
        "of cells, so about 0, possibly slightly negative, at no effect). <b>Number of DE genes</b>: Welch's t-test per gene, Benjamini-Hochberg "
        "adjusted p below 0.05. Hits are the measured top quarter of each quantity.</p>"
        f"{others}</details>")
    return (head + text + _table_html(display_table(table, PRIMARY))
            + (embed(figure) if figure is not None and Path(figure).exists() else "")
            + details)


__all__ = ["draw_screening", "read_screening", "screening_figure",
           "screening_html"]
