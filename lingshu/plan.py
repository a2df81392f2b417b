"""What the workflow runs, decided from the validated config: the rules' planning helpers.

The Snakefile validates the config with :func:`validate_config` (the schema, the registered
model names, the checks that span fields), then ``workflow/rules/common.smk`` asks this module
which runs each dataset has and which parameters each job gets. Kept in Python, beside the
model specs, so that the plan is tested without Snakemake.

Runs: every model of a dataset is one run (``lingshu``), and each of its sampling variants
one more (``lingshu@w3``), sharing the model's pre-train and fit jobs.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from lingshu.config import SCHEMA_PATH, DatasetEntry, error_message, load_schema, schema_errors
from lingshu.errors import InputError
from lingshu.models.spec import VARIANTS_KEY, get_spec, model_names, parse_run, run_name


def validate_config(config: dict, source: str = "config",
                    schema_path: str | Path = SCHEMA_PATH, check_files: bool = False) -> dict:
    """Validate ``config`` in place (defaults filled) and return it; raise InputError if bad.

    source: the config file's name, used in the message.
    check_files: also check that every local source file exists (:func:`check_source_files`);
    the Snakefile does so before any job of a run starts (not for a dry run, which may plan
    data not obtained yet).
    """
    errors = schema_errors(config, load_schema(schema_path, model_names=model_names()))
    if errors:
        raise InputError(error_message(errors[0], source, len(errors)))
    _check_cross_fields(config, source)
    if check_files:
        check_source_files(config, source)
    return config


def check_source_files(config: dict, source: str = "config") -> None:
    """Raise InputError for the first dataset whose local source file does not exist
    (``source.path``, or ``prior.source.path``), naming the entry, the path as configured,
    where it resolves to and the fix: a run stops before any job rather than in its fetch job.
    Relative paths are taken from the working directory (Snakemake's)."""
    for name, entry in sorted(config["datasets"].items()):
        sources = [("source", entry.get("source") or {})]
        if entry.get("prior"):
            sources.append(("prior.source", entry["prior"].get("source") or {}))
        for block, src in sources:
            if "path" not in src:
                continue
            path = Path(os.path.expanduser(str(src["path"])))
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise InputError(
                    f"{source}: datasets.{name}.{block}.path: {str(src['path'])!r} {what} "
                    f"(resolved to {path.absolute()}; a relative path is taken from the "
                    f"working directory {Path.cwd()}). Fix: correct `path:` in the dataset "
                    f"entry (or give an absolute path), or put the file there")


def _check_cross_fields(config: dict, source: str) -> None:
    models = set(config["models"])
    for name, block in config["models"].items():
        problems = get_spec(name).check_variants(block or {}, f"models.{name}")
        if problems:
            raise InputError(f"{source}: {problems[0]}. Fix: keep only sampling settings in "
                             f"a variant, or make it a model block of its own")
    for name, entry in config["datasets"].items():
        unknown = set(entry.get("models", [])) - models
        if unknown:
            raise InputError(f"{source}: datasets.{name}.models: {sorted(unknown)} are not "
                             f"configured under models. Fix: add them to `models` or remove them")
        extra = set(entry.get("model_params") or {}) - models
        if extra:
            raise InputError(f"{source}: datasets.{name}.model_params: {sorted(extra)} are not "
                             f"configured under models. Fix: add them to `models` or remove them")
        for model, block in (entry.get("model_params") or {}).items():
            problems = get_spec(model).check_variants(block or {},
                                                      f"datasets.{name}.model_params.{model}")
            if problems:
                raise InputError(f"{source}: {problems[0]}. Fix: keep only sampling settings in "
                                 f"a variant")
        if "lingshu" in entry.get("models", models) and not entry.get("prior") and any(
                uses_prior(config, run, name) for run in runs_of(config, name)
                if parse_run(run)[0] == "lingshu"):
            raise InputError(f"{source}: datasets.{name}: the lingshu block sets prior_injection "
                             f"but the dataset has no `prior` (external data to take prior genes "
                             f"from). Fix: add a `prior` block to the dataset, or set "
                             f"`prior_injection: false` for it under model_params.lingshu")
        _check_split(entry["split"], entry, f"{source}: datasets.{name}")


def _check_split(split: dict, entry: dict, where: str) -> None:
    listed = split.get("test_perturbations") or split.get("test_perturbations_file")
    if split["kind"] == "heldout_perturbations" and not (
        listed or split.get("n_test_perturbations")
    ):
        raise InputError(f"{where}.split: heldout_perturbations needs test perturbations. Fix: "
                         f"set test_perturbations, test_perturbations_file or "
                         f"n_test_perturbations")
    if listed and split.get("n_test_perturbations"):
        raise InputError(f"{where}.split.n_test_perturbations: given together with an explicit "
                         f"list of test perturbations. Fix: either list them or have "
                         f"n_test_perturbations drawn, not both")
    per_context = split.get("test_contexts") or split.get("n_test_contexts")
    if split["kind"] == "heldout_combinations" and not (
        split.get("test_combinations") or split.get("n_test_combinations") or per_context
    ):
        raise InputError(f"{where}.split: heldout_combinations needs test combinations. Fix: "
                         f"set test_combinations, n_test_combinations or test_contexts with "
                         f"n_test_perturbations_per_context")
    if per_context and not split.get("n_test_perturbations_per_context"):
        raise InputError(f"{where}.split.n_test_perturbations_per_context: test contexts need "
                         f"it. Fix: set how many perturbations each test context holds out")
    if split["kind"] == "heldout_combinations" and not entry["columns"].get("context"):
        raise InputError(f"{where}.columns.context: held-out combinations need a context "
                         f"column. Fix: set columns.context (e.g. cell_type)")


# ------------------------------------------------------------------------------------------
# Planning helpers (the config is validated: defaults are filled)
# ------------------------------------------------------------------------------------------


def dataset_entry(config: dict, dataset: str) -> DatasetEntry:
    """The typed entry of a validated config's dataset."""
    return DatasetEntry.from_validated(dataset, config["datasets"][dataset])


def entry_json(config: dict, dataset: str, with_prior: bool = False) -> str:
    """The dataset entry as the JSON a stage's ``--entry`` takes: what the data are, without
    which models run on them and with which parameters (the rules' business, never a stage's),
    and without the ``prior`` block unless the job uses it. Snakemake re-runs a job when its
    parameters change, so a job sees only what can change its output: editing a model's
    settings, or the prior, never re-runs the split."""
    entry = dataset_entry(config, dataset)
    return replace(entry, models=None, model_params={}, description="",
                   prior=entry.prior if with_prior else None).to_json()


def models_of(config: dict, dataset: str) -> list[str]:
    """The models run on a dataset (its ``models`` list, else every configured model)."""
    return list(config["datasets"][dataset].get("models") or sorted(config["models"]))


def model_block(config: dict, model: str, dataset: str | None = None) -> dict[str, Any]:
    """A model's config block, with the dataset entry's ``model_params`` for it on top."""
    block = dict(config["models"].get(model) or {})
    if dataset is not None:
        params = config["datasets"][dataset].get("model_params") or {}
        block.update(params.get(model) or {})
    return block


def training_params(config: dict, model: str, dataset: str) -> dict[str, Any]:
    """What the fit job of a model gets (and hashes): no resources, no sampling."""
    return get_spec(model).training_params(model_block(config, model, dataset))


def pretraining_params(config: dict, model: str, dataset: str) -> dict[str, Any]:
    """What a model's pre-train job gets (and hashes): its training settings less the fit-only
    ones, so editing a fine-tuning setting never re-runs the pre-training."""
    return get_spec(model).pretraining_params(model_block(config, model, dataset))


def sampling_params(config: dict, run: str, dataset: str) -> dict[str, Any]:
    """What a run's predict and generate jobs get on top of the training parameters."""
    model, variant = parse_run(run)
    return get_spec(model).sampling_params(model_block(config, model, dataset), variant)


def generation_params(config: dict, run: str, dataset: str) -> dict[str, Any]:
    """What a run's generate job gets: the sampling settings that change unconditional
    generation only (a guidance change never re-runs generation)."""
    keys = get_spec(parse_run(run)[0]).generation_keys
    return {k: v for k, v in sampling_params(config, run, dataset).items() if k in keys}


def runs_of(config: dict, dataset: str) -> list[str]:
    """Every prediction run of a dataset: each model, then each of its sampling variants."""
    runs = []
    for model in models_of(config, dataset):
        runs.append(model)
        variants = model_block(config, model, dataset).get(VARIANTS_KEY) or {}
        runs += [run_name(model, v) for v in variants]
    return runs


def has_reference(config: dict, dataset: str) -> bool:
    """Whether the dataset's split keeps reference cells (generation fidelity runs)."""
    return float(config["datasets"][dataset]["split"].get("reference_fraction", 0)) > 0


def generation_runs_of(config: dict, dataset: str) -> list[str]:
    """The runs that generate cells unconditionally: every generative model, and each variant
    that changes one of its generation settings (the others would repeat the model's cells)."""
    if not has_reference(config, dataset):
        return []
    runs = []
    for run in runs_of(config, dataset):
        model, variant = parse_run(run)
        spec = get_spec(model)
        if spec.generates_from is None:
            continue
        if variant is not None and (generation_params(config, run, dataset)
                                    == generation_params(config, model, dataset)):
            continue
        runs.append(run)
    return runs


def uses_prior(config: dict, run: str, dataset: str) -> bool:
    """Whether a run injects prior genes (Lingshu-Cell's ``prior_injection``)."""
    return bool(sampling_params(config, run, dataset).get("prior_injection"))


def params_json(params: dict[str, Any]) -> str:
    """Parameters as the compact, key-sorted JSON the command line takes."""
    return json.dumps(params, sort_keys=True)
