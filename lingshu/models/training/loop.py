"""The training loop itself: :func:`train` runs the optimiser steps, logs and checkpoints them.

The loop knows nothing about the network or the objective: it trains any ``torch.nn.Module``
with a ``loss_fn(model, batch, generator) -> scalar`` on batches drawn by
``sample_batch(n, generator)``.

Randomness: the loop owns one ``torch.Generator`` (seeded ``cfg.seed + rank``, living on the
training device so that ``loss_fn`` can draw masks there) and passes it to both callables.
On a fresh run the global torch RNG is seeded with ``cfg.seed + rank`` too (dropout uses it).
Numpy and Python's ``random`` are not used. Checkpoints hold the generator state and torch's
global CPU (and CUDA) RNG state of every rank, so a run that is killed and resumed continues
the same loss curve: on CPU the losses after the resume are bitwise identical to those of an
uninterrupted run.

A ``monitor(model, step) -> dict`` (optional) is called on rank 0 at ``monitor_steps`` with a
copy of the model holding the EMA weights (the weights the run hands on), in eval mode and
under ``torch.no_grad``; its rows (each with its ``step``) are kept in the checkpoint and
returned in :class:`TrainResult`. It must draw no randomness from the loop's streams, so that
monitoring never changes what is trained.

The checkpoint format is described in :mod:`lingshu.models.training.checkpoint`, runs of
several processes (``torchrun``) in :mod:`lingshu.models.training.ddp`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lingshu.errors import CorruptFileError
from lingshu.models.training.checkpoint import (
    CHECKPOINT_FORMAT,
    _gather_rng,
    _restore_rng,
    _strip_prefixes,
    load_checkpoint,
    save_checkpoint,
)
from lingshu.models.training.config import TrainConfig, lr_at
from lingshu.models.training.curves import plot_loss_curve
from lingshu.models.training.ddp import ddp_cleanup, ddp_setup, unwrap_model
from lingshu.models.training.ema import EMA
from lingshu.models.training.optim import param_groups

log = logging.getLogger(__name__)


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
    monitor: list[dict] = field(default_factory=list)  # the monitor's rows, oldest first


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
          fingerprint: str | None = None,
          monitor: Callable[[nn.Module, int], dict] | None = None,
          monitor_steps: tuple[int, ...] = ()) -> TrainResult:
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
    rank, world, device, created_group = _processes(device)
    micro, n_micro = _batch_split(cfg, world)
    try:
        return _train(model, loss_fn, sample_batch, cfg, checkpoint_path, device, resume,
                      progress and rank == 0, init_state_dict, loss_curve_path, rank, world,
                      micro, n_micro, fingerprint, monitor, tuple(monitor_steps))
    finally:
        if created_group:
            ddp_cleanup()


def _processes(device: str | torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group)."""
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
    return rank, world, device, created_group


def _batch_split(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(cells per micro-batch, micro-batches per rank and step) of the global batch."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} (= batch_size {cfg.batch_size} / {world} "
                         f"processes) is not divisible by micro_batch_size {micro}")
    return micro, per_rank // micro


@dataclass
class _Run:
    """One call of :func:`train`: its settings, what it trains and its running totals."""

    cfg: TrainConfig
    checkpoint_path: Path
    loss_curve_path: str | Path | None
    fingerprint: str | None
    rank: int
    world: int
    device: torch.device
    micro: int  # cells per micro-batch
    n_micro: int  # micro-batches per rank and optimiser step
    model: nn.Module  # the plain module: what the optimiser, the EMA and checkpoints see
    net: nn.Module  # what loss_fn is given: the model or its DDP / compiled wrapper
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    ema: EMA
    losses: list[float] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # step losses not yet in losses
    start_step: int = 0
    train_seconds: float = 0.0  # of the calls before this one (from the checkpoint)
    cells_seen: int = 0
    t0: float = 0.0  # when this call started training
    bar: Any = None  # the progress bar (rank 0 only)
    log_time: float = 0.0  # start of the window the logged throughput is measured over
    log_step: int = 0
    monitor: Callable[[nn.Module, int], dict] | None = None
    monitor_rows: list[dict] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _train(model, loss_fn, sample_batch, cfg, checkpoint_path, device, resume, show_bar,
           init_state_dict, loss_curve_path, rank, world, micro, n_micro,
           fingerprint=None, monitor=None, monitor_steps=()) -> TrainResult:
    model = unwrap_model(model).to(device)
    model.train()
    generator = torch.Generator(device=device)
    ckpt = _checkpoint_to_resume(checkpoint_path, cfg, resume, fingerprint, main=rank == 0)
    missing, unexpected = _load_weights(model, ckpt, init_state_dict)
    optimizer, ema = _optimizer_and_ema(model, cfg, init_state_dict)
    run = _Run(cfg=cfg, checkpoint_path=checkpoint_path, loss_curve_path=loss_curve_path,
               fingerprint=fingerprint, rank=rank, world=world, device=device, micro=micro,
               n_micro=n_micro, model=model, net=model, generator=generator,
               optimizer=optimizer, ema=ema, monitor=monitor)
    _resume_or_seed(run, ckpt)
    del ckpt
    run.net = _wrap_model(model, cfg, world, device)
    use_bf16 = bool(cfg.bf16 and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    run.bar = _progress_bar(cfg, run.start_step) if show_bar else None
    run.t0 = time.perf_counter()
    run.log_time, run.log_step = run.t0, run.start_step
    last_saved = run.start_step if run.start_step > 0 else -1
    try:
        for step in range(run.start_step + 1, cfg.steps + 1):
            lr, grad_norm = _optimizer_step(run, step, loss_fn, sample_batch, use_bf16)
            if run.bar is not None:
                run.bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                _log_progress(run, step, lr, grad_norm)
            if step in monitor_steps:
                _monitor(run, step)
            if step % cfg.checkpoint_every == 0:
                _flush_losses(run)
                _save(run, step)
                last_saved = step
        _flush_losses(run)
        _final_checkpoint(run, last_saved)
    finally:
        if run.bar is not None:
            run.bar.close()
    if world > 1:
        dist.barrier()  # every rank returns once rank 0 has written the final checkpoint
    return _result(run, missing, unexpected)


# --------------------------------------------------------------------------------------------
# before the first step: weights, optimiser, EMA, random streams, wrappers
# --------------------------------------------------------------------------------------------
def _checkpoint_to_resume(checkpoint_path: Path, cfg: TrainConfig, resume: bool,
                          fingerprint: str | None, main: bool) -> dict | None:
    """The checkpoint to continue from, or None to train afresh.

    Resumable state that cannot be read (truncated, corrupt, holding pickled objects) or is
    not a training checkpoint is reported and not resumed: training starts afresh and
    overwrites it (it is only a shortcut, never an input)."""
    if not (resume and checkpoint_path.exists()):
        return None
    try:
        ckpt = load_checkpoint(checkpoint_path)
    except CorruptFileError as err:
        if main:
            log.warning("not resuming: %s. Training afresh (the file will be overwritten)", err)
        return None
    if ckpt.get("format") != CHECKPOINT_FORMAT or not _resumable(ckpt):
        if main:
            log.warning("not resuming %s: not a complete %s checkpoint (format %r). Training "
                        "afresh (the file will be overwritten)", checkpoint_path,
                        CHECKPOINT_FORMAT, ckpt.get("format"))
        return None
    if fingerprint is not None and ckpt.get("fingerprint") != fingerprint:
        if main:
            log.warning("%s was written for other inputs (data, parameters or initial "
                        "weights); not resuming it, training afresh", checkpoint_path)
        return None
    old = ckpt.get("config", {})
    changed = {k: (old.get(k), v) for k, v in cfg.to_dict().items()
               if k in old and old[k] != v}
    if changed and main:
        log.warning("resuming %s with a changed config (old, new): %s", checkpoint_path, changed)
    return ckpt


def _resumable(ckpt: dict) -> bool:
    """Whether a training checkpoint holds what a resume reads."""
    keys = ("step", "model", "optimizer", "ema", "losses")
    return all(k in ckpt for k in keys) and isinstance(ckpt["model"], dict)


def _load_weights(model: nn.Module, ckpt: dict | None,
                  init_state_dict: dict | None) -> tuple[list[str], list[str]]:
    """Load the checkpoint's weights, else ``init_state_dict``; (missing, unexpected) keys."""
    if ckpt is not None:
        model.load_state_dict(_strip_prefixes(ckpt["model"]))
        return [], []
    if init_state_dict is not None:
        return _load_init_state(model, init_state_dict)
    return [], []


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


def _optimizer_and_ema(model: nn.Module, cfg: TrainConfig,
                       init_state_dict: dict | None) -> tuple[torch.optim.Optimizer, EMA]:
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr_scale),
                                  lr=lr_at(1, cfg),
                                  betas=tuple(cfg.betas))
    # The warm-up is for an average that starts at random weights, not at trained ones.
    ema = EMA(model, cfg.ema_decay, warmup=init_state_dict is None)
    return optimizer, ema


def _resume_or_seed(run: _Run, ckpt: dict | None) -> None:
    """Restore optimiser, EMA, history and random streams from ``ckpt``, or seed a fresh run."""
    if ckpt is None:
        run.generator.manual_seed(run.cfg.seed + run.rank)
        torch.manual_seed(run.cfg.seed + run.rank)
        return
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.ema.load_state_dict(ckpt["ema"])
    run.start_step = int(ckpt["step"])
    run.losses = [float(x) for x in ckpt["losses"]][:run.start_step]
    run.train_seconds = float(ckpt.get("train_seconds", 0.0))
    run.cells_seen = int(ckpt.get("cells_seen", 0))
    run.monitor_rows = [dict(r) for r in ckpt.get("monitor", []) if r["step"] <= run.start_step]
    _restore_rng(ckpt, run.rank, run.world, run.generator, run.device, run.cfg.seed)
    if run.main:
        log.info("resumed from %s at step %d/%d", run.checkpoint_path, run.start_step,
                 run.cfg.steps)


def _wrap_model(model: nn.Module, cfg: TrainConfig, world: int,
                device: torch.device) -> nn.Module:
    """The module ``loss_fn`` calls: ``model`` under DDP (several processes) and/or compiled."""
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _progress_bar(cfg: TrainConfig, start_step: int):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# one optimiser step
# --------------------------------------------------------------------------------------------
def _optimizer_step(run: _Run, step: int, loss_fn: Callable, sample_batch: Callable,
                    use_bf16: bool) -> tuple[float, torch.Tensor | None]:
    """Optimiser step ``step`` on one global batch; (its learning rate, the gradient norm)."""
    cfg = run.cfg
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    run.optimizer.zero_grad(set_to_none=True)
    total = _accumulate_gradients(run, loss_fn, sample_batch, use_bf16)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip) \
        if cfg.grad_clip and cfg.grad_clip > 0 else None
    run.optimizer.step()
    run.ema.update(run.model)
    run.pending.append(total)
    run.cells_seen += cfg.batch_size
    return lr, grad_norm


def _accumulate_gradients(run: _Run, loss_fn: Callable, sample_batch: Callable,
                          use_bf16: bool) -> torch.Tensor:
    """Backward passes over this rank's micro-batches; the global-batch mean loss (on device)."""
    device, n_micro = run.device, run.n_micro
    total = torch.zeros((), device=device)
    for i in range(n_micro):
        batch = _to_device(sample_batch(run.micro, run.generator), device)
        sync = run.world == 1 or i == n_micro - 1
        net = run.net
        ctx = net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=use_bf16):
                loss = loss_fn(net, batch, run.generator)
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            (loss.float() / n_micro).backward()
        total += loss.detach().float()
    total /= n_micro
    if run.world > 1:
        dist.all_reduce(total)
        total /= run.world
    return total


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# losses, logging, checkpoints
# --------------------------------------------------------------------------------------------
def _flush_losses(run: _Run) -> None:
    """Move the pending step losses to ``run.losses``; fail on a non-finite one."""
    if run.pending:
        values = torch.stack(run.pending).float().cpu().tolist()
        run.pending.clear()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        run.losses.extend(values)
        if bad:
            first = len(run.losses) - len(values) + bad[0] + 1
            raise FloatingPointError(f"non-finite loss at step {first}")


def _log_progress(run: _Run, step: int, lr: float, grad_norm: torch.Tensor | None) -> None:
    """Log the loss and throughput of the steps since the last log line."""
    _flush_losses(run)
    cfg, losses = run.cfg, run.losses
    now = time.perf_counter()
    rate = (step - run.log_step) * cfg.batch_size / max(now - run.log_time, 1e-9)
    run.log_time, run.log_step = now, step
    recent = losses[-min(cfg.log_every, len(losses)):]
    mean_recent = sum(recent) / len(recent)
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{losses[-1]:.4f}", cells_s=f"{rate:.0f}", refresh=False)
    if run.main:
        gn = f" grad_norm {float(grad_norm):.3f}" if grad_norm is not None else ""
        log.info("step %d/%d loss %.4f (mean of last %d: %.4f) lr %.3g%s cells/s %.0f",
                 step, cfg.steps, losses[-1], len(recent), mean_recent, lr, gn, rate)


def _save(run: _Run, step: int) -> None:
    """Write the checkpoint (and the loss curve) of step ``step``; call it on every rank."""
    rng = _gather_rng(run.generator, run.device, run.world)  # collective: every rank
    if not run.main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.state_dict(),
        "losses": list(run.losses),
        "config": run.cfg.to_dict(),
        "fingerprint": run.fingerprint,
        "world_size": run.world,
        "rng": rng,
        "train_seconds": run.train_seconds + (time.perf_counter() - run.t0),
        "cells_seen": run.cells_seen,
        "monitor": list(run.monitor_rows),
    }
    save_checkpoint(run.checkpoint_path, state)
    if run.loss_curve_path is not None:
        plot_loss_curve(run.losses, run.loss_curve_path)


def _monitor(run: _Run, step: int) -> None:
    """Call the monitor on a copy of the model holding the EMA weights (rank 0 only)."""
    if run.monitor is None or not run.main:
        return
    shadow = copy.deepcopy(run.model)
    run.ema.copy_to(shadow)
    shadow.eval()
    start = time.perf_counter()
    with torch.no_grad():
        row = {"step": step, **run.monitor(shadow, step)}
    del shadow
    run.monitor_rows.append(row)
    log.info("step %d: %s (%.1f s)", step, ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        if k != "step"), time.perf_counter() - start)


def _final_checkpoint(run: _Run, last_saved: int) -> None:
    """Save the last step unless it is saved already; a run that had nothing to train says so
    (and draws the loss curve if it is missing)."""
    cfg = run.cfg
    if last_saved != cfg.steps and cfg.steps > run.start_step:
        _save(run, cfg.steps)
    elif run.start_step >= cfg.steps and run.main:
        log.info("checkpoint %s is already at step %d >= %d: nothing to train",
                 run.checkpoint_path, run.start_step, cfg.steps)
        if run.loss_curve_path is not None and not Path(run.loss_curve_path).exists():
            plot_loss_curve(run.losses, run.loss_curve_path)


# --------------------------------------------------------------------------------------------
# after the last step
# --------------------------------------------------------------------------------------------
def _result(run: _Run, missing: list[str], unexpected: list[str]) -> TrainResult:
    cfg = run.cfg
    seconds = time.perf_counter() - run.t0
    done = max(cfg.steps - run.start_step, 0)
    peak, kind = _peak_memory_mb(run.device)
    if run.main and done:
        log.info("trained %d steps in %.1f s (%.0f cells/s), peak memory %.0f MiB (%s)",
                 done, seconds, done * cfg.batch_size / max(seconds, 1e-9), peak, kind)
    return TrainResult(losses=list(run.losses), steps=max(cfg.steps, run.start_step),
                       seconds=seconds,
                       cells_per_second=done * cfg.batch_size / max(seconds, 1e-9),
                       peak_memory_mb=peak, memory_kind=kind, start_step=run.start_step,
                       world_size=run.world, checkpoint_path=run.checkpoint_path,
                       missing_keys=missing, unexpected_keys=unexpected,
                       monitor=list(run.monitor_rows))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "rss"
