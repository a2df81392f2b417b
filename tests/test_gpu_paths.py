"""The GPU code paths of Lingshu-Cell tested as far as a CPU allows: bf16 autocast and
torch.compile on the tiny preset. On a machine with CUDA the same tests run on the GPU too
(the ``cuda`` cases; skipped where there is none, as in CI)."""

from __future__ import annotations

import pytest
import torch

from lingshu.models.mddm.diffusion import diffusion_loss, mask_tokens, masked_loss
from lingshu.models.mddm.network import LingshuNetwork, config_from_preset
from lingshu.models.training import TrainConfig, train
from lingshu.tokens import N_EXPR_TOKENS

N_GENES, N_CELLS = 40, 64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))]


def _tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.linspace(0.1, 4.0, N_GENES).expand(N_CELLS, -1),
                         generator=g).clamp(max=N_EXPR_TOKENS - 1).long()  # (C, G)


def _net(seed: int = 0, conditional: bool = True) -> LingshuNetwork:
    torch.manual_seed(seed)
    conditions = {"n_contexts": 2, "n_perturbations": 3} if conditional else {}
    return LingshuNetwork(config_from_preset("tiny", N_GENES, **conditions))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_and_backward_stay_close_to_float32(device):
    """The network and the loss under bf16 autocast (what training does on a GPU): finite
    logits and gradients, and a loss within a few percent of the float32 one."""
    tokens = _tokens()
    gen = torch.Generator().manual_seed(1)
    noisy, mask, t = mask_tokens(tokens, gen)
    cond = {"context": torch.zeros(N_CELLS, dtype=torch.long),
            "perturbation": torch.ones(N_CELLS, dtype=torch.long),
            "target_genes": torch.full((N_CELLS, 1), 3, dtype=torch.long)}
    tokens, noisy, mask, t = (x.to(device) for x in (tokens, noisy, mask, t))
    cond = {k: v.to(device) for k, v in cond.items()}
    net = _net().to(device)
    loss32 = diffusion_loss(net(noisy, **cond), tokens, mask, t)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = net(noisy, **cond)
        loss16 = diffusion_loss(logits, tokens, mask, t)
    # (the output head may return float32 under CPU autocast; what matters is finite values)
    assert torch.isfinite(logits.float()).all()
    assert loss16.dtype == torch.float32  # the loss is computed in float32 whatever the logits
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_trains_the_tiny_preset_like_eager(tmp_path, device):
    """``compile: true`` (the GPU presets' option) through the training loop: the compiled
    network gives the eager network's losses."""
    tokens = _tokens()

    def sample_batch(n, gen):  # the loop's generator lives on the training device
        return tokens.to(gen.device)[torch.randint(N_CELLS, (n,), generator=gen, device=gen.device)]

    def loss_fn(model, batch, gen):
        noisy, mask, t = mask_tokens(batch, gen)
        return masked_loss(model, noisy, batch, mask, t)  # what pre-training runs

    losses = {}
    for compile_ in (False, True):
        cfg = TrainConfig(steps=3, batch_size=16, seed=0, warmup_steps=1, compile=compile_,
                          checkpoint_every=10)
        try:
            result = train(_net(conditional=False), loss_fn, sample_batch, cfg, tmp_path / f"c{compile_}.pt",
                           device=device, progress=False)
        except Exception as err:  # no C++ toolchain for inductor: say so, don't pass silently
            if compile_ and "compiler" in str(err).lower():
                pytest.skip(f"torch.compile needs a C++ compiler here: {err}")
            raise
        losses[compile_] = result.losses
    assert len(losses[True]) == 3
    # on CUDA both run under bf16 autocast, where fused kernels round differently
    rtol = 1e-2 if device == "cuda" else 1e-3
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_lingshu_cell_pretrains_fine_tunes_predicts_and_generates_on_cuda(tmp_path):
    """The model's own training (with its held-out diagnostics), fine-tuning, prediction and
    generation with ``device: cuda`` (what a GPU pipeline run does): the batch draws use the
    training loop's generator, which lives on the GPU, and the outputs are finite."""
    import numpy as np

    from lingshu.data.features import compute_features
    from lingshu.data.split import make_split
    from lingshu.models.harness import build_model, predict_conditions, training_data

    from conftest import make_entry, make_processed

    entry = make_entry("genetic")
    adata = make_processed(n_genes=24, perts=("G1", "G2", "G3"), n_per=20, n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations", "test_perturbations": ["G2"]},
                       seed=0)
    features = compute_features(adata, split, entry, n_components=4, seed=0)
    model = build_model("lingshu", {"preset": "tiny", "pretrain_steps": 4, "finetune_steps": 4,
                                    "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 4,
                                    "sample_batch": 32, "device": "cuda"})
    pre = training_data(adata, split, features, seed=0, entry=entry, workdir=str(tmp_path),
                        include_control_input=True)
    model.pretrain(pre, tmp_path / "pretrain.pt")
    data = training_data(adata, split, features, seed=0, entry=entry, workdir=str(tmp_path))
    model.fit(data, init=tmp_path / "pretrain.pt")
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    assert pred.n_obs > 0 and set(pred.obs["perturbation"]) >= {"G2"}
    x = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    assert np.isfinite(x).all() and (x >= 0).all()
    model.cfg["unconditional_steps"] = 4
    model.load_pretrained(tmp_path / "pretrain.pt")
    cells = model.generate(8, np.random.default_rng(0))
    assert cells.shape == (8, adata.n_vars) and np.isfinite(cells).all()
