"""Generic training loop for the masked discrete diffusion model (SPEC 1.3).

The loop knows nothing about the network or the objective: it trains any ``torch.nn.Module``
with a ``loss_fn(model, batch, generator) -> scalar`` on batches drawn by
``sample_batch(n, generator)``.

Optimiser (SPEC 1.3, "paper"): AdamW (betas 0.9/0.95, weight decay 0.1), gradient-norm
clipping at 1.0, linear warm-up then cosine decay to a floor (:func:`lr_at`), bf16 autocast on
CUDA, an exponential moving average of the weights (:class:`EMA`), global batch 256 cells.

Weight decay is applied to weight *matrices* only: a parameter is decayed when it has two or
more dimensions and is neither the weight of an ``nn.Embedding``/``nn.EmbeddingBag`` nor a bare
``nn.Parameter`` whose name contains ``emb`` (e.g. a learned positional embedding). Biases,
norm scales/shifts and every other 1-D parameter are not decayed (:func:`param_groups`).

Randomness: the loop owns one ``torch.Generator`` (seeded ``cfg.seed + rank``, living on the
training device so that ``loss_fn`` can draw masks there) and passes it to both callables.
On a fresh run the global torch RNG is seeded with ``cfg.seed + rank`` too (dropout uses it).
Numpy and Python's ``random`` are not used. Checkpoints hold the generator state and torch's
global CPU (and CUDA) RNG state of every rank, so a run that is killed and resumed continues
the same loss curve: on CPU the losses after the resume are bitwise identical to those of an
uninterrupted run.

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

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) :func:`train` initialises the process
group (nccl on CUDA, gloo on CPU) unless the caller already did, wraps the model in
``DistributedDataParallel`` and splits the global batch across ranks; each rank draws its own
micro-batches. Only rank 0 writes checkpoints and curves and shows the progress bar. DDP
broadcasts rank 0's weights at wrap time and averages gradients, so all ranks end identical.
``loss_fn`` must therefore run the forward pass as ``model(...)`` and must not rely on
attributes of ``model`` (it may be a DDP or compiled wrapper; use :func:`unwrap_model`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lingshu.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lingshu-mddm-train/1"

__all__ = [
    "TrainConfig", "TrainResult", "EMA", "lr_at", "param_groups", "train", "ddp_setup",
    "ddp_cleanup", "load_checkpoint", "save_checkpoint", "ema_weights", "unwrap_model",
    "plot_loss_curve",
]


# --------------------------------------------------------------------------------------------
# configuration and schedule
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation settings (defaults: SPEC 1.3).

    batch_size is the *global* batch (cells per optimiser step, summed over all ranks); each of
    ``world_size`` ranks processes ``batch_size // world_size`` cells per step, in micro-batches
    of ``micro_batch_size`` cells (gradient accumulation; None = one micro-batch per rank).
    """

    steps: int
    batch_size: int = 256
    micro_batch_size: int | None = None
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    ddp_find_unused_parameters: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = [float(b) for b in self.betas]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (1-based: the first update is step 1).

    Linear warm-up ``lr * step / warmup_steps`` reaching the peak ``lr`` at
    ``step == warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` reached at
    ``step == cfg.steps`` (and held beyond it).
    """
    step = max(int(step), 0)
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    if decay_steps <= 0:
        return cfg.min_lr if step > cfg.warmup_steps else cfg.lr
    progress = min(max((step - cfg.warmup_steps) / decay_steps, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module beneath DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices only (see module docstring)."""
    model = unwrap_model(model)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or "emb" in pname.lower():
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class EMA:
    """Exponential moving average of a model's floating-point parameters.

    ``update`` sets ``shadow = d * shadow + (1 - d) * param`` for every parameter. The shadow
    starts as a copy of the parameters. Buffers are not averaged.

    warmup: use the warmed-up decay ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update
    (as in timm and diffusers), for training from random weights: a short run's average is then
    not dominated by the initialisation (with a fixed 0.99, 22% of the shadow after 150 steps
    would still be random weights). Without it (training that starts from trained weights,
    such as fine-tuning) ``d = decay`` throughout: the warm-up's short early window would only
    make the average noisier (on the default sim_stimulation data, Lingshu-Cell's fine-tuning
    with the warm-up doubled the MAE, 0.393 against 0.190).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        model = unwrap_model(model)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters()
            if p.is_floating_point()
        }

    def _params(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(unwrap_model(model).named_parameters())
        names = list(self.shadow)
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"EMA: model lacks parameters {missing[:5]}")
        return [self.shadow[n] for n in names], [params[n].detach() for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadows, params = self._params(model)
        decay = self.current_decay()
        if shadows:
            torch._foreach_mul_(shadows, decay)
            torch._foreach_add_(shadows, params, alpha=1.0 - decay)
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next update applies: ``min(decay, (1 + n) / (10 + n))`` with the
        warm-up, else ``decay``."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averaged ones."""
        shadows, params = self._params(model)
        for s, p in zip(shadows, params):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "warmup": self.warmup,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = _strip_prefixes(state["shadow"])
        if set(shadow) != set(self.shadow):
            raise KeyError("EMA state does not match the model: "
                           f"missing {sorted(set(self.shadow) - set(shadow))[:5]}, "
                           f"unexpected {sorted(set(shadow) - set(self.shadow))[:5]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
        self.warmup = bool(state.get("warmup", self.warmup))


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a training checkpoint onto the CPU (``weights_only=True``: no pickled objects)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def ema_weights(checkpoint: dict | str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint with its parameters replaced by their EMA.

    Buffers (and anything the EMA does not track) come from the raw model state, so the result
    loads with ``model.load_state_dict(..., strict=True)``.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    state = dict(checkpoint["model"])
    shadow = checkpoint["ema"]["shadow"]
    unknown = sorted(set(shadow) - set(state))
    if unknown:
        raise KeyError(f"EMA entries without a model entry: {unknown[:5]}")
    state.update(shadow)
    return state


def _rng_snapshot(generator: torch.Generator, device: torch.device) -> dict:
    snap = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    return snap


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


# --------------------------------------------------------------------------------------------
# loss curve
# --------------------------------------------------------------------------------------------
def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_loss_curve(losses: list[float], path: str | Path, title: str = "training loss") -> None:
    """Write the raw and smoothed (trailing moving average) loss curve as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    if losses:
        ax.plot(steps, losses, color="0.7", lw=0.8, label="raw")
        window = max(1, len(losses) // 50)
        ax.plot(steps, _smooth(losses, window), color="C0", lw=1.5,
                label=f"moving average ({window})")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns.

    losses: the whole per-step loss history (including steps done before a resume).
    steps: optimiser steps done in total; start_step: where this call started (0 or resumed).
    seconds / cells_per_second: wall time and throughput (global cells) of this call only.
    peak_memory_mb: peak RSS of the process (CPU) or ``torch.cuda.max_memory_allocated``
    (CUDA), per ``memory_kind`` ("rss" / "cuda").
    """

    losses: list[float]
    steps: int
    seconds: float
    cells_per_second: float
    peak_memory_mb: float
    memory_kind: str
    start_step: int = 0
    world_size: int = 1
    checkpoint_path: Path | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "rss"


def _load_init_state(model: nn.Module, init_state_dict: dict) -> tuple[list[str], list[str]]:
    """Load ``init_state_dict`` with strict=False; entries of the wrong shape are skipped."""
    state = _strip_prefixes(init_state_dict)
    own = model.state_dict()
    mismatched = [k for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k in mismatched:
        log.warning("init_state_dict: %s has shape %s, the model %s: skipped (left as initialised)",
                    k, tuple(state[k].shape), tuple(own[k].shape))
        del state[k]
    res = model.load_state_dict(state, strict=False)
    missing = sorted(set(res.missing_keys) | set(mismatched))
    unexpected = sorted(res.unexpected_keys)
    log.info("init_state_dict loaded: %d tensors; missing (kept as initialised) %d: %s; "
             "unexpected (ignored) %d: %s", len(state) - len(unexpected), len(missing), missing,
             len(unexpected), unexpected)
    return missing, unexpected


def train(model: nn.Module,
          loss_fn: Callable[[nn.Module, Any, torch.Generator], torch.Tensor],
          sample_batch: Callable[[int, torch.Generator], Any],
          cfg: TrainConfig,
          checkpoint_path: str | Path,
          device: str | torch.device = "cpu",
          resume: bool = True,
          progress: bool = True,
          init_state_dict: dict | None = None,
          loss_curve_path: str | Path | None = None,
          fingerprint: str | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps; see the module docstring.

    ``sample_batch(n, generator)`` returns n cells (any nesting of tensors; moved to the
    device by the loop); ``loss_fn(model, batch, generator)`` returns the scalar mean loss over
    those cells. Both get the loop's generator, which lives on the training device.
    With ``resume`` and an existing checkpoint, training continues from its step (and
    ``init_state_dict`` is ignored); a checkpoint already at ``cfg.steps`` returns at once.
    ``fingerprint`` names the run's inputs (data, parameters, initial weights): a checkpoint
    written under another fingerprint is stale (left by a run on other inputs) and is not
    resumed; training starts afresh and overwrites it.
    The model is trained in place and holds the raw (not EMA) weights at the end.
    """
    checkpoint_path = Path(checkpoint_path)
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ValueError(f"invalid TrainConfig: {cfg}")

    # --- processes and device ---------------------------------------------------------------
    created_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized()):
        created_group = not dist.is_initialized()
        rank, world, ddp_device = ddp_setup()
        if torch.device(device) != ddp_device:
            log.info("rank %d: running on %s (DDP) instead of %s", rank, ddp_device, device)
        device = ddp_device
    else:
        rank, world, device = 0, 1, torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    main = rank == 0

    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} (= batch_size {cfg.batch_size} / {world} "
                         f"processes) is not divisible by micro_batch_size {micro}")
    n_micro = per_rank // micro

    try:
        return _train(model, loss_fn, sample_batch, cfg, checkpoint_path, device, resume,
                      progress and main, init_state_dict, loss_curve_path, rank, world,
                      micro, n_micro, fingerprint)
    finally:
        if created_group:
            ddp_cleanup()


def _train(model, loss_fn, sample_batch, cfg, checkpoint_path, device, resume, show_bar,
           init_state_dict, loss_curve_path, rank, world, micro, n_micro,
           fingerprint=None) -> TrainResult:
    main = rank == 0
    model = unwrap_model(model).to(device)
    model.train()
    generator = torch.Generator(device=device)

    ckpt = None
    if resume and checkpoint_path.exists():
        ckpt = load_checkpoint(checkpoint_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{checkpoint_path}: not a {CHECKPOINT_FORMAT} checkpoint")
        if fingerprint is not None and ckpt.get("fingerprint") != fingerprint:
            if main:
                log.warning("%s was written for other inputs (data, parameters or initial "
                            "weights); not resuming it, training afresh", checkpoint_path)
            ckpt = None
    if ckpt is not None:
        old = ckpt.get("config", {})
        changed = {k: (old.get(k), v) for k, v in cfg.to_dict().items()
                   if k in old and old[k] != v}
        if changed and main:
            log.warning("resuming %s with a changed config (old, new): %s", checkpoint_path, changed)

    missing: list[str] = []
    unexpected: list[str] = []
    if ckpt is not None:
        model.load_state_dict(_strip_prefixes(ckpt["model"]))
    elif init_state_dict is not None:
        missing, unexpected = _load_init_state(model, init_state_dict)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(1, cfg),
                                  betas=tuple(cfg.betas))
    # The warm-up is for an average that starts at random weights, not at trained ones.
    ema = EMA(model, cfg.ema_decay, warmup=init_state_dict is None)
    losses: list[float] = []
    start_step, train_seconds, cells_seen = 0, 0.0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        start_step = int(ckpt["step"])
        losses = [float(x) for x in ckpt["losses"]][:start_step]
        train_seconds = float(ckpt.get("train_seconds", 0.0))
        cells_seen = int(ckpt.get("cells_seen", 0))
        _restore_rng(ckpt, rank, world, generator, device, cfg.seed)
        if main:
            log.info("resumed from %s at step %d/%d", checkpoint_path, start_step, cfg.steps)
    else:
        generator.manual_seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)
    del ckpt

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    if cfg.compile:
        net = torch.compile(net)
    use_bf16 = bool(cfg.bf16 and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def checkpoint(step: int) -> None:
        snaps = _gather(_rng_snapshot(generator, device), world)  # collective: every rank
        if not main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "losses": list(losses),
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "world_size": world,
            "rng": {"generator": [s["generator"] for s in snaps],
                    "torch_cpu": [s["torch_cpu"] for s in snaps],
                    "cuda": [s["cuda"] for s in snaps] if "cuda" in snaps[0] else None},
            "train_seconds": train_seconds + (time.perf_counter() - t0),
            "cells_seen": cells_seen,
        }
        save_checkpoint(checkpoint_path, state)
        if loss_curve_path is not None:
            plot_loss_curve(losses, loss_curve_path)

    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            values = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            losses.extend(values)
            if bad:
                raise FloatingPointError(f"non-finite loss at step {len(losses) - len(values) + bad[0] + 1}")

    bar = None
    if show_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True)

    t0 = time.perf_counter()
    t_log, step_log = t0, start_step
    last_saved = start_step if start_step > 0 else -1
    step = start_step
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for i in range(n_micro):
                batch = _to_device(sample_batch(micro, generator), device)
                sync = world == 1 or i == n_micro - 1
                ctx = net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                        enabled=use_bf16):
                        loss = loss_fn(net, batch, generator)
                    if loss.ndim != 0:
                        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                    (loss.float() / n_micro).backward()
                total += loss.detach().float()
            total /= n_micro
            if world > 1:
                dist.all_reduce(total)
                total /= world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) \
                if cfg.grad_clip and cfg.grad_clip > 0 else None
            optimizer.step()
            ema.update(model)
            pending.append(total)
            cells_seen += cfg.batch_size
            if bar is not None:
                bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                flush()
                now = time.perf_counter()
                rate = (step - step_log) * cfg.batch_size / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                recent = losses[-min(cfg.log_every, len(losses)):]
                mean_recent = sum(recent) / len(recent)
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", cells_s=f"{rate:.0f}", refresh=False)
                if main:
                    gn = f" grad_norm {float(grad_norm):.3f}" if grad_norm is not None else ""
                    log.info("step %d/%d loss %.4f (mean of last %d: %.4f) lr %.3g%s cells/s %.0f",
                             step, cfg.steps, losses[-1], len(recent), mean_recent, lr, gn, rate)
            if step % cfg.checkpoint_every == 0:
                flush()
                checkpoint(step)
                last_saved = step
        flush()
        if last_saved != cfg.steps and cfg.steps > start_step:
            checkpoint(cfg.steps)
        elif start_step >= cfg.steps and main:
            log.info("checkpoint %s is already at step %d >= %d: nothing to train",
                     checkpoint_path, start_step, cfg.steps)
            if loss_curve_path is not None and not Path(loss_curve_path).exists():
                plot_loss_curve(losses, loss_curve_path)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        dist.barrier()  # every rank returns once rank 0 has written the final checkpoint

    seconds = time.perf_counter() - t0
    done = max(cfg.steps - start_step, 0)
    peak, kind = _peak_memory_mb(device)
    if main and done:
        log.info("trained %d steps in %.1f s (%.0f cells/s), peak memory %.0f MiB (%s)",
                 done, seconds, done * cfg.batch_size / max(seconds, 1e-9), peak, kind)
    return TrainResult(losses=list(losses), steps=max(cfg.steps, start_step), seconds=seconds,
                       cells_per_second=done * cfg.batch_size / max(seconds, 1e-9),
                       peak_memory_mb=peak, memory_kind=kind, start_step=start_step,
                       world_size=world, checkpoint_path=checkpoint_path,
                       missing_keys=missing, unexpected_keys=unexpected)
