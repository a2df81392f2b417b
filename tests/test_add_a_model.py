"""Adding a model is one package under lingshu/models/ (its adapter and its spec) and one config
block: this test does exactly that, in a copy of the project, and runs the toy model through the
pipeline (slow: about a minute)."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TOY_SPEC = '''
"""The toy model's record for the pipeline."""

from lingshu.models.spec import ModelSpec

SPECS = (
    ModelSpec(
        name="toy_shift",
        cls="lingshu.models.toy_shift.model:ToyShift",
        note="a toy: the context's control cells plus the mean training shift.",
    ),
)
'''

TOY_MODEL = '''
"""A toy model: the context's control cells plus the average shift of the training
perturbations (log1p CP10k)."""

import numpy as np

from lingshu.constants import CONTROL, PERT_COL
from lingshu.data.normalize import log1p_cp10k
from lingshu.models.base import PerturbationModel


class ToyShift(PerturbationModel):
    name = "toy_shift"

    def fit(self, data):
        x = np.asarray(log1p_cp10k(data.count_rows().read_all()).todense())
        ctrl = (data.obs[PERT_COL] == CONTROL).to_numpy()
        self.shift = x[~ctrl].mean(0) - x[ctrl].mean(0)

    def predict(self, condition, rng):
        ctrl = np.asarray(log1p_cp10k(condition.control_counts).todense())
        rows = rng.integers(0, ctrl.shape[0], size=condition.n_cells)
        return np.clip(ctrl[rows] + self.shift, 0, None).astype(np.float32)

    def get_state(self):
        return {"shift": self.shift}, {}

    def set_state(self, arrays, meta):
        self.shift = arrays["shift"]
'''

CONFIG = {
    "seed": 0, "threads": 1, "bootstrap": 20, "ceiling": False,
    "datasets": {"toy_data": {
        "source": {"simulate": {"n_genes": 150, "n_cells": 1200, "n_contexts": 1,
                                "n_knockdowns": 5, "n_stimulations": 0}},
        "columns": {"perturbation": "perturbation", "control": "control",
                    "context": "cell_type", "batch": "donor"},
        "split": {"kind": "heldout_perturbations", "n_test_perturbations": 2,
                  "reference_fraction": 0},
    }},
    "models": {"control_mean": {}, "toy_shift": {}},  # the one config block
}


@pytest.mark.slow
def test_a_new_model_is_one_package_one_spec_and_one_config_block(tmp_path):
    repo = tmp_path / "repo"
    for part in ("lingshu", "workflow", "config", "envs", "profiles"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", repo / "Snakefile")
    package = repo / "lingshu" / "models" / "toy_shift"
    package.mkdir()
    (package / "__init__.py").write_text('"""A toy model."""\n')
    (package / "spec.py").write_text(textwrap.dedent(TOY_SPEC).lstrip())
    (package / "model.py").write_text(textwrap.dedent(TOY_MODEL).lstrip())
    config = repo / "toy.yaml"
    config.write_text(yaml.safe_dump(dict(CONFIG, results_dir=str(tmp_path / "results"))))

    # `python -m` puts the working directory first on sys.path: the copy's package is used.
    run = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", str(config),
                          "--cores", "2"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = tmp_path / "results" / "toy_data" / "report"
    table = pd.read_csv(report / "table.tsv", sep="\t").set_index("model")
    assert {"control_mean", "toy_shift"} <= set(table.index)
    # Its own predictions were scored (a shift on the controls scores unlike the controls).
    assert np.isfinite(table.loc["toy_shift", "MAE"])
    assert table.loc["toy_shift", "MAE"] != table.loc["control_mean", "MAE"]
    assert "the mean training shift" in (report / "report.html").read_text()
