"""What the workflow runs, decided from the validated config: the rules' planning helpers.

The Snakefile validates the config with :func:`validate_config` (the schema, the registered
model names, the checks that span fields), then ``workflow/rules/common.smk`` asks this module
which runs each dataset has and which parameters each job gets. Kept in Python, beside the
model specs, so that the plan is tested without Snakemake.

Runs: every model of a dataset is one run (``lingshu``), and each of its sampling variants
one more (``lingshu@w3``), sharing the model's pre-train and fit jobs. An ``external`` entry
under ``models`` (``kind: external``: predictions made outside this pipeline, read from its
``path``) is one run with no pre-train, fit, generate job nor variants: the
``external_prediction`` rule checks and converts its file (:mod:`lingshu.models.external`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from lingshu.config import SCHEMA_PATH, DatasetEntry, error_message, load_schema, schema_errors
from lingshu.constants import CONTROL
from lingshu.errors import InputError
from lingshu.models.spec import (
    VARIANT_NAME,
    VARIANT_SEP,
    VARIANTS_KEY,
    get_spec,
    model_names,
    parse_run,
    run_name,
)

EXTERNAL = "external"  # the `kind` of a model entry whose predictions are made elsewhere
EXTERNAL_KEYS = ("kind", "path", "values", "note")
EXTERNAL_VALUES = ("counts", "log1p_cp10k")
DATASET_PLACEHOLDER = "{dataset}"
SCREEN_KEYS = ("candidates", "candidates_file", "contexts", "max_cells")
CANDIDATE_KEYS = ("candidates", "candidates_file")  # what the features job needs of a screen


def validate_config(config: dict, source: str = "config",
                    schema_path: str | Path = SCHEMA_PATH, check_files: bool = False) -> dict:
    """Validate ``config`` in place (defaults filled) and return it; raise InputError if bad.

    source: the config file's name, used in the message.
    check_files: also check that every local source file exists (:func:`check_source_files`);
    the Snakefile does so before any job of a run starts (not for a dry run, which may plan
    data not obtained yet).
    """
    _check_external(config, source)
    _check_screens(config, source)
    names = model_names() + [m for m in _external_names(config) if m not in model_names()]
    errors = schema_errors(config, load_schema(schema_path, model_names=names))
    if errors:
        message = error_message(errors[0], source, len(errors))
        if list(errors[0].absolute_path) == ["models"] and errors[0].validator == "enum":
            message += (" (or, for predictions made outside this pipeline, an entry of "
                        "`kind: external` with `path` and `values`: see config/README.md)")
        raise InputError(message)
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


def _external_names(config: dict) -> list[str]:
    """The names of the ``kind: external`` entries of a (not yet validated) config."""
    models = config.get("models")
    if not isinstance(models, dict):
        return []
    return [name for name, block in models.items()
            if isinstance(block, dict) and block.get("kind") == EXTERNAL]


def _users_of(config: dict, model: str) -> list[str]:
    """The datasets of a (not yet validated) config that run ``model``."""
    datasets = config.get("datasets")
    if not isinstance(datasets, dict):
        return []
    return sorted(name for name, entry in datasets.items()
                  if not isinstance(entry, dict) or not isinstance(entry.get("models"), list)
                  or model in entry["models"])


def _check_external(config: dict, source: str) -> None:
    """Raise InputError for the first bad ``kind: external`` entry under ``models`` (run before
    the schema, so that the message says what an external entry needs)."""
    models = config.get("models")
    if not isinstance(models, dict):
        return
    registered = set(model_names())
    example = "e.g. `{kind: external, path: \"preds/{dataset}.h5ad\", values: log1p_cp10k}`"
    for name, block in models.items():
        if not isinstance(block, dict) or "kind" not in block:
            continue
        where = f"{source}: models.{name}"
        if block["kind"] != EXTERNAL:
            raise InputError(
                f"{where}.kind: {block['kind']!r} is not a kind of model entry (the only one "
                f"is 'external': predictions made outside this pipeline). Fix: write "
                f"`kind: external` with `path` and `values`, or remove `kind` from a "
                f"registered model's block")
        if name in registered:
            raise InputError(
                f"{where}: an external entry may not take the name of the registered model "
                f"{name!r}. Fix: give the external predictions a name of their own (e.g. "
                f"{name}_external); a registered model's block has no `kind`")
        if VARIANT_SEP in str(name) or not VARIANT_NAME.match(str(name)):
            raise InputError(f"{where}: {name!r} is not a valid name (letters, digits, _ and "
                             f"-). Fix: rename the entry")
        unknown = sorted(set(block) - set(EXTERNAL_KEYS))
        if unknown:
            raise InputError(
                f"{where}: {unknown} are not keys of an external entry (it takes path, values "
                f"and an optional note: nothing is fitted or sampled). Fix: remove them")
        path = block.get("path")
        if not isinstance(path, str) or not path.strip():
            raise InputError(
                f"{where}.path: {'missing' if path is None else f'{path!r} is not a path'}. "
                f"Fix: give the prediction file (an h5ad), {example}")
        values = block.get("values")
        if values not in EXTERNAL_VALUES:
            problem = ("missing" if values is None else
                       f"{values!r} is not one of {list(EXTERNAL_VALUES)}")
            raise InputError(
                f"{where}.values: {problem}. Fix: say what the file's X holds: "
                f"`values: counts` (raw integer counts, normalised here to log1p(CP10k)) or "
                f"`values: log1p_cp10k` (log1p of counts per 10,000)")
        if "note" in block and not isinstance(block["note"], str):
            raise InputError(f"{where}.note: give one line of text (the report prints it). "
                             f"Fix: quote the note")
        fields = [f for f in re.findall(r"\{([^{}]*)\}", path) if f != "dataset"]
        if fields:
            raise InputError(
                f"{where}.path: {path!r} holds the placeholder {{{fields[0]}}}; the only one "
                f"is {DATASET_PLACEHOLDER}. Fix: write {DATASET_PLACEHOLDER} where the "
                f"dataset's name goes, or a fixed path")
        users = _users_of(config, name)
        if len(users) > 1 and DATASET_PLACEHOLDER not in path:
            raise InputError(
                f"{where}.path: {path!r} has no {DATASET_PLACEHOLDER}, but {len(users)} "
                f"datasets use this entry ({', '.join(users)}): each would read the same "
                f"file. Fix: put {DATASET_PLACEHOLDER} in the path (e.g. "
                f"preds/{DATASET_PLACEHOLDER}.h5ad), or list the entry in one dataset's "
                f"`models`")
    datasets = config.get("datasets")
    for dataset, entry in (datasets.items() if isinstance(datasets, dict) else ()):
        params = entry.get("model_params") if isinstance(entry, dict) else None
        for name in _external_names(config):
            if isinstance(params, dict) and name in params:
                raise InputError(
                    f"{source}: datasets.{dataset}.model_params.{name}: an external entry has "
                    f"no parameters. Fix: remove it (a `path` with {DATASET_PLACEHOLDER} reads "
                    f"one file per dataset)")


def _labels_problem(values, what: str) -> str | None:
    """What is wrong with a list of labels (None when nothing is)."""
    if not isinstance(values, list):
        return f"give a list of {what}, e.g. [GENE1, GENE2]"
    if not values:
        return "the list is empty"
    odd = [v for v in values if not isinstance(v, str) or not v.strip()]
    if odd:
        return f"{odd[0]!r} is not a label (write each as text; quote numbers)"
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        return f"{twice[:8]} listed more than once"
    return None


def _check_screens(config: dict, source: str) -> None:
    """Raise InputError for the first bad ``screen`` block of a dataset (run before the schema,
    so that the message says what a screen takes). A candidate may be a perturbation the data
    hold (the screen's table says its role in the split); whether it is a measured gene or has
    features is known only once the data are read, and a candidate that has neither is listed
    as not encoded, never an error."""
    datasets = config.get("datasets")
    for dataset, entry in (datasets.items() if isinstance(datasets, dict) else ()):
        if not isinstance(entry, dict) or "screen" not in entry:
            continue
        where = f"{source}: datasets.{dataset}.screen"
        screen = entry["screen"]
        example = "e.g. `screen: {candidates: [GENE1, GENE2]}`"
        if not isinstance(screen, dict):
            raise InputError(f"{where}: give a mapping, {example}. Fix: list the candidates "
                             f"under `candidates`, or remove `screen`")
        unknown = sorted(set(screen) - set(SCREEN_KEYS))
        if unknown:
            raise InputError(f"{where}: {unknown} are not keys of a screen (it takes "
                             f"{', '.join(SCREEN_KEYS)}). Fix: remove or rename them")
        if screen.get("candidates") is None and not screen.get("candidates_file"):
            raise InputError(f"{where}: no candidates. Fix: list them ({example}) or name a "
                             f"file of them (`candidates_file: lists/candidates.txt`, one "
                             f"label per line)")
        if screen.get("candidates") is not None:
            problem = _labels_problem(screen["candidates"], "candidate perturbations")
            if problem:
                raise InputError(f"{where}.candidates: {problem}. Fix: list each candidate "
                                 f"perturbation once, {example}")
            columns = entry.get("columns") if isinstance(entry.get("columns"), dict) else {}
            controls = {CONTROL, str(columns.get("control", CONTROL))}
            hit = [c for c in screen["candidates"] if c in controls]
            if hit:
                raise InputError(f"{where}.candidates: {hit[0]!r} is the control label, not a "
                                 f"perturbation. Fix: remove it")
        if "candidates_file" in screen and (not isinstance(screen["candidates_file"], str)
                                            or not screen["candidates_file"].strip()):
            raise InputError(f"{where}.candidates_file: {screen['candidates_file']!r} is not a "
                             f"path. Fix: give the file's path (relative to the directory "
                             f"Snakemake runs in), or remove the key")
        if "contexts" in screen:
            problem = _labels_problem(screen["contexts"], "contexts")
            if problem:
                raise InputError(f"{where}.contexts: {problem}. Fix: list each context once, "
                                 f"or remove `contexts` to screen in every context with "
                                 f"control cells")
        cells = screen.get("max_cells", 1)
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise InputError(f"{where}.max_cells: {cells!r} is not a positive number of cells. "
                             f"Fix: give the most cells to predict per candidate and context "
                             f"(default 300)")


def _check_cross_fields(config: dict, source: str) -> None:
    models = set(config["models"])
    for name, block in config["models"].items():
        if is_external(config, name):
            continue
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


def entry_json(config: dict, dataset: str, with_prior: bool = False,
               screen: tuple[str, ...] = ()) -> str:
    """The dataset entry as the JSON a stage's ``--entry`` takes: what the data are, without
    which models run on them and with which parameters (the rules' business, never a stage's),
    without the ``prior`` block unless the job uses it, and with only the ``screen`` keys
    named in ``screen`` (the features job: :data:`CANDIDATE_KEYS`; the screen job: all).
    Snakemake re-runs a job when its parameters change, so a job sees only what can change its
    output: editing a model's settings, the prior or the screen never re-runs the split."""
    entry = dataset_entry(config, dataset)
    kept = {k: v for k, v in (entry.screen or {}).items() if k in screen}
    return replace(entry, models=None, model_params={}, description="",
                   prior=entry.prior if with_prior else None,
                   screen=kept if kept else None).to_json()


def has_screen(config: dict, dataset: str) -> bool:
    """Whether the dataset's entry lists screen candidates."""
    return bool(config["datasets"][dataset].get("screen"))


def screen_runs_of(config: dict, dataset: str) -> list[str]:
    """The runs that screen the dataset's candidates: every run of a registered model (an
    external entry's predictions cover the held-out conditions only); none without a
    screen."""
    if not has_screen(config, dataset):
        return []
    return [r for r in runs_of(config, dataset) if not is_external(config, r)]


def models_of(config: dict, dataset: str) -> list[str]:
    """The models run on a dataset (its ``models`` list, else every configured model);
    external entries included."""
    return list(config["datasets"][dataset].get("models") or sorted(config["models"]))


def is_external(config: dict, model: str) -> bool:
    """Whether ``model`` (a run's model) is a ``kind: external`` entry: predictions made
    outside this pipeline, with no fit, pre-train, generate job nor sampling variants."""
    block = config["models"].get(parse_run(model)[0])
    return isinstance(block, dict) and block.get("kind") == EXTERNAL


def external_models(config: dict) -> list[str]:
    """Every external entry of the config, sorted."""
    return sorted(m for m in config["models"] if is_external(config, m))


def fitted_models_of(config: dict, dataset: str) -> list[str]:
    """The registered models run on a dataset: those with fit (and pre-train) jobs."""
    return [m for m in models_of(config, dataset) if not is_external(config, m)]


def external_path(config: dict, model: str, dataset: str) -> str:
    """The prediction file an external entry names for ``dataset`` (its ``path`` with
    ``{dataset}`` filled in, ``~`` expanded; a relative path is from the working directory)."""
    path = str(config["models"][model]["path"]).replace(DATASET_PLACEHOLDER, dataset)
    return os.path.expanduser(path)


def external_file(config: dict, model: str, dataset: str, source: str = "config") -> str:
    """:func:`external_path`, after checking that the file exists: raise InputError naming
    the entry, the path as configured, where it resolves to and the fix (what the
    ``external_prediction`` rule's input asks, so a missing file stops the run when planned)."""
    path = external_path(config, model, dataset)
    if not Path(path).is_file():
        what = "is not a file" if Path(path).exists() else "does not exist"
        configured = config["models"][model]["path"]
        raise InputError(
            f"{source}: models.{model}.path: {configured!r} for dataset {dataset!r} is "
            f"{path!r}, which {what} (resolved to {Path(path).absolute()}; a relative path is "
            f"taken from the working directory {Path.cwd()}). Fix: put the predictions there "
            f"(`snakemake export` writes what a model needs to make them), or correct "
            f"`path:`")
    return path


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
        if is_external(config, model):
            continue
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
        if is_external(config, model):
            continue
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
    if is_external(config, run):
        return False
    return bool(sampling_params(config, run, dataset).get("prior_injection"))


def params_json(params: dict[str, Any]) -> str:
    """Parameters as the compact, key-sorted JSON the command line takes."""
    return json.dumps(params, sort_keys=True)
