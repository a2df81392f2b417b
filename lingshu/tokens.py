"""The count quantiser of Lingshu-Cell (SPEC 1.1): raw UMI counts <-> expression tokens.

One vocabulary for every gene, about two significant digits:

====================  ==========================================  ============
count x               token                                       tokens
====================  ==========================================  ============
0 <= x < 100          x (exact)                                   0 .. 99
100 <= x <= 9999      100 + 90*(k-2) + r, k = floor(log10 x),     100 .. 279
                      r = floor((x - 10^k) / 10^(k-1))
x > 9999              overflow                                    280
====================  ==========================================  ============

So 100..109 -> 100, 110..119 -> 101, ..., 990..999 -> 189, 1000..1099 -> 190, ...,
9900..9999 -> 279. The decade k is found with integer comparisons (not a float ``log10``)
so the edges 100, 1000, 9999 and 10000 are exact. ``MASK_TOKEN`` (281) marks a masked gene;
the network's token embedding therefore has ``N_EXPR_TOKENS + 1 = 282`` rows.
"""

from __future__ import annotations

import numpy as np
import torch

N_EXPR_TOKENS = 281  # expression tokens 0..280
MASK_TOKEN = 281  # id of a masked gene; never produced by quantize_counts
VOCAB_SIZE = N_EXPR_TOKENS + 1  # rows of the network's gene-token embedding
OVERFLOW_TOKEN = 280  # counts above 9999
OVERFLOW_COUNT = 10_000  # what dequantize_tokens returns for the overflow token (its lower edge)

_MAX_COUNT = 10_000  # any count >= this lands in the overflow bin; clip to it before casting


def _quantize_int(x, where):
    """Tokens of non-negative integer counts ``x`` (numpy or torch, any shape), clipped at 10000."""
    return where(
        x < 100,
        x,
        where(
            x < 1_000,
            100 + (x - 100) // 10,  # k = 2: 90 bins of width 10
            where(x < 10_000, 190 + (x - 1_000) // 100, OVERFLOW_TOKEN),  # k = 3: width 100
        ),
    )


def quantize_counts(counts, dtype=None):
    """Map raw UMI counts to expression tokens (SPEC 1.1), element-wise and vectorised.

    counts: numpy array (any int / float / bool dtype) or torch tensor, any shape. Float counts
        are floored first (UMI counts are integers; 99.7 -> token 99), so every value in
        [9999, 10000) still gets token 279 and only counts >= 10000 overflow.
    dtype: dtype of the result; default ``np.int64`` for numpy, ``torch.long`` for torch.
        ``np.uint16`` is enough for every token (0..280) and saves 4x memory when storing a
        whole token matrix; convert to int64 / long before indexing an embedding.
    Returns tokens of the same shape (and device, for torch) in 0..280.
    Raises ValueError on negative or non-finite input.
    """
    if isinstance(counts, torch.Tensor):
        x = counts
        if x.dtype == torch.bool:
            x = x.long()
        if x.is_floating_point():
            if not bool(torch.isfinite(x).all()):
                raise ValueError("quantize_counts: counts contain NaN or inf; raw UMI counts must be finite")
            x = torch.floor(x).clamp(max=_MAX_COUNT)
        if bool((x < 0).any()):
            raise ValueError("quantize_counts: counts contain negative values; raw UMI counts must be >= 0")
        x = x.clamp(max=_MAX_COUNT).long()
        tokens = _quantize_int(x, torch.where)
        return tokens.to(torch.long if dtype is None else dtype)

    x = np.asarray(counts)
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"quantize_counts: counts must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError("quantize_counts: counts contain NaN or inf; raw UMI counts must be finite")
        x = np.minimum(np.floor(x), _MAX_COUNT)
    if (x < 0).any():
        raise ValueError("quantize_counts: counts contain negative values; raw UMI counts must be >= 0")
    x = np.minimum(x, _MAX_COUNT).astype(np.int64)
    tokens = _quantize_int(x, np.where)
    return tokens.astype(np.int64 if dtype is None else dtype)


def _edges_int(t, where):
    """(lower, width) of the bins of valid tokens ``t`` (numpy or torch int64)."""
    lower = where(
        t < 100,
        t,
        where(t < 190, 100 + 10 * (t - 100), where(t < OVERFLOW_TOKEN, 1_000 + 100 * (t - 190), OVERFLOW_COUNT)),
    )
    width = where(t < 100, 1, where(t < 190, 10, where(t < OVERFLOW_TOKEN, 100, 1)))
    return lower, width


def dequantize_tokens(tokens, mode: str = "center"):
    """Map expression tokens back to integer counts.

    tokens: numpy array or torch tensor of ints in 0..280, any shape.
    mode: ``"lower"``: the bin's lower edge (the smallest count of the bin);
        ``"center"``: the midpoint of the bin's real interval [lower, lower + width), which is
        an integer: lower + 5 for the width-10 bins (100..189), lower + 50 for the width-100
        bins (190..279). Tokens below 100 are their own count in both modes, so every count
        below 100 round-trips exactly. The overflow token 280 maps to 10000 in both modes
        (the bin is unbounded above; 10000 is its lower edge).
    Returns int64 counts (numpy) or a long tensor (torch) of the same shape.
    Raises ValueError on MASK_TOKEN or any token outside 0..280.
    """
    if mode not in ("lower", "center"):
        raise ValueError(f"dequantize_tokens: mode must be 'lower' or 'center', got {mode!r}")
    is_torch = isinstance(tokens, torch.Tensor)
    t = tokens.long() if is_torch else np.asarray(tokens)
    if not is_torch and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"dequantize_tokens: tokens must be integers, got dtype {t.dtype}")
    if not is_torch:
        t = t.astype(np.int64)
    if bool((t == MASK_TOKEN).any()):
        raise ValueError("dequantize_tokens: tokens contain MASK_TOKEN (281); unmask (sample) them first")
    if bool(((t < 0) | (t > OVERFLOW_TOKEN)).any()):
        raise ValueError(f"dequantize_tokens: tokens outside 0..{OVERFLOW_TOKEN}")
    where = torch.where if is_torch else np.where
    lower, width = _edges_int(t, where)
    if mode == "lower":
        return lower
    return lower + width // 2  # width 1 (exact and overflow bins) -> + 0


def bin_edges() -> np.ndarray:
    """(281, 2) float64 table of the inclusive count range (lower, upper) of every token.

    Row t is token t: rows 0..99 are (t, t); 100 is (100, 109); 189 is (990, 999); 190 is
    (1000, 1099); 279 is (9900, 9999); 280 (overflow) is (10000, inf).
    """
    t = np.arange(N_EXPR_TOKENS, dtype=np.int64)
    lower, width = _edges_int(t, np.where)
    upper = (lower + width - 1).astype(np.float64)
    upper[OVERFLOW_TOKEN] = np.inf
    return np.stack([lower.astype(np.float64), upper], axis=1)
