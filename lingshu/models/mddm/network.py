"""The Lingshu-Cell network (SPEC 1.2): token logits of every gene given a partly masked cell.

Read top to bottom:

1. ``embed``: each gene position gets gene-identity embedding + token embedding (B, G, D).
2. ``embed`` / ``group_genes``: a fixed random permutation of the genes (drawn once from ``cfg.seed``,
   stored as a buffer so it travels with the checkpoint), padding to a multiple of S with a
   learned pad embedding, and grouping S consecutive genes into one (S*D) vector; one shared
   linear layer compresses each group to D  -> (B, G/S, D).
3. Two condition tokens (context, perturbation) are prepended, bypassing compression.
4. A LLaMA-style bidirectional transformer: pre-RMSNorm, RoPE on Q and K, SwiGLU, no biases,
   final RMSNorm, attention through ``F.scaled_dot_product_attention``.
5. The condition outputs are dropped; one linear layer expands D back to S*D,
   ``ungroup_genes`` undoes grouping, padding and permutation -> (B, G, D).
6. The head: a shared ``Linear(D, 281)`` plus a learned per-gene bias (G, 281). The bias
   carries each gene's marginal token distribution; a full per-gene weight matrix would be
   G*D*281 parameters (3.3G for the paper's sizes).

RoPE positions: the condition tokens take positions 0 and 1 and gene group j takes position
j + 2, also in an unconditional network, so that an unconditional checkpoint fine-tunes into a
conditional one without shifting its positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS, VOCAB_SIZE

N_COND_TOKENS = 2  # context, perturbation
GENE_POS_OFFSET = N_COND_TOKENS  # RoPE position of the first gene group


@dataclass
class NetworkConfig:
    n_genes: int
    group_size: int = 8  # S: genes per compressed token
    d_model: int = 640
    n_layers: int = 13
    n_heads: int = 10
    d_ff: int = 2560
    n_contexts: int = 0  # 0 = unconditional (no condition tokens)
    n_perturbations: int = 0  # identity table size, index 0 = "unknown"; 0 = unconditional
    pert_feature_dim: int = 0  # width of optional perturbation feature vectors (SPEC 1.2a)
    # ours, not the paper's: the two condition embeddings are also added to every gene-group
    # token (besides being prepended), so that each group sees its condition from the first
    # layer rather than only once attention has learnt to look at two positions of many
    cond_broadcast: bool = False
    # ours, not the paper's: a rank-r path from the two condition tokens straight to every
    # gene's logits (a condition-dependent shift of the per-gene bias, zero at the start),
    # beside the route through attention; 0 = off (the paper's head)
    cond_head_rank: int = 0
    # ours: scale the cond_head shift of each cell by its share of masked genes (1 with every
    # gene masked, 0 with none), since the visible genes tell more of the condition the more
    # of them there are; off: the same shift at every mask rate
    cond_head_masked: bool = False
    # ours, not the paper's: a per-gene rank-r readout added to the head, logits of gene g +=
    # A_g (P h_g) (P: D -> r shared, A: (r, G, 281), zero at the start), so that a state every
    # gene's vector carries (e.g. which cell type the visible genes point to) shifts each
    # gene's tokens its own way; the paper's head is one Linear(D, 281) shared over genes plus
    # a per-gene bias, so such a shift must be spelt out per gene group by the layers; 0 = off
    gene_head_rank: int = 0
    # ours, not the paper's: each cell's library size (log1p of its total count) as an input,
    # an embedding added to every gene-group token, so that the genes sampled in one parallel
    # unmasking step share the cell's depth instead of each drawing it on its own; the
    # sampler draws the size (lingshu.models.mddm.model). library_center / library_scale
    # standardise log1p(total) (set from the training cells, carried by the checkpoint). Its
    # held-out bits are given each cell's own library size, which the floors do not know
    library_size: bool = False
    library_center: float = 0.0
    library_scale: float = 1.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    seed: int = 0  # seed of the fixed gene permutation

    def __post_init__(self):
        if self.n_genes < 1 or self.group_size < 1:
            raise ValueError(f"NetworkConfig: n_genes ({self.n_genes}) and group_size ({self.group_size}) must be >= 1")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"NetworkConfig: d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even width (RoPE)"
            )
        if self.gene_head_rank < 0:
            raise ValueError(f"NetworkConfig: gene_head_rank must be >= 0, got {self.gene_head_rank}")
        if self.cond_head_rank < 0:
            raise ValueError(f"NetworkConfig: cond_head_rank must be >= 0, got {self.cond_head_rank}")
        if not self.library_scale > 0:
            raise ValueError(f"NetworkConfig: library_scale must be > 0, got {self.library_scale}")
        if (self.n_contexts > 0) != (self.n_perturbations > 0):
            raise ValueError(
                "NetworkConfig: n_contexts and n_perturbations must both be > 0 (conditional) or both 0 "
                f"(unconditional), got {self.n_contexts} and {self.n_perturbations}"
            )

    @property
    def conditional(self) -> bool:
        return self.n_contexts > 0

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_genes / self.group_size)

    @property
    def n_padded(self) -> int:
        return self.n_groups * self.group_size

    @property
    def seq_len(self) -> int:
        return self.n_groups + (N_COND_TOKENS if self.conditional else 0)


PRESETS: dict[str, dict] = {
    "tiny": dict(group_size=4, d_model=32, n_layers=2, n_heads=2, d_ff=64),  # tests: seconds
    # The default pipeline on 2 CPU cores (~1,000 genes, ~130 training cells/s): S=16 halves
    # the sequence against S=8 at a small cost in resolution.
    "small": dict(group_size=16, d_model=96, n_layers=3, n_heads=4, d_ff=256),
    "paper": dict(group_size=8, d_model=640, n_layers=13, n_heads=10, d_ff=2560),  # 2,260 tokens / 18,080 genes
    "paper_s32": dict(group_size=32, d_model=640, n_layers=13, n_heads=10, d_ff=2560),  # genetic perturbation
}


def config_from_preset(preset: str, n_genes: int, **overrides) -> NetworkConfig:
    """A :class:`NetworkConfig` from one of :data:`PRESETS` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; choose one of {sorted(PRESETS)}")
    return NetworkConfig(n_genes=n_genes, **{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------
# Compression: permutation + padding + grouping, and its exact inverse (no learned weights)


def pad_and_group(x: torch.Tensor, pad: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad genes (already in permuted order) to a multiple of S with ``pad`` and group S
    consecutive genes. x: (B, G, D); pad: (D,). Returns (B, G_pad / S, S * D)."""
    B, G, D = x.shape
    n_pad = (-G) % group_size
    if n_pad:
        x = torch.cat([x, pad.to(x.dtype).expand(B, n_pad, D)], dim=1)  # (B, G_pad, D)
    return x.reshape(B, -1, group_size * D)  # (B, G_pad/S, S*D)


def group_genes(x: torch.Tensor, perm: torch.Tensor, pad: torch.Tensor, group_size: int) -> torch.Tensor:
    """Permute genes, pad to a multiple of S with ``pad`` and group S consecutive genes.

    x: (B, G, D) per-gene embeddings; perm: (G,) permutation; pad: (D,) padding embedding.
    Returns (B, G_pad / S, S * D). (The network permutes the integer tokens instead of the
    embeddings, which is the same and cheaper; see :meth:`LingshuNetwork.embed`.)
    """
    return pad_and_group(x.index_select(1, perm), pad, group_size)  # (B, G, D) permuted, then grouped


def ungroup_genes(x: torch.Tensor, inv_perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`group_genes`: ungroup, drop the padding, undo the permutation.

    x: (B, G_pad / S, S * D); inv_perm: (G,) inverse of the permutation. Returns (B, G, D).
    """
    B, n_groups, SD = x.shape
    n_genes = inv_perm.numel()
    x = x.reshape(B, n_groups * group_size, SD // group_size)  # (B, G_pad, D)
    return x[:, :n_genes].index_select(1, inv_perm)  # (B, G, D) in the original gene order


# ---------------------------------------------------------------------------------------------
# Backbone: LLaMA-style bidirectional transformer


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalised in float32 (bf16-safe under autocast), learned scale, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary embeddings, each (seq_len, head_dim) (half-split layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, H, L, hd) by the angles of cos, sin: (L, hd) (GPT-NeoX rotate-half form)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, L, hd/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, L, hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # (B, L, D) each
        q, k, v = (z.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, H, L, hd), bidirectional
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, L, F) inside, (B, L, D) out


class Block(nn.Module):
    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.norm_ff = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ff = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), cos, sin)
        return x + self.ff(self.norm_ff(x))


# ---------------------------------------------------------------------------------------------
# The network


class LingshuNetwork(nn.Module):
    """Logits (B, G, 281) of every gene's token given a partly masked cell (B, G) and conditions."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        G, S, D = cfg.n_genes, cfg.group_size, cfg.d_model

        # fixed gene permutation, drawn once; persistent buffers so the checkpoint carries it
        perm = torch.randperm(G, generator=torch.Generator().manual_seed(cfg.seed))
        self.register_buffer("gene_perm", perm)
        self.register_buffer("gene_perm_inv", torch.argsort(perm))

        self.gene_emb = nn.Embedding(G, D)  # gene identity
        self.token_emb = nn.Embedding(VOCAB_SIZE, D)  # 281 expression tokens + MASK
        self.pad_emb = nn.Parameter(torch.zeros(D))  # padding positions of the last group
        self.compress = nn.Linear(S * D, D, bias=False)  # one shared layer for every group
        self.expand = nn.Linear(D, S * D, bias=False)
        self.head = nn.Linear(D, N_EXPR_TOKENS, bias=False)  # shared over genes
        self.head_bias = nn.Parameter(torch.zeros(G, N_EXPR_TOKENS))  # per-gene bias
        if cfg.gene_head_rank:
            self.gene_head_down = nn.Linear(D, cfg.gene_head_rank, bias=False)
            # (r, G, 281), zero: the head starts as the paper's
            self.gene_head_up = nn.Parameter(torch.zeros(cfg.gene_head_rank, G, N_EXPR_TOKENS))

        if cfg.conditional:
            self.context_emb = nn.Embedding(cfg.n_contexts, D)
            self.pert_emb = nn.Embedding(cfg.n_perturbations, D)  # row 0 = unknown perturbation
            self.pert_feature_proj = nn.Linear(cfg.pert_feature_dim, D, bias=False) if cfg.pert_feature_dim else None
            self.target_proj = nn.Linear(D, D, bias=False)  # mean target gene-identity -> token
            if cfg.cond_head_rank:
                r = cfg.cond_head_rank
                self.cond_head_norm = RMSNorm(2 * D, eps=cfg.norm_eps)
                self.cond_head_down = nn.Linear(2 * D, r, bias=False)
                # (r, G, 281), zero: a fine-tuned model starts as its pre-trained one
                self.cond_head_up = nn.Parameter(torch.zeros(r, G, N_EXPR_TOKENS))

        if cfg.library_size:  # standardised log library size -> (D,), added to every group
            self.library_emb = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))

        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(D, eps=cfg.norm_eps)

        cos, sin = rope_tables(cfg.n_groups + GENE_POS_OFFSET, D // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L_max, hd)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        if cfg.conditional and cfg.cond_head_rank:  # unit-scale codes from normalised tokens
            nn.init.normal_(self.cond_head_down.weight, std=(2 * D) ** -0.5)
            # The perturbation's half starts at zero, so the path first learns what the context
            # token tells (cell type) and the perturbation's code only then what remains (its
            # response). Started at random, both codes learnt cell-type identity at once: a
            # perturbation trained in one context carried that context's cell type into
            # held-out combinations (sim_stimulation: 33% of the cells predicted for a type B
            # combination sat nearest the type C centroid; README, "Lingshu-Cell at CPU scale").
            nn.init.zeros_(self.cond_head_down.weight[:, D:])
        if cfg.library_size:  # zero: the input starts with no effect, as a new condition should
            nn.init.zeros_(self.library_emb[2].weight)
            nn.init.zeros_(self.library_emb[2].bias)
        for name, p in self.named_parameters():  # residual output projections, as GPT-2 / nanoGPT
            if name.endswith("attn.out.weight") or name.endswith("ff.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Grouped (gene + token) embeddings, equal to ``group_genes(gene_emb + token_emb(tokens))``.

        tokens: (B, G) long. Returns (B, G_pad / S, S * D). Permutes the integer tokens and the
        (G, D) gene table rather than the (B, G, D) embeddings: same result, less memory traffic.
        """
        perm = self.gene_perm
        x = self.gene_emb.weight[perm] + self.token_emb(tokens[:, perm])  # (B, G, D) in permuted order
        return pad_and_group(x, self.pad_emb, self.cfg.group_size)  # (B, G/S, S*D)

    # -- conditions ------------------------------------------------------------------------

    def condition_tokens(self, context, perturbation, pert_features=None, target_genes=None) -> torch.Tensor:
        """The two condition tokens (B, 2, D).

        context: (B,) long in [0, n_contexts); perturbation: (B,) long in [0, n_perturbations)
        (0 = unknown); pert_features: (B, pert_feature_dim) float or None; target_genes: (B, T)
        long gene indices padded with -1, or None (a row of only -1 adds nothing).
        """
        ctx = self.context_emb(context)  # (B, D)
        pert = self.pert_emb(perturbation)  # (B, D)
        if pert_features is not None:
            if self.pert_feature_proj is None:
                raise ValueError("pert_features given but the network was built with pert_feature_dim=0")
            pert = pert + self.pert_feature_proj(pert_features.to(pert.dtype))  # (B, D)
        if target_genes is not None:
            valid = target_genes >= 0  # (B, T)
            emb = self.gene_emb(target_genes.clamp(min=0)) * valid.unsqueeze(-1)  # (B, T, D)
            mean = emb.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # (B, D)
            pert = pert + self.target_proj(mean)
        return torch.stack([ctx, pert], dim=1)  # (B, 2, D)

    def cond_head_shift(self, cond: torch.Tensor, cells: torch.Tensor | None = None,
                        genes: torch.Tensor | None = None) -> torch.Tensor:
        """The rank-r logit shift of ``cond_head_rank`` from condition tokens cond (B, 2, D):
        (B, G, 281), or (K, 281) for the K (cell, gene) pairs ``cells``, ``genes`` (K,), cells
        in ascending order (as ``select.nonzero`` gives them)."""
        B = cond.shape[0]
        z = self.cond_head_down(self.cond_head_norm(cond.reshape(B, -1)))  # (B, r)
        up = self.cond_head_up  # (r, G, 281)
        r, G, V = up.shape
        flat = up.reshape(r, G * V)
        if cells is None:
            return (z.to(up.dtype) @ flat).view(B, G, V)
        # Whole cells at a time, one matmul each (a gather per pair would cost a scatter-add of
        # r x K x 281 in the backward pass), a block of at most ~2^25 logits in memory.
        block = max(1, (1 << 25) // (G * V))
        bounds = torch.searchsorted(cells, torch.arange(0, B + block, block, device=cells.device))
        out = []
        for i, start in enumerate(range(0, B, block)):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                full = (z[start:start + block].to(up.dtype) @ flat).view(-1, V)  # (b * G, 281)
                out.append(full.index_select(0, (cells[lo:hi] - start) * G + genes[lo:hi]))
        return torch.cat(out) if out else z.new_zeros(0, V)

    def _head_shift(self, cond: torch.Tensor, tokens: torch.Tensor, cells: torch.Tensor | None = None,
                    genes: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`cond_head_shift`, scaled by each cell's share of masked genes in ``tokens``
        (B, G) under ``cond_head_masked``: (B, G, 281), or (K, 281) for the pairs ``cells``,
        ``genes``."""
        shift = self.cond_head_shift(cond, cells, genes)
        if not self.cfg.cond_head_masked:
            return shift
        share = (tokens == MASK_TOKEN).float().mean(1)  # (B,)
        scale = share[:, None, None] if cells is None else share[cells, None]
        return shift * scale.to(shift.dtype)

    # -- forward ---------------------------------------------------------------------------

    def library_embedding(self, library: torch.Tensor) -> torch.Tensor:
        """(B, D) embedding of the cells' library sizes ``library`` (B,): log1p(total count)."""
        cfg = self.cfg
        s = (library.float() - cfg.library_center) / cfg.library_scale  # (B,)
        return self.library_emb(s[:, None].to(self.library_emb[0].weight.dtype))  # (B, D)

    def forward(self, tokens, context=None, perturbation=None, pert_features=None,
                target_genes=None, select=None, library=None) -> torch.Tensor:
        """tokens: (B, G) long in [0, 281] (281 = MASK). Conditions as in :meth:`condition_tokens`,
        required for a conditional network and refused by an unconditional one.
        library: (B,) float log1p(total count) of each cell, required with
        ``cfg.library_size`` and refused without it.
        select: optional (B, G) bool; when given, only the logits of the selected genes are
        computed (the per-gene head is most of a forward pass when G is large and few genes
        are read, as in many-step sampling).
        Returns logits (B, G, 281), or (K, 281) for the K selected genes in row-major order."""
        cfg = self.cfg
        B, G = tokens.shape
        if G != cfg.n_genes:
            raise ValueError(f"tokens have {G} genes, the network was built for {cfg.n_genes}")

        x = self.compress(self.embed(tokens))  # (B, G/S, D)
        if cfg.library_size:
            if library is None or library.shape != (B,):
                raise ValueError("a network with library_size needs `library`, a (B,) tensor of "
                                 "log1p(total count) per cell")
            x = x + self.library_embedding(library).to(x.dtype)[:, None]  # (B, G/S, D)
        elif library is not None:
            raise ValueError("`library` given to a network built without library_size")

        if cfg.conditional:
            if context is None or perturbation is None:
                raise ValueError("a conditional network needs `context` and `perturbation` (B,) long tensors")
            cond = self.condition_tokens(context, perturbation, pert_features, target_genes)  # (B, 2, D)
            if cfg.cond_broadcast:
                x = x + cond.sum(1, keepdim=True).to(x.dtype)  # (B, G/S, D)
            x = torch.cat([cond.to(x.dtype), x], dim=1)  # (B, 2 + G/S, D)
            start = 0
        else:
            if any(c is not None for c in (context, perturbation, pert_features, target_genes)):
                raise ValueError("conditions given to an unconditional network (n_contexts=0)")
            start = GENE_POS_OFFSET  # gene groups keep positions 2.. without condition tokens
        head_cond = cond if cfg.conditional and cfg.cond_head_rank else None
        L = x.shape[1]
        cos, sin = self.rope_cos[start : start + L], self.rope_sin[start : start + L]  # (L, hd)

        for block in self.blocks:
            x = block(x, cos, sin)  # (B, L, D)
        x = self.norm(x)
        if cfg.conditional:
            x = x[:, N_COND_TOKENS:]  # (B, G/S, D): condition outputs are discarded

        x = self.expand(x)  # (B, G/S, S*D)
        if select is not None:
            b, g = select.nonzero(as_tuple=True)  # (K,) cells and genes, row-major
            x = x.reshape(-1, cfg.d_model)  # (B * G_pad, D) in permuted gene order
            h = x.index_select(0, b * cfg.n_padded + self.gene_perm_inv[g])  # (K, D)
            logits = self.head(h) + self.head_bias.index_select(0, g)  # (K, 281)
            if cfg.gene_head_rank:
                z = self.gene_head_down(h)  # (K, r)
                for i in range(cfg.gene_head_rank):  # one (K, 281) gather at a time
                    logits = logits + z[:, i : i + 1] * self.gene_head_up[i].index_select(0, g)
            return logits if head_cond is None else logits + self._head_shift(head_cond, tokens, b, g)
        x = ungroup_genes(x, self.gene_perm_inv, cfg.group_size)  # (B, G, D)
        logits = self.head(x) + self.head_bias  # (B, G, 281)
        if cfg.gene_head_rank:
            logits = logits + torch.einsum("bgr,rgv->bgv", self.gene_head_down(x), self.gene_head_up)
        return logits if head_cond is None else logits + self._head_shift(head_cond, tokens)

    # -- accounting ------------------------------------------------------------------------

    def num_parameters(self, blocks_only: bool = False) -> int:
        """Number of parameters: all of them, or only those of the transformer blocks."""
        module = self.blocks if blocks_only else self
        return sum(p.numel() for p in module.parameters())

    def estimate_flops_per_cell(self) -> int:
        """Forward + backward FLOPs of one cell (3x the forward's matmul FLOPs), for MFU.

        Counts the matmuls of the blocks (2 FLOPs per multiply-add), attention scores and
        values (4 * L^2 * D per layer), compression, expansion and the head; ignores norms,
        activations and embedding look-ups.
        """
        cfg = self.cfg
        D, F_, L, S = cfg.d_model, cfg.d_ff, cfg.seq_len, cfg.group_size
        per_layer = 2 * L * (4 * D * D + 3 * D * F_) + 4 * L * L * D
        io = 2 * cfg.n_groups * (S * D * D) * 2 + 2 * cfg.n_genes * D * N_EXPR_TOKENS
        return 3 * (cfg.n_layers * per_layer + io)
