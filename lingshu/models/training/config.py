"""Optimisation settings of the training loop and its learning-rate schedule.

Optimiser (SPEC 1.3, "paper"): AdamW (betas 0.9/0.95, weight decay 0.1), gradient-norm
clipping at 1.0, linear warm-up then cosine decay to a floor (:func:`lr_at`), bf16 autocast on
CUDA, an exponential moving average of the weights (:class:`~lingshu.models.training.ema.EMA`),
global batch 256 cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


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
    # {parameter-name prefix: learning-rate multiplier} (see training.optim.param_groups)
    lr_scale: dict[str, float] | None = None

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
