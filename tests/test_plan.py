"""What the workflow plans from a config: runs, and which settings reach which job."""

import json
from pathlib import Path

import pytest
import yaml

from lingshu import plan
from lingshu.config import DatasetEntry
from lingshu.models.spec import get_spec, model_names, parse_run, run_name

ROOT = Path(__file__).resolve().parent.parent


def _config(**lingshu):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"]["lingshu"].update(lingshu)
    return plan.validate_config(cfg)


def test_runs_are_the_models_then_their_sampling_variants():
    cfg = _config(variants={"w0": {"guidance": 0.0}, "steps16": {"sample_steps": 16}})
    runs = plan.runs_of(cfg, "sim_genetic")
    assert runs == ["control_mean", "linear", "lingshu", "lingshu@w0", "lingshu@steps16",
                    "perturbation_mean", "scale", "scldm", "scvi", "state"]
    assert parse_run("lingshu@w0") == ("lingshu", "w0") and parse_run("linear") == ("linear", None)
    assert run_name("lingshu", "w0") == "lingshu@w0"


def test_training_jobs_never_see_sampling_settings_or_resources():
    cfg = _config(variants={"w3": {"guidance": 3.0}})
    training = plan.training_params(cfg, "lingshu", "sim_genetic")
    assert training == {"preset": "small", "pretrain_steps": 250, "finetune_steps": 200,
                        "batch_size": 64, "network": {"cond_head_rank": 16, "cond_head_masked": True},
                        "cond_lr_scale": 10}
    edited = _config(guidance=2.5, sample_steps=8, threads=1, stratified=False,
                     variants={"w9": {"guidance": 9}})
    assert plan.training_params(edited, "lingshu", "sim_genetic") == training


def test_pretraining_never_sees_fine_tuning_settings():
    cfg = _config()
    assert plan.pretraining_params(cfg, "lingshu", "sim_genetic") == {
        "preset": "small", "pretrain_steps": 250, "batch_size": 64,
        "network": {"cond_head_rank": 16, "cond_head_masked": True}}
    edited = _config(finetune_steps=21, identity_dropout=0.2, cond_lr_scale=3,
                     full_mask_share=0.25)
    assert plan.pretraining_params(edited, "lingshu", "sim_genetic") == plan.pretraining_params(
        cfg, "lingshu", "sim_genetic")
    assert plan.training_params(edited, "lingshu", "sim_genetic") != plan.training_params(
        cfg, "lingshu", "sim_genetic")
    for name in model_names():
        spec = get_spec(name)
        assert not spec.fit_keys & spec.sampling_keys and (spec.pretrains or not spec.fit_keys)


def test_a_variant_samples_on_top_of_the_base_settings():
    cfg = _config(variants={"w3": {"guidance": 3.0}})
    base = {"guidance": 1.0, "sample_steps": 3, "unconditional_steps": 64, "stratified": True}
    assert plan.sampling_params(cfg, "lingshu", "sim_genetic") == base
    assert plan.sampling_params(cfg, "lingshu@w3", "sim_genetic") == {**base, "guidance": 3.0}
    assert plan.sampling_params(cfg, "linear", "sim_genetic") == {}
    with pytest.raises(KeyError, match="no sampling variant 'w4'"):
        plan.sampling_params(cfg, "lingshu@w4", "sim_genetic")


def test_dataset_model_params_reach_that_dataset_only():
    cfg = yaml.safe_load((ROOT / "config" / "shared_data.yaml").read_text())
    cfg["datasets"]["kang"]["model_params"] = {"lingshu": {"guidance": 3.0}}
    plan.validate_config(cfg)
    assert plan.sampling_params(cfg, "lingshu", "kang")["guidance"] == 3.0
    assert plan.sampling_params(cfg, "lingshu", "papalexi")["guidance"] == 1.0
    assert plan.training_params(cfg, "lingshu", "kang") == plan.training_params(
        cfg, "lingshu", "papalexi")


def test_only_variants_that_change_generation_generate_again():
    cfg = _config(variants={"w3": {"guidance": 3.0}, "long": {"unconditional_steps": 512}})
    assert plan.generation_runs_of(cfg, "sim_genetic") == ["lingshu", "lingshu@long", "scldm",
                                                           "scvi"]
    cfg["datasets"]["sim_genetic"]["split"]["reference_fraction"] = 0
    assert plan.generation_runs_of(cfg, "sim_genetic") == []


def test_the_entry_a_stage_gets_describes_the_data_only():
    cfg = yaml.safe_load((ROOT / "config" / "shared_data.yaml").read_text())
    plan.validate_config(cfg)
    cfg["datasets"]["kang"]["prior"] = {"source": {"path": "x.h5ad"},
                                        "columns": {"perturbation": "gene"}}
    plan.validate_config(cfg)
    entry = DatasetEntry.from_json(plan.entry_json(cfg, "kang"))
    assert entry.name == "kang" and entry.perturbation_type == "stimulation"
    assert entry.model_params == {} and entry.prior is None and entry.description == ""
    assert "guidance" not in plan.entry_json(cfg, "kang")
    with_prior = DatasetEntry.from_json(plan.entry_json(cfg, "kang", with_prior=True))
    assert with_prior.prior["columns"]["perturbation"] == "gene"


def test_prior_injection_in_a_variant_needs_a_prior():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"]["lingshu"]["variants"] = {"prior": {"prior_injection": True}}
    with pytest.raises(Exception, match="prior_injection"):
        plan.validate_config(cfg)
    cfg["datasets"]["sim_genetic"]["prior"] = {"source": {"path": "x.h5ad"},
                                               "columns": {"perturbation": "gene"}}
    cfg["datasets"]["sim_stimulation"]["models"] = ["control_mean", "linear"]
    plan.validate_config(cfg)
    assert plan.uses_prior(cfg, "lingshu@prior", "sim_genetic")
    assert not plan.uses_prior(cfg, "lingshu", "sim_genetic")


def test_spec_splits_a_block_into_training_and_sampling():
    spec = get_spec("scldm")
    block = {"preset": "small", "guidance": 2.0, "output": "mean", "threads": 2,
             "variants": {"w1": {"guidance": 1.0}}}
    assert spec.training_params(block) == {"preset": "small"}
    assert spec.sampling_params(block) == {"guidance": 2.0, "output": "mean"}
    assert spec.sampling_params(block, "w1") == {"guidance": 1.0, "output": "mean"}
    assert json.loads(plan.params_json({"b": 1, "a": 2})) == {"a": 2, "b": 1}


def test_generate_jobs_get_only_the_settings_that_change_generation():
    cfg = _config(variants={"w3": {"guidance": 3.0}}, unconditional_steps=64)
    assert plan.generation_params(cfg, "lingshu", "sim_genetic") == {"unconditional_steps": 64,
                                                                       "stratified": True}
    assert plan.generation_params(cfg, "lingshu@w3", "sim_genetic") == {"unconditional_steps": 64,
                                                                       "stratified": True}


def test_an_external_entry_is_one_run_with_no_training_or_generation():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"]["mine"] = {"kind": "external", "path": "preds/{dataset}.h5ad",
                             "values": "counts"}
    plan.validate_config(cfg)
    assert "mine" in plan.runs_of(cfg, "sim_genetic")
    assert [r for r in plan.runs_of(cfg, "sim_genetic") if r.startswith("mine")] == ["mine"]
    assert plan.is_external(cfg, "mine") and not plan.is_external(cfg, "lingshu")
    assert plan.external_models(cfg) == ["mine"]
    assert "mine" not in plan.fitted_models_of(cfg, "sim_genetic")
    assert "mine" in plan.models_of(cfg, "sim_genetic")
    assert "mine" not in plan.generation_runs_of(cfg, "sim_genetic")
    assert not plan.uses_prior(cfg, "mine", "sim_genetic")
    assert plan.external_path(cfg, "mine", "sim_genetic") == "preds/sim_genetic.h5ad"
    with pytest.raises(Exception, match=r"models\.mine\.path: 'preds/\{dataset\}\.h5ad' for "
                                        r"dataset 'sim_genetic' .* does not exist"):
        plan.external_file(cfg, "mine", "sim_genetic", "my.yaml")


def test_the_screen_reaches_the_features_and_screen_jobs_only():
    cfg = _config(variants={"w0": {"guidance": 0.0}})
    cfg["models"]["mine"] = {"kind": "external", "path": "p/{dataset}.h5ad", "values": "counts"}
    plan.validate_config(cfg)
    # The split (and every other stage) never sees the screen: editing it never re-splits.
    assert json.loads(plan.entry_json(cfg, "sim_genetic"))["screen"] is None
    features = json.loads(plan.entry_json(cfg, "sim_genetic", screen=plan.CANDIDATE_KEYS))
    assert set(features["screen"]) == {"candidates"}  # max_cells never re-runs the features
    full = json.loads(plan.entry_json(cfg, "sim_genetic", screen=plan.SCREEN_KEYS))
    assert full["screen"]["max_cells"] == 50
    # Every run of a registered model screens (variants too); external entries do not.
    assert plan.screen_runs_of(cfg, "sim_genetic") == [
        r for r in plan.runs_of(cfg, "sim_genetic") if r != "mine"]
    assert "lingshu@w0" in plan.screen_runs_of(cfg, "sim_genetic")
    assert plan.screen_runs_of(cfg, "sim_stimulation") == []
