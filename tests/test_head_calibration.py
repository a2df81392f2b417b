"""Last-layer recalibration of Lingshu-Cell's head bias (lingshu.models.mddm.calibrate)."""

import numpy as np
import torch
import torch.nn as nn

from lingshu.models.mddm.calibrate import recalibrate_head_bias
from lingshu.models.mddm.diffusion import mask_tokens, masked_loss
from lingshu.tokens import N_EXPR_TOKENS


class FrozenHead(nn.Module):
    """A 'network' whose logits ignore the cell: a fixed table (the frozen layers) plus the
    per-gene head bias. The fixed table puts each gene's mass on tokens 0-3 in a wrong
    proportion, so the bias alone must move it to the data's."""

    def __init__(self, n_genes: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.full((n_genes, N_EXPR_TOKENS), -12.0)
        table[:, :4] = torch.randn(n_genes, 4, generator=g)
        self.register_buffer("table", table)
        self.other = nn.Parameter(torch.ones(3))  # must be left alone
        self.head_bias = nn.Parameter(torch.zeros(n_genes, N_EXPR_TOKENS))

    def forward(self, tokens, select=None):
        logits = (self.table + self.head_bias)[None].expand(tokens.shape[0], -1, -1)
        return logits if select is None else logits[select]


def _data(n_cells=400, n_genes=6, seed=1):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4), size=n_genes)  # (G, 4) each gene's true distribution
    tokens = np.stack([rng.choice(4, size=n_cells, p=p) for p in probs], axis=1)  # (N, G)
    return torch.as_tensor(tokens, dtype=torch.long)


def _loss_fn(model, batch, gen):
    noisy, mask, t = mask_tokens(batch, gen)
    return masked_loss(model, noisy, batch, mask, t)


def test_the_bias_moves_each_gene_to_its_token_frequencies_and_nothing_else_moves():
    tokens = _data()
    G = tokens.shape[1]
    net = FrozenHead(G)
    freq = torch.stack([torch.bincount(tokens[:, g], minlength=4)[:4] for g in range(G)]).float()
    freq /= freq.sum(1, keepdim=True)  # (G, 4)

    def sample_batch(n, gen):
        return tokens[torch.randint(tokens.shape[0], (n,), generator=gen)]

    def tvd():
        p = torch.softmax(net.table + net.head_bias, -1)[:, :4]
        return float(0.5 * (p - freq).abs().sum(1).max())

    before = tvd()
    losses = recalibrate_head_bias(net, _loss_fn, sample_batch, steps=300, batch_size=32,
                                   seed=0, lr=0.05)
    assert before > 0.2  # the frozen table is far off
    assert tvd() < 0.03  # each gene's predicted distribution is its training frequencies
    assert len(losses) == 300 and np.mean(losses[-30:]) < np.mean(losses[:30])
    assert torch.equal(net.other.detach(), torch.ones(3))
    assert net.training  # the mode it came in

    # seeded: the same call from the same start gives the same bias
    again = FrozenHead(G)
    recalibrate_head_bias(again, _loss_fn, sample_batch, steps=300, batch_size=32, seed=0, lr=0.05)
    assert torch.equal(again.head_bias, net.head_bias)


def test_zero_steps_leave_the_bias_as_it_is():
    net = FrozenHead(3)
    assert recalibrate_head_bias(net, _loss_fn, lambda n, g: None, steps=0, batch_size=8, seed=0) == []
    assert torch.equal(net.head_bias.detach(), torch.zeros(3, N_EXPR_TOKENS))
