"""scLDM stage 1: a permutation-invariant variational autoencoder of single-cell counts.

A cell is the set of pairs (gene g, count x_g). Shapes: B cells, G genes (or a subset G' of
them given by ``gene_idx``), M latent tokens of width L (``latent_dim``), d model width, H
heads of width d / H.

Encoder (permutation-invariant pooling, the paper's MCAB in its pooling role):

1. gene token: ``gene_embedding[g] * log1p(x_g)``. Every gene of the panel is in the set; a
   zero count gives a zero token (its key and value are zero because the key / value
   projections have no bias), so unexpressed genes only take a share of the attention
   normaliser with logit 0, like an attention sink, and add nothing to the pooled value.
2. M learned query tokens cross-attend to the gene tokens (B, M, d). Because the projections
   are linear without bias, the keys and values of all cells are ``log1p(x_g)`` times a
   per-gene vector, so the (H, M, G) query-key products are computed once per batch and
   scaled per cell; no (B, G, d) tensor is built.
3. Self-attention blocks over the M tokens, then a linear layer to the posterior mean and
   log-variance of the latent (B, M, L) each.

Nothing in 1-3 depends on the position of a gene in the input: permuting the columns of the
counts together with ``gene_idx`` leaves the latent unchanged.

Decoder (the MCAB in its unpooling role, permutation-equivariant): the latent is projected to
d, gets a learned per-token position embedding (the M tokens are distinct queries, so they have
an identity), goes through self-attention blocks; then every gene's learned query embedding
cross-attends to the M tokens (heads of width d / H) and the per-gene logit is a learned
per-gene readout of the attention output, ``readout[g] . attention_out[g] + bias[g]`` (B, G),
computed without building a (B, G, d) tensor (see :class:`SetDecoder`). The count likelihood is a
negative binomial with mean ``softmax(logits over genes) * library size`` and a learned
per-gene inverse overdispersion ``theta`` (variance ``mu + mu^2 / theta``).

Loss per cell (the negative ELBO): NB negative log-likelihood summed over genes plus
``kl_weight`` times the KL divergence of the Gaussian posterior from N(0, I), divided by the
number of genes so that the scale does not depend on the panel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lingshu.constants import TARGET_SUM
from lingshu.models.scldm.layers import TransformerBlock

LOGVAR_RANGE = (-10.0, 5.0)  # clamp of the posterior log-variance, for stable early steps
LOG_THETA_RANGE = (-6.0, 9.0)  # clamp of the per-gene log inverse dispersion


@dataclass
class AutoencoderConfig:
    """Sizes of the autoencoder."""

    n_genes: int
    d_model: int = 64
    n_heads: int = 4
    latent_tokens: int = 16  # M
    latent_dim: int = 16  # L, width of a latent token
    encoder_layers: int = 2
    decoder_layers: int = 2

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"AutoencoderConfig: d_model ({self.d_model}) must be divisible "
                             f"by n_heads ({self.n_heads})")
        if min(self.n_genes, self.latent_tokens, self.latent_dim) < 1:
            raise ValueError(f"AutoencoderConfig: sizes must be >= 1: {self}")


def nb_log_likelihood(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """Element-wise log NB(x; mean mu, inverse dispersion theta); broadcasts.

    P(x) = Gamma(x + theta) / (Gamma(theta) x!) * (theta / (theta + mu))^theta
    * (mu / (theta + mu))^x, i.e. scipy's ``nbinom(n=theta, p=theta / (theta + mu))``.
    ``eps`` keeps the logs finite where mu = 0 (then the likelihood of x = 0 is 1).
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
            + theta * (torch.log(theta + eps) - log_theta_mu)
            + x * (torch.log(mu + eps) - log_theta_mu))


class SetEncoder(nn.Module):
    """(B, G') log1p counts of the genes ``gene_idx`` -> posterior mean, log-variance (B, M, L)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.gene_embedding = nn.Embedding(cfg.n_genes, d)
        self.latent_query_emb = nn.Parameter(torch.randn(cfg.latent_tokens, d))
        self.query_norm = nn.LayerNorm(d)
        # no biases: a zero count must give a zero key and value (see the module docstring)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.pool_out = nn.Linear(d, d)
        self.blocks = nn.ModuleList(TransformerBlock(d, cfg.n_heads)
                                    for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(d)
        self.to_posterior = nn.Linear(d, 2 * cfg.latent_dim)

    def forward(self, log_counts: torch.Tensor,
                gene_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = log_counts.shape
        m, d = self.latent_query_emb.shape
        h, dh = self.n_heads, d // self.n_heads
        emb = self.gene_embedding(gene_idx)  # (G', d)
        k = self.k_proj(emb).view(n, h, dh).transpose(0, 1)  # (H, G', dh), per unit log1p
        v = self.v_proj(emb).view(n, h, dh).transpose(0, 1)  # (H, G', dh)
        q = self.q_proj(self.query_norm(self.latent_query_emb)).view(m, h, dh).transpose(0, 1)
        base = q @ k.transpose(1, 2) / math.sqrt(dh)  # (H, M, G')
        s = log_counts[:, None, None, :]  # (B, 1, 1, G')
        attn = torch.softmax(s * base, dim=-1)  # (B, H, M, G'): token g's logit is s_g * base
        pooled = (attn * s) @ v  # (B, H, M, dh): token g's value is s_g * v_g
        x = self.latent_query_emb + self.pool_out(pooled.transpose(1, 2).reshape(b, m, d))
        for block in self.blocks:
            x = block(x)  # (B, M, d)
        mean, logvar = self.to_posterior(self.norm(x)).chunk(2, dim=-1)  # (B, M, L) each
        return mean, logvar.clamp(*LOGVAR_RANGE)


class SetDecoder(nn.Module):
    """(B, M, L) latents -> (B, G') per-gene logits of the genes ``gene_idx``."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.from_latent = nn.Linear(cfg.latent_dim, d)
        self.token_pos_emb = nn.Parameter(0.02 * torch.randn(cfg.latent_tokens, d))
        self.blocks = nn.ModuleList(TransformerBlock(d, cfg.n_heads)
                                    for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.gene_query_emb = nn.Embedding(cfg.n_genes, d)
        self.gene_readout_emb = nn.Embedding(cfg.n_genes, d)
        nn.init.normal_(self.gene_readout_emb.weight, std=d ** -0.5)
        self.gene_bias_emb = nn.Embedding(cfg.n_genes, 1)
        nn.init.zeros_(self.gene_bias_emb.weight)

    def forward(self, z: torch.Tensor, gene_idx: torch.Tensor) -> torch.Tensor:
        b, m, _ = z.shape
        n = gene_idx.shape[0]
        d = self.token_pos_emb.shape[1]
        h, dh = self.n_heads, d // self.n_heads
        x = self.from_latent(z) + self.token_pos_emb  # (B, M, d)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        k = self.k_proj(x).view(b * m, h, dh).transpose(0, 1)  # (H, B*M, dh)
        v = self.v_proj(x).view(b * m, h, dh).transpose(0, 1)  # (H, B*M, dh)
        q = self.gene_query_emb(gene_idx).view(n, h, dh).permute(1, 2, 0)  # (H, dh, G')
        w = self.gene_readout_emb(gene_idx).view(n, h, dh).permute(1, 2, 0)  # (H, dh, G')
        # The gene queries are the same for every cell: one (B*M, dh) x (dh, G') product per
        # head, laid out (H, B, M, G') so that the softmax over the M tokens and the sum below
        # run over an outer axis (contiguous, vectorised) rather than rows of length M.
        scores = (k @ q).view(h, b, m, n) / math.sqrt(dh)  # (H, B, M, G')
        readout = (v @ w).view(h, b, m, n)  # (H, B, M, G'): w_g . v_m per head
        scores = scores - scores.amax(dim=2, keepdim=True).detach()  # exact; for stability
        attn = scores.exp()
        attn = attn / attn.sum(dim=2, keepdim=True)  # softmax over the M latent tokens
        # logit_g = sum over heads of w_g . (attention output of gene g) + bias_g
        return (attn * readout).sum(dim=(0, 2)) + self.gene_bias_emb(gene_idx)[:, 0]


class ScLDMAutoencoder(nn.Module):
    """Encoder, decoder and the per-gene NB dispersion; ``forward`` gives the ELBO terms."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SetEncoder(cfg)
        self.decoder = SetDecoder(cfg)
        self.log_theta = nn.Parameter(torch.zeros(cfg.n_genes))

    def _genes(self, gene_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if gene_idx is None:
            return torch.arange(self.cfg.n_genes, device=device)
        return gene_idx.to(device)

    @torch.no_grad()
    def init_gene_bias(self, gene_share: torch.Tensor) -> None:
        """Start the decoder at the data's average expression shares (G,), so that early
        steps learn how cells differ rather than the genes' overall levels."""
        self.decoder.gene_bias_emb.weight.copy_(torch.log(gene_share.float() + 1e-6)[:, None])

    def theta(self, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Per-gene NB inverse dispersion (G',)."""
        log_theta = self.log_theta.clamp(*LOG_THETA_RANGE)
        return torch.exp(log_theta if gene_idx is None else log_theta[gene_idx])

    def posterior(self, counts: torch.Tensor, gene_idx: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G') raw counts -> posterior mean and log-variance, (B, M, L) each."""
        return self.encoder(torch.log1p(counts.float()), self._genes(gene_idx, counts.device))

    def encode(self, counts: torch.Tensor, gene_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G') raw counts -> the deterministic latent (posterior mean) (B, M, L)."""
        return self.posterior(counts, gene_idx)[0]

    def decode_logits(self, z: torch.Tensor, gene_idx: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """(B, M, L) latents -> (B, G') logits; softmax over genes gives expression shares."""
        return self.decoder(z, self._genes(gene_idx, z.device))

    def decode_probs(self, z: torch.Tensor, gene_idx: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """(B, M, L) latents -> (B, G') expression shares (rows sum to 1).

        The NB mean of a cell is its shares times its library size.
        """
        return torch.softmax(self.decode_logits(z, gene_idx).float(), dim=-1)

    def forward(self, counts: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ELBO terms of (B, G) raw counts with the reparameterisation noise (B, M, L).

        Returns (NB negative log-likelihood summed over genes (B,), KL to N(0, I) (B,)).
        """
        mean, logvar = self.posterior(counts)
        z = mean + torch.exp(0.5 * logvar) * noise  # (B, M, L)
        log_share = torch.log_softmax(self.decode_logits(z).float(), dim=-1)  # (B, G)
        library = counts.float().sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
        mu = torch.exp(log_share) * library
        nll = -nb_log_likelihood(counts.float(), mu, self.theta()).sum(-1)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2))
        return nll, kl


@torch.no_grad()
def reconstruction_pearson(autoencoder: ScLDMAutoencoder, counts: torch.Tensor,
                           batch_size: int = 512) -> torch.Tensor:
    """Per-cell Pearson of log1p(CP10k) counts with log1p(CP10k) of the decoded NB mean.

    counts: (N, G) raw counts. The latent is the posterior mean; the NB mean in CP10k is the
    decoded expression share x 1e4, so the library size drops out. Returns (N,) float64;
    cells whose observed profile is constant (e.g. no counts) give NaN.
    """
    out = []
    device = next(autoencoder.parameters()).device
    for start in range(0, counts.shape[0], batch_size):
        x = counts[start:start + batch_size].to(device).float()
        probs = autoencoder.decode_probs(autoencoder.encode(x))
        library = x.sum(-1, keepdim=True)
        observed = torch.log1p(x * TARGET_SUM / library.clamp_min(1.0)).double()
        decoded = torch.log1p(probs * TARGET_SUM).double()
        o = observed - observed.mean(-1, keepdim=True)
        p = decoded - decoded.mean(-1, keepdim=True)
        denom = o.norm(dim=-1) * p.norm(dim=-1)
        r = (o * p).sum(-1) / denom
        out.append(torch.where(denom > 0, r, torch.full_like(r, float("nan"))).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
