"""Tests of lingshu.report: every output file from tiny evaluations, table layout, HTML content."""

from __future__ import annotations

import html
import json

import anndata as ad
import numpy as np
import pytest

from lingshu.evaluate import PAPER_METRICS, evaluate_to_dir
from lingshu.io import read_table
from lingshu.report import build_report
from lingshu.report.html import run_note
from lingshu.report.tables import benchmark_table, paper_table, to_markdown
from test_evaluate import make_prediction, make_truth
from test_generation_figures import make_generation_dir

MODELS = ("control_mean", "perturbation_mean", "perfect")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Truth, predictions and evaluation folders (models + ceiling) on two tiny contexts."""
    root = tmp_path_factory.mktemp("report_inputs")
    truth = make_truth(contexts=("A", "B"), perts=("P1", "P2", "P3", "P4"))
    truth_path = root / "truth.h5ad"
    truth.write_h5ad(truth_path)
    pred_paths, eval_dirs = {}, {}
    for model in MODELS:
        pred_paths[model] = str(root / f"{model}.h5ad")
        make_prediction(truth, model).write_h5ad(pred_paths[model])
        eval_dirs[model] = str(root / "eval" / model)
        evaluate_to_dir(str(truth_path), pred_paths[model], eval_dirs[model])
    ceiling_dir = str(root / "eval" / "ceiling")
    evaluate_to_dir(str(truth_path), None, ceiling_dir, ceiling=True)
    bench = root / "benchmarks"
    bench.mkdir()
    for model in MODELS:  # the workflow's layout: benchmarks/<rule>_<model>.tsv
        (bench / f"evaluate_{model}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            "12.5\t0:00:12\t512.3\t900.1\t500.0\t505.0\t1.0\t2.0\t95.0\t11.9\n"
        )
    benchmark_files = sorted(str(p) for p in bench.iterdir()) + [str(bench / "not_run.tsv")]
    return dict(truth_path=str(truth_path), pred_paths=pred_paths, eval_dirs=eval_dirs,
                ceiling_dir=ceiling_dir, benchmark_files=benchmark_files)


@pytest.fixture(scope="module")
def report_dir(evaluated, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    features = out / "features_used.tsv"
    features.write_text("context\tperturbation\tsource\nA\tP1\ttarget_pca\nA\tP2\tunknown\n")
    build_report("tiny", evaluated["eval_dirs"], evaluated["ceiling_dir"], evaluated["truth_path"],
                 evaluated["pred_paths"], str(out), benchmark_files=evaluated["benchmark_files"],
                 n_boot=100, seed=0, features_used=str(features))
    return out


def test_report_marks_conditions_predicted_without_target_information(report_dir):
    page = (report_dir / "report.html").read_text()
    assert "1 of 2 test conditions were predicted without target information" in page


def test_report_writes_every_file(report_dir):
    for name in ("table.tsv", "table.md", "full_metrics.tsv", "benchmarks.tsv", "report.html",
                 "figures/metric_bars.png", "figures/delta_scatter.png",
                 "figures/per_condition_distributions.png"):
        path = report_dir / name
        assert path.exists() and path.stat().st_size > 0, name


def test_table_layout(report_dir):
    table = read_table(report_dir / "table.tsv")
    assert list(table["model"]) == [*MODELS, "data ceiling"]
    for label in PAPER_METRICS:
        assert {label, f"{label} low", f"{label} high", f"{label} rank"} <= set(table.columns)
    models = table.set_index("model")
    assert models.loc["perfect", "MAE rank"] == 1  # MAE ranks ascending
    assert models.loc["perfect", "Pearson-delta rank"] == 1  # others descending
    assert models.loc["perfect", "average rank"] == models["average rank"].min()
    assert models.loc["control_mean", "average score"] == 0.0
    assert models.loc["perturbation_mean", "VCC score"] == 0.0
    assert models.loc["perfect", "VCC score"] > 0
    assert np.isnan(models.loc["data ceiling", "MAE rank"])  # the ceiling is not ranked
    full = read_table(report_dir / "full_metrics.tsv")
    assert {"overlap_at_N", "clustering_agreement", "spearman_nsig"} <= set(full.columns)


def test_html_mentions_every_model(report_dir):
    page = (report_dir / "report.html").read_text()
    for model in MODELS:
        assert model in page
    assert "data:image/png;base64," in page
    assert "tiny" in page and "8 test conditions" in page
    assert "evaluate_perfect" in page and "not_run" not in page  # jobs named from their files


def test_markdown_bolds_best_and_handles_missing_baselines(evaluated):
    per_condition = {m: read_table(f"{d}/per_condition.tsv") for m, d in evaluated["eval_dirs"].items()}
    table = paper_table({"perfect": per_condition["perfect"]}, None, n_boot=0)
    assert np.isnan(table["average score"]).all()  # no control_mean baseline to score against
    markdown = to_markdown(table)
    assert markdown.count("\n") == 3 and "**" in markdown


def test_metrics_that_cannot_separate_the_models_are_named_with_the_reason(evaluated):
    from lingshu.report.html import _silent_html
    from lingshu.report.tables import silent_metrics

    per_condition = read_table(f"{evaluated['eval_dirs']['perfect']}/per_condition.tsv")
    worse = per_condition.copy()
    worse["mae"] = worse["mae"] + 0.1
    frames = {"a": per_condition, "b": worse}
    assert "MAE" not in silent_metrics(paper_table(frames, None, n_boot=0), frames)
    # no real DE gene anywhere: the DE metrics tie (0 or undefined) and say why
    none_de = {m: f.assign(de_nsig_counts_real=0, overlap_at_N=0.0) for m, f in frames.items()}
    silent = silent_metrics(paper_table(none_de, None, n_boot=0), none_de)
    assert "no gene is DE" in silent["DES"] and "MAE" not in silent
    # one held-out condition per context: PDS is 1 for every model
    one = {m: f.groupby("context", as_index=False).head(1).assign(discrimination_score_l1=1.0)
           for m, f in frames.items()}
    silent = silent_metrics(paper_table(one, None, n_boot=0), one)
    assert "one held-out condition" in silent["PDS"]
    html = _silent_html({"DES": "why 1", "AUPRC": "why 1", "PDS": "why 2"})
    assert "<b>DES, AUPRC</b>: why 1" in html and "<b>PDS</b>: why 2" in html
    assert _silent_html({}) == ""


def test_ties_for_best_are_all_bold_and_a_column_where_all_tie_has_none(evaluated):
    from lingshu.report.tables import best_models

    per_condition = read_table(f"{evaluated['eval_dirs']['perfect']}/per_condition.tsv")
    table = paper_table({"a": per_condition, "b": per_condition.copy()}, None, n_boot=0)
    assert best_models(table) == {}  # identical models: nobody is best anywhere
    assert "**" not in to_markdown(table)
    worse = per_condition.copy()
    worse["mae"] = worse["mae"] + 0.1
    table = paper_table({"a": per_condition, "b": per_condition.copy(), "c": worse}, None,
                        n_boot=0)
    best = best_models(table)
    assert best["MAE"] == {"a", "b"}  # a tie for the best: both bold
    assert "DES" not in best  # the same DES for all three: none
    lines = to_markdown(table).splitlines()
    assert lines[4].startswith("| c |") and "**" not in lines[4]


def test_benchmark_table_names_jobs(tmp_path):
    for rule in ("split", "train"):
        (tmp_path / "bench" / rule).mkdir(parents=True)
        (tmp_path / "bench" / rule / "kang.tsv").write_text("s\tmax_rss\n3.0\t100\n5.0\t-\n")
    table = benchmark_table([str(p) for p in sorted((tmp_path / "bench").rglob("*.tsv"))])
    assert list(table["job"]) == ["split/kang", "train/kang"]
    assert table["wall_s"].tolist() == [4.0, 4.0]
    assert table["max_rss_mb"].tolist() == [100.0, 100.0]
    assert table["cpu_s"].isna().all()  # files without a cpu_time column


def test_report_cost_table_has_cpu_time(report_dir):
    costs = read_table(report_dir / "benchmarks.tsv").set_index("job")
    assert costs.loc["evaluate_perfect", "cpu_s"] == 11.9
    assert "CPU time (s)" in (report_dir / "report.html").read_text()


def test_context_scores_and_prediction_distribution(report_dir):
    scores = read_table(report_dir / "context_scores.tsv").set_index("model")
    assert set(scores.columns) == {"A", "B"}
    assert (scores.loc["control_mean"] == 0).all()  # the reference scores 0 in every context
    assert (scores.loc["perfect"] > 0.3).all() and (scores.loc["perfect"] <= 1).all()
    assert (report_dir / "figures" / "context_scores.png").stat().st_size > 0
    dist = read_table(report_dir / "prediction_distribution.tsv").set_index("model")
    assert dist.loc["perfect", "mmd"] < dist.loc["perturbation_mean", "mmd"]
    page = (report_dir / "report.html").read_text()
    assert "Held-out conditions per context" in page
    assert "Distribution of the predicted cells" in page
    assert "Generation fidelity" not in page  # no generation folder given


def test_report_draws_generation_fidelity_from_the_generation_folder(evaluated, tmp_path):
    from lingshu.report.generation import figure_names

    make_generation_dir(tmp_path / "generation")
    # a sampling variant's run: its settings travel from the prediction to the report's notes
    variant = make_prediction(ad.read_h5ad(evaluated["truth_path"]), "perfect")
    variant.uns["lingshu"] = {"model": "lingshu", "run": "lingshu@w3",
                              "sampling": json.dumps({"guidance": 3.0})}
    variant.write_h5ad(tmp_path / "lingshu@w3.h5ad")
    evaluate_to_dir(evaluated["truth_path"], str(tmp_path / "lingshu@w3.h5ad"),
                    str(tmp_path / "eval_w3"))
    eval_dirs = {**evaluated["eval_dirs"], "lingshu@w3": str(tmp_path / "eval_w3")}
    pred_paths = {**evaluated["pred_paths"], "lingshu@w3": str(tmp_path / "lingshu@w3.h5ad")}
    out = tmp_path / "report"
    build_report("tiny", eval_dirs, evaluated["ceiling_dir"], evaluated["truth_path"],
                 pred_paths, str(out), n_boot=0, seed=0,
                 generation_dir=str(tmp_path / "generation"))
    assert (out / "generation" / "table.md").stat().st_size > 0
    assert sorted(p.name for p in (out / "generation" / "figures").iterdir()) == sorted(
        figure_names())
    page = (out / "report.html").read_text()
    assert "Generation fidelity" in page and "model_a" in page
    # every run's note comes from its model's spec; a variant's names its sampling settings
    for model in ("control_mean", "perturbation_mean"):
        assert html.escape(run_note(model)) in page
    note = run_note("lingshu@w3", {"guidance": 3.0})
    assert "guidance = 3.0" in note and html.escape(note) in page


def test_benchmark_table_takes_cpu_time_from_the_jobs_usage_line(tmp_path):
    from lingshu.usage import PREFIX

    bench, logs = tmp_path / "ds" / "benchmarks", tmp_path / "ds" / "logs"
    bench.mkdir(parents=True)
    logs.mkdir()
    for job in ("fit_a", "fit_b", "fit_c"):
        (bench / f"{job}.tsv").write_text("s\tcpu_time\tmax_rss\n40.0\t15.0\t100\n")
    # a job's own count; two ranks under torchrun add up; no usage line: Snakemake's figure
    (logs / "fit_a.log").write_text(f"training...\n{PREFIX}" '{"command": "fit", "wall_s": 40, "cpu_s": 38.5}\n')
    (logs / "fit_b.log").write_text(f"{PREFIX}" '{"cpu_s": 30}\n' f"{PREFIX}" '{"cpu_s": 31}\n')
    (logs / "fit_c.log").write_text("ERROR: something failed\n")
    table = benchmark_table([str(p) for p in sorted(bench.glob("*.tsv"))]).set_index("job")
    assert table["cpu_s"].to_dict() == {"fit_a": 38.5, "fit_b": 61.0, "fit_c": 15.0}
    assert table["cpu_from"].to_dict() == {"fit_a": "job log", "fit_b": "job log",
                                           "fit_c": "Snakemake"}

