# Helpers shared by the rules: paths, per-dataset model lists, JSON of config entries.
import hashlib
import json
import os

from lingshu.models.registry import DDP_MODELS, GENERATIVE, MODEL_ENVS, PRETRAINING, TOKENISED

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


def model_block(model, dataset=None):
    """A model's config block, with the dataset entry's ``model_params`` for it on top."""
    block = dict(config["models"].get(model) or {})
    if dataset is not None:
        block.update((entry(dataset).get("model_params") or {}).get(model) or {})
    return block


def model_env(wildcards):
    """The conda env of a model's jobs (STATE brings arc-state and its dependencies)."""
    return f"../../envs/{MODEL_ENVS.get(wildcards.model, 'models')}.yaml"


def uses_prior(model, dataset):
    """Lingshu-Cell with prior_injection, on a dataset with a prior (config.py checks both)."""
    return bool(model_block(model, dataset).get("prior_injection") and entry(dataset).get("prior"))


def prior_input(wildcards):
    """The prior gene table, for a model that injects priors."""
    if uses_prior(wildcards.model, wildcards.dataset):
        return [f"{R}/{wildcards.dataset}/prior/genes.tsv"]
    return []


def prior_flag(wildcards, input):
    return f"--prior {input.prior}" if input.prior else ""


def token_input(wildcards):
    """The memory-mapped count tokens, for models that train from them."""
    return [f"{R}/{wildcards.dataset}/tokens"] if wildcards.model in TOKENISED else []


def token_flag(wildcards, input):
    return f"--tokens {input.tokens}" if input.tokens else ""


def launcher(wildcards):
    """How a training job starts: ``torchrun`` with one process per GPU when a DDP-capable
    model's block asks for several GPUs, else one Python process."""
    gpus = int(model_block(wildcards.model, wildcards.dataset).get("gpu", 0))
    if gpus > 1 and wildcards.model in DDP_MODELS:
        return f"torchrun --standalone --nproc_per_node={gpus} -m lingshu"
    return "python -m lingshu"


def model_params_json(model, dataset):
    return json.dumps(model_block(model, dataset), sort_keys=True)


def generative_models_of(dataset):
    """The dataset's models that generate cells unconditionally, when it has reference cells."""
    if float(entry(dataset)["split"].get("reference_fraction", 0)) <= 0:
        return []
    return [m for m in models_of(dataset) if m in GENERATIVE]


def generator_checkpoint(wildcards):
    """What a generative model samples from: its pre-trained or its fitted model."""
    stage = GENERATIVE[wildcards.model]
    name = "pretrain.pt" if stage == "pretrain" else "model.npz"
    return f"{R}/{wildcards.dataset}/models/{wildcards.model}/{name}"


def raw_input(wildcards):
    """The raw h5ad of a dataset: simulated, or fetched/linked from its source."""
    if "simulate" in entry(wildcards.dataset)["source"]:
        return f"{R}/{wildcards.dataset}/raw/simulated.h5ad"
    return f"{R}/{wildcards.dataset}/raw/source.h5ad"


def split_lists(dataset):
    """A digest of the split's target-list files (or "absent"), so that editing a file's
    contents re-runs the split; the files are not inputs, so the plan needs none of them."""
    split = entry(dataset)["split"]
    out = {}
    for key in ("test_perturbations_file", "exclude_perturbations_file"):
        if split.get(key):
            path = split[key]
            out[key] = hashlib.sha256(open(path, "rb").read()).hexdigest() \
                if os.path.isfile(path) else "absent"
    return json.dumps(out, sort_keys=True)


def split_seed(dataset):
    return int(entry(dataset)["split"].get("seed", config["seed"]))


def all_targets():
    targets = [f"{R}/{d}/report/report.html" for d in DATASETS]
    return targets + [f"{R}/index.html"]


def job_names(dataset):
    """Benchmark files the report's cost table reads (those that exist when it runs)."""
    names = ["preprocess", "split", "features", "truth"]
    names += ["tokenize"] if set(models_of(dataset)) & TOKENISED else []
    if any(uses_prior(m, dataset) for m in models_of(dataset)):
        names += ["fetch_prior", "prior"]
    for m in models_of(dataset):
        names += [f"pretrain_{m}"] if m in PRETRAINING else []
        names += [f"fit_{m}", f"predict_{m}", f"evaluate_{m}"]
        names += [f"generate_{m}"] if m in generative_models_of(dataset) else []
    if generative_models_of(dataset):
        names.append("generation_eval")
    if config["ceiling"]:
        names.append("ceiling")
    return [f"{R}/{dataset}/benchmarks/{n}.tsv" for n in names]
