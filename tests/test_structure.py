"""The package's shape: data flows one way (data < models < evaluate < report), and every
model is described once, by its spec, which the config schema and the report read."""

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from lingshu.config import load_schema
from lingshu.models.spec import RESOURCE_KEYS, all_specs, model_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lingshu"

# Lower layers never import from higher ones. Modules in one layer may import each other.
LAYERS = {
    "ground": 0,  # constants, errors, io, tokens, stats, config: used by every stage
    "data": 1,
    "models": 2,
    "evaluate": 3,
    "report": 4,
    "top": 5,  # the command line and the workflow's planning helpers
}
TOP = {"lingshu.cli", "lingshu.plan", "lingshu.__main__"}


def layer_of(module: str) -> int:
    if module in TOP:
        return LAYERS["top"]
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return LAYERS["ground"]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every lingshu module a file imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lingshu")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("lingshu"):
                found.add(node.module)
    return found


def backward_imports(files, root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        mine = module_name(path, root)
        for target in imported_modules(path):
            if layer_of(target) > layer_of(mine):
                problems.append(f"{mine} (layer {layer_of(mine)}) imports {target} "
                                f"(layer {layer_of(target)})")
    return problems


def test_no_module_imports_from_a_later_stage():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    assert backward_imports(files) == []


def test_the_import_direction_check_catches_a_backward_import(tmp_path):
    # A data module that reaches into the report: the check must name it.
    bad = tmp_path / "lingshu" / "data" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from lingshu.report.tables import paper_table\n")
    problems = backward_imports([bad], root=tmp_path)
    assert problems == ["lingshu.data.bad (layer 1) imports lingshu.report.tables (layer 4)"]


def test_the_schema_lists_no_model_names_and_takes_them_from_the_specs():
    raw = (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()
    schema = yaml.safe_load(raw)
    assert "enum" not in schema["$defs"]["model_name"]
    for name in model_names():  # the names are written in the specs only
        assert f" {name}," not in raw and f"[{name}" not in raw
    filled = load_schema(model_names=model_names())
    assert filled["$defs"]["model_name"]["enum"] == sorted(all_specs())
    assert schema["properties"]["models"]["propertyNames"] == {"$ref": "#/$defs/model_name"}
    dataset_params = schema["$defs"]["dataset"]["properties"]["model_params"]
    assert dataset_params["propertyNames"] == {"$ref": "#/$defs/model_name"}


def test_every_spec_names_a_class_that_is_that_model():
    specs = all_specs()
    expected = {"control_mean", "perturbation_mean", "linear", "lingshu", "state", "scldm"}
    assert expected <= set(specs)
    for name, spec in specs.items():
        cls = spec.load_class()
        assert cls.name == name, spec.cls
        if spec.pretrains:
            assert callable(getattr(cls, "pretrain", None)), name
        if spec.generates_from == "pretrain":
            assert callable(getattr(cls, "load_pretrained", None)), name
        if spec.generates_from is not None:
            assert "generate" in cls.__dict__, name
        assert not spec.sampling_keys & RESOURCE_KEYS, name


@pytest.mark.parametrize("name", ["lingshu", "scldm"])
def test_sampling_keys_are_parameters_of_the_model(name):
    spec = all_specs()[name]
    module = inspect.getmodule(spec.load_class())
    unknown = spec.sampling_keys - set(module.DEFAULTS)
    assert not unknown, sorted(unknown)


def test_a_model_package_without_a_spec_is_not_a_model():
    # lingshu/models/training is shared code: no spec, so not listed.
    assert (PACKAGE / "models" / "training" / "__init__.py").exists()
    assert "training" not in all_specs()
