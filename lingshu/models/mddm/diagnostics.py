"""What Lingshu-Cell has learned, in bits: held-out masked-token cross-entropy beside two floors.

The network is asked to fill in the genes of held-out cells (the split's reference cells, which
no model trains on) masked at fixed rates t (a fixed set of ``round(t * G)`` genes per cell,
seeded, so every evaluation of a run masks the same genes). Its cross-entropy on the masked
genes, in bits per masked gene, is set beside two floors computed on exactly the same masked
genes:

- ``marginal``: each gene's own token distribution in the training cells. A model that does
  not beat it has learned no gene-gene dependency (nor anything about the cell's identity);
- ``context``: the same per context (cell type): what knowing the cell type alone is worth.

A model that predicts each gene's marginal exactly scores the marginal floor (tested). The
marginals are smoothed by 1/V pseudo-counts per token (V expression tokens, one pseudo-cell in
all), so that a token a gene never showed in training costs a finite number of bits.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS

MASK_RATES = (0.15, 0.5, 0.9)
MAX_FLOOR_CELLS = 20_000  # training cells the marginals are counted on (a seeded sample)
FLOORS = ("marginal", "context")


def fixed_mask(n_cells: int, n_genes: int, rate: float, seed: int) -> torch.Tensor:
    """(n_cells, n_genes) bool: exactly ``max(1, round(rate * n_genes))`` masked genes per
    cell, chosen uniformly by a generator seeded with ``seed``."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"mask rate must lie in (0, 1], got {rate}")
    k = max(1, round(rate * n_genes))
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.rand(n_cells, n_genes, generator=gen).argsort(dim=1)  # (n, G)
    mask = torch.zeros(n_cells, n_genes, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def masked_bits(model_fn: Callable[[torch.Tensor, slice], torch.Tensor], tokens: torch.Tensor,
                mask: torch.Tensor, batch: int = 64) -> float:
    """Mean cross-entropy, in bits, of the true tokens at the masked genes.

    model_fn(noisy_tokens, rows) -> (b, G, V) logits for the cells ``rows`` (a slice of the
    evaluated cells, so that conditions can be sliced alike). tokens, mask: (n, G).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            rows = slice(start, start + batch)
            tok, m = tokens[rows], mask[rows]
            noisy = torch.where(m, torch.full_like(tok, MASK_TOKEN), tok)
            logits = model_fn(noisy, rows)  # (b, G, V), on the model's device
            tok, m = tok.to(logits.device), m.to(logits.device)
            total += float(F.cross_entropy(logits[m].float(), tok[m], reduction="sum"))
            count += int(m.sum())
    return total / max(count, 1) / math.log(2)


def marginal_log_probs(blocks, vocab: int = N_EXPR_TOKENS,
                       pseudo: float | None = 1.0) -> dict[object, np.ndarray]:
    """Each gene's smoothed token distribution, as log probabilities, counted block by block.

    blocks: an iterable of ``(tokens, groups)``: (n, G) integer tokens of training cells and
    (n,) their labels, or None for one group. pseudo: pseudo-cells spread evenly over the
    vocabulary (``pseudo / vocab`` per token) in each group; None: ``1 / n`` for a group of n
    cells, so that all the tokens a gene never showed together get about ``1 / n**2`` (a
    negligible share, finite logits). Returns label -> (G, vocab) float64 log probabilities
    (the label ``None`` when ``groups`` is None).
    """
    counts: dict[object, np.ndarray] = {}
    cells: dict[object, int] = {}
    for tokens, groups in blocks:
        tokens = np.asarray(tokens)
        n, g = tokens.shape
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"tokens must lie in [0, {vocab}); got "
                             f"{tokens.min()}..{tokens.max()}")
        labels = np.full(n, None, dtype=object) if groups is None else np.asarray(groups, object)
        offsets = np.arange(g, dtype=np.int64) * vocab  # (G,)
        for label in dict.fromkeys(labels.tolist()):
            rows = tokens[labels == label].astype(np.int64)  # (m, G)
            c = np.bincount((rows + offsets).ravel(), minlength=g * vocab).reshape(g, vocab)
            counts[label] = counts[label] + c if label in counts else c
            cells[label] = cells.get(label, 0) + rows.shape[0]
    out = {}
    for label, c in counts.items():
        a = 1.0 / max(cells[label], 1) if pseudo is None else float(pseudo)
        out[label] = np.log((c + a / vocab) / (cells[label] + a))
    return out


def floor_bits(log_probs: dict[object, np.ndarray], tokens: np.ndarray, mask: np.ndarray,
               groups: np.ndarray | None = None) -> float:
    """Mean cross-entropy, in bits, of the masked tokens under per-gene distributions.

    log_probs: from :func:`marginal_log_probs`; tokens, mask: (n, G); groups: (n,) labels of
    the evaluated cells (a label without a table falls back to the ``None`` table when there
    is one, else raises).
    """
    tokens, mask = np.asarray(tokens, np.int64), np.asarray(mask, bool)
    labels = np.full(tokens.shape[0], None, dtype=object) if groups is None \
        else np.asarray(groups, object)
    total, count = 0.0, 0
    genes = np.arange(tokens.shape[1])
    for label in dict.fromkeys(labels.tolist()):
        table = log_probs.get(label, log_probs.get(None))
        if table is None:
            raise ValueError(f"no marginal for group {label!r}")
        rows = labels == label
        lp = table[genes[None, :], tokens[rows]]  # (m, G)
        total -= float(lp[mask[rows]].sum())
        count += int(mask[rows].sum())
    return total / max(count, 1) / math.log(2)


class HeldOutDiagnostics:
    """The held-out cells, their fixed masks and the floors, computed once per training run;
    called with a network it returns bits per masked gene at each mask rate.

    eval_tokens: (n, G) tokens of the held-out cells; eval_contexts: (n,) their contexts.
    train_blocks: a callable returning a fresh iterable of ``(tokens, contexts)`` blocks of
    (a sample of) the training cells.
    """

    def __init__(self, eval_tokens: np.ndarray, eval_contexts: np.ndarray,
                 train_blocks: Callable, seed: int, rates: tuple[float, ...] = MASK_RATES):
        self.tokens = torch.as_tensor(np.asarray(eval_tokens, np.int64))
        self.rates = tuple(rates)
        n, g = self.tokens.shape
        self.masks = {r: fixed_mask(n, g, r, seed + i) for i, r in enumerate(self.rates)}
        marginal = marginal_log_probs((t, None) for t, _ in train_blocks())
        per_context = marginal_log_probs(train_blocks())
        per_context[None] = marginal[None]  # a context without training cells: the marginal
        self.floors = {}
        for r, m in self.masks.items():
            self.floors[f"marginal@{r:g}"] = floor_bits(marginal, eval_tokens, m.numpy())
            self.floors[f"context@{r:g}"] = floor_bits(per_context, eval_tokens, m.numpy(),
                                                       eval_contexts)

    def __call__(self, model_fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> dict:
        """bits per masked gene of ``model_fn`` at each rate: ``{"model@0.15": ..., ...}``."""
        return {f"model@{r:g}": masked_bits(model_fn, self.tokens, m)
                for r, m in self.masks.items()}


def diagnostics_table(rows: list[dict], floors: dict[str, float]) -> list[dict]:
    """Long rows (step, rate, model, marginal floor, context floor) from the per-step dicts
    that :class:`HeldOutDiagnostics` returned (each with its ``step``)."""
    out = []
    for row in rows:
        for key, value in row.items():
            if not key.startswith("model@"):
                continue
            rate = key.split("@", 1)[1]
            out.append({"step": int(row["step"]), "mask_rate": float(rate),
                        "bits_model": float(value),
                        "bits_marginal": floors[f"marginal@{rate}"],
                        "bits_context": floors[f"context@{rate}"]})
    return out
