"""Model registry: a new model is one module plus one line here (and one config block).

Classes are imported on first use, so that the baselines' jobs never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from lingshu.models.base import PerturbationModel, load_state

MODELS: dict[str, str] = {
    "control_mean": "lingshu.models.baselines:ControlMean",
    "perturbation_mean": "lingshu.models.baselines:PerturbationMean",
    "linear": "lingshu.models.baselines:LinearModel",
    "lingshu": "lingshu.models.lingshu_cell:LingshuCell",
    "state": "lingshu.models.state:StateModel",
    "scldm": "lingshu.models.scldm_model:ScLDM",
}
BASELINES = ("control_mean", "perturbation_mean", "linear")

# Models with an unconditional pre-training stage of their own (a pipeline rule before fit).
PRETRAINING = {"lingshu", "scldm"}

# Generative models that can sample cells unconditionally (generation fidelity, SPEC 2.2), and
# the stage whose output they sample from: Lingshu-Cell's unconditional pre-trained model, or
# scLDM's fitted latent model under its null condition.
GENERATIVE = {"lingshu": "pretrain", "scldm": "fit"}

# Models whose pre-train and fit rules run under ``torchrun`` (DDP, one process per GPU) when
# their config block asks for more than one GPU.
DDP_MODELS = {"lingshu"}

# Models that train from the on-disk count tokens of the tokenize rule
# (lingshu.data.tokenstore) instead of counts loaded into memory.
TOKENISED = {"lingshu"}

# Models whose jobs run in a conda env of their own (envs/<env>.yaml); the rest use models.yaml.
MODEL_ENVS = {"state": "state"}

# Resource keys of a model's config block, consumed by Snakemake, not by the model.
RESOURCE_KEYS = {"threads", "mem_mb", "gpu"}


def model_class(name: str) -> type[PerturbationModel]:
    """The class registered under ``name``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, params: dict[str, Any] | None = None) -> PerturbationModel:
    """Instantiate a registered model with its config parameters (resource keys removed)."""
    params = {k: v for k, v in (params or {}).items() if k not in RESOURCE_KEYS}
    return model_class(name)(**params)


def load_model(path: str) -> PerturbationModel:
    """Load a model saved with :meth:`PerturbationModel.save`."""
    arrays, meta = load_state(path)
    model = build_model(meta["model"], meta.get("params"))
    model.set_state(arrays, meta)
    return model


def load_generator(name: str, params: dict[str, Any] | None, path: str) -> PerturbationModel:
    """A generative model ready for ``generate()``, from the output of its GENERATIVE stage."""
    if name not in GENERATIVE:
        raise KeyError(f"model {name!r} does not generate cells unconditionally; "
                       f"generative models: {sorted(GENERATIVE)}")
    if GENERATIVE[name] == "pretrain":
        model = build_model(name, params)
        model.load_pretrained(path)
        return model
    return load_model(path)
