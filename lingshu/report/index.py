"""The front page of a run: one HTML page that links every dataset's report and shows its table."""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from lingshu.io import atomic_path


def build_index(results_dir: str, datasets: list[str], out: str) -> None:
    """Write ``out``: for each dataset a link to ``<dataset>/report/report.html`` and its table.

    results_dir: the run's results folder; datasets: their names; each dataset's
    ``report/table.tsv`` must exist (the report rule wrote it).
    """
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>lingshu-bench results</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:3px 6px;text-align:right}th{background:#f3f3f3}</style></head><body>",
             "<h1>lingshu-bench results</h1>",
             "<p>One section per dataset: the models x metrics table (values with ranks); "
             "open the dataset's report for intervals, figures and costs.</p>"]
    out_dir = Path(out).resolve().parent
    for name in datasets:
        table_path = Path(results_dir) / name / "report" / "table.tsv"
        report = Path(results_dir) / name / "report" / "report.html"
        link = os.path.relpath(report.resolve(), out_dir)
        table = pd.read_csv(table_path, sep="\t")
        parts.append(f"<h2><a href='{html.escape(link)}'>{html.escape(name)}</a></h2>")
        parts.append(table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.3f}"))
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
