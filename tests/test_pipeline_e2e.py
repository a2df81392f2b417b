"""The whole Snakemake pipeline on a tiny simulated config, end to end (slow: a few minutes):
every model, sampling variants from one fit, a sampling edit that re-runs sampling only,
predictions made elsewhere (an external entry) scored like a model's, and a rerun from scratch
of the trained models that gives the same numbers."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "seed": 0,
    "threads": 1,
    "bootstrap": 50,
    "ceiling": True,
    "datasets": {
        "tiny_genetic": {
            "source": {"simulate": {"n_genes": 300, "n_cells": 2400, "n_contexts": 2,
                                    "n_knockdowns": 6, "n_stimulations": 0,
                                    "gene_mean_median": 0.3}},
            "columns": {"perturbation": "perturbation", "control": "control",
                        "context": "cell_type", "batch": "donor"},
            "split": {"kind": "heldout_perturbations", "n_test_perturbations": 2,
                      "max_reference_cells": 60},
            # Two measured genes and a label that is neither a gene nor has features.
            "screen": {"candidates": ["GENE00010", "GENE00020", "NOTAGENE"], "max_cells": 20},
        },
    },
    "models": {"control_mean": {}, "perturbation_mean": {}, "linear": {"ridge": 0.1},
               # Three guidance settings of one fit: rows lingshu, lingshu@w0, lingshu@w3.
               "lingshu": {"preset": "tiny", "pretrain_steps": 10, "finetune_steps": 20,
                           "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 10,
                           "unconditional_steps": 24, "threads": 1, "guidance": 1.0,
                           "variants": {"w0": {"guidance": 0.0}, "w3": {"guidance": 3.0}}},
               "state": {"preset": "tiny", "threads": 1},
               "scldm": {"preset": "tiny", "threads": 1}},
}


def _run_tiny(results: Path, tmp_path: Path, config: dict = TINY, *extra: str,
              name: str | None = None, targets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the pipeline on ``config`` into ``results`` (extra: more Snakemake arguments;
    targets: files to make, relative to ``results``, rather than everything)."""
    config_path = tmp_path / f"{name or results.name}.yaml"
    config_path.write_text(yaml.safe_dump(dict(config, results_dir=str(results))))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", *(str(results / t) for t in targets),
         "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(ROOT), "--configfile", str(config_path), "--cores", "2", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _planned_jobs(dry_run: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's job stats."""
    stats = (dry_run.stdout + dry_run.stderr).split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_is_identical(tmp_path):
    results = tmp_path / "results"
    _run_tiny(results, tmp_path)

    ds = results / "tiny_genetic"
    table = pd.read_csv(ds / "report" / "table.tsv", sep="\t")
    assert {"control_mean", "perturbation_mean", "linear", "lingshu", "state", "scldm",
            "lingshu@w0", "lingshu@w3"} <= set(table["model"])
    # Three guidance settings, one pre-training and one fit, and three different predictions.
    lingshu_jobs = sorted(p.name for p in (ds / "benchmarks").glob("*lingshu*"))
    assert [j for j in lingshu_jobs if j.startswith(("pretrain", "fit"))] == [
        "fit_lingshu.tsv", "pretrain_lingshu.tsv"]
    assert {"predict_lingshu.tsv", "predict_lingshu@w0.tsv", "predict_lingshu@w3.tsv"} <= set(
        lingshu_jobs)
    rows = table.set_index("model")
    assert len({rows.loc[r, "MAE"] for r in ("lingshu", "lingshu@w0", "lingshu@w3")}) == 3
    assert "variant" in (ds / "report" / "report.html").read_text()
    assert (ds / "models" / "lingshu" / "pretrain.pt").exists()
    assert (ds / "report" / "report.html").stat().st_size > 10_000
    assert (results / "index.html").exists()
    for name in ("metric_bars", "delta_scatter", "per_condition_distributions"):
        assert (ds / "report" / "figures" / f"{name}.png").exists()
    for rule in ("preprocess", "split", "evaluate_linear", "ceiling", "pretrain_lingshu",
                 "fit_lingshu", "fit_state", "predict_state", "pretrain_scldm", "fit_scldm"):
        assert (ds / "benchmarks" / f"{rule}.tsv").exists()
        assert (ds / "logs" / f"{rule}.log").exists()
    # The candidate screen: every run lists every candidate in every context; NOTAGENE and
    # every candidate of the models that ignore the perturbation are listed as not encoded.
    for run in set(table["model"]) - {"data ceiling"}:
        screen = pd.read_csv(ds / "screen" / f"{run}.tsv", sep="\t")
        assert len(screen) == 3 * screen["context"].nunique() and screen["context"].nunique() == 2
        assert set(screen["perturbation"]) == {"GENE00010", "GENE00020", "NOTAGENE"}, run
        ranked = screen["status"] == "ranked"
        if run in ("control_mean", "perturbation_mean"):
            assert not ranked.any(), run
        else:
            assert set(screen.loc[ranked, "perturbation"]) == {"GENE00010", "GENE00020"}, run
            assert (screen.loc[ranked, "n_cells"] == 20).all(), run
    assert "Candidate screen" in (ds / "report" / "report.html").read_text()
    summaries = {m: json.loads((ds / "eval" / m / "summary.json").read_text())["metrics"]
                 for m in ("linear", "lingshu", "state", "scldm")}

    # Generation fidelity: both generative models, the sampling floor, figures, in the report.
    generation = pd.read_csv(ds / "generation" / "table.tsv", sep="\t")
    assert {"lingshu", "scldm", "real (training cells)"} <= set(generation["model"])
    assert (generation.loc[generation["model"] != "real (reference cells)", "n_cells"] == 60).all()
    for name in ("fidelity_bars", "umap", "markers", "histograms"):
        assert (ds / "report" / "generation" / "figures" / f"{name}.png").stat().st_size > 1000, name
    page = (ds / "report" / "report.html").read_text()
    assert "Generation fidelity" in page and "Distribution of the predicted cells" in page
    assert "Held-out conditions per context" in page  # two contexts
    for rule in ("generate_lingshu", "generate_scldm", "generation_eval"):
        assert (ds / "benchmarks" / f"{rule}.tsv").exists(), rule
    assert not (ds / "benchmarks" / "generate_lingshu@w3.tsv").exists()  # guidance: no effect

    # Editing only sampling settings (guidance) re-runs sampling, evaluation and the report,
    # never a pre-training or fitting job; a training setting retrains.
    edited = copy.deepcopy(TINY)
    edited["models"]["lingshu"]["guidance"] = 2.0
    edited["models"]["scldm"]["guidance"] = 2.0
    jobs = _planned_jobs(_run_tiny(results, tmp_path, edited, "-n", name="edited"))
    assert "pretrain_model" not in jobs and "fit_model" not in jobs, jobs
    assert "generate" not in jobs, jobs  # guidance does not change unconditional generation
    assert jobs["predict"] == 2 and jobs["evaluate"] == 2 and jobs["report"] == 1, jobs
    retrained = copy.deepcopy(TINY)
    retrained["models"]["lingshu"]["finetune_steps"] = 21
    jobs = _planned_jobs(_run_tiny(results, tmp_path, retrained, "-n", name="retrained"))
    assert jobs.get("fit_model") == 1 and "pretrain_model" not in jobs, jobs

    # Predictions made elsewhere (a `kind: external` entry): perturbation_mean's own file,
    # copied out and read back, runs only its own job, its evaluation, the report and the
    # index, and scores exactly what perturbation_mean scored.
    outside = tmp_path / "outside" / "pm.h5ad"
    outside.parent.mkdir()
    shutil.copyfile(ds / "predictions" / "perturbation_mean.h5ad", outside)
    external = copy.deepcopy(TINY)
    external["models"]["outside"] = {"kind": "external", "path": str(outside),
                                     "values": "log1p_cp10k", "note": "scored from outside"}
    jobs = _planned_jobs(_run_tiny(results, tmp_path, external, "-n", name="external"))
    # (screening ranks every run's predicted effects: a new run is scored there too)
    assert jobs == {"external_prediction": 1, "evaluate": 1, "screening": 1, "report": 1,
                    "index": 1, "all": 1}, jobs
    _run_tiny(results, tmp_path, external, name="external")
    rows = pd.read_csv(ds / "report" / "table.tsv", sep="\t").set_index("model")
    pd.testing.assert_series_equal(rows.loc["outside"], rows.loc["perturbation_mean"],
                                   check_names=False)
    assert "scored from outside" in (ds / "report" / "report.html").read_text()
    assert json.loads((ds / "eval" / "outside" / "summary.json").read_text())["external"][
        "source"] == str(outside)
    assert "external_prediction_outside" in set(
        pd.read_csv(ds / "report" / "benchmarks.tsv", sep="\t")["job"])

    # Determinism: a second run from scratch gives the same numbers (of the trained models'
    # evaluations and the generation table: the files that depend on every training job).
    again = tmp_path / "again"
    _run_tiny(again, tmp_path, targets=(
        *(f"tiny_genetic/eval/{model}/summary.json" for model in summaries),
        "tiny_genetic/generation/table.tsv"))
    for model, metrics in summaries.items():
        path = again / "tiny_genetic" / "eval" / model / "summary.json"
        assert json.loads(path.read_text())["metrics"] == metrics, model
    rerun = pd.read_csv(again / "tiny_genetic" / "generation" / "table.tsv", sep="\t")
    pd.testing.assert_frame_equal(rerun.drop(columns="generate_seconds"),
                                  generation.drop(columns="generate_seconds"))
