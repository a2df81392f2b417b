"""The front page: a leaderboard of runs x datasets and the runs a baseline beat."""

import math

import numpy as np
import pandas as pd

from lingshu.evaluate.perturbation import PAPER_METRICS
from lingshu.report.index import build_index, leaderboard, load_tables, lost_to_baselines
from lingshu.report.tables import AVERAGE_RANK, AVERAGE_SCORE, CEILING_ROW, VCC_SCORE

BASELINES = {"control_mean", "perturbation_mean", "linear"}


def _table(ranks: dict[str, float], ceiling: bool = True) -> pd.DataFrame:
    rows = []
    for i, (model, rank) in enumerate(ranks.items()):
        row = {"model": model, AVERAGE_RANK: rank, AVERAGE_SCORE: 0.1 * i, VCC_SCORE: 0.0}
        for label in PAPER_METRICS:
            row.update({label: 0.5, f"{label} low": 0.4, f"{label} high": 0.6,
                        f"{label} rank": rank})
        rows.append(row)
    if ceiling:
        row = {"model": CEILING_ROW, AVERAGE_RANK: np.nan, AVERAGE_SCORE: np.nan,
               VCC_SCORE: np.nan}
        for label in PAPER_METRICS:
            row.update({label: 0.9, f"{label} low": np.nan, f"{label} high": np.nan,
                        f"{label} rank": np.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def _write(tmp_path, name, table):
    report = tmp_path / name / "report"
    report.mkdir(parents=True)
    table.to_csv(report / "table.tsv", sep="\t", index=False)
    (report / "report.html").write_text("<html></html>")


def test_leaderboard_averages_ranks_over_the_datasets_a_run_ran_on(tmp_path):
    _write(tmp_path, "a", _table({"linear": 1.0, "lingshu": 2.0, "control_mean": 3.0}))
    _write(tmp_path, "b", _table({"linear": 2.0, "control_mean": 3.0, "scale": 1.0}))
    board = leaderboard(load_tables(tmp_path, ["a", "b"]))
    assert list(board.index) == ["scale", "linear", "lingshu", "control_mean"]
    assert board.loc["linear", "mean rank"] == 1.5 and board.loc["scale", "mean rank"] == 1.0
    assert math.isnan(board.loc["scale", "a rank"]) and board.loc["lingshu", "mean rank"] == 2.0
    assert CEILING_ROW not in board.index


def test_runs_a_baseline_beat_are_named_with_the_winners():
    tables = {"a": _table({"linear": 1.0, "perturbation_mean": 2.0, "lingshu": 3.0,
                           "scale": 1.5, "lingshu@w0": 2.0}).set_index("model")}
    lost = lost_to_baselines(tables, BASELINES)["a"]
    assert lost == ["lingshu (3.00) lost to linear (1.00), perturbation_mean (2.00)",
                    "scale (1.50) lost to linear (1.00)",
                    "lingshu@w0 (2.00) lost to linear (1.00)"]


def test_the_index_page_links_reports_and_shows_every_run(tmp_path):
    _write(tmp_path, "sim_genetic", _table({"linear": 1.0, "lingshu": 2.0}))
    _write(tmp_path, "kang", _table({"linear": 2.0, "lingshu": 1.0}, ceiling=False))
    out = tmp_path / "index.html"
    build_index(str(tmp_path), ["sim_genetic", "kang"], str(out))
    page = out.read_text()
    assert "href='sim_genetic/report/report.html'" in page
    assert "href='kang/report/report.html'" in page
    assert "lingshu (2.00) lost to linear (1.00)" in page
    assert page.count("<table") == 3  # the leaderboard and one table per dataset
    assert "low" not in page.split("<h2>Metric values")[1]  # intervals stay in the reports


def test_the_index_bolds_as_the_report_does(tmp_path):
    # every metric ties (0.5) except MAE, where lingshu is better: bold there only
    table = _table({"linear": 1.0, "lingshu": 2.0})
    table.loc[table["model"] == "lingshu", "MAE"] = 0.1
    _write(tmp_path, "d", table)
    out = tmp_path / "index.html"
    build_index(str(tmp_path), ["d"], str(out))
    cells = out.read_text().split("<h2>Metric values")[1]
    assert cells.count("class='best'") == 1 and "class='best'>0.100" in cells
