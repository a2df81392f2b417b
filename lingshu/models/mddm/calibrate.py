"""Last-layer recalibration of Lingshu-Cell's per-gene head bias (ours, not the paper's).

After fine-tuning, the network is frozen and only the head's per-gene bias (G, 281) is refit
on the training cells, with the training loss itself (the same batches, masking, identity
dropout and 1/t weights: ``loss_fn``). With the network fixed, the loss is convex in the bias,
so a few hundred cheap steps (forward passes only; no gradient flows into the network) bring
it to its optimum, where each gene's predicted token distribution, averaged over the training
cells and mask rates, matches the data's (the gradient of the bias is the average of
predicted minus observed probabilities). Jointly trained at the CPU budget, the bias is not
there: the fine-tuned network gives the most expressed genes too many zeros at every mask
rate, and refit it leaves them fewer (README, "A recalibrated head bias": it fixes the
control condition's most expressed genes on four datasets, but held-out prediction only on
one, so it is off by default).

The optimiser is Adam at ``lr`` on a cosine schedule down to zero, so the last steps average
the batches' noise away. The network's weights are left as they were except ``head_bias``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from lingshu.models.training.config import TrainConfig, lr_at

log = logging.getLogger(__name__)


def recalibrate_head_bias(net: nn.Module, loss_fn: Callable[[Callable, Any, torch.Generator], torch.Tensor],
                          sample_batch: Callable[[int, torch.Generator], Any], steps: int,
                          batch_size: int, seed: int, lr: float = 1e-2,
                          progress: bool = False) -> list[float]:
    """Refit ``net.head_bias`` alone for ``steps`` steps of ``batch_size`` cells.

    loss_fn(model_fn, batch, generator) -> scalar: the training loss, calling
    ``model_fn(noisy, select=mask, **conditions)`` for the masked genes' logits (K, 281), as
    :func:`~lingshu.models.mddm.diffusion.masked_loss` does. sample_batch(n, generator): a
    batch of n training cells. Both draw from one generator seeded with ``seed`` (on the bias's
    device). Returns the loss of every step. ``net`` runs in eval mode and is left in the
    mode it came in.
    """
    if steps <= 0:
        return []
    bias = net.head_bias
    delta = torch.zeros_like(bias, requires_grad=True)  # the change, (G, 281)
    opt = torch.optim.Adam([delta], lr=lr)
    schedule = TrainConfig(steps=steps, lr=lr, min_lr=0.0, warmup_steps=0)  # cosine to zero
    gen = torch.Generator(device=bias.device).manual_seed(int(seed))
    was_training = net.training
    net.eval()

    def model_fn(tokens, select=None, **cond):
        if select is None:
            raise ValueError("recalibrate_head_bias: loss_fn must ask for the masked genes only "
                             "(select=mask)")
        with torch.no_grad():
            logits = net(tokens, select=select, **cond)  # (K, 281), the bias as it was
        genes = select.nonzero(as_tuple=True)[1]  # (K,) row-major, as the logits
        return logits.float() + delta.index_select(0, genes)

    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="recalibrate head bias", unit="step")
    try:
        for step in range(steps):
            loss = loss_fn(model_fn, sample_batch(batch_size, gen), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule)
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        bias.add_(delta.to(bias.dtype))
    net.train(was_training)
    tenth = max(1, steps // 10)
    log.info("recalibrated the head bias: %d steps, loss %.4f -> %.4f (means of the first and "
             "last tenth)", steps, np.mean(losses[:tenth]), np.mean(losses[-tenth:]))
    return losses
