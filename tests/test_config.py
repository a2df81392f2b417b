import copy
from pathlib import Path

import pytest
import yaml

from lingshu.config import DatasetEntry
from lingshu.errors import InputError
from lingshu.plan import validate_config

ROOT = Path(__file__).resolve().parent.parent


def _default():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "shared_data.yaml", "perturbench.yaml", "paper/vcc_h1.yaml",
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
    (lambda c: c["models"]["lingshu"].update(variants={"fast": {"finetune_steps": 10}}),
     "models.lingshu.variants.fast", "not sampling settings"),
    (lambda c: c["models"]["scldm"].update(variants={"a b": {"guidance": 2}}),
     "models.scldm.variants", "a b"),
    (lambda c: c["datasets"]["sim_genetic"].update(
        model_params={"lingshu": {"variants": {"w3": {"lr": 1.0}}}}),
     "datasets.sim_genetic.model_params.lingshu.variants.w3", "not sampling settings"),
    (lambda c: c["models"]["lingshu"].update(variants={"prior": {"prior_injection": True}}),
     "datasets.sim_genetic", "prior_injection"),
])
def test_schema_errors_name_the_field_and_the_fix(mutate, field, words):
    with pytest.raises(InputError) as info:
        validate_config(_break(mutate), "my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ") and field in msg and words in msg and "Fix:" in msg


def _screen(**screen):
    return lambda c: c["datasets"]["sim_genetic"].update(screen=screen)


@pytest.mark.parametrize("mutate, field, words", [
    (_screen(candidates=[]), "datasets.sim_genetic.screen.candidates", "the list is empty"),
    (_screen(), "datasets.sim_genetic.screen", "no candidates"),
    (_screen(candidates=["GENE00001", "GENE00002", "GENE00001"]),
     "datasets.sim_genetic.screen.candidates", "['GENE00001'] listed more than once"),
    (_screen(candidates=["GENE00001", 7]), "datasets.sim_genetic.screen.candidates",
     "7 is not a label"),
    (_screen(candidates="GENE00001"), "datasets.sim_genetic.screen.candidates",
     "give a list"),
    (_screen(candidates=["control"]), "datasets.sim_genetic.screen.candidates",
     "'control' is the control label"),
    (_screen(candidates=["GENE00001"], top_k=5), "datasets.sim_genetic.screen",
     "['top_k'] are not keys of a screen"),
    (_screen(candidates=["GENE00001"], contexts=[]), "datasets.sim_genetic.screen.contexts",
     "the list is empty"),
    (_screen(candidates=["GENE00001"], max_cells=0), "datasets.sim_genetic.screen.max_cells",
     "not a positive number"),
    (_screen(candidates_file=""), "datasets.sim_genetic.screen", "no candidates"),
    (lambda c: c["datasets"]["sim_genetic"].update(screen=["GENE00001"]),
     "datasets.sim_genetic.screen", "give a mapping"),
])
def test_screen_errors_name_the_field_and_the_fix(mutate, field, words):
    with pytest.raises(InputError) as info:
        validate_config(_break(mutate), "my.yaml")
    msg = str(info.value)
    assert msg.startswith(f"my.yaml: {field}: ") and words in msg and "Fix:" in msg, msg


def test_a_screen_is_optional_and_gets_its_defaults():
    cfg = _default()
    validate_config(cfg)
    screen = cfg["datasets"]["sim_genetic"]["screen"]
    assert screen["max_cells"] == 50 and "GENE01001" in screen["candidates"]
    assert "screen" not in cfg["datasets"]["sim_stimulation"]
    cfg = _break(_screen(candidates_file="lists/candidates.txt"))  # read by the jobs, not here
    validate_config(cfg)
    assert cfg["datasets"]["sim_genetic"]["screen"]["max_cells"] == 300
    entry = DatasetEntry.from_validated("sim_genetic", cfg["datasets"]["sim_genetic"])
    assert DatasetEntry.from_json(entry.to_json()) == entry
    assert entry.screen == {"candidates_file": "lists/candidates.txt", "max_cells": 300}


def test_validation_does_not_touch_a_valid_config_beyond_defaults():
    cfg = _default()
    before = copy.deepcopy(cfg)
    validate_config(cfg)
    assert cfg["datasets"]["sim_genetic"]["source"] == before["datasets"]["sim_genetic"]["source"]
    assert cfg["models"] == before["models"]


def test_a_dataset_entry_is_parsed_once_with_every_default():
    cfg = _default()
    validate_config(cfg)
    raw = _default()["datasets"]["sim_stimulation"]
    entry = DatasetEntry.parse("sim_stimulation", raw)
    assert entry.perturbation_type == "stimulation" and not entry.genetic
    assert entry.columns.context == "cell_type" and entry.columns.control == "control"
    assert entry.qc.min_counts_per_cell == 0 and entry.min_cells_per_condition == 10
    assert entry.split["reference_fraction"] == 0.1  # schema default filled
    assert DatasetEntry.from_json(entry.to_json()) == entry
    assert raw == _default()["datasets"]["sim_stimulation"]  # the raw entry is not modified


def test_a_bad_dataset_entry_names_the_dataset_and_field():
    raw = _default()["datasets"]["sim_genetic"]
    raw["qc"] = {"min_counts_per_cell": -1}
    with pytest.raises(InputError, match=r"datasets\.sim_genetic\.qc\.min_counts_per_cell"):
        DatasetEntry.parse("sim_genetic", raw)
    with pytest.raises(InputError, match="--entry"):
        DatasetEntry.from_json('{"source": {}}')


def test_targets_of_perturbations_follow_the_entry():
    genetic = DatasetEntry.parse("g", {"source": {"path": "x"}, "combo_separator": "_",
                                       "split": {"kind": "heldout_perturbations",
                                                 "n_test_perturbations": 1}})
    assert genetic.targets(["A_B", "C", "control"], ["A", "B"]) == {
        "A_B": ["A", "B"], "C": [], "control": []}
    stim = DatasetEntry.parse("s", {"source": {"path": "x"}, "perturbation_type": "stimulation",
                                    "split": {"kind": "heldout_perturbations",
                                              "n_test_perturbations": 1}})
    assert stim.targets(["A"], ["A"]) == {"A": []}


def test_a_missing_local_source_file_fails_at_validation(tmp_path, monkeypatch):
    """Before any job runs (the Snakefile checks it when a run starts), not in the fetch job;
    the message names the entry, the path as configured, where it resolves and the fix."""
    monkeypatch.chdir(tmp_path)
    cfg = _default()
    cfg["datasets"]["sim_genetic"]["source"] = {"path": "data/screen.h5ad"}
    validate_config(copy.deepcopy(cfg), "my.yaml")  # the schema alone: a dry run plans it
    with pytest.raises(InputError) as info:
        validate_config(copy.deepcopy(cfg), "my.yaml", check_files=True)
    msg = str(info.value)
    assert msg.startswith("my.yaml: datasets.sim_genetic.source.path: 'data/screen.h5ad' does "
                          "not exist") and str(tmp_path / "data" / "screen.h5ad") in msg
    assert "Fix:" in msg
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "screen.h5ad").write_bytes(b"")
    validate_config(copy.deepcopy(cfg), "my.yaml", check_files=True)
    # the prior's external data too
    cfg["datasets"]["sim_genetic"]["prior"] = {"source": {"path": "data/other.h5ad"},
                                               "columns": {"perturbation": "gene"}}
    with pytest.raises(InputError, match=r"datasets\.sim_genetic\.prior\.source\.path: "
                                         r"'data/other\.h5ad' does not exist"):
        validate_config(copy.deepcopy(cfg), "my.yaml", check_files=True)
