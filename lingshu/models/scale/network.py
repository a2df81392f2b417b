"""SCALE's networks: the hierarchical set-aware encoder, the adaptive condition aggregation and
the conditional JiT-style endpoint network, plus the endpoint loss and the ODE sampler.

Shapes: B sets, S cells per set, G genes, K transport coordinates (principal components), d the
model width, F the perturbation-feature width, T target genes of a perturbation.

Hierarchical set-aware encoder (:class:`SetEncoder`), for the source (control) cells of a set:

1. genes are a set of tokens ``e_g + phi(x_g) U`` (a learned gene embedding plus a projection
   of a small basis of the gene's log1p(CP10k) value, ``phi(x) = (x, 1[x > 0], sqrt(x))``);
   ``gene_seeds`` learned seed queries pool them by attention, each seed one head
   (:class:`GenePooling`, the set transformer's PMA). Keys and values are linear in the
   tokens, so the attention is computed from the (G, d) gene table and the (3, cells, G)
   value basis without building the (cells, G, d) token tensor: the same numbers, at a
   fraction of the cost;
2. set-transformer self-attention blocks over the seed slots, then a second PMA with one seed
   gives the cell embedding (cells, d). Nothing depends on the order of the genes;
3. a set-equivariant fusion: self-attention blocks across the S cells of a set, without
   positional encoding, so that each cell's latent sees its population.

Condition aggregation (:class:`ConditionEncoder`): the condition is a variable set of tokens,
a context embedding, a learned perturbation identity (index 0 = unknown), a projection of the
perturbation's shared features (absent when it has none), one token per target gene (the
encoder's gene embedding of the target, projected; genetic perturbations) and, for the
unconditional branch of classifier-free guidance, a learned null token that replaces every
perturbation token. One learned seed query attends over the present tokens (``seed``); the
ablation's masked mean (``mean``) is kept as an option.

Endpoint network (:class:`EndpointNet`, "JiT": the network outputs the clean endpoint): per cell
a token ``W_x x_t + W_h h`` (its transport state and its encoded source cell), DiT blocks with
adaLN-Zero modulation from (condition + sinusoidal time embedding), self-attention across the
cells of the set, a zero-initialised head back to K: the predicted endpoint x1_hat (B, S, K).

Training (:func:`endpoint_loss`): x_t = (1 - t) x0 + t x1, loss = mean squared error of x1_hat
against x1 (x-prediction, x-loss). Sampling (:func:`endpoint_ode`): Euler steps of
dx/dt = (x1_hat - x_t) / (1 - t) from t = 0 to 1 (1 - t clamped at ``t_gap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_BASIS = 3  # phi(x) = (x, 1[x > 0], sqrt(x))
POOLINGS = ("seed", "mean")


@dataclass
class ScaleConfig:
    """Sizes of SCALE's network and of its condition tables."""

    n_genes: int
    n_components: int
    d_model: int = 64
    n_heads: int = 4
    gene_seeds: int = 8
    encoder_layers: int = 1  # self-attention blocks over the seed slots of a cell
    fusion_layers: int = 1  # self-attention blocks across the cells of a set
    velocity_layers: int = 3
    n_contexts: int = 1
    n_perturbations: int = 1  # identity table size; index 0 = unknown perturbation
    feature_dim: int = 0  # F; 0 = no perturbation features
    condition_pooling: str = "seed"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"scale: d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.condition_pooling not in POOLINGS:
            raise ValueError(f"scale: condition_pooling must be one of {POOLINGS}, got "
                             f"{self.condition_pooling!r}")


def value_basis(x: torch.Tensor) -> torch.Tensor:
    """(N, G) log1p expression -> (3, N, G) basis (x, 1[x > 0], sqrt(x))."""
    return torch.stack([x, (x > 0).to(x.dtype), torch.sqrt(x.clamp_min(0.0))])


def feed_forward(d: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features (of 1000 t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class Attention(nn.Module):
    """Multi-head attention of queries (..., Lq, d) over keys/values (..., Lk, d).

    mask: (..., Lk) bool, True where a key may be attended to (every row needs one).
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, -1)).transpose(-3, -2)  # (..., H, L, dh)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(y)), self._heads(self.v(y))
        attn_mask = None if mask is None else mask[..., None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(-3, -2).flatten(-2))


class Block(nn.Module):
    """Pre-norm set-transformer block (MAB): attention of x over y (itself when y is None),
    then a feed-forward layer, both residual."""

    def __init__(self, d: int, n_heads: int, cross: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, n_heads)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = feed_forward(d)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        kv = q if y is None else self.norm_kv(y)
        x = x + self.attn(q, kv, mask)
        return x + self.ff(self.norm_ff(x))


class GenePooling(nn.Module):
    """PMA over the gene tokens of each cell: (N, G) expression -> (N, m, d) seed slots.

    Token of gene g: ``e_g + phi(x_g) U``. Keys and values are linear maps of the tokens, so
    ``k_g = e_g W_k + b_k + phi(x_g) (U W_k)``: the gene part is computed once per call and the
    value part is a rank-3 correction per cell (no (N, G, d) tensor is built). Each of the m
    seeds is one attention head over the genes (single-head attention per seed: the seeds
    play the role of heads, which keeps the (m, N, G) score tensor, the cost, small).
    """

    def __init__(self, n_genes: int, d: int, n_seeds: int) -> None:
        super().__init__()
        self.gene_emb = nn.Parameter(torch.randn(n_genes, d) * 0.02)
        self.value_emb = nn.Parameter(torch.randn(N_BASIS, d) * 0.02)  # U
        self.seeds = nn.Parameter(torch.randn(n_seeds, d) * 0.02)
        self.norm_q = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = feed_forward(d)

    def forward(self, x: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, G') log1p expression of the genes ``gene_idx`` (default: all, in order)."""
        emb = self.gene_emb if gene_idx is None else self.gene_emb[gene_idx]  # (G', d)
        n, g = x.shape
        m, d = self.seeds.shape
        phi = value_basis(x)  # (r, N, G')
        q = self.q(self.norm_q(self.seeds)) / math.sqrt(d)  # (m, d)
        k_value = self.value_emb @ self.k.weight.T  # (r, d): U W_k
        v_value = self.value_emb @ self.v.weight.T
        # scores (m, N, G'): the gene part plus the rank-3 value part; softmax over genes
        scores = (q @ self.k(emb).T)[:, None, :] + (
            (q @ k_value.T) @ phi.reshape(N_BASIS, -1)).view(m, n, g)
        p = torch.softmax(scores, dim=-1)
        pooled = (p.reshape(m * n, g) @ self.v(emb)).view(m, n, d)
        p_phi = torch.bmm(p.transpose(0, 1), phi.permute(1, 2, 0))  # (N, m, r)
        pooled = pooled.transpose(0, 1) + p_phi @ v_value  # (N, m, d)
        slots = self.seeds[None] + self.out(pooled)
        return slots + self.ff(self.norm_ff(slots))


class SetEncoder(nn.Module):
    """Hierarchical set-aware encoder: genes -> cell embedding -> cells fused within a set."""

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.n_heads
        self.gene_pool = GenePooling(cfg.n_genes, d, cfg.gene_seeds)
        self.slot_blocks = nn.ModuleList(Block(d, heads) for _ in range(cfg.encoder_layers))
        self.cell_seed = nn.Parameter(torch.randn(1, d) * 0.02)
        self.cell_pool = Block(d, heads, cross=True)
        self.fusion = nn.ModuleList(Block(d, heads) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(d)

    def encode_cells(self, x: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(..., G') expression -> (..., d) cell embeddings, each cell on its own (invariant to
        the order of the genes when ``gene_idx`` names them)."""
        lead = x.shape[:-1]
        slots = self.gene_pool(x.reshape(-1, x.shape[-1]), gene_idx)
        for block in self.slot_blocks:
            slots = block(slots)
        seed = self.cell_seed.expand(slots.shape[0], 1, -1)
        cells = self.cell_pool(seed, slots)[:, 0]
        return cells.reshape(*lead, -1)

    def forward(self, x: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, G') expression of B sets of S cells -> (B, S, d) fused cell latents
        (equivariant to the order of the cells of a set)."""
        h = self.encode_cells(x, gene_idx)
        for block in self.fusion:
            h = block(h)
        return self.norm(h)


class ConditionEncoder(nn.Module):
    """Adaptive condition aggregation: a learned seed query over the condition's tokens."""

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.pooling = cfg.condition_pooling
        self.context_emb = nn.Embedding(cfg.n_contexts, d)
        self.perturbation_emb = nn.Embedding(cfg.n_perturbations, d)
        self.null_emb = nn.Parameter(torch.randn(d) * 0.02)
        self.feature_proj = nn.Linear(cfg.feature_dim, d) if cfg.feature_dim else None
        self.target_proj = nn.Linear(d, d)
        self.seed = nn.Parameter(torch.randn(1, d) * 0.02)
        self.pool = Block(d, cfg.n_heads, cross=True)
        self.norm = nn.LayerNorm(d)

    def tokens(self, context: torch.Tensor, perturbation: torch.Tensor, features: torch.Tensor,
               has_features: torch.Tensor, targets: torch.Tensor, null: torch.Tensor,
               gene_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_tokens, d) condition tokens and their (B, n_tokens) presence mask.

        targets: (B, T) target-gene indices, -1 where there is none.
        """
        n = context.shape[0]
        keep = ~null
        toks = [self.context_emb(context), self.null_emb.expand(n, -1),
                self.perturbation_emb(perturbation)]
        mask = [torch.ones_like(keep), null, keep]
        if self.feature_proj is not None:
            toks.append(self.feature_proj(features.to(self.null_emb.dtype)))
            mask.append(keep & has_features)
        tokens = torch.stack(toks, dim=1)
        mask = torch.stack(mask, dim=1)
        if targets.shape[1]:
            tok = self.target_proj(gene_emb[targets.clamp_min(0)])  # (B, T, d)
            tokens = torch.cat([tokens, tok], dim=1)
            mask = torch.cat([mask, (targets >= 0) & keep[:, None]], dim=1)
        return tokens, mask

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """(B, d) condition vector; arguments as :meth:`tokens`."""
        tokens, mask = self.tokens(*args)
        if self.pooling == "mean":
            w = mask.to(tokens.dtype)[..., None]
            return self.norm((tokens * w).sum(1) / w.sum(1))
        seed = self.seed.expand(tokens.shape[0], 1, -1)
        return self.norm(self.pool(seed, tokens, mask)[:, 0])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class AdaBlock(nn.Module):
    """DiT block with adaLN-Zero: self-attention across the cells of a set, feed-forward."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = Attention(d, n_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.ff = feed_forward(d)
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1)
        x = x + g1[:, None] * self.attn(h, h)
        return x + g2[:, None] * self.ff(_modulate(self.norm2(x), sh2, sc2))


class EndpointNet(nn.Module):
    """Conditional JiT-style network: (x_t, t, source latents, condition) -> endpoint x1_hat."""

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.d = d
        self.x_in = nn.Linear(cfg.n_components, d)
        self.h_in = nn.Linear(d, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(AdaBlock(d, cfg.n_heads) for _ in range(cfg.velocity_layers))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.ada = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, cfg.n_components)
        for layer in (self.ada, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """x_t (B, S, K), t (B,), h (B, S, d) source latents, c (B, d) -> (B, S, K)."""
        cond = c + self.time_mlp(time_embedding(t, self.d).to(c.dtype))
        x = self.x_in(x_t) + self.h_in(h)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.ada(F.silu(cond)).chunk(2, dim=-1)
        return self.head(_modulate(self.norm(x), shift, scale))


class ScaleNetwork(nn.Module):
    """The whole SCALE network; ``forward`` is one endpoint prediction from scratch."""

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SetEncoder(cfg)
        self.condition = ConditionEncoder(cfg)
        self.endpoint = EndpointNet(cfg)

    def condition_vector(self, context: torch.Tensor, perturbation: torch.Tensor,
                         features: torch.Tensor, has_features: torch.Tensor,
                         targets: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """(B, d) aggregated condition (see :class:`ConditionEncoder`)."""
        return self.condition(context, perturbation, features, has_features, targets, null,
                              self.encoder.gene_pool.gene_emb)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, source: torch.Tensor,
                context: torch.Tensor, perturbation: torch.Tensor, features: torch.Tensor,
                has_features: torch.Tensor, targets: torch.Tensor,
                null: torch.Tensor) -> torch.Tensor:
        """x_t (B, S, K), t (B,), source (B, S, G) the set's control cells -> x1_hat (B, S, K)."""
        h = self.encoder(source)
        c = self.condition_vector(context, perturbation, features, has_features, targets, null)
        return self.endpoint(x_t, t, h, c)


# ------------------------------------------------------------------------------ objective
def mixed_prior(control: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The Gaussian-control mixed prior's draw: x0 = control + sigma * noise."""
    return control + sigma * noise


def endpoint_loss(net: Callable[..., torch.Tensor], x1: torch.Tensor, x0: torch.Tensor,
                  t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
    """Endpoint (x-prediction, x-loss) objective: mean of (net(x_t, t, ...) - x1)^2.

    x1, x0: (B, S, K) endpoints and starting points (coupled cell by cell); t: (B,), one time
    per set; x_t = (1 - t) x0 + t x1.
    """
    tt = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    x_t = (1.0 - tt) * x0 + tt * x1
    x1_hat = net(x_t, t, **condition)
    return ((x1_hat.float() - x1.float()) ** 2).mean()


def endpoint_ode(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x0: torch.Tensor, steps: int,
                 predict_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 guidance: float = 1.0, t_gap: float = 1e-3) -> torch.Tensor:
    """Integrate dx/dt = (x1_hat(x, t) - x) / (1 - t) from t = 0 to 1 with ``steps`` Euler steps.

    predict(x, t) -> x1_hat, with t a (B,) tensor. With ``predict_uncond`` and a guidance
    weight w other than 0 and 1, x1_hat = x1_u + w (x1_c - x1_u) (guidance on the endpoint,
    the same as on the velocity since both share x); w in {0, 1} is the plain conditional
    prediction. The last step lands on the endpoint prediction (dt = 1 - t).
    """
    if steps < 1:
        raise ValueError(f"scale: sample_steps must be >= 1, got {steps}")
    guided = predict_uncond is not None and guidance not in (0, 1)
    x = x0
    grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t0, device=x.device, dtype=torch.float32)
        x1_hat = predict(x, t)
        if guided:
            x1_u = predict_uncond(x, t)
            x1_hat = x1_u + guidance * (x1_hat - x1_u)
        v = (x1_hat - x) / max(1.0 - t0, t_gap)
        x = x + (t1 - t0) * v
    return x
