# Helpers shared by the rules: paths, runs and parameters of each dataset's jobs. The decisions
# live in lingshu.plan (tested without Snakemake); these wrappers bind them to this config.
import hashlib
import json
import os

from lingshu import plan
from lingshu.constants import SPLIT_VERSION
from lingshu.models.spec import all_specs, parse_run

R = config["results_dir"]
DATASETS = sorted(config["datasets"])
SPECS = all_specs()


EXTERNAL = plan.external_models(config)  # `kind: external` entries: predictions made elsewhere


def _all_runs():
    return sorted({run for d in DATASETS for run in plan.runs_of(config, d)})


def _one_of(names):
    """A wildcard constraint matching exactly these names (none: a regex matching nothing)."""
    return "|".join(names) if names else "(?!)"


# {model}: the registered models (fit and pre-train jobs); {run}: every run. The predict and
# external_prediction rules, which both write predictions/{run}.h5ad, narrow {run} to their
# own runs, so that Snakemake never finds two rules for one prediction.
MODEL_RUNS = [r for r in _all_runs() if not plan.is_external(config, r)]
EXTERNAL_RUNS = [r for r in _all_runs() if plan.is_external(config, r)]


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    model=_one_of(sorted(m for m in config["models"] if m not in EXTERNAL)),
    run=_one_of(_all_runs()),


def entry(dataset):
    return config["datasets"][dataset]


def entry_json(dataset, with_prior=False, screen=()):
    """The typed dataset entry as JSON (the CLI's --entry): the data's description only (and
    the keys ``screen`` names of the entry's screen block)."""
    return plan.entry_json(config, dataset, with_prior, screen)


def models_of(dataset):
    return plan.models_of(config, dataset)


def fitted_models_of(dataset):
    """The dataset's registered models (those with fit jobs; no external entry)."""
    return plan.fitted_models_of(config, dataset)


def external_source(wildcards):
    """The user's prediction file of an external entry (its `path` for this dataset); a
    missing file stops the run when it is planned, with the entry and the fix."""
    return plan.external_file(config, wildcards.run, wildcards.dataset, CONFIG_SOURCE)


def split_seed(dataset):
    """The seed of a dataset's split draws (its split's own, else the global seed)."""
    return entry(dataset)["split"].get("seed", config["seed"])


def runs_of(dataset):
    return plan.runs_of(config, dataset)


def model_of(run):
    return parse_run(run)[0]


def model_block(model, dataset=None):
    """A model's config block, with the dataset entry's ``model_params`` for it on top."""
    return plan.model_block(config, model, dataset)


def training_json(model, dataset):
    """What a model's fit job gets: its training settings only, so that changing a sampling
    setting (guidance, steps) never re-runs it."""
    return plan.params_json(plan.training_params(config, model, dataset))


def pretraining_json(model, dataset):
    """What a model's pre-train job gets: its training settings less the fit-only ones."""
    return plan.params_json(plan.pretraining_params(config, model, dataset))


def sampling_json(run, dataset):
    """What a run's predict job gets on top of the fitted model."""
    return plan.params_json(plan.sampling_params(config, run, dataset))


def generation_json(run, dataset):
    """What a run's generate job gets: only the settings that change generation."""
    return plan.params_json(plan.generation_params(config, run, dataset))


def resource(key, default, run_wildcard="model"):
    """A model block's Snakemake resource (threads, mem_mb, gpu) for a job's wildcards."""

    def get(wildcards):
        model = model_of(getattr(wildcards, run_wildcard))
        return model_block(model, wildcards.dataset).get(key, default)

    return get


def model_env(wildcards):
    """The conda env of a model's jobs (STATE brings arc-state and its dependencies)."""
    name = wildcards.model if hasattr(wildcards, "model") else model_of(wildcards.run)
    return f"../../envs/{SPECS[name].env}.yaml"


def split_files(dataset):
    return [f"{R}/{dataset}/split/cells.tsv", f"{R}/{dataset}/split/conditions.tsv"]


def split_dir(wildcards, input):
    return os.path.dirname(input.split[0])


def prior_input(wildcards):
    """The prior gene table, for a run that injects priors."""
    if plan.uses_prior(config, wildcards.run, wildcards.dataset) and entry(wildcards.dataset).get(
        "prior"
    ):
        return [f"{R}/{wildcards.dataset}/prior/genes.tsv"]
    return []


def prior_flag(wildcards, input):
    return f"--prior {input.prior}" if input.prior else ""


def token_input(wildcards):
    """The on-disk count tokens, for models that train from them."""
    return [f"{R}/{wildcards.dataset}/tokens"] if SPECS[wildcards.model].tokens else []


def token_flag(wildcards, input):
    return f"--tokens {input.tokens}" if input.tokens else ""


def launcher(wildcards):
    """How a training job starts: ``torchrun`` with one process per GPU when a DDP-capable
    model's block asks for several GPUs, else one Python process."""
    gpus = int(model_block(wildcards.model, wildcards.dataset).get("gpu", 0))
    if gpus > 1 and SPECS[wildcards.model].ddp:
        return f"torchrun --standalone --nproc_per_node={gpus} -m lingshu"
    return "python -m lingshu"


def pretraining(model):
    return SPECS[model].pretrains


def generation_runs_of(dataset):
    """The dataset's runs that generate cells unconditionally, when it has reference cells."""
    return plan.generation_runs_of(config, dataset)


def generator_checkpoint(wildcards):
    """What a generating run samples from: its model's pre-trained or fitted state."""
    model = model_of(wildcards.run)
    name = "pretrain.pt" if SPECS[model].generates_from == "pretrain" else "model.npz"
    return f"{R}/{wildcards.dataset}/models/{model}/{name}"


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
            out[key] = (
                hashlib.sha256(open(path, "rb").read()).hexdigest()
                if os.path.isfile(path)
                else "absent"
            )
    return json.dumps(out, sort_keys=True)


def screen_lists(dataset):
    """A digest of the screen's candidates file (or "absent"; "" without one), so that editing
    the file re-runs the jobs that read it; it is not an input, so the plan needs none."""
    path = (entry(dataset).get("screen") or {}).get("candidates_file")
    if not path:
        return ""
    if not os.path.isfile(path):
        return "absent"
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def screen_runs_of(dataset):
    """The runs that rank the dataset's screen candidates (none without a `screen`)."""
    return plan.screen_runs_of(config, dataset)


def screen_files(dataset):
    return [f"{R}/{dataset}/screen/{r}.tsv" for r in screen_runs_of(dataset)]


def export_files(dataset):
    """The export folder of a dataset (`snakemake export`): what a model run elsewhere may see."""
    names = ["train_counts.h5ad", "control_input.h5ad", "heldout_conditions.tsv", "features.tsv"]
    return [f"{R}/{dataset}/export/{n}" for n in names] + [f"{R}/{dataset}/export/manifest.json"]


def all_targets():
    targets = [f"{R}/{d}/report/report.html" for d in DATASETS]
    targets += [f for d in DATASETS for f in screen_files(d)]
    return targets + [f"{R}/index.html"]


def job_names(dataset):
    """Benchmark files the report's cost table reads (those that exist when it runs)."""
    names = ["preprocess", "split", "features", "truth"]
    fitted = fitted_models_of(dataset)
    names += ["tokenize"] if any(SPECS[m].tokens for m in fitted) else []
    if any(plan.uses_prior(config, r, dataset) for r in runs_of(dataset)):
        names += ["fetch_prior", "prior"]
    for m in fitted:
        names += [f"pretrain_{m}"] if SPECS[m].pretrains else []
        names += [f"fit_{m}"]
    for r in runs_of(dataset):
        made = "external_prediction" if plan.is_external(config, r) else "predict"
        names += [f"{made}_{r}", f"evaluate_{r}"]
    names += [f"generate_{r}" for r in generation_runs_of(dataset)]
    if generation_runs_of(dataset):
        names.append("generation_eval")
    if config["ceiling"]:
        names.append("ceiling")
    names.append("screening")
    names += [f"screen_{r}" for r in screen_runs_of(dataset)]
    return [f"{R}/{dataset}/benchmarks/{n}.tsv" for n in names]
