"""Tables of the report: the paper's Table 2 layout, every cell-eval metric, job resources.

Input everywhere is ``per_condition``: model name -> the per-condition table written by
:func:`lingshu.evaluate.evaluate_to_dir` (one row per test condition, one column per metric).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from lingshu.constants import CONTEXT_COL
from lingshu.evaluate.perturbation import (
    LOWER_IS_BETTER,
    NSIG_REAL,
    PAPER_METRICS,
    average_score,
    bootstrap_ci,
    ceiling_summary,
    read_summary,
    summarize,
    vcc_score,
)
from lingshu.io import read_table
from lingshu.usage import read_cpu_seconds

CEILING_ROW = "data ceiling"
CONTROL_BASELINE = "control_mean"  # reference of the paper's average score
CELL_MEAN_BASELINE = "perturbation_mean"  # reference of the VCC score
AVERAGE_RANK, AVERAGE_SCORE, VCC_SCORE = "average rank", "average score", "VCC score"


def load_per_condition(eval_dirs: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Read ``per_condition.tsv`` of every model's evaluation folder."""
    return {model: read_table(Path(d) / "per_condition.tsv") for model, d in eval_dirs.items()}


def load_ceiling(ceiling_dir: str | None) -> dict[str, float] | None:
    """The data ceiling of an ``evaluate_to_dir(..., ceiling=True)`` folder, or None."""
    if ceiling_dir is None:
        return None
    folder = Path(ceiling_dir)
    if (folder / "summary.json").exists():
        return read_summary(folder)["metrics"]
    return ceiling_summary(read_table(folder / "ceiling_agg.tsv"), read_table(folder / "per_condition.tsv"))


def _rank(values: pd.Series, metric: str) -> pd.Series:
    """Rank among models, 1 = best; undefined values (NaN) rank last."""
    return values.rank(ascending=metric in LOWER_IS_BETTER, method="min", na_option="bottom")


def paper_table(
    per_condition: dict[str, pd.DataFrame],
    ceiling: dict[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Models x metrics in the layout of the paper's Table 2.

    Columns: ``model``; for each of the 7 metrics its value, ``<metric> low`` / ``high``
    (95% bootstrap interval over conditions) and ``<metric> rank``; ``average rank`` over the
    7; ``average score`` (vs control_mean) and ``VCC score`` (vs perturbation_mean) when those
    baselines are among the models. A last ``data ceiling`` row carries values only (no rank).
    """
    summaries = {model: summarize(table) for model, table in per_condition.items()}
    rows = []
    for model, table in per_condition.items():
        row: dict[str, object] = {"model": model}
        for label, column in PAPER_METRICS.items():
            row[label] = summaries[model].get(column, np.nan)
            row[f"{label} low"], row[f"{label} high"] = (
                bootstrap_ci(table, column, n_boot=n_boot, seed=seed)
                if column == "spearman_nsig" or column in table
                else (np.nan, np.nan)
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    for label, column in PAPER_METRICS.items():
        table[f"{label} rank"] = _rank(table[label], column)
    table[AVERAGE_RANK] = table[[f"{label} rank" for label in PAPER_METRICS]].mean(axis=1)
    table[AVERAGE_SCORE] = _scores(summaries, CONTROL_BASELINE, average_score, "average_score")
    table[VCC_SCORE] = _scores(summaries, CELL_MEAN_BASELINE, vcc_score, "vcc_score")
    if ceiling is not None:
        ceiling_row = {"model": CEILING_ROW}
        ceiling_row.update({label: ceiling.get(column, np.nan) for label, column in PAPER_METRICS.items()})
        table = pd.concat([table, pd.DataFrame([ceiling_row])], ignore_index=True)
    return table[_ordered_columns(table)]


def _scores(summaries: dict[str, dict], baseline: str, score_fn, key: str) -> list[float]:
    """One score per model against ``baseline``; NaN for all when the baseline was not run."""
    if baseline not in summaries:
        return [np.nan] * len(summaries)
    return [score_fn(summary, summaries[baseline])[key] for summary in summaries.values()]


def _ordered_columns(table: pd.DataFrame) -> list[str]:
    """model, then value / low / high / rank per metric, then the three overall columns."""
    columns = ["model"]
    for label in PAPER_METRICS:
        columns += [label, f"{label} low", f"{label} high", f"{label} rank"]
    return columns + [AVERAGE_RANK, AVERAGE_SCORE, VCC_SCORE]


def full_metrics_table(
    per_condition: dict[str, pd.DataFrame], ceiling: dict[str, float] | None = None
) -> pd.DataFrame:
    """Every metric cell-eval produced (context-balanced mean) per model, plus the ceiling."""
    rows = [{"model": model, **summarize(table)} for model, table in per_condition.items()]
    if ceiling is not None:
        rows.append({"model": CEILING_ROW, **ceiling})
    return pd.DataFrame(rows)


def best_models(table: pd.DataFrame) -> dict[str, set[str]]:
    """Column -> the models with the best value (all of those tied at it; ceiling excluded),
    for bold face. A column where every model (of two or more) has the same value has no best
    model (e.g. DES 0 for all on data where no gene is DE): no bold there, rather than the
    first row's."""
    models = table[table["model"] != CEILING_ROW].set_index("model")
    columns = [(label, column in LOWER_IS_BETTER) for label, column in PAPER_METRICS.items()]
    columns += [(AVERAGE_RANK, True), (AVERAGE_SCORE, False), (VCC_SCORE, False)]
    best = {}
    for column, lower in columns:
        values = models[column].dropna()
        if not len(values):
            continue
        tied = set(values.index[values == (values.min() if lower else values.max())])
        if len(tied) < len(values) or len(values) == 1:
            best[column] = tied
    return best


# Paper metrics that score the predicted DE genes against the real ones.
_DE_METRICS = ("DES", "Spearman #DEG", "Spearman LFC", "AUPRC")


def silent_metrics(table: pd.DataFrame, per_condition: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Paper metric -> why it does not separate the models on this dataset: those where two or
    more models are scored and every one has the same value (or none has one), with the
    reason where the data show it (no real DE gene; one held-out condition per context)."""
    models = table[table["model"] != CEILING_ROW]
    if len(models) < 2:
        return {}
    frames = [f for f in per_condition.values() if len(f)]
    truth_de = max((float(f[NSIG_REAL].max()) for f in frames if NSIG_REAL in f), default=np.nan)
    one_each = bool(frames) and all(f.groupby(CONTEXT_COL).size().max() == 1 for f in frames
                                    if CONTEXT_COL in f)
    silent = {}
    for label in PAPER_METRICS:
        values = models[label]
        if values.nunique(dropna=False) > 1:  # the models differ (a NaN differs from a value)
            continue
        if label in _DE_METRICS and truth_de == 0:
            why = ("no gene is DE in the real cells of any held-out condition (cell-eval's "
                   "test), so there is nothing to find")
        elif label == "PDS" and one_each:
            why = ("each context holds one held-out condition, and PDS ranks a prediction "
                   "among its context's conditions, so every model scores 1")
        elif values.isna().all():
            why = "undefined for every model"
        else:
            why = "every model scores the same"
        silent[label] = why
    return silent


def format_number(value: float, digits: int = 3) -> str:
    """A value for display; an em dash where undefined."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The paper table as strings: ``value [low, high] (rank)`` per metric cell."""
    rows = []
    for _, row in table.iterrows():
        shown = {"model": row["model"]}
        for label in PAPER_METRICS:
            cell = format_number(row[label])
            if math.isfinite(row[f"{label} low"]):
                cell += f" [{format_number(row[f'{label} low'])}, {format_number(row[f'{label} high'])}]"
            if math.isfinite(row[f"{label} rank"]):
                cell += f" ({int(row[f'{label} rank'])})"
            shown[label] = cell
        shown[AVERAGE_RANK] = format_number(row[AVERAGE_RANK], 1)
        shown[AVERAGE_SCORE] = format_number(row[AVERAGE_SCORE])
        shown[VCC_SCORE] = format_number(row[VCC_SCORE])
        rows.append(shown)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The paper table as a Markdown pipe table (value [95% CI] (rank); best in bold)."""
    shown = display_table(table)
    best = best_models(table)
    for column, models in best.items():
        at = shown["model"].isin(models)
        shown.loc[at, column] = "**" + shown.loc[at, column] + "**"
    lines = [
        "| " + " | ".join(shown.columns) + " |",
        "|" + "|".join("---" for _ in shown.columns) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def benchmark_table(benchmark_files: list[str]) -> pd.DataFrame:
    """Wall time, CPU time and peak memory per job from Snakemake ``benchmark:`` TSVs.

    CPU time is the job's own count (the usage line that ends its log,
    ``<results>/<dataset>/logs/<job>.log`` beside ``benchmarks/<job>.tsv``; see
    :mod:`lingshu.usage`) where there is one, else Snakemake's sampled ``cpu_time``, which
    misses what ran after its last sample; ``cpu_from`` says which.

    The job is named by its path with the folders all files share removed (the workflow's
    ``benchmarks/evaluate_linear.tsv`` -> ``evaluate_linear``; ``bench/fit/kang.tsv`` ->
    ``fit/kang`` beside other rules). Files that do not exist (jobs that have not run) are
    skipped; repeated measurements in one file are averaged.
    """
    paths = [Path(f) for f in benchmark_files if Path(f).exists()]
    if not paths:
        return pd.DataFrame(columns=["job", "wall_s", "cpu_s", "cpu_from", "max_rss_mb"])
    common = Path(*_common_parts([p.parent.parts for p in paths]) or (".",))
    rows = []
    for path in paths:
        bench = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        name = path.with_suffix("").relative_to(common).as_posix()
        own = read_cpu_seconds(path.parent.parent / "logs" / f"{path.stem}.log")
        rows.append({
            "job": name,
            "wall_s": _column_mean(bench, "s"),
            "cpu_s": own if own is not None else _column_mean(bench, "cpu_time"),
            "cpu_from": "job log" if own is not None else "Snakemake",
            "max_rss_mb": _column_mean(bench, "max_rss"),
        })
    return pd.DataFrame(rows).sort_values("job", ignore_index=True)


def _column_mean(frame: pd.DataFrame, column: str) -> float:
    """Mean of a numeric column; NaN when absent (older Snakemake files lack some columns)."""
    if column not in frame:
        return float("nan")
    return float(pd.to_numeric(frame[column], errors="coerce").mean())


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Longest common leading folder parts of several paths."""
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return tuple(common)


def context_scores(per_condition: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's average score per held-out context (cell type or donor) and model.

    The identity x perturbation view of the paper's PBMC cytokine figure: each context's test
    conditions are summarised on their own and scored against control_mean of that context.
    Rows: models; columns: contexts (empty when control_mean was not run).
    """
    if CONTROL_BASELINE not in per_condition:
        return pd.DataFrame()
    contexts = sorted(set().union(*(set(t["context"].astype(str)) for t in per_condition.values())))
    rows = []
    for model, table in per_condition.items():
        row: dict[str, object] = {"model": model}
        for ctx in contexts:
            base = per_condition[CONTROL_BASELINE]
            mine = table[table["context"].astype(str) == ctx]
            ref = base[base["context"].astype(str) == ctx]
            row[ctx] = (average_score(summarize(mine), summarize(ref))["average_score"]
                        if len(mine) and len(ref) else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)
