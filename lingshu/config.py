"""The config, validated once and parsed into typed entries.

The Snakefile calls :func:`validate_config` before building the DAG; the schema is
``workflow/schemas/config.schema.yaml`` (defaults are filled in as it validates; the list of
model names comes from the model specs, :mod:`lingshu.models.spec`). Messages name the entry,
the field and the fix. A stage receives its dataset entry as one :class:`DatasetEntry`
(:meth:`DatasetEntry.from_json` of what the rule passes), never as a raw dict with defaults
restated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lingshu.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

_FIXES = {
    "required": "add the missing key (see config/README.md)",
    "additionalProperties": "remove or rename the key; allowed keys are listed in the schema",
    "enum": "use one of the allowed values",
    "const": "use the allowed value",
    "oneOf": "give exactly one of url+sha256, path, or simulate",
    "pattern": "match the expected form",
    "type": "give a value of the expected type",
    "propertyNames": "use a registered name (letters, digits, _ and - for a dataset)",
    "minProperties": "add at least one entry",
    "minimum": "give a larger value",
    "minItems": "give at least one item",
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


def load_schema(path: str | Path = SCHEMA_PATH, model_names: list[str] | None = None) -> dict:
    """The config schema; with ``model_names`` (the registered models, see
    :mod:`lingshu.plan`) those are the only keys allowed under ``models`` and a dataset's
    ``model_params``."""
    with open(path) as fh:
        schema = yaml.safe_load(fh)
    if model_names is not None:
        schema.setdefault("$defs", {})["model_name"] = {
            "enum": sorted(model_names),
            "description": "a registered model (lingshu/models/*/spec.py)"}
    return schema


def schema_errors(instance: dict, schema: dict) -> list[jsonschema.ValidationError]:
    """Every schema error of ``instance`` (defaults filled in place as it validates), sorted."""
    validator = _extend_with_default(jsonschema.Draft202012Validator)(schema)
    return sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))


def error_message(error: jsonschema.ValidationError, source: str, n_errors: int) -> str:
    """``<source>: <field>: <problem>. Fix: <fix>`` for a schema error."""
    return _message(error, source, n_errors)


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


# ------------------------------------------------------------------------------------------
# The typed dataset entry
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Which obs columns of the raw file hold what (``columns`` of the entry)."""

    perturbation: str = "perturbation"
    control: str = "control"
    context: str | None = None
    context_label: str | None = None
    batch: str | None = None


@dataclass(frozen=True)
class QC:
    """Cell and gene filters of preprocessing (``qc`` of the entry)."""

    min_counts_per_cell: int = 0
    min_genes_per_cell: int = 0
    min_cells_per_gene: int = 0
    max_pct_mito: float | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the config, validated and with every default filled.

    ``source``, ``split``, ``prior`` and ``screen`` stay mappings (their variants are many and
    the schema documents them); everything else is a field. Build it with :meth:`parse` (a raw entry as
    in a config file) or :meth:`from_json` (what the rules pass to the command line).
    """

    name: str
    source: dict[str, Any]
    split: dict[str, Any]
    columns: Columns = field(default_factory=Columns)
    perturbation_type: str = "genetic"
    combo_separator: str = "+"
    genes: str | None = None
    layer: str | None = None
    qc: QC = field(default_factory=QC)
    min_cells_per_condition: int = 10
    drop_small_conditions: bool = False
    perturbation_features: str | None = None
    prior: dict[str, Any] | None = None
    models: tuple[str, ...] | None = None
    model_params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    screen: dict[str, Any] | None = None

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any], source: str = "config") -> DatasetEntry:
        """Validate a raw entry against the schema (filling defaults) and type it."""
        entry = _copy(raw)
        errors = schema_errors(entry, {"$ref": "#/$defs/dataset", "$defs": load_schema()["$defs"]})
        if errors:
            error = errors[0]
            error.path.extendleft(["datasets", name][::-1])
            raise InputError(_message(error, source, len(errors)))
        return cls.from_validated(name, entry)

    @classmethod
    def from_validated(cls, name: str, entry: dict[str, Any]) -> DatasetEntry:
        """Type an entry already validated (defaults filled) as part of the whole config."""
        return cls(
            name=name, source=dict(entry["source"]), split=dict(entry["split"]),
            columns=Columns(**entry["columns"]),
            perturbation_type=entry["perturbation_type"],
            combo_separator=entry["combo_separator"], genes=entry["genes"],
            layer=entry["layer"], qc=QC(**entry["qc"]),
            min_cells_per_condition=int(entry["min_cells_per_condition"]),
            drop_small_conditions=bool(entry["drop_small_conditions"]),
            perturbation_features=entry["perturbation_features"], prior=entry.get("prior"),
            models=tuple(entry["models"]) if entry.get("models") is not None else None,
            model_params=dict(entry.get("model_params") or {}),
            description=entry.get("description", ""),
            screen=dict(entry["screen"]) if entry.get("screen") is not None else None)

    def to_json(self) -> str:
        """Compact JSON that :meth:`from_json` reads back (what the rules pass)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetEntry:
        """The entry from :meth:`to_json` (or ``{"name": ..., **raw entry}``), validated."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"command line: --entry is not valid JSON ({err}). Fix: pass the "
                             "dataset entry as the rules do") from err
        if not isinstance(raw, dict) or "name" not in raw:
            raise InputError("command line: --entry needs the dataset's name and entry. Fix: "
                             "pass the JSON the rules pass")
        name = raw.pop("name")
        raw = {k: v for k, v in raw.items()
               if not (v is None and k in ("prior", "models", "screen"))}
        if raw.get("description") == "":
            raw.pop("description")
        return cls.parse(name, raw, source="--entry")

    @property
    def genetic(self) -> bool:
        """Genetic perturbations (targets are genes) rather than stimulations."""
        return self.perturbation_type == "genetic"

    def targets(self, labels, genes) -> dict[str, list[str]]:
        """Each perturbation label's target genes that are in ``genes`` (the panel); empty
        lists for stimulation data. Combinations (``A+B``) list every target."""
        if not self.genetic:
            return {str(p): [] for p in labels}
        panel = set(map(str, genes))
        return {str(p): [t for t in str(p).split(self.combo_separator) if t in panel]
                for p in labels}
