"""The GPU code paths of Lingshu-Cell tested as far as a CPU allows: bf16 autocast and
torch.compile on the tiny preset."""

from __future__ import annotations

import pytest
import torch

from lingshu.models.mddm.diffusion import diffusion_loss, mask_tokens, masked_loss
from lingshu.models.mddm.network import LingshuNetwork, config_from_preset
from lingshu.models.training import TrainConfig, train
from lingshu.tokens import N_EXPR_TOKENS

N_GENES, N_CELLS = 40, 64


def _tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.linspace(0.1, 4.0, N_GENES).expand(N_CELLS, -1),
                         generator=g).clamp(max=N_EXPR_TOKENS - 1).long()  # (C, G)


def _net(seed: int = 0, conditional: bool = True) -> LingshuNetwork:
    torch.manual_seed(seed)
    conditions = {"n_contexts": 2, "n_perturbations": 3} if conditional else {}
    return LingshuNetwork(config_from_preset("tiny", N_GENES, **conditions))


def test_bf16_autocast_forward_and_backward_stay_close_to_float32():
    """The network and the loss under bf16 autocast (what training does on a GPU): finite
    logits and gradients, and a loss within a few percent of the float32 one."""
    tokens = _tokens()
    gen = torch.Generator().manual_seed(1)
    noisy, mask, t = mask_tokens(tokens, gen)
    cond = {"context": torch.zeros(N_CELLS, dtype=torch.long),
            "perturbation": torch.ones(N_CELLS, dtype=torch.long),
            "target_genes": torch.full((N_CELLS, 1), 3, dtype=torch.long)}
    net = _net()
    loss32 = diffusion_loss(net(noisy, **cond), tokens, mask, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(noisy, **cond)
        loss16 = diffusion_loss(logits, tokens, mask, t)
    # (the output head may return float32 under CPU autocast; what matters is finite values)
    assert torch.isfinite(logits.float()).all()
    assert loss16.dtype == torch.float32  # the loss is computed in float32 whatever the logits
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_torch_compile_trains_the_tiny_preset_like_eager(tmp_path):
    """``compile: true`` (the GPU presets' option) through the training loop: the compiled
    network gives the eager network's losses."""
    tokens = _tokens()

    def sample_batch(n, gen):
        return tokens[torch.randint(N_CELLS, (n,), generator=gen)]

    def loss_fn(model, batch, gen):
        noisy, mask, t = mask_tokens(batch, gen)
        return masked_loss(model, noisy, batch, mask, t)  # what pre-training runs

    losses = {}
    for compile_ in (False, True):
        cfg = TrainConfig(steps=3, batch_size=16, seed=0, warmup_steps=1, compile=compile_,
                          checkpoint_every=10)
        try:
            result = train(_net(conditional=False), loss_fn, sample_batch, cfg, tmp_path / f"c{compile_}.pt",
                           progress=False)
        except Exception as err:  # no C++ toolchain for inductor: say so, don't pass silently
            if compile_ and "compiler" in str(err).lower():
                pytest.skip(f"torch.compile needs a C++ compiler here: {err}")
            raise
        losses[compile_] = result.losses
    assert len(losses[True]) == 3
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3)
