import copy
from pathlib import Path

import pytest
import yaml

from lingshu.config import validate_config
from lingshu.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def _default():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "shared_data.yaml", "paper/vcc_h1.yaml",
                                  "paper/pbmc_cytokines.yaml"])
def test_shipped_configs_validate_and_fill_defaults(name):
    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    validate_config(cfg, name)
    for entry in cfg["datasets"].values():
        assert entry["min_cells_per_condition"] == 10
        assert entry["qc"]["min_counts_per_cell"] == 0
        assert "perturbation" in entry["columns"]


def _break(mutate):
    cfg = _default()
    mutate(cfg)
    return cfg


@pytest.mark.parametrize("mutate, field, words", [
    (lambda c: c["datasets"]["sim_genetic"].pop("split"), "datasets.sim_genetic",
     "'split' is a required property"),
    (lambda c: c["datasets"]["sim_genetic"]["split"].update(kind="random"),
     "datasets.sim_genetic.split.kind", "is not one of"),
    (lambda c: c["datasets"]["sim_genetic"].update(source={"url": "https://x.org/a.h5ad"}),
     "datasets.sim_genetic.source", "not a valid source"),
    (lambda c: c["datasets"]["sim_genetic"].update(
        source={"url": "https://x.org/a.h5ad", "sha256": "abc"}),
     "datasets.sim_genetic.source", "not a valid source"),
    (lambda c: c["datasets"]["sim_genetic"].update(colums={}), "datasets.sim_genetic",
     "colums"),
    (lambda c: c["models"].update(magic={}), "models", "magic"),
    (lambda c: c["datasets"].update({"bad name!": c["datasets"]["sim_genetic"]}), "datasets",
     "bad name!"),
    (lambda c: c["datasets"]["sim_genetic"].update(min_cells_per_condition=0),
     "datasets.sim_genetic.min_cells_per_condition", "minimum"),
    (lambda c: (c["models"].pop("state"),
                c["datasets"]["sim_genetic"].update(models=["state"])),
     "datasets.sim_genetic.models", "not configured"),
    (lambda c: (c["models"].pop("state"),
                c["datasets"]["sim_genetic"].update(model_params={"state": {"steps": 5}})),
     "datasets.sim_genetic.model_params", "not configured"),
    (lambda c: c["datasets"]["sim_genetic"].update(model_params={"magic": {}}),
     "datasets.sim_genetic.model_params", "magic"),
    (lambda c: c["datasets"]["sim_genetic"]["split"].update(reference_fraction=0.9),
     "datasets.sim_genetic.split.reference_fraction", "maximum"),
    (lambda c: c["datasets"]["sim_genetic"]["split"].pop("n_test_perturbations"),
     "datasets.sim_genetic.split", "test_perturbations"),
    (lambda c: c["models"]["lingshu"].update(prior_injection=True),
     "datasets.sim_genetic", "prior_injection"),
    (lambda c: c["datasets"]["sim_genetic"].update(prior={"source": {"path": "x.h5ad"},
                                                          "columns": {}}),
     "datasets.sim_genetic.prior.columns", "perturbation"),
    (lambda c: c["datasets"]["sim_stimulation"]["columns"].update(context=None),
     "datasets.sim_stimulation.columns.context", "context column"),
])
def test_schema_errors_name_the_field_and_the_fix(mutate, field, words):
    with pytest.raises(InputError) as info:
        validate_config(_break(mutate), "my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ") and field in msg and words in msg and "Fix:" in msg


def test_validation_does_not_touch_a_valid_config_beyond_defaults():
    cfg = _default()
    before = copy.deepcopy(cfg)
    validate_config(cfg)
    assert cfg["datasets"]["sim_genetic"]["source"] == before["datasets"]["sim_genetic"]["source"]
    assert cfg["models"] == before["models"]
