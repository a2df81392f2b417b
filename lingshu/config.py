"""Config validation with messages that name the entry, the field and the fix.

The Snakefile calls :func:`validate_config` before building the DAG; the schema is
``workflow/schemas/config.schema.yaml`` (defaults are filled in as it validates).
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from lingshu.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

_FIXES = {
    "required": "add the missing key (see config/README.md)",
    "additionalProperties": "remove or rename the key; allowed keys are listed in the schema",
    "enum": "use one of the allowed values",
    "oneOf": "give exactly one of url+sha256, path, or simulate",
    "pattern": "match the expected form",
    "type": "give a value of the expected type",
    "propertyNames": "use a registered name",
    "minProperties": "add at least one entry",
    "minimum": "give a larger value",
    "maximum": "give a smaller value",
}


def _extend_with_default(validator_class):
    """A validator that fills schema defaults into the instance as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = _copy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def validate_config(config: dict, source: str = "config", schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Validate ``config`` in place (defaults filled) and return it; raise InputError if bad.

    source: the config file's name, used in the message.
    """
    schema = load_schema(schema_path)
    validator = _extend_with_default(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise InputError(_message(errors[0], source, len(errors)))
    _check_cross_fields(config, source)
    return config


def _message(error: jsonschema.ValidationError, source: str, n_errors: int) -> str:
    field = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    problem = error.message
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        problem = f"{sorted(error.instance)} is not a valid source"
    if error.validator == "propertyNames":
        problem = f"{error.instance!r} is not allowed here ({error.message})"
    fix = _FIXES.get(str(error.validator), "see workflow/schemas/config.schema.yaml")
    more = f" ({n_errors - 1} more problem(s) after this one)" if n_errors > 1 else ""
    return f"{source}: {field}: {problem}. Fix: {fix}{more}"


def _check_cross_fields(config: dict, source: str) -> None:
    models = set(config["models"])
    for name, entry in config["datasets"].items():
        unknown = set(entry.get("models", [])) - models
        if unknown:
            raise InputError(f"{source}: datasets.{name}.models: {sorted(unknown)} are not "
                             f"configured under models. Fix: add them to `models` or remove them")
        extra = set(entry.get("model_params") or {}) - models
        if extra:
            raise InputError(f"{source}: datasets.{name}.model_params: {sorted(extra)} are not "
                             f"configured under models. Fix: add them to `models` or remove them")
        lingshu = {**(config["models"].get("lingshu") or {}),
                   **((entry.get("model_params") or {}).get("lingshu") or {})}
        if "lingshu" in entry.get("models", models) and lingshu.get("prior_injection") \
                and not entry.get("prior"):
            raise InputError(f"{source}: datasets.{name}: the lingshu block sets prior_injection "
                             f"but the dataset has no `prior` (external data to take prior genes "
                             f"from). Fix: add a `prior` block to the dataset, or set "
                             f"`prior_injection: false` for it under model_params.lingshu")
        split = entry["split"]
        listed = split.get("test_perturbations") or split.get("test_perturbations_file")
        if split["kind"] == "heldout_perturbations" and not (
            listed or split.get("n_test_perturbations")
        ):
            raise InputError(f"{source}: datasets.{name}.split: heldout_perturbations needs "
                             f"test perturbations. Fix: set test_perturbations, "
                             f"test_perturbations_file or n_test_perturbations")
        if listed and split.get("n_test_perturbations"):
            raise InputError(f"{source}: datasets.{name}.split.n_test_perturbations: given "
                             f"together with an explicit list of test perturbations. Fix: "
                             f"either list them or have n_test_perturbations drawn, not both")
        per_context = split.get("test_contexts") or split.get("n_test_contexts")
        if split["kind"] == "heldout_combinations" and not (
            split.get("test_combinations") or split.get("n_test_combinations") or per_context
        ):
            raise InputError(f"{source}: datasets.{name}.split: heldout_combinations needs "
                             f"test combinations. Fix: set test_combinations, n_test_combinations "
                             f"or test_contexts with n_test_perturbations_per_context")
        if per_context and not split.get("n_test_perturbations_per_context"):
            raise InputError(f"{source}: datasets.{name}.split.n_test_perturbations_per_context: "
                             f"test contexts need it. Fix: set how many perturbations each test "
                             f"context holds out")
        if split["kind"] == "heldout_combinations" and not entry["columns"].get("context"):
            raise InputError(f"{source}: datasets.{name}.columns.context: held-out combinations "
                             f"need a context column. Fix: set columns.context (e.g. cell_type)")
