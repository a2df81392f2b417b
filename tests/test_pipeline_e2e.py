"""The whole Snakemake pipeline on a tiny simulated config, end to end (slow: about 2 minutes)."""

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
            "split": {"kind": "heldout_perturbations", "n_test_perturbations": 2},
        },
    },
    "models": {"control_mean": {}, "perturbation_mean": {}, "linear": {"ridge": 0.1}},
}


def _run(config_path, cwd):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(ROOT), "--configfile", str(config_path), "--cores", "2"],
        cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_is_identical(tmp_path):
    results = tmp_path / "results"
    cfg = dict(TINY, results_dir=str(results))
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    run = _run(config_path, tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]

    ds = results / "tiny_genetic"
    table = pd.read_csv(ds / "report" / "table.tsv", sep="\t")
    assert {"control_mean", "perturbation_mean", "linear"} <= set(table["model"])
    assert (ds / "report" / "report.html").stat().st_size > 10_000
    assert (results / "index.html").exists()
    for name in ("metric_bars", "delta_scatter", "per_condition_distributions"):
        assert (ds / "report" / "figures" / f"{name}.png").exists()
    for rule in ("preprocess", "split", "evaluate_linear", "ceiling"):
        assert (ds / "benchmarks" / f"{rule}.tsv").exists()
        assert (ds / "logs" / f"{rule}.log").exists()
    summary = json.loads((ds / "eval" / "linear" / "summary.json").read_text())

    # Determinism: a second run from scratch gives the same numbers.
    again = tmp_path / "again"
    cfg2 = dict(TINY, results_dir=str(again))
    config2 = tmp_path / "again.yaml"
    config2.write_text(yaml.safe_dump(cfg2))
    run2 = _run(config2, tmp_path)
    assert run2.returncode == 0, run2.stderr[-4000:]
    summary2 = json.loads((again / "tiny_genetic" / "eval" / "linear" / "summary.json").read_text())
    assert summary["metrics"] == summary2["metrics"]
