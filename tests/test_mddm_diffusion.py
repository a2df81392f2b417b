"""The masked diffusion process (SPEC 1.3, 1.4): masking, the LLaDA loss, the schedule, the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from lingshu.models.mddm.diffusion import (
    diffusion_loss,
    inverse_cdf,
    mask_tokens,
    masked_loss,
    sample,
    stratified_uniforms,
    unmask_schedule,
)
from lingshu.models.mddm.network import LingshuNetwork, config_from_preset
from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS

V = N_EXPR_TOKENS


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- forward process and loss ------------------------------------------------------------------


def test_mask_tokens_masks_with_probability_t():
    tokens = torch.randint(0, V, (64, 500), generator=gen(1))
    noisy, mask, t = mask_tokens(tokens, gen(2))
    assert noisy.shape == tokens.shape and mask.dtype == torch.bool and t.shape == (64,)
    assert ((t > 0) & (t <= 1)).all()
    assert torch.equal(noisy[mask], torch.full_like(noisy[mask], MASK_TOKEN))
    assert torch.equal(noisy[~mask], tokens[~mask])
    assert (mask.float().mean(1) - t).abs().max() < 0.1  # 500 genes per cell: binomial spread ~0.02
    again = mask_tokens(tokens, gen(2))
    assert all(torch.equal(a, b) for a, b in zip((noisy, mask, t), again))


def test_full_mask_share_masks_that_share_of_cells_whole_and_nothing_else():
    """``full_mask``: about that share of cells get t = 1 (every gene masked); at 0 the draws
    are the paper's, unchanged; the other cells are masked exactly as without it."""
    tokens = torch.randint(0, N_EXPR_TOKENS, (4000, 50), generator=torch.Generator().manual_seed(3))
    base = mask_tokens(tokens, torch.Generator().manual_seed(0))
    same = mask_tokens(tokens, torch.Generator().manual_seed(0), full_mask=0.0)
    for a, b in zip(base, same):
        assert torch.equal(a, b)
    noisy, mask, t = mask_tokens(tokens, torch.Generator().manual_seed(0), full_mask=0.3)
    whole = t == 1.0
    assert abs(whole.float().mean().item() - 0.3) < 0.03
    assert mask[whole].all() and (noisy[whole] == MASK_TOKEN).all()
    torch.testing.assert_close(t[~whole], base[2][~whole])  # the same t for the others
    assert abs(mask[~whole].float().mean().item() - t[~whole].mean().item()) < 0.01


def test_loss_equals_hand_computed_value():
    logits = torch.zeros(2, 3, V)
    logits[0, 0, 5] = 2.0
    logits[0, 1, 7] = 1.0
    logits[1, 2, 0] = 3.0
    tokens = torch.tensor([[5, 3, 9], [1, 1, 0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    # -log softmax(l)[y] with all logits 0 but one equal to a: log((V - 1) + e^a) - l[y]
    ce00 = math.log(V - 1 + math.exp(2.0)) - 2.0
    ce01 = math.log(V - 1 + math.exp(1.0)) - 0.0
    ce12 = math.log(V - 1 + math.exp(3.0)) - 3.0
    expected = ((ce00 + ce01) / 0.5 / 3 + ce12 / 0.25 / 3) / 2  # / G genes, mean over cells
    assert diffusion_loss(logits, tokens, mask, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
def test_masked_loss_equals_the_full_loss_in_value_and_gradients(conditional):
    """Training asks the network for the masked genes' logits only: same loss and same
    gradients as computing every gene's logits and reading the masked ones."""
    n_genes = 23  # not a multiple of the group size: padding in play
    kw = {"n_contexts": 2, "n_perturbations": 3} if conditional else {}
    net = LingshuNetwork(config_from_preset("tiny", n_genes, **kw))
    tokens = torch.randint(0, 20, (6, n_genes), generator=gen(7))
    noisy, mask, t = mask_tokens(tokens, gen(8))
    cond = ({"context": torch.tensor([0, 1, 0, 1, 0, 1]),
             "perturbation": torch.tensor([0, 1, 2, 0, 1, 2])} if conditional else {})
    full = diffusion_loss(net(noisy, **cond), tokens, mask, t)
    full.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    sel = masked_loss(net, noisy, tokens, mask, t, **cond)
    sel.backward()
    assert sel.item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in net.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-7), name


def test_loss_ignores_unmasked_genes_and_has_gradient_only_there():
    logits = torch.randn(4, 10, V, generator=gen(3), requires_grad=True)
    tokens = torch.randint(0, V, (4, 10), generator=gen(4))
    mask = torch.rand(4, 10, generator=gen(5)) < 0.5
    t = torch.rand(4, generator=gen(6)) + 0.1
    loss = diffusion_loss(logits, tokens, mask, t)
    other = logits.detach().clone()
    other[~mask] = torch.randn_like(other[~mask]) * 10
    assert diffusion_loss(other, tokens, mask, t).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and logits.grad[mask].abs().sum() > 0


# -- schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_genes, steps", [(30, 3), (18080, 256), (100, 1), (5, 20), (0, 4)])
def test_unmask_schedule_sums_to_n_genes(n_genes, steps):
    counts = unmask_schedule(n_genes, steps)
    assert len(counts) == steps and sum(counts) == n_genes and min(counts) >= 0


def test_unmask_schedule_follows_cosine():
    counts = unmask_schedule(1000, 10)
    masked_after = 1000 - torch.tensor(counts).cumsum(0)
    expected = [round(1000 * math.cos(math.pi / 2 * s / 10)) for s in range(1, 11)]
    assert masked_after.tolist() == expected
    assert counts[0] < counts[-1]  # few genes first, many last


# -- sampler ------------------------------------------------------------------------------------

G, B = 24, 6


class FakeModel:
    """model_fn with logits = a fixed random table (G, V) + a per-condition table; records calls."""

    def __init__(self):
        self.table = torch.randn(G, V, generator=gen(10)) * 2
        self.calls = []

    def __call__(self, tokens, cond):
        self.calls.append((tokens.clone(), cond))
        shift = torch.randn(G, V, generator=gen(cond["id"])) * 2
        return (self.table + shift).expand(tokens.shape[0], G, V)


def test_sampler_fills_every_mask_following_the_schedule():
    model, cond = FakeModel(), {"id": 1}
    steps = 4
    out = sample(model, B, G, steps, gen(0), cond=cond)
    assert out.shape == (B, G) and out.dtype == torch.long
    assert ((out >= 0) & (out < V)).all()
    assert len(model.calls) == steps
    masked = [int((tok == MASK_TOKEN).sum(1)[0]) for tok, _ in model.calls] + [0]
    assert masked[0] == G
    assert [masked[i] - masked[i + 1] for i in range(steps)] == unmask_schedule(G, steps)
    assert all(c is cond for _, c in model.calls)  # condition passed through untouched
    assert cond == {"id": 1}


def test_sampler_more_steps_than_genes_skips_empty_steps():
    model = FakeModel()
    out = sample(model, 2, G, 64, gen(0), cond={"id": 1})
    assert (out != MASK_TOKEN).all() and len(model.calls) <= 64


def test_sampler_never_changes_fixed_tokens():
    model = FakeModel()
    fixed_mask = torch.rand(B, G, generator=gen(7)) < 0.3
    fixed_tokens = torch.full((B, G), 1)
    out = sample(model, B, G, 5, gen(0), cond={"id": 1}, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask)
    assert (out[fixed_mask] == 1).all()
    for tokens, _ in model.calls:  # fixed from the first call on
        assert (tokens[fixed_mask] == 1).all()
    assert (out != MASK_TOKEN).all()
    # the free genes of each cell follow the schedule of its own number of free genes
    free = (~fixed_mask).sum(1)
    first_call_masked = (model.calls[0][0] == MASK_TOKEN).sum(1)
    assert torch.equal(first_call_masked, free)


def test_sampler_unmasks_uniformly_random_positions():
    model = FakeModel()
    sample(model, 200, G, 3, gen(0), cond={"id": 1})
    unmasked_first = (model.calls[1][0] != MASK_TOKEN).float().mean(0)  # (G,) over 200 cells
    assert (unmasked_first > 0).all()  # every gene position gets chosen somewhere


def test_guidance_zero_equals_conditional_sampling():
    cond, uncond = {"id": 1}, {"id": 2}
    plain_model, guided_model = FakeModel(), FakeModel()
    plain = sample(plain_model, B, G, 4, gen(5), cond=cond)
    guided = sample(guided_model, B, G, 4, gen(5), cond=cond, uncond=uncond, guidance=0.0)
    assert torch.equal(plain, guided)
    assert len(guided_model.calls) == 4 and all(c is cond for _, c in guided_model.calls)


def test_guidance_positive_differs_and_calls_both_branches():
    cond, uncond = {"id": 1}, {"id": 2}
    model = FakeModel()
    plain = sample(FakeModel(), B, G, 4, gen(5), cond=cond)
    guided = sample(model, B, G, 4, gen(5), cond=cond, uncond=uncond, guidance=2.0)
    assert not torch.equal(plain, guided)
    assert [c["id"] for _, c in model.calls] == [1, 2] * 4
    with pytest.raises(ValueError):
        sample(FakeModel(), B, G, 4, gen(5), cond=cond, guidance=2.0)  # no uncond


def test_guidance_formula_on_the_logits():
    # with one gene, one step, and logits that put all mass on a single token per branch,
    # guided logits l_u + (w+1)(l_c - l_u) pick the conditional token for w >= 0
    def model_fn(tokens, cond):
        logits = torch.full((tokens.shape[0], 1, V), -30.0)
        logits[..., cond] = 0.0
        logits[..., 3] = -1.0  # shared
        return logits

    out = sample(model_fn, 50, 1, 1, gen(0), cond=7, uncond=9, guidance=1.0)
    assert (out == 7).all()


def test_sampler_is_deterministic_given_the_generator():
    a = sample(FakeModel(), B, G, 4, gen(3), cond={"id": 1})
    b = sample(FakeModel(), B, G, 4, gen(3), cond={"id": 1})
    c = sample(FakeModel(), B, G, 4, gen(4), cond={"id": 1})
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_with_the_real_network():
    torch.manual_seed(0)
    net = LingshuNetwork(config_from_preset("tiny", G, n_contexts=2, n_perturbations=3)).eval()
    cond = {"context": torch.zeros(B, dtype=torch.long), "perturbation": torch.full((B,), 2)}
    uncond = {"context": torch.zeros(B, dtype=torch.long), "perturbation": torch.zeros(B, dtype=torch.long)}
    out = sample(lambda x, c: net(x, **c), B, G, 3, gen(0), cond=cond, uncond=uncond, guidance=2.0)
    assert out.shape == (B, G) and (out < V).all()


def test_selective_sampling_gives_the_same_cells():
    torch.manual_seed(0)
    net = LingshuNetwork(config_from_preset("tiny", 40)).eval()
    full = sample(lambda x, c: net(x), 6, 40, 16, gen(4))
    part = sample(lambda x, c, select=None: net(x, select=select), 6, 40, 16, gen(4), select=True)
    assert torch.equal(full, part)


# -- stratified draws: the same distribution per token, less noise per batch ----------------


def test_stratified_uniforms_put_one_chosen_cell_in_each_stratum_of_its_column():
    chosen = torch.rand(50, 30, generator=gen(1)) < 0.4
    u = stratified_uniforms(chosen, gen(2))
    assert ((u >= 0) & (u < 1)).all()
    for g in range(30):
        c = int(chosen[:, g].sum())
        strata = torch.floor(u[chosen[:, g], g] * c).long().sort().values
        assert torch.equal(strata, torch.arange(c))  # one per stratum, none twice


def test_stratified_uniforms_are_uniform_for_each_cell_on_its_own():
    chosen = torch.ones(8, 2000, dtype=torch.bool)
    u = stratified_uniforms(chosen, gen(3))  # each column: one value per eighth
    for cell in range(8):  # over 2,000 columns a cell's values are U(0, 1)
        counts = torch.bincount(torch.floor(u[cell] * 4).long(), minlength=4).float()
        assert (counts - 500).abs().max() < 75  # 3.9 standard deviations


def test_inverse_cdf_draws_from_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2]).expand(40000, 4)
    tok = inverse_cdf(probs, torch.rand(40000, generator=gen(4)))
    share = torch.bincount(tok, minlength=4).float() / 40000
    assert share[1] == 0 and torch.allclose(share, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.01)
    edges = inverse_cdf(probs[:3], torch.tensor([0.0, 0.5, 1.0 - 1e-9]))
    assert edges.tolist() == [0, 2, 3]


class FixedLogits:
    """Logits that ignore the tokens: every cell's genes have the same distribution."""

    def __init__(self, n_genes, seed=0):
        self.logits = torch.randn(n_genes, V, generator=gen(seed)) * 3

    def __call__(self, tokens, cond, select=None):
        full = self.logits.expand(tokens.shape[0], -1, -1)
        return full if select is None else full[select]


def test_stratified_sampling_matches_each_genes_distribution_within_one_cell():
    n, g = 64, 20
    model = FixedLogits(g)
    cdf = torch.softmax(model.logits, -1).cumsum(-1)  # (G, V)

    def worst_cdf_gap(tokens):  # largest |empirical - true| CDF gap over genes and tokens
        emp = torch.stack([torch.bincount(tokens[:, j], minlength=V) for j in range(g)])
        return float((emp.cumsum(-1) / n - cdf).abs().max())

    # one step unmasks every gene at once: each gene's n draws are stratified, so the empirical
    # CDF is within 1/n of the true one everywhere; independent draws stray further
    strat = sample(model, n, g, 1, gen(5), select=True, stratified=True)
    plain = sample(model, n, g, 1, gen(5), select=True)
    assert worst_cdf_gap(strat) <= 1 / n + 1e-6
    assert worst_cdf_gap(plain) > 2 / n
    # over steps the cells that unmask a gene at each step are stratified among themselves
    several = sample(model, n, g, 3, gen(6), select=True, stratified=True)
    assert (several != MASK_TOKEN).all() and worst_cdf_gap(several) <= 3 / n + 1e-6


def test_stratified_sampling_keeps_each_cells_distribution():
    # one gene, 2 cells per batch, many batches: a cell's tokens over batches follow the
    # distribution exactly as independent draws do (the strata only couple the two cells)
    model = FixedLogits(1, seed=2)
    probs = torch.softmax(model.logits[0], -1)
    tokens = torch.cat([sample(model, 2, 1, 1, gen(s), stratified=True)[0] for s in range(3000)])
    top = probs.argsort(descending=True)[:3]
    share = torch.stack([(tokens == t).float().mean() for t in top])
    assert torch.allclose(share, probs[top], atol=0.035)


def test_stratified_sampling_is_deterministic_and_leaves_the_default_draws_alone():
    model = FakeModel()
    a = sample(model, B, G, 4, gen(3), cond={"id": 1}, stratified=True)
    b = sample(FakeModel(), B, G, 4, gen(3), cond={"id": 1}, stratified=True)
    plain = sample(FakeModel(), B, G, 4, gen(3), cond={"id": 1})
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert torch.equal(plain, sample(FakeModel(), B, G, 4, gen(3), cond={"id": 1},
                                     stratified=False))


# -- progress: per unmasking step, never drawing randomness ----------------------------------


class CountingBar:
    """A progress bar that records its updates (what :func:`sample` gets as ``progress``)."""

    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


def test_sampler_reports_progress_per_unmasking_step_without_drawing_randomness():
    bar = CountingBar()
    with_bar = sample(FakeModel(), B, G, 5, gen(3), cond={"id": 1}, progress=bar)
    assert bar.n == 5  # one update per unmasking step
    # steps that unmask no gene (more steps than genes) still move the bar
    model, many = FakeModel(), CountingBar()
    sample(model, 2, G, 2 * G, gen(3), cond={"id": 1}, progress=many)
    assert many.n == 2 * G and len(model.calls) < 2 * G
    # the bar draws nothing from the generator: the same cells as without it, or with its own
    assert torch.equal(with_bar, sample(FakeModel(), B, G, 5, gen(3), cond={"id": 1}))
    assert torch.equal(with_bar, sample(FakeModel(), B, G, 5, gen(3), cond={"id": 1},
                                        progress=True))


def _spy_bars(monkeypatch):
    """Record the bars the Lingshu-Cell model opens (total, and how far each got)."""
    from lingshu.models.mddm import model as mddm_model

    bars = []
    real = mddm_model.sampling_bar

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(mddm_model, "sampling_bar", spy)
    return bars


def test_generation_progress_counts_steps_times_batches(monkeypatch):
    """Unconditional generation: one bar over unmasking steps x batches, which reaches its
    total (a bar over batches would sit at 0 until a whole batch is sampled)."""
    import numpy as np

    from lingshu.models.mddm.model import LingshuCell

    model = LingshuCell(preset="tiny", unconditional_steps=4, sample_batch=3)
    model.genes = [f"G{i}" for i in range(G)]
    torch.manual_seed(0)
    model.pretrained = LingshuNetwork(config_from_preset("tiny", G)).eval()
    bars = _spy_bars(monkeypatch)
    shown = model.generate(7, np.random.default_rng(0), progress=True)  # 3 batches: 3 + 3 + 1
    assert [(b.total, b.n, b.unit) for b in bars] == [(4 * 3, 4 * 3, "step")]
    np.testing.assert_array_equal(shown, model.generate(7, np.random.default_rng(0)))


def test_prediction_progress_counts_steps_times_batches_of_every_condition(monkeypatch):
    import numpy as np
    import scipy.sparse as sp
    from dataclasses import asdict

    from lingshu.models.base import ConditionInput
    from lingshu.models.mddm.model import LingshuCell

    model = LingshuCell(preset="tiny", sample_steps=3, sample_batch=4, guidance=1.0)
    cfg = config_from_preset("tiny", G, n_contexts=1, n_perturbations=3)
    torch.manual_seed(0)
    weights = {f"w::{k}": v.numpy() for k, v in LingshuNetwork(cfg).state_dict().items()}
    model.set_state(weights, {"network": asdict(cfg), "genes": [f"G{i}" for i in range(G)],
                              "contexts": ["A"], "perturbations": ["P1", "P2"],
                              "targets": {"P1": [1], "P2": [2]}, "max_targets": 1,
                              "perturbation_type": "genetic"})
    ctrl = sp.csr_matrix(np.ones((3, G), dtype=np.float32))
    conditions = [ConditionInput("A", "P1", ctrl, 9), ConditionInput("A", "P2", ctrl, 2)]
    bars = _spy_bars(monkeypatch)
    shown = list(model.predict_many(conditions, np.random.default_rng(0), progress=True))
    assert [(b.total, b.n) for b in bars] == [(3 * (3 + 1), 3 * (3 + 1))]  # 9 cells: 3 batches
    assert model._sample_bar is None  # the bar is closed and released once prediction ends
    quiet = list(model.predict_many(conditions, np.random.default_rng(0)))
    for a, b in zip(shown, quiet):
        np.testing.assert_array_equal(a, b)
