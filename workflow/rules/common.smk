# Helpers shared by the rules: paths, per-dataset model lists, JSON of config entries.
import json
import os

from lingshu.models.registry import MODEL_ENVS, PRETRAINING

R = config["results_dir"]
DATASETS = sorted(config["datasets"])


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    model="|".join(sorted(config["models"])),


def entry(dataset):
    return config["datasets"][dataset]


def entry_json(dataset):
    """The validated dataset entry as compact JSON (the CLI's --entry)."""
    return json.dumps(entry(dataset), sort_keys=True)


def models_of(dataset):
    return entry(dataset).get("models") or sorted(config["models"])


def model_block(model):
    return config["models"].get(model) or {}


def model_env(wildcards):
    """The conda env of a model's jobs (STATE brings arc-state and its dependencies)."""
    return f"../../envs/{MODEL_ENVS.get(wildcards.model, 'models')}.yaml"


def model_params_json(model):
    return json.dumps(model_block(model), sort_keys=True)


def raw_input(wildcards):
    """The raw h5ad of a dataset: simulated, or fetched/linked from its source."""
    if "simulate" in entry(wildcards.dataset)["source"]:
        return f"{R}/{wildcards.dataset}/raw/simulated.h5ad"
    return f"{R}/{wildcards.dataset}/raw/source.h5ad"


def split_seed(dataset):
    return int(entry(dataset)["split"].get("seed", config["seed"]))


def all_targets():
    targets = [f"{R}/{d}/report/report.html" for d in DATASETS]
    return targets + [f"{R}/index.html"]


def job_names(dataset):
    """Benchmark files the report's cost table reads (those that exist when it runs)."""
    names = ["preprocess", "split", "features", "truth"]
    for m in models_of(dataset):
        names += [f"pretrain_{m}"] if m in PRETRAINING else []
        names += [f"fit_{m}", f"predict_{m}", f"evaluate_{m}"]
    if config["ceiling"]:
        names.append("ceiling")
    return [f"{R}/{dataset}/benchmarks/{n}.tsv" for n in names]
