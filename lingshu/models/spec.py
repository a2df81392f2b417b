"""One record per model: what the pipeline needs to know about it, in one place.

Every model is a package under ``lingshu/models/`` whose ``spec.py`` defines ``SPECS``, a tuple
of :class:`ModelSpec` (usually one; the baselines package has three). They are found by
scanning the packages, so adding a model is one package, its spec and one config block: the
rules, the config schema's list of model names and the report's notes all read the specs.

This module imports no model code (no torch): the Snakefile reads it to plan jobs. A model's
class is imported on first use (:meth:`ModelSpec.load_class`).

A model's config block holds three kinds of keys:

- resources (``threads``, ``mem_mb``, ``gpu``): Snakemake's, never seen by the model;
- sampling keys (:attr:`ModelSpec.sampling_keys`): read only when the fitted model predicts
  or generates, so changing one re-runs sampling, evaluation and the report, never training;
- every other key: training settings, hashed by the fit job and, except the fit-only keys
  (:attr:`ModelSpec.fit_keys`), by the pre-train job: changing a fine-tuning setting re-runs
  the fit, never the pre-training.

``variants`` (name -> sampling keys) adds one prediction per variant from the same fit; each is
a row of the report named ``<model>@<variant>``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

RESOURCE_KEYS = frozenset({"threads", "mem_mb", "gpu"})
VARIANTS_KEY = "variants"
VARIANT_SEP = "@"  # a run is "<model>" or "<model>@<variant>"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """How the pipeline runs one model.

    name: the config key, the rule wildcard and the report row.
    cls: ``"module:Class"`` of its :class:`~lingshu.models.base.PerturbationModel`.
    note: the line the report prints about it.
    pretrains: it has an unconditional pre-training stage (a rule before fit; its
        ``pretrain(data, out_path)`` is called, and fit gets the result as ``init``).
    generates_from: ``"pretrain"`` or ``"fit"``: it generates cells unconditionally (generation
        fidelity) from that stage's output; None: it does not generate.
    ddp: its pre-train and fit jobs run under ``torchrun`` when its block asks for several GPUs.
    tokens: it trains from the on-disk count tokens of the tokenize rule.
    env: the conda env of its jobs (``envs/<env>.yaml``).
    sampling_keys: parameters read only at prediction / generation.
    generation_keys: the sampling keys that change unconditional generation (a variant that
        changes none of them shares the base model's generated cells).
    fit_keys: training keys only the fit stage reads (its pre-train job neither gets nor
        hashes them).
    baseline: a reference baseline (the front page lists the runs each baseline beat).
    reads_perturbation: its prediction depends on the perturbation asked about. False for a
        model that predicts the same cells for every perturbation of a context (a candidate
        screen lists every candidate as not encoded for it rather than rank sampling noise).
    """

    name: str
    cls: str
    note: str
    pretrains: bool = False
    generates_from: str | None = None
    ddp: bool = False
    tokens: bool = False
    env: str = "models"
    sampling_keys: frozenset[str] = field(default_factory=frozenset)
    generation_keys: frozenset[str] = field(default_factory=frozenset)
    fit_keys: frozenset[str] = field(default_factory=frozenset)
    baseline: bool = False
    reads_perturbation: bool = True

    def __post_init__(self) -> None:
        if self.generates_from not in (None, "pretrain", "fit"):
            raise ValueError(f"{self.name}: generates_from must be None, 'pretrain' or 'fit'")
        if self.generates_from == "pretrain" and not self.pretrains:
            raise ValueError(f"{self.name}: generates from its pre-training but has none")
        if not self.generation_keys <= self.sampling_keys:
            raise ValueError(f"{self.name}: generation_keys must be sampling keys")
        if self.fit_keys & self.sampling_keys:
            raise ValueError(f"{self.name}: fit_keys are training keys, not sampling keys")
        if self.fit_keys and not self.pretrains:
            raise ValueError(f"{self.name}: fit_keys need a pre-training stage")
        if VARIANT_SEP in self.name or not VARIANT_NAME.match(self.name):
            raise ValueError(f"{self.name!r}: a model name is letters, digits, _ and -")

    def load_class(self) -> type:
        """The model class (imports its module)."""
        module, cls = self.cls.split(":")
        return getattr(importlib.import_module(module), cls)

    # ------------------------------------------------------------------ parameters
    def training_params(self, block: dict[str, Any]) -> dict[str, Any]:
        """The keys of a config block that train the model (resources, sampling keys and
        variants removed): what the pre-train and fit jobs get and hash."""
        drop = RESOURCE_KEYS | self.sampling_keys | {VARIANTS_KEY}
        return {k: v for k, v in block.items() if k not in drop}

    def pretraining_params(self, block: dict[str, Any]) -> dict[str, Any]:
        """The training keys the pre-train job gets and hashes (the fit-only keys removed)."""
        return {k: v for k, v in self.training_params(block).items() if k not in self.fit_keys}

    def sampling_params(self, block: dict[str, Any], variant: str | None = None) -> dict[str, Any]:
        """The sampling keys of a config block, with a variant's on top."""
        params = {k: v for k, v in block.items() if k in self.sampling_keys}
        if variant is not None:
            variants = block.get(VARIANTS_KEY) or {}
            if variant not in variants:
                raise KeyError(f"{self.name}: no sampling variant {variant!r}; "
                               f"configured: {sorted(variants)}")
            params.update(variants[variant] or {})
        return params

    def check_variants(self, block: dict[str, Any], where: str) -> list[str]:
        """Problems of a block's ``variants`` (names, keys that are not sampling keys)."""
        problems = []
        variants = block.get(VARIANTS_KEY) or {}
        if not isinstance(variants, dict):
            return [f"{where}.{VARIANTS_KEY}: give a mapping of variant name -> sampling settings"]
        for name, settings in variants.items():
            if not VARIANT_NAME.match(str(name)):
                problems.append(f"{where}.{VARIANTS_KEY}.{name}: a variant name is letters, "
                                "digits, _ and -")
            if not isinstance(settings, dict):
                problems.append(f"{where}.{VARIANTS_KEY}.{name}: give a mapping of sampling "
                                "settings")
                continue
            training = sorted(set(settings) - self.sampling_keys)
            if training:
                allowed = ", ".join(sorted(self.sampling_keys)) or "none"
                problems.append(
                    f"{where}.{VARIANTS_KEY}.{name}: {training} are not sampling settings of "
                    f"{self.name} (a variant shares the model's fit; only sampling may differ: "
                    f"{allowed})")
        return problems


def run_name(model: str, variant: str | None = None) -> str:
    """The name of a prediction run: the model, or ``<model>@<variant>``."""
    return model if variant is None else f"{model}{VARIANT_SEP}{variant}"


def parse_run(run: str) -> tuple[str, str | None]:
    """(model, variant or None) of a run name."""
    model, sep, variant = run.partition(VARIANT_SEP)
    return model, (variant if sep else None)


@lru_cache(maxsize=1)
def _specs() -> dict[str, ModelSpec]:
    import lingshu.models as package

    specs: dict[str, ModelSpec] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        # A package without spec.py is shared code (e.g. training), not a model.
        if not info.ispkg or not (Path(info.module_finder.path) / info.name / "spec.py").exists():
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}.spec")
        for spec in module.SPECS:
            if spec.name in specs:
                raise ValueError(f"model {spec.name!r} is defined twice (lingshu.models."
                                 f"{info.name}.spec and another package)")
            specs[spec.name] = spec
    return specs


def all_specs() -> dict[str, ModelSpec]:
    """Every model's spec by name (found in the packages under ``lingshu/models/``)."""
    return dict(_specs())


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_specs())


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``."""
    specs = _specs()
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(specs)}")
    return specs[name]
