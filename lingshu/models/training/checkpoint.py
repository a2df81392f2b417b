"""Checkpoints of the training loop: format, atomic save, load, and the random streams they hold.

Checkpoints (written atomically by rank 0 with :func:`lingshu.io.atomic_path`) are plain
dicts of tensors, numbers, strings, lists and dicts, loadable with
``torch.load(path, weights_only=True)``::

    format      "lingshu-mddm-train/1"
    step        optimiser steps done
    model       state dict of the (unwrapped) model
    optimizer   AdamW state dict
    ema         {"decay", "num_updates", "shadow": {param name: tensor}}
    losses      list of per-step losses (global-batch mean), len == step
    config      TrainConfig as a dict
    world_size  number of processes that wrote it
    rng         {"generator": [uint8 tensor per rank], "torch_cpu": [... per rank],
                 "cuda": [... per rank] or None}
    train_seconds, cells_seen
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lingshu.errors import corrupt_file_error
from lingshu.io import atomic_path
from lingshu.models.training.ddp import _gather

# The RNG warnings are records of a training run, so they go to the loop's logger: the one a
# caller configures to follow a run.
log = logging.getLogger("lingshu.models.training.loop")

CHECKPOINT_FORMAT = "lingshu-mddm-train/1"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU without executing code (``weights_only=True``: tensors,
    numbers, strings and containers only, never pickled objects).

    Raises :class:`~lingshu.errors.CorruptFileError`, naming the file and saying to delete it
    and re-run its rule, when it is truncated, corrupt, holds pickled objects or is not a dict
    (FileNotFoundError for a missing file).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise corrupt_file_error(path, "a checkpoint", err) from err
    if not isinstance(state, dict):
        raise corrupt_file_error(path, "a checkpoint", f"it holds a {type(state).__name__}, "
                                 "not a dict")
    return state


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in ("module.", "_orig_mod."):
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _rng_snapshot(generator: torch.Generator, device: torch.device) -> dict:
    snap = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    return snap


def _gather_rng(generator: torch.Generator, device: torch.device, world: int) -> dict:
    """The ``rng`` entry of a checkpoint: every rank's random states (a collective: call it on
    every rank)."""
    snaps = _gather(_rng_snapshot(generator, device), world)
    return {"generator": [s["generator"] for s in snaps],
            "torch_cpu": [s["torch_cpu"] for s in snaps],
            "cuda": [s["cuda"] for s in snaps] if "cuda" in snaps[0] else None}


def _restore_rng(ckpt: dict, rank: int, world: int, generator: torch.Generator,
                 device: torch.device, seed: int) -> None:
    rng = ckpt.get("rng") or {}
    gens = rng.get("generator") or []
    if ckpt.get("world_size", 1) != world or len(gens) != world:
        log.warning("checkpoint was written by %s process(es), this run has %d: random streams "
                    "are re-seeded (the loss curve will not match an uninterrupted run)",
                    ckpt.get("world_size"), world)
        generator.manual_seed(seed + rank + 1_000_003 * int(ckpt["step"]))
        torch.manual_seed(seed + rank + 1_000_003 * int(ckpt["step"]))
        return
    try:
        generator.set_state(gens[rank])
    except RuntimeError as err:  # e.g. a CUDA checkpoint resumed on the CPU
        log.warning("cannot restore the data/mask generator (%s); re-seeding", err)
        generator.manual_seed(seed + rank + 1_000_003 * int(ckpt["step"]))
    torch.set_rng_state(rng["torch_cpu"][rank])
    cuda_states = rng.get("cuda")
    if device.type == "cuda" and cuda_states:
        torch.cuda.set_rng_state(cuda_states[rank], device)
