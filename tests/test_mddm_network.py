"""The Lingshu-Cell network (SPEC 1.2) on tiny configs: compression, shapes, conditions."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from lingshu.models.mddm.network import (
    PRESETS,
    LingshuNetwork,
    NetworkConfig,
    config_from_preset,
    group_genes,
    ungroup_genes,
)
from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS

G = 30  # not a multiple of the tiny group size 4


def tiny(**kw) -> LingshuNetwork:
    torch.manual_seed(0)
    return LingshuNetwork(config_from_preset("tiny", G, **kw)).eval()


def conditional(**kw) -> LingshuNetwork:
    return tiny(n_contexts=3, n_perturbations=5, **kw)


def random_tokens(B=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_TOKEN + 1, (B, G), generator=gen)  # MASK included


def test_group_then_ungroup_is_identity():
    net = tiny()
    x = torch.randn(2, G, 5)
    grouped = group_genes(x, net.gene_perm, torch.full((5,), 7.0), 4)
    assert grouped.shape == (2, 8, 4 * 5)  # ceil(30/4) = 8 groups
    assert torch.equal(ungroup_genes(grouped, net.gene_perm_inv, 4), x)
    # the permutation really permutes and the padding sits in the last group
    assert not torch.equal(net.gene_perm, torch.arange(G))
    assert torch.equal(grouped[:, -1, -10:], torch.full((2, 10), 7.0))


def test_network_embedding_is_group_genes_of_per_gene_embeddings():
    net = tiny()
    tokens = random_tokens()
    per_gene = net.gene_emb.weight + net.token_emb(tokens)  # (B, G, D)
    expected = group_genes(per_gene, net.gene_perm, net.pad_emb, 4)
    assert torch.allclose(net.embed(tokens), expected)


def test_permutation_is_saved_and_restored():
    net = tiny()
    assert "gene_perm" in net.state_dict()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = LingshuNetwork(config_from_preset("tiny", G, seed=123))
    assert not torch.equal(other.gene_perm, net.gene_perm)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.gene_perm, net.gene_perm)
    assert torch.equal(other.gene_perm_inv, net.gene_perm_inv)
    tokens = random_tokens()
    assert torch.equal(other.eval()(tokens), net(tokens))


def test_unconditional_output_shape_and_refuses_conditions():
    net = tiny()
    out = net(random_tokens())
    assert out.shape == (3, G, N_EXPR_TOKENS)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        net(random_tokens(), context=torch.zeros(3, dtype=torch.long))


def test_each_gene_output_depends_on_its_own_input():
    # the gene -> group -> gene bookkeeping routes every gene's token back to its own logits
    net = tiny()
    tokens = random_tokens(B=1)
    base = net(tokens)
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % MASK_TOKEN
    diff = (net(changed) - base).abs().sum(-1)[0]  # (G,)
    assert diff[7] > 0  # attention mixes groups, so others may move too, but gene 7 must


def test_condition_tokens_change_the_output():
    net = conditional(pert_feature_dim=6)
    tokens = random_tokens()
    ctx, pert = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 4])
    out = net(tokens, ctx, pert)
    assert out.shape == (3, G, N_EXPR_TOKENS)
    assert not torch.allclose(out, net(tokens, torch.tensor([1, 2, 0]), pert))
    assert not torch.allclose(out, net(tokens, ctx, torch.tensor([1, 2, 3])))
    feats = torch.randn(3, 6)
    assert not torch.allclose(out, net(tokens, ctx, pert, pert_features=feats))
    targets = torch.tensor([[4, -1], [5, 9], [-1, -1]])
    with_targets = net(tokens, ctx, pert, target_genes=targets)
    assert not torch.allclose(out[:2], with_targets[:2])
    assert torch.allclose(out[2], with_targets[2])  # no targets (all -1) adds nothing
    with pytest.raises(ValueError):
        net(tokens)  # a conditional network needs its conditions


def test_target_genes_reach_the_gene_embedding():
    net = conditional()
    tokens = random_tokens()
    out = net(tokens, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
              target_genes=torch.tensor([[4], [4], [4]]))
    out.sum().backward()
    assert net.gene_emb.weight.grad is not None and net.target_proj.weight.grad.abs().sum() > 0


def test_no_bias_in_blocks_and_block_size_of_paper_preset():
    net = tiny()
    names = [n for n, _ in net.blocks.named_parameters()]
    assert names and not any(n.endswith("bias") for n in names)
    assert all(not m.bias for m in net.blocks.modules() if isinstance(m, torch.nn.Linear))
    # the paper's backbone is about 85M parameters (SPEC 1.2); count it without building it
    cfg = config_from_preset("paper", 18080)
    D, F_ = cfg.d_model, cfg.d_ff
    assert 84e6 < cfg.n_layers * (4 * D * D + 3 * D * F_ + 2 * D) < 86e6
    assert cfg.n_groups == 2260 and config_from_preset("paper_s32", 18080).n_groups == 565
    assert net.num_parameters(blocks_only=True) < net.num_parameters()
    assert net.estimate_flops_per_cell() > 0


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tiny()(random_tokens())
    assert calls == [False] * PRESETS["tiny"]["n_layers"]  # bidirectional, once per layer


def test_config_validation():
    with pytest.raises(ValueError):
        NetworkConfig(n_genes=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        NetworkConfig(n_genes=10, n_contexts=2, n_perturbations=0)
    with pytest.raises(ValueError):
        config_from_preset("huge", 10)
    with pytest.raises(ValueError):
        tiny()(torch.zeros(2, G + 1, dtype=torch.long))


def test_backward_reaches_every_parameter():
    net = conditional(pert_feature_dim=4, cond_head_rank=2).train()
    out = net(random_tokens(), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]),
              pert_features=torch.randn(3, 4), target_genes=torch.tensor([[1], [2], [-1]]))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_selected_logits_equal_the_full_logits_at_those_genes():
    for net, kw in ((tiny(), {}),
                    (conditional(), {"context": torch.tensor([0, 1, 2]),
                                     "perturbation": torch.tensor([1, 0, 4])})):
        tokens = random_tokens()
        select = torch.rand(3, G, generator=torch.Generator().manual_seed(1)) < 0.3
        with torch.no_grad():
            full = net(tokens, **kw)
            part = net(tokens, select=select, **kw)
        assert part.shape == (int(select.sum()), N_EXPR_TOKENS)
        torch.testing.assert_close(part, full[select], rtol=1e-5, atol=1e-5)


def test_selected_logits_backward_is_the_same_on_every_run_with_several_threads():
    """The select path's gathers (hidden states, head bias, cond_head and gene_head rows) go
    through index_select, whose backward adds in a fixed order: two identical training steps
    give bit-identical gradients with 2 threads (an indexed gather's backward, a scatter-add
    split over threads, differed in the last bits from run to run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        net = LingshuNetwork(config_from_preset("tiny", 600, n_contexts=3, n_perturbations=5,
                                                cond_head_rank=2, gene_head_rank=2)).train()
        with torch.no_grad():  # the zero-started readouts given weight, so their gradients vary
            net.cond_head_up.normal_()
            net.gene_head_up.normal_()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, MASK_TOKEN + 1, (64, 600), generator=gen)
        select = torch.rand(64, 600, generator=gen) < 0.5
        target = torch.randint(0, N_EXPR_TOKENS, (int(select.sum()),), generator=gen)
        cond = {"context": torch.randint(0, 3, (64,), generator=gen),
                "perturbation": torch.randint(0, 5, (64,), generator=gen)}
        grads = []
        for _ in range(3):
            net.zero_grad()
            F.cross_entropy(net(tokens, select=select, **cond), target).backward()
            grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        for other in grads[1:]:
            for name, grad in grads[0].items():
                assert torch.equal(grad, other[name]), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("broadcast", [False, True])
def test_cond_broadcast_lets_gene_groups_see_the_condition_without_attention(broadcast):
    """With attention's output zeroed, gene groups can read the condition tokens only when
    ``cond_broadcast`` adds them to every group token."""
    net = conditional(cond_broadcast=broadcast)
    with torch.no_grad():
        for block in net.blocks:
            block.attn.out.weight.zero_()
        net.context_emb.weight.normal_(0, 1.0)
    tokens = torch.full((1, G), MASK_TOKEN)
    pert = torch.tensor([1])
    a = net(tokens, context=torch.tensor([0]), perturbation=pert)
    b = net(tokens, context=torch.tensor([1]), perturbation=pert)
    assert (not torch.allclose(a, b)) == broadcast


def test_cond_head_starts_at_zero_and_reaches_every_gene_without_attention():
    """``cond_head_rank``: a fine-tuned model starts exactly as the same network without it (the
    shift is zero), and once trained the condition reaches every gene's logits directly, even
    with attention's output zeroed; the selected-genes path gives the same logits."""
    plain, ranked = conditional(), conditional(cond_head_rank=3)
    ranked.load_state_dict(plain.state_dict(), strict=False)
    tokens, kw = random_tokens(), dict(context=torch.tensor([0, 1, 2]),
                                      perturbation=torch.tensor([1, 0, 4]))
    with torch.no_grad():
        torch.testing.assert_close(ranked(tokens, **kw), plain(tokens, **kw))
        for block in ranked.blocks:
            block.attn.out.weight.zero_()
        ranked.cond_head_up.normal_(0, 1.0)
        masked = torch.full((1, G), MASK_TOKEN)
        a, b = (ranked(masked, context=torch.tensor([c]), perturbation=torch.tensor([1]))
                for c in (0, 1))
        assert (a - b).abs().amax(-1).min() > 0  # every gene's logits move with the context
        select = torch.rand(3, G, generator=torch.Generator().manual_seed(2)) < 0.4
        torch.testing.assert_close(ranked(tokens, select=select, **kw),
                                   ranked(tokens, **kw)[select], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cond_head_rank"):
        NetworkConfig(n_genes=4, cond_head_rank=-1)


def test_cond_head_codes_start_from_the_context_alone():
    """The perturbation's half of the cond_head input projection starts at zero: at the start
    of fine-tuning the path's code points the same way for every perturbation of a context
    (the joint RMSNorm only rescales it) and differs between contexts; the perturbation half
    still receives gradients once the path carries a shift."""
    net = conditional(cond_head_rank=3)
    D = net.cfg.d_model
    assert torch.count_nonzero(net.cond_head_down.weight[:, D:]) == 0
    cond = net.condition_tokens(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 1]))
    z = net.cond_head_down(net.cond_head_norm(cond.reshape(3, -1)))
    cos = torch.nn.functional.cosine_similarity
    assert cos(z[0], z[1], dim=0) > 1 - 1e-5
    assert cos(z[0], z[2], dim=0) < 0.99
    with torch.no_grad():
        net.cond_head_up.normal_(0, 1.0)
    net(random_tokens(), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])).square().mean().backward()
    assert net.cond_head_down.weight.grad[:, D:].abs().sum() > 0


def test_gene_head_readout_starts_at_zero_and_shifts_each_gene_its_own_way():
    """``gene_head_rank``: logits of gene g gain A_g (P h_g). It starts at zero (the paper's
    head), the selected-logits path equals the full one, gradients reach both factors, and
    the same hidden vector shifts two genes' tokens differently, which the shared head cannot
    (one Linear(D, 281) for every gene: equal vectors give equal shifts)."""
    plain, net = tiny(), tiny(gene_head_rank=3)
    tokens = random_tokens()
    net.load_state_dict(plain.state_dict(), strict=False)  # same weights but the readout
    assert torch.allclose(net(tokens), plain(tokens), atol=1e-6)  # zero at the start
    torch.nn.init.normal_(net.gene_head_up)
    select = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.allclose(net(tokens, select=select), net(tokens)[select], atol=1e-5)
    net(tokens, select=select).square().sum().backward()
    assert net.gene_head_up.grad.abs().sum() > 0 and net.gene_head_down.weight.grad.abs().sum() > 0
    h = torch.randn(1, 4, 32)  # one hidden vector given to genes 0 and 1 through the head
    h = torch.cat([h[:, :1], h[:, :1]], dim=1)
    z = net.gene_head_down(h)  # (1, 2, r)
    shift = torch.einsum("bgr,rgv->bgv", z, net.gene_head_up[:, :2])
    assert not torch.allclose(shift[0, 0], shift[0, 1])
    assert torch.allclose(net.head(h)[0, 0], net.head(h)[0, 1])
    with pytest.raises(ValueError, match="gene_head_rank"):
        NetworkConfig(n_genes=G, gene_head_rank=-1)


def test_library_size_input_starts_without_effect_and_is_required():
    """``library_size``: each cell's log library size is an input, zero at the start (a network
    with it computes exactly what the same weights without it compute), then added to every
    gene group; the network refuses to run without it, and one built without it refuses it."""
    plain = tiny()
    sized = tiny(library_size=True, library_center=3.0, library_scale=0.5)
    sized.load_state_dict(plain.state_dict(), strict=False)
    tokens, lib = random_tokens(), torch.tensor([1.0, 3.0, 6.0])
    select = torch.rand(3, G, generator=torch.Generator().manual_seed(1)) < 0.3
    with torch.no_grad():
        torch.testing.assert_close(sized(tokens, library=lib), plain(tokens))
        sized.library_emb[2].weight.normal_(0, 1.0)
        a = sized(tokens, library=lib)
        assert not torch.allclose(a, sized(tokens, library=lib + 2.0))
        assert not torch.allclose(a, plain(tokens))
        torch.testing.assert_close(sized(tokens, library=lib, select=select), a[select],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs `library`"):
        sized(tokens)
    with pytest.raises(ValueError, match="built without library_size"):
        plain(tokens, library=lib)
    with pytest.raises(ValueError, match="library_scale must be > 0"):
        config_from_preset("tiny", G, library_size=True, library_scale=0.0)


def test_cond_head_masked_scales_the_shift_by_each_cells_masked_share():
    """``cond_head_masked``: the cond_head shift in full on an all-masked cell, none on a cell
    with nothing masked, and in proportion between; the selected-genes path agrees."""
    plain, gated = conditional(cond_head_rank=3), conditional(cond_head_rank=3, cond_head_masked=True)
    with torch.no_grad():
        plain.cond_head_up.normal_(0, 1.0)
    gated.load_state_dict(plain.state_dict())
    base = conditional()  # the same weights without the path
    base.load_state_dict(plain.state_dict(), strict=False)
    kw = dict(context=torch.tensor([0, 1, 2]), perturbation=torch.tensor([1, 0, 4]))
    tokens = random_tokens().clamp(max=MASK_TOKEN - 1)  # nothing masked
    tokens[0] = MASK_TOKEN  # all masked
    tokens[2, : G // 3] = MASK_TOKEN  # a third masked
    with torch.no_grad():
        full, off, out = plain(tokens, **kw), base(tokens, **kw), gated(tokens, **kw)
        torch.testing.assert_close(out[0], full[0])
        torch.testing.assert_close(out[1], off[1])
        share = (G // 3) / G
        torch.testing.assert_close(out[2], off[2] + share * (full[2] - off[2]), rtol=1e-4, atol=1e-4)
        select = torch.rand(3, G, generator=torch.Generator().manual_seed(2)) < 0.4
        torch.testing.assert_close(gated(tokens, select=select, **kw), out[select],
                                   rtol=1e-5, atol=1e-5)
