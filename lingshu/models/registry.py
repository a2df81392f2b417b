"""Model registry: a new model is one module plus one line here (and one config block)."""

from __future__ import annotations

from typing import Any

from lingshu.models.base import PerturbationModel, load_state
from lingshu.models.baselines import ControlMean, LinearModel, PerturbationMean

MODELS: dict[str, type[PerturbationModel]] = {
    cls.name: cls for cls in (ControlMean, PerturbationMean, LinearModel)
}

# Resource keys of a model's config block, consumed by Snakemake, not by the model.
RESOURCE_KEYS = {"threads", "mem_mb", "gpu"}


def build_model(name: str, params: dict[str, Any] | None = None) -> PerturbationModel:
    """Instantiate a registered model with its config parameters (resource keys removed)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    params = {k: v for k, v in (params or {}).items() if k not in RESOURCE_KEYS}
    return MODELS[name](**params)


def load_model(path: str) -> PerturbationModel:
    """Load a model saved with :meth:`PerturbationModel.save`."""
    arrays, meta = load_state(path)
    model = build_model(meta["model"], meta.get("params"))
    model.set_state(arrays, meta)
    return model
