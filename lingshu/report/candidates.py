"""The report's candidate-screen section: each run's ranking of the screen's candidates
(perturbations with no measured cells), from the tables of
:func:`lingshu.evaluate.candidates.candidate_screen_job` (``screen/<run>.tsv``)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from lingshu.constants import CONTEXT_COL, PERT_COL
from lingshu.evaluate.candidates import RANKED
from lingshu.io import read_table, write_table

TABLE = "candidate_screen.tsv"
TOP = 10  # candidates shown per run and context
MARKS = {"test": "†", "train": "*"}  # a candidate with measured cells: held out / trained on


def read_candidate_screens(paths: dict[str, str | Path]) -> pd.DataFrame:
    """Every run's screen table, in the order given (run -> ``screen/<run>.tsv``)."""
    frames = [read_table(path) for path in paths.values()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def draw_candidate_screen(paths: dict[str, str | Path], outdir: str | Path) -> pd.DataFrame | None:
    """Copy every run's screen into ``outdir/candidate_screen.tsv``; the table, or None without
    a screen."""
    if not paths:
        return None
    table = read_candidate_screens(paths)
    write_table(table, Path(outdir) / TABLE)
    return table


def _label(row: pd.Series, rank_column: str, effect: float) -> str:
    mark = MARKS.get(str(row["split_role"]), "")
    return f"{int(row[rank_column])}. {row[PERT_COL]}{mark} ({effect:.3g})"


def _grid(columns: dict[str, list[str]]) -> str:
    """A table with one column per run, its cells listed top down."""
    depth = max((len(v) for v in columns.values()), default=0)
    header = "".join(f"<th>{html.escape(run)}</th>" for run in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v[i]) if i < len(v) else ''}</td>"
                         for v in columns.values()) + "</tr>" for i in range(depth))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _overall(table: pd.DataFrame, runs: list[str], top: int) -> dict[str, list[str]]:
    """run -> its top candidates by mean predicted effect over the screened contexts."""
    out = {}
    for run in runs:
        rows = table[(table["run"] == run) & (table["status"] == RANKED)]
        mean = rows.groupby(PERT_COL).agg(effect=("predicted_effect", "mean"),
                                          rank=("rank_overall", "first"),
                                          split_role=("split_role", "first")).reset_index()
        mean = mean.sort_values(["rank", PERT_COL]).head(top)
        out[run] = [_label(r, "rank", r["effect"]) for _, r in mean.iterrows()]
    return out


def _not_encoded_html(table: pd.DataFrame, n_contexts: int) -> str:
    rows = table[table["status"] != RANKED]
    if not len(rows):
        return "<p>Every run ranked every candidate in every context.</p>"
    items = []
    for (run, reason), group in rows.groupby(["run", "reason"], sort=False):
        by_candidate = group.groupby(PERT_COL, sort=False)[CONTEXT_COL].apply(list)
        named = ", ".join(
            p if len(ctx) == n_contexts else f"{p} (in {', '.join(ctx)})"
            for p, ctx in by_candidate.items())
        items.append(f"<li><b>{html.escape(str(run))}</b>: {html.escape(named)}: "
                     f"{html.escape(str(reason))}</li>")
    return ("<p><b>Not encoded</b> (listed, never dropped; no cells were predicted for "
            f"them):</p><ul>{''.join(items)}</ul>")


def candidate_screen_html(table: pd.DataFrame | None, top: int = TOP) -> str:
    """The report's "Candidate screen" section (empty without a screen)."""
    if table is None:
        return ""
    head = "<h2>Candidate screen: ranking perturbations no one has measured</h2>"
    if not len(table):
        return head + "<p>No run screened the candidates.</p>"
    runs = list(dict.fromkeys(table["run"]))
    ranking = [r for r in runs if ((table["run"] == r) & (table["status"] == RANKED)).any()]
    candidates = list(dict.fromkeys(table[PERT_COL]))
    contexts = list(dict.fromkeys(table[CONTEXT_COL]))
    text = (
        f"<p>The dataset's {len(candidates)} candidate perturbation(s) in {len(contexts)} "
        "context(s), each predicted by every run from the context's real control cells, as "
        "held-out conditions are, and ranked by its <b>predicted effect</b>: the L2 norm of "
        "the shift of the mean log1p(CP10k) profile of the predicted cells from those control "
        "cells (the primary effect of the screening section). Each cell: rank, candidate, "
        "effect. <b>†</b> a held-out perturbation (measured cells exist, never shown to the "
        "models: a known answer, scored in the screening section); <b>*</b> a perturbation "
        "the models trained on. Overall: by the candidate's mean effect over the contexts. "
        f"<code>screen/&lt;run&gt;.tsv</code> (all runs: <code>{TABLE}</code>) hold every "
        "rank, the number of DE genes and the top 5 up and down genes by mean log fold "
        "change.</p>")
    if not ranking:
        return head + text + _not_encoded_html(table, len(contexts))
    sections = ["<h3>Overall</h3>", _grid(_overall(table, ranking, top))]
    for ctx in contexts:
        rows = table[table[CONTEXT_COL] == ctx]
        first = rows.iloc[0]
        sections.append(f"<h3>{html.escape(str(ctx))}</h3><p>{int(first['n_control_cells'])} "
                        f"control cells ({html.escape(str(first['control_cells']))} cells of "
                        "the split).</p>")
        columns = {}
        for run in ranking:
            ranked = rows[(rows["run"] == run) & (rows["status"] == RANKED)]
            ranked = ranked.sort_values(["rank", PERT_COL]).head(top)
            columns[run] = [_label(r, "rank", r["predicted_effect"])
                            for _, r in ranked.iterrows()]
        sections.append(_grid(columns))
    return head + text + "".join(sections) + _not_encoded_html(table, len(contexts))


__all__ = ["candidate_screen_html", "draw_candidate_screen", "read_candidate_screens"]
