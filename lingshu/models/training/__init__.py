"""The training loop every neural model of the benchmark shares: AdamW with warm-up and cosine
decay, an EMA of the weights, atomic resumable checkpoints, DDP under ``torchrun``, bf16 on CUDA,
loss curves. A model supplies ``loss_fn(model, batch, generator)`` and
``sample_batch(n, generator)``; the loop knows nothing else about it.

Modules: ``loop`` (:func:`train`), ``config`` (settings and learning-rate schedule), ``optim``
(weight-decay groups), ``ema`` (weight average), ``checkpoint`` (format, save and load, random
states), ``ddp`` (processes under ``torchrun``), ``curves`` (loss-curve PNG).
"""

from lingshu.models.training.checkpoint import load_checkpoint, save_checkpoint
from lingshu.models.training.config import TrainConfig, lr_at
from lingshu.models.training.curves import plot_loss_curve
from lingshu.models.training.ddp import ddp_cleanup, ddp_setup, unwrap_model
from lingshu.models.training.ema import EMA, ema_weights
from lingshu.models.training.loop import TrainResult, train
from lingshu.models.training.optim import param_groups

__all__ = [
    "EMA", "TrainConfig", "TrainResult", "ddp_cleanup", "ddp_setup", "ema_weights",
    "load_checkpoint", "lr_at", "param_groups", "plot_loss_curve", "save_checkpoint", "train",
    "unwrap_model",
]
