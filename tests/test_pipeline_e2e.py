"""The whole Snakemake pipeline on a tiny simulated config, end to end (slow: about 5 minutes, two runs)."""

import json
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
        },
    },
    "models": {"control_mean": {}, "perturbation_mean": {}, "linear": {"ridge": 0.1},
               "lingshu": {"preset": "tiny", "pretrain_steps": 10, "finetune_steps": 20,
                           "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 10,
                           "unconditional_steps": 24, "threads": 1},
               "state": {"preset": "tiny", "threads": 1},
               "scldm": {"preset": "tiny", "threads": 1}},
}


def _run_tiny(results: Path, tmp_path: Path) -> None:
    """Run the pipeline on the TINY config into ``results`` (a fresh folder)."""
    config_path = tmp_path / f"{results.name}.yaml"
    config_path.write_text(yaml.safe_dump(dict(TINY, results_dir=str(results))))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(ROOT), "--configfile", str(config_path), "--cores", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_is_identical(tmp_path):
    results = tmp_path / "results"
    _run_tiny(results, tmp_path)

    ds = results / "tiny_genetic"
    table = pd.read_csv(ds / "report" / "table.tsv", sep="\t")
    assert {"control_mean", "perturbation_mean", "linear", "lingshu", "state", "scldm"} <= set(
        table["model"])
    assert (ds / "models" / "lingshu" / "pretrain.pt").exists()
    assert (ds / "report" / "report.html").stat().st_size > 10_000
    assert (results / "index.html").exists()
    for name in ("metric_bars", "delta_scatter", "per_condition_distributions"):
        assert (ds / "report" / "figures" / f"{name}.png").exists()
    for rule in ("preprocess", "split", "evaluate_linear", "ceiling", "pretrain_lingshu",
                 "fit_lingshu", "fit_state", "predict_state", "pretrain_scldm", "fit_scldm"):
        assert (ds / "benchmarks" / f"{rule}.tsv").exists()
        assert (ds / "logs" / f"{rule}.log").exists()
    summaries = {m: json.loads((ds / "eval" / m / "summary.json").read_text())["metrics"]
                 for m in ("linear", "lingshu", "state", "scldm")}

    # Generation fidelity: both generative models, the sampling floor, figures, in the report.
    generation = pd.read_csv(ds / "generation" / "table.tsv", sep="\t")
    assert {"lingshu", "scldm", "real (training cells)"} <= set(generation["model"])
    assert (generation.loc[generation["model"] != "real (reference cells)", "n_cells"] == 60).all()
    for name in ("fidelity_bars", "umap", "markers", "histograms"):
        assert (ds / "generation" / "figures" / f"{name}.png").stat().st_size > 1000, name
    page = (ds / "report" / "report.html").read_text()
    assert "Generation fidelity" in page and "Distribution of the predicted cells" in page
    assert "Held-out conditions per context" in page  # two contexts
    for rule in ("generate_lingshu", "generate_scldm", "generation_eval"):
        assert (ds / "benchmarks" / f"{rule}.tsv").exists(), rule

    # Determinism: a second run from scratch gives the same numbers.
    again = tmp_path / "again"
    _run_tiny(again, tmp_path)
    for model, metrics in summaries.items():
        path = again / "tiny_genetic" / "eval" / model / "summary.json"
        assert json.loads(path.read_text())["metrics"] == metrics, model
    rerun = pd.read_csv(again / "tiny_genetic" / "generation" / "table.tsv", sep="\t")
    pd.testing.assert_frame_equal(rerun.drop(columns="generate_seconds"),
                                  generation.drop(columns="generate_seconds"))
