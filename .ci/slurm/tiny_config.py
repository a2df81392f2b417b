"""Write the SLURM test's config: the pipeline tests' tiny config (tests/test_pipeline_e2e.py,
TINY), cut to what fits the CI's time: its one dataset, the three baselines and Lingshu-Cell
(pre-train, fit, predict: the deep-model path, one sampling setting), no data ceiling and no
reference cells (no generation jobs).

usage: python .ci/slurm/tiny_config.py RESULTS_DIR OUT.yaml
"""

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_pipeline_e2e import TINY  # noqa: E402

MODELS = ("control_mean", "perturbation_mean", "linear", "lingshu")


def slurm_test_config(results_dir: str) -> dict:
    config = copy.deepcopy(TINY)
    config["models"] = {m: config["models"][m] for m in MODELS}
    config["models"]["lingshu"].pop("variants", None)
    config["ceiling"] = False
    for entry in config["datasets"].values():
        entry["split"]["reference_fraction"] = 0  # no generation fidelity jobs
        entry.pop("screen", None)  # no candidate screen jobs
    config["results_dir"] = results_dir
    return config


if __name__ == "__main__":
    results, out = sys.argv[1:3]
    Path(out).write_text(yaml.safe_dump(slurm_test_config(results), sort_keys=False))
