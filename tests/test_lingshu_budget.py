"""benchmarks/lingshu_budget.py: the spread over seeds and the checkpoint a fit starts from."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lingshu_budget.py"


@pytest.fixture(scope="module")
def budget():
    spec = importlib.util.spec_from_file_location("lingshu_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table() -> pd.DataFrame:
    seeds = [{"dataset": "a", "model": "lingshu", "variant": "default", "seed": k,
              "pearson_delta": pd_, "des": des, "mae": mae}
             for k, (pd_, des, mae) in enumerate([(0.40, 0.10, 0.090), (0.44, 0.14, 0.100),
                                                  (0.42, 0.12, 0.095)])]
    refs = [{"dataset": "a", "model": "control_mean", "variant": "[control_mean]",
             "pearson_delta": 0.0, "des": 0.0, "mae": 0.098},
            {"dataset": "a", "model": "perturbation_mean", "variant": "[perturbation_mean]",
             "pearson_delta": 0.5, "des": 0.13, "mae": 0.2},
            {"dataset": "b", "model": "control_mean", "variant": "[control_mean]", "mae": 0.01}]
    return pd.DataFrame(seeds + refs).assign(cpu_total=60.0)


def test_spread_gives_mean_sd_range_and_wins_against_each_pipeline_row(budget):
    out = budget.spread(_table()).set_index("metric")
    assert list(out.index) == ["pearson_delta", "des", "mae"]
    assert (out["seeds"] == 3).all() and (out["dataset"] == "a").all()
    mae = out.loc["mae"]
    assert mae["mean"] == pytest.approx(0.095)
    assert mae["sd"] == pytest.approx(np.std([0.090, 0.100, 0.095], ddof=1))
    assert (mae["min"], mae["max"]) == (0.090, 0.100)
    # lower MAE is better: two seeds below control_mean's 0.098; another dataset's row is not
    # compared
    assert mae["better_than"] == "control_mean 2/3; perturbation_mean 3/3"
    # higher DES is better, and a tie is no win
    assert out.loc["des", "better_than"] == "control_mean 3/3; perturbation_mean 1/3"
    assert out.loc["pearson_delta", "better_than"] == "control_mean 3/3; perturbation_mean 0/3"


def test_spread_of_one_seed_has_no_sd_and_writes_table_and_figure(budget, tmp_path):
    table = _table()
    one = table[(table["seed"] != 1) & (table["seed"] != 2)]
    out = budget.spread(one)
    assert (out["seeds"] == 1).all() and out["sd"].isna().all()
    budget.write_spread(table, tmp_path)
    assert (tmp_path / "spread.png").stat().st_size > 0
    written = pd.read_csv(tmp_path / "spread.tsv", sep="\t")
    assert len(written) == 3 and set(written["metric"]) == {"pearson_delta", "des", "mae"}


def test_fit_starts_from_the_studys_own_or_the_pipeline_runs_checkpoint(budget, tmp_path):
    work, res = tmp_path / "work", tmp_path / "res"
    work.mkdir()
    fit_only = {"fit", "predict"}
    with pytest.raises(SystemExit, match="--pretrained"):  # neither pre-trained nor given
        budget.checkpoint(work, res, "lingshu", fit_only, pretrained=False)
    with pytest.raises(SystemExit, match="has not pre-trained lingshu"):
        budget.checkpoint(work, res, "lingshu", fit_only, pretrained=True)
    pipeline = res / "models" / "lingshu" / "pretrain.pt"
    pipeline.parent.mkdir(parents=True)
    pipeline.write_bytes(b"x")
    assert budget.checkpoint(work, res, "lingshu", fit_only, pretrained=True) == pipeline
    # a study that pre-trains fine-tunes from its own checkpoint, --pretrained or not
    assert budget.checkpoint(work, res, "lingshu", {"pretrain", "fit"}, True) == \
        work / "pretrain.pt"
    (work / "pretrain.pt").write_bytes(b"y")
    assert budget.checkpoint(work, res, "lingshu", fit_only, pretrained=False) == \
        work / "pretrain.pt"


def test_merge_keeps_every_seed(budget, tmp_path):
    table = _table()
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    table.to_csv(a, sep="\t", index=False)
    table.assign(variant=table["variant"].where(table["variant"].str.startswith("["),
                                                "other")).to_csv(b, sep="\t", index=False)
    budget.main(["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    merged = pd.read_csv(tmp_path / "m" / "budget.tsv", sep="\t")
    assert (merged["variant"] == "default").sum() == 3 and (merged["variant"] == "other").sum() == 3
    assert len(merged[merged["variant"].str.startswith("[")]) == 3  # the pipeline rows once
    spread = pd.read_csv(tmp_path / "m" / "spread.tsv", sep="\t")
    assert set(spread["variant"]) == {"default", "other"}


def test_prediction_metrics_score_against_the_runs_control_mean(budget, tmp_path):
    import json

    from lingshu.evaluate.perturbation import PAPER_METRICS, average_score

    control = {m: 0.2 for m in PAPER_METRICS.values()} | {"mae": 0.1, "overlap_at_N": None}
    model = {m: 0.5 for m in PAPER_METRICS.values()} | {"mae": 0.08}
    for name, metrics in (("control_mean", control), ("model", model)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"metrics": metrics}))
    out = budget.prediction_metrics(tmp_path / "model", tmp_path / "control_mean")
    assert out["mae"] == 0.08 and out["pearson_delta"] == 0.5
    expected = average_score(model, {k: float("nan") if v is None else v
                                     for k, v in control.items()})["average_score"]
    assert out["average_score"] == pytest.approx(expected) and out["average_score"] > 0
    same = budget.prediction_metrics(tmp_path / "control_mean", tmp_path / "control_mean")
    assert same["average_score"] == 0.0 and "des" not in same  # a null metric is left out
    assert "average_score" not in budget.prediction_metrics(tmp_path / "model", tmp_path / "x")
