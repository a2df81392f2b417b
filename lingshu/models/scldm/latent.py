"""scLDM stage 2: a conditional Diffusion Transformer on the latents, trained by flow matching.

Shapes: B cells, M latent tokens of width L, d the DiT width, F the perturbation feature width.

Network (:class:`LatentDiT`): latent tokens (B, M, L) -> linear to d + learned token position
embedding -> DiT blocks with adaLN-Zero modulation (shift, scale and gate of both sub-layers
predicted from the conditioning vector, initialised to zero so every block starts as the
identity) -> adaLN + linear back to L (zero-initialised): the velocity (B, M, L).

Conditioning vector (B, d) = sinusoidal time embedding through an MLP + condition embedding.
The condition embedding is ``context_emb[c] + perturbation_emb[p] + feature_proj(f)``: a
learned context, a learned identity of each training perturbation (index 0 = "unknown",
shared by every perturbation without one) and a linear projection of the perturbation's
feature vector (SPEC 1.2a), so that a perturbation never seen in training is reached through
its features. Where ``null`` is True the whole condition embedding is replaced by one learned
null embedding: the unconditional branch of classifier-free guidance.

Flow matching (:func:`flow_matching_loss`): x0 ~ N(0, I) noise, x1 a data latent,
t ~ U(0, 1), x_t = (1 - t) x0 + t x1, target velocity x1 - x0, mean squared error.

Sampling (:func:`euler_sample`): Euler steps of dx/dt = v from t = 0 (noise) to t = 1, with
the guided velocity v = v_uncond + w (v_cond - v_uncond) (:func:`guided_velocity`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lingshu.models.scldm.layers import SelfAttention, mlp, timestep_embedding

# velocity_fn(x_t (B, M, L), t (B,), **condition) -> velocity (B, M, L)
VelocityFn = Callable[..., torch.Tensor]


@dataclass
class DiTConfig:
    """Sizes of the latent Diffusion Transformer and of its condition tables."""

    latent_tokens: int
    latent_dim: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_contexts: int = 1
    n_perturbations: int = 1  # identity table size; index 0 = unknown perturbation
    feature_dim: int = 0  # F; 0 = no perturbation features

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"DiTConfig: d_model ({self.d_model}) must be divisible by "
                             f"n_heads ({self.n_heads})")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, M, d) normalised tokens, (B, d) shift and scale."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and feed-forward over (B, M, d), modulated by the (B, d) condition."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(d_model)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class LatentDiT(nn.Module):
    """Velocity field v(x_t, t, condition) over (B, M, L) latents."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.inp = nn.Linear(cfg.latent_dim, d)
        self.token_pos_emb = nn.Parameter(0.02 * torch.randn(cfg.latent_tokens, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.context_emb = nn.Embedding(cfg.n_contexts, d)
        self.perturbation_emb = nn.Embedding(cfg.n_perturbations, d)
        self.feature_proj = nn.Linear(cfg.feature_dim, d) if cfg.feature_dim > 0 else None
        self.null_condition_emb = nn.Parameter(torch.zeros(d))
        for table in (self.context_emb, self.perturbation_emb):
            nn.init.normal_(table.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.n_heads) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, cfg.latent_dim)
        for layer in (self.final_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_embedding(self, context: torch.Tensor, perturbation: torch.Tensor,
                            features: torch.Tensor | None, null: torch.Tensor | None
                            ) -> torch.Tensor:
        """(B,) context and perturbation indices, (B, F) features, (B,) null flags -> (B, d)."""
        c = self.context_emb(context) + self.perturbation_emb(perturbation)
        if self.feature_proj is not None and features is not None:
            c = c + self.feature_proj(features.float())
        if null is not None:
            c = torch.where(null[:, None], self.null_condition_emb.expand_as(c), c)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                perturbation: torch.Tensor, features: torch.Tensor | None = None,
                null: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M, L) x_t, (B,) times in [0, 1], condition -> velocity (B, M, L)."""
        d = self.cfg.d_model
        c = self.time_mlp(timestep_embedding(t, d)) + self.condition_embedding(
            context, perturbation, features, null)  # (B, d)
        h = self.inp(x) + self.token_pos_emb  # (B, M, d)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(h), shift, scale))


def flow_matching_loss(velocity_fn: VelocityFn, x1: torch.Tensor, generator: torch.Generator,
                       noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                       **condition: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of the predicted velocity on the linear path (scalar).

    x1: (B, M, L) data latents; noise x0 (B, M, L) and times t (B,) are drawn from
    ``generator`` unless given. x_t = (1 - t) x0 + t x1; target x1 - x0.
    """
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=generator.device)
        noise = noise.to(x1.device, x1.dtype)
    if t is None:
        t = torch.rand(x1.shape[0], generator=generator, device=generator.device).to(x1.device)
    tt = t.to(x1.dtype)[:, None, None]
    x_t = (1.0 - tt) * noise + tt * x1
    v = velocity_fn(x_t, t, **condition)
    return (v.float() - (x1 - noise).float()).square().mean()


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor,
                    cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
                    guidance: float) -> torch.Tensor:
    """Classifier-free guided velocity v_u + w (v_c - v_u), (B, M, L).

    w = 1 (or no unconditional branch) returns the conditional velocity itself, not the
    algebraically equal but rounded expression, so that it equals conditional sampling exactly.
    """
    v_cond = velocity_fn(x, t, **cond)
    if uncond is None or guidance == 1.0:
        return v_cond
    v_uncond = velocity_fn(x, t, **uncond)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int,
                 cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None = None,
                 guidance: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = guided v from noise (B, M, L) at t = 0 to t = 1, ``steps`` Euler steps.

    ``cond`` / ``uncond`` are the keyword arguments of ``velocity_fn`` for the conditional and
    the unconditional branch (tensors with a batch dimension of B). Returns (B, M, L).
    """
    if steps < 1:
        raise ValueError(f"euler_sample: steps must be >= 1, got {steps}")
    x = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device)
        x = x + dt * guided_velocity(velocity_fn, x, t, cond, uncond, guidance)
    return x
