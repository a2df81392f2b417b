"""Multi-process (DDP) plumbing of the training loop: process group, gathering, unwrapping.

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) :func:`~lingshu.models.training.train`
initialises the process group (nccl on CUDA, gloo on CPU) unless the caller already did, wraps
the model in ``DistributedDataParallel`` and splits the global batch across ranks; each rank
draws its own micro-batches. Only rank 0 writes checkpoints and curves and shows the progress
bar. DDP broadcasts rank 0's weights at wrap time and averages gradients, so all ranks end
identical. ``loss_fn`` must therefore run the forward pass as ``model(...)`` and must not rely
on attributes of ``model`` (it may be a DDP or compiled wrapper; use :func:`unwrap_model`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def ddp_setup() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process; initialise the process group under torchrun.

    With ``WORLD_SIZE > 1`` in the environment the default process group is initialised from
    the environment (nccl when CUDA is available, gloo otherwise) unless it already is, and the
    device is ``cuda:LOCAL_RANK`` (or the CPU). Without it: (0, 1, cuda if available else cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": device} if cuda else {}
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", **kw)
    return dist.get_rank(), dist.get_world_size(), device


def ddp_cleanup() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module beneath DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
