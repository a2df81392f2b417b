"""Transformer pieces shared by the scLDM autoencoder and its latent Diffusion Transformer.

Shapes: B cells, M latent tokens, d model width, H heads of width d / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention over a short token set: (B, M, d) -> (B, M, d)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        q, k, v = self.qkv(x).view(b, m, 3, self.n_heads, d // self.n_heads).unbind(2)
        # (B, H, M, d/H) each; bidirectional attention (no mask)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        return self.out(y.transpose(1, 2).reshape(b, m, d))


def mlp(d_model: int, ratio: int = 4) -> nn.Sequential:
    """The feed-forward layer of a block: (..., d) -> (..., d)."""
    return nn.Sequential(nn.Linear(d_model, ratio * d_model), nn.GELU(),
                         nn.Linear(ratio * d_model, d_model))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention then feed-forward, each residual. (B, M, d)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = mlp(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of times t in [0, 1]: (B,) -> (B, dim).

    Times are scaled by 1000 first so that the frequencies resolve the unit interval the way
    they resolve integer diffusion steps in DiT.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
