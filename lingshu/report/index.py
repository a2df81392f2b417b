"""The front page of a run: a leaderboard of models x datasets, the baselines each model lost
to, and each dataset's metric values, linking every dataset's report.

It reads only what the report rule wrote (each dataset's ``report/table.tsv``) and fits a
1,400-pixel window: one leaderboard row per run with one cell per dataset (average rank and
average score), and per dataset a compact table (value and rank per metric; the 95% intervals
are in the dataset's own report).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import pandas as pd

from lingshu.evaluate.perturbation import PAPER_METRICS
from lingshu.io import atomic_path, read_table
from lingshu.models.spec import all_specs, parse_run
from lingshu.report.tables import (
    AVERAGE_RANK,
    AVERAGE_SCORE,
    CEILING_ROW,
    VCC_SCORE,
    best_models,
    format_number,
)

MEAN_RANK = "mean rank"  # a run's average rank, averaged over the datasets it ran on

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1360px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em}
p.lead{color:#555;max-width:70em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #d4d4d4;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.model,th.model{text-align:left}
tr.baseline td.model{font-style:italic;color:#555}
tr.ceiling td{color:#777;background:#fafafa}
td .score{color:#555;font-size:12px}
td.best{font-weight:bold}
ul.lost li{margin:.2em 0}
"""


def _baselines() -> set[str]:
    return {name for name, spec in all_specs().items() if spec.baseline}


def _is_baseline(run: str, baselines: set[str]) -> bool:
    return parse_run(run)[0] in baselines


def _rank_colour(rank: float, n: int) -> str:
    """A light background from green (rank 1) to red (rank n)."""
    if not math.isfinite(rank) or n <= 1:
        return "#ffffff"
    hue = 120.0 * (1.0 - (rank - 1.0) / (n - 1.0))
    return f"hsl({hue:.0f},60%,88%)"


def load_tables(results_dir: str | Path, datasets: list[str]) -> dict[str, pd.DataFrame]:
    """Each dataset's report table (``<dataset>/report/table.tsv``), indexed by run."""
    tables = {}
    for name in datasets:
        path = Path(results_dir) / name / "report" / "table.tsv"
        tables[name] = read_table(path).set_index("model")
    return tables


def leaderboard(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Runs x datasets: ``<dataset> rank`` and ``<dataset> score`` (average rank and average
    score there; NaN where the run did not run), and ``mean rank`` over the datasets it ran on;
    sorted by mean rank (best first). The data ceiling is not a run and is left out."""
    runs: list[str] = []
    for table in tables.values():
        runs += [r for r in table.index if r != CEILING_ROW and r not in runs]
    board = pd.DataFrame(index=pd.Index(runs, name="model"))
    for name, table in tables.items():
        rows = table.drop(index=CEILING_ROW, errors="ignore")
        board[f"{name} rank"] = rows[AVERAGE_RANK].reindex(board.index)
        board[f"{name} score"] = rows[AVERAGE_SCORE].reindex(board.index)
    board[MEAN_RANK] = board[[f"{n} rank" for n in tables]].mean(axis=1, skipna=True)
    return board.sort_values(MEAN_RANK, kind="stable")


def lost_to_baselines(tables: dict[str, pd.DataFrame], baselines: set[str]) -> dict[str, list[str]]:
    """Per dataset, one line per non-baseline run that a baseline beat on average rank:
    ``"<run> (<rank>) lost to <baseline> (<rank>), ..."``."""
    lines: dict[str, list[str]] = {}
    for name, table in tables.items():
        rows = table.drop(index=CEILING_ROW, errors="ignore")[AVERAGE_RANK].dropna()
        base = rows[[r for r in rows.index if _is_baseline(r, baselines)]]
        out = []
        for run, rank in rows.items():
            if _is_baseline(run, baselines):
                continue
            better = base[base < rank].sort_values()
            if len(better):
                winners = ", ".join(f"{b} ({v:.2f})" for b, v in better.items())
                out.append(f"{run} ({rank:.2f}) lost to {winners}")
        lines[name] = out
    return lines


def _leaderboard_html(board: pd.DataFrame, links: dict[str, str], baselines: set[str]) -> str:
    datasets = list(links)
    head = "".join(f"<th><a href='{html.escape(links[n])}'>{html.escape(n)}</a></th>"
                   for n in datasets)
    rows = [f"<table class='leaderboard'><tr><th class='model'>model</th><th>{MEAN_RANK}</th>"
            f"{head}</tr>"]
    n_runs = {n: int(board[f"{n} rank"].notna().sum()) for n in datasets}
    best_mean = board[MEAN_RANK].min()
    for run, row in board.iterrows():
        cls = " class='baseline'" if _is_baseline(str(run), baselines) else ""
        mean_cls = " class='best'" if row[MEAN_RANK] == best_mean else ""
        cells = [f"<td class='model'>{html.escape(str(run))}</td>",
                 f"<td{mean_cls}>{format_number(row[MEAN_RANK], 2)}</td>"]
        for n in datasets:
            rank, score = row[f"{n} rank"], row[f"{n} score"]
            if not math.isfinite(rank):
                cells.append("<td>—</td>")
                continue
            colour = _rank_colour(rank, n_runs[n])
            cells.append(f"<td style='background:{colour}'>{rank:.2f} "
                         f"<span class='score'>· {format_number(score)}</span></td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _dataset_html(name: str, table: pd.DataFrame, link: str, baselines: set[str]) -> str:
    labels = list(PAPER_METRICS)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    parts = [f"<h3><a href='{html.escape(link)}'>{html.escape(name)}</a></h3>",
             f"<table><tr><th class='model'>model</th>{head}<th>{AVERAGE_RANK}</th>"
             f"<th>{AVERAGE_SCORE}</th><th>{VCC_SCORE}</th></tr>"]
    best_of = best_models(table.reset_index())  # the report's rule: ties all bold, none if all tie
    order = table.drop(index=CEILING_ROW, errors="ignore").sort_values(AVERAGE_RANK,
                                                                        kind="stable")
    if CEILING_ROW in table.index:
        order = pd.concat([order, table.loc[[CEILING_ROW]]])
    for run, row in order.iterrows():
        if run == CEILING_ROW:
            cls = " class='ceiling'"
        elif _is_baseline(str(run), baselines):
            cls = " class='baseline'"
        else:
            cls = ""
        cells = [f"<td class='model'>{html.escape(str(run))}</td>"]
        for label in labels:
            rank = row.get(f"{label} rank", float("nan"))
            best = " class='best'" if run in best_of.get(label, ()) else ""
            suffix = f" ({int(rank)})" if isinstance(rank, float) and math.isfinite(rank) else ""
            cells.append(f"<td{best}>{format_number(row[label])}{suffix}</td>")
        cells += [f"<td>{format_number(row.get(AVERAGE_RANK, float('nan')), 2)}</td>",
                  f"<td>{format_number(row.get(AVERAGE_SCORE, float('nan')))}</td>",
                  f"<td>{format_number(row.get(VCC_SCORE, float('nan')))}</td>"]
        parts.append(f"<tr{cls}>{''.join(cells)}</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def build_index(results_dir: str, datasets: list[str], out: str) -> None:
    """Write ``out``: the leaderboard of every run over ``datasets``, the runs a baseline beat,
    and each dataset's compact table, linking ``<dataset>/report/report.html``.

    results_dir: the run's results folder; each dataset's ``report/table.tsv`` must exist (the
    report rule wrote it).
    """
    tables = load_tables(results_dir, datasets)
    out_dir = Path(out).resolve().parent
    links = {n: os.path.relpath((Path(results_dir) / n / "report" / "report.html").resolve(),
                                out_dir) for n in datasets}
    baselines = _baselines()
    board = leaderboard(tables)
    lost = lost_to_baselines(tables, baselines)

    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width'>",
             f"<title>lingshu-bench leaderboard</title><style>{STYLE}</style></head><body>",
             "<h1>lingshu-bench leaderboard</h1>",
             "<p class='lead'>Each cell: the run's <b>average rank</b> over the paper's seven "
             "metrics among the runs of that dataset (1 = best; green to red) and, after the dot, "
             "its <b>average score</b> (the paper's improvement over <i>control_mean</i>; higher "
             f"is better). Rows are sorted by <b>{MEAN_RANK}</b>, the average rank averaged over "
             "the datasets the run ran on; baselines in italics. A dataset's name opens its "
             "report (95% intervals, figures, generation fidelity, costs).</p>",
             _leaderboard_html(board, links, baselines),
             "<h2>Runs a baseline beat</h2>",
             "<p class='lead'>A run is listed under a dataset when a baseline has a better "
             "(lower) average rank there; the ranks are in brackets.</p>"]
    for name in datasets:
        items = lost[name]
        body = ("<ul class='lost'>" + "".join(f"<li>{html.escape(x)}</li>" for x in items)
                + "</ul>") if items else "<p>No run lost to a baseline.</p>"
        parts.append(f"<h3>{html.escape(name)}</h3>{body}")
    parts.append("<h2>Metric values per dataset</h2>"
                 "<p class='lead'>Value (rank) per metric; the data ceiling, where computed, is "
                 "the last row and is not ranked.</p>")
    for name in datasets:
        parts.append(_dataset_html(name, tables[name], links[name], baselines))
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
