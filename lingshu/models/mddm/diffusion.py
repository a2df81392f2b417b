"""The masked discrete diffusion process (SPEC 1.3, 1.4): masking, loss and sampler.

No network code lives here: the sampler sees the model only as
``model_fn(tokens, cond) -> logits``. For a :class:`~lingshu.models.mddm.network.LingshuNetwork`
``net`` that is ``lambda x, cond: net(x, **(cond or {}))``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS

ModelFn = Callable[..., torch.Tensor]  # (tokens, cond[, select=]) -> logits


def mask_tokens(tokens: torch.Tensor, generator: torch.Generator, eps: float = 1e-3,
                full_mask: float = 0.0):
    """The forward process: mask each gene of each cell independently with probability t.

    tokens: (B, G) long expression tokens. generator: on the tokens' device.
    t is drawn per cell as t = eps + (1 - eps) * u, u ~ U(0, 1) (LLaDA), so t lies in [eps, 1]
    and the 1/t loss weight stays bounded.
    full_mask: the share of cells given t = 1 instead (every gene masked; ours, not the
    paper's, 0 by default). The loss at each t is still minimised by the true conditional, so
    this moves no optimum; it spends more of the training on the all-masked cell, the one
    that only the condition tokens can inform (and the one the sampler's first step reads).
    Returns noisy_tokens (B, G) long with MASK_TOKEN at masked genes, mask (B, G) bool, t (B,).
    """
    B, G = tokens.shape
    u = torch.rand(B, generator=generator, device=tokens.device)  # (B,)
    t = eps + (1.0 - eps) * u  # (B,)
    if full_mask > 0:  # (no extra draw at 0: runs without it are unchanged)
        whole = torch.rand(B, generator=generator, device=tokens.device) < full_mask  # (B,)
        t = torch.where(whole, torch.ones_like(t), t)
    mask = torch.rand(B, G, generator=generator, device=tokens.device) < t[:, None]  # (B, G)
    noisy = torch.where(mask, torch.full_like(tokens, MASK_TOKEN), tokens)  # (B, G)
    return noisy, mask, t


def diffusion_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The MDLM / LLaDA bound: cross-entropy on masked genes only, weighted by 1/t.

    logits: (B, G, 281); tokens: (B, G) long clean tokens; mask: (B, G) bool; t: (B,).
    loss = mean over cells of [ sum over masked genes of CE / t ] / G  (divided by the number
    of genes, not the number of masked genes). Logits at unmasked genes are never read.
    Returns a scalar (float32).
    """
    return _weighted_ce(logits[mask], tokens, mask, t)  # (M, 281): M = masked genes


def _weighted_ce(masked_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """The bound from the masked genes' logits (M, 281), in ``mask``'s row-major order."""
    B, G = tokens.shape
    ce = F.cross_entropy(masked_logits.float(), tokens[mask], reduction="none")  # (M,)
    weight = (1.0 / t.float())[:, None].expand(B, G)[mask]  # (M,)
    return (ce * weight).sum() / (B * G)


def masked_loss(model_fn: ModelFn, noisy: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                t: torch.Tensor, **cond: Any) -> torch.Tensor:
    """:func:`diffusion_loss` with the network asked for the masked genes' logits only.

    ``model_fn(noisy, select=mask, **cond)`` returns (M, 281) logits of the M masked genes in
    row-major order (as :class:`~lingshu.models.mddm.network.LingshuNetwork` does). Same value
    and gradients as ``diffusion_loss(model_fn(noisy, **cond), tokens, mask, t)`` (tested), at
    about half the head's work: with t ~ U(0, 1) half the genes are masked on average, and the
    per-gene head is most of a training step's cost on a CPU (about 1.4x faster per step at
    the ``small`` preset and 1,000 genes).
    """
    return _weighted_ce(model_fn(noisy, select=mask, **cond), tokens, mask, t)


def _masked_after(n_masked: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """How many genes stay masked after ``step`` of ``steps``: round(n * cos(pi/2 * step/steps))."""
    if step >= steps:
        return torch.zeros_like(n_masked)
    return torch.round(n_masked.double() * math.cos(math.pi / 2 * step / steps)).long()


def unmask_schedule(n_genes: int, steps: int) -> list[int]:
    """Genes to unmask at each of ``steps`` sampling steps (cosine schedule, MaskGIT / SPEC 1.4).

    The masked fraction after step s is cos(pi/2 * s/N): few genes early, many late.
    Returns a list of N ints >= 0 that sums exactly to ``n_genes``.
    """
    if steps < 1 or n_genes < 0:
        raise ValueError(f"unmask_schedule: need steps >= 1 and n_genes >= 0, got {steps} and {n_genes}")
    n = torch.tensor([n_genes])
    masked = [int(_masked_after(n, s, steps)) for s in range(steps + 1)]  # masked[0] = n_genes, masked[N] = 0
    return [masked[s] - masked[s + 1] for s in range(steps)]


def guided_logits(model_fn: ModelFn, tokens: torch.Tensor, cond: Any, uncond: Any, guidance: float,
                  select: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance on logits, the control condition as the unconditional branch:
    l(x, uncond) + (w + 1) * (l(x, cond) - l(x, uncond)). w = 0 calls the model once and
    returns l(x, cond) exactly. tokens: (B, G). Returns (B, G, 281); with ``select`` ((B, G)
    bool, passed to ``model_fn`` as a keyword) the model returns and this returns (K, 281)."""
    kw = {} if select is None else {"select": select}
    logits = model_fn(tokens, cond, **kw)  # (B, G, 281) or (K, 281)
    if guidance == 0:
        return logits
    if uncond is None:
        raise ValueError("classifier-free guidance (guidance != 0) needs `uncond`, the control condition")
    base = model_fn(tokens, uncond, **kw)  # (B, G, 281) or (K, 281)
    return base + (guidance + 1.0) * (logits - base)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    n_cells: int,
    n_genes: int,
    steps: int,
    generator: torch.Generator,
    cond: Any = None,
    uncond: Any = None,
    guidance: float = 0.0,
    fixed_tokens: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    progress: bool | Any = False,
    select: bool = False,
    stratified: bool = False,
) -> torch.Tensor:
    """Generate cells by iterative unmasking (SPEC 1.4).

    model_fn: ``model_fn(tokens (B, G) long, cond) -> logits (B, G, 281)``; ``cond`` and
        ``uncond`` are opaque (e.g. dicts of condition tensors) and passed through unchanged.
    n_cells, n_genes: B and G. steps: N. generator: drives every random choice; the tokens live
        on its device.
    guidance: w of classifier-free guidance (:func:`guided_logits`); w = 0 skips the ``uncond``
        pass and gives exactly conditional sampling.
    fixed_tokens, fixed_mask: prior injection: where ``fixed_mask`` (broadcastable to (B, G),
        bool) is True the token is ``fixed_tokens`` (broadcastable to (B, G), in 0..280) from the
        start and never changes.
    progress: True shows a tqdm bar of this call's ``steps`` unmasking steps; False or None
        none; a progress bar (anything with ``update(n)``, e.g. a caller's tqdm over every step of several batches,
        see :func:`sampling_bar`) is advanced by one per step instead. Never draws randomness.
    select: ``model_fn`` takes ``select=`` ((B, G) bool) and returns logits (K, 281) of the
        selected genes only; the sampler then asks only for the genes it unmasks. Same result,
        far less work when each step unmasks few genes (e.g. 256 steps).
    stratified: draw each token by inverting its softmax's CDF at a uniform that is
        stratified across the cells unmasking that gene at that step (Latin hypercube:
        :func:`stratified_uniforms`) rather than independently. Ours, off by default (SPEC:
        independent draws). Each token's distribution is unchanged, softmax(logits); only the
        cells of one batch stop being independent, so that the batch's tokens of a gene
        follow its distributions more closely than independent draws do.

    Every cell starts all-masked except its fixed genes. At step s the cosine schedule sets how
    many genes stay masked (round(n * cos(pi/2 * s/N)), n = the cell's free genes, as in
    :func:`unmask_schedule`); that many masked genes are chosen uniformly at random and their
    tokens drawn from softmax(logits), no temperature, no top-k. A step that unmasks no gene in
    any cell skips the model call. Returns tokens (B, G) long with no MASK_TOKEN left.
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")
    device = generator.device
    x = torch.full((n_cells, n_genes), MASK_TOKEN, dtype=torch.long, device=device)  # (B, G)
    if fixed_mask is not None:
        if fixed_tokens is None:
            raise ValueError("sample: fixed_mask given without fixed_tokens")
        fixed_mask = torch.as_tensor(fixed_mask, dtype=torch.bool, device=device).expand(n_cells, n_genes)  # (B, G)
        fixed_tokens = torch.as_tensor(fixed_tokens, dtype=torch.long, device=device).expand(n_cells, n_genes)
        if bool(((fixed_tokens[fixed_mask] < 0) | (fixed_tokens[fixed_mask] >= N_EXPR_TOKENS)).any()):
            raise ValueError(f"sample: fixed tokens must be expression tokens 0..{N_EXPR_TOKENS - 1}")
        x = torch.where(fixed_mask, fixed_tokens, x)
    n_free = (x == MASK_TOKEN).sum(1)  # (B,) genes to generate per cell

    own_bar = progress is True
    if own_bar:
        bar = sampling_bar(steps, 1, desc="unmasking")
    else:  # a caller's bar, or none (never tested for truth: an empty tqdm is falsy)
        bar = None if progress is False or progress is None else progress
    try:
        for s in range(1, steps + 1):
            _unmask_step(model_fn, x, s, steps, n_free, generator, cond, uncond, guidance, select,
                         stratified)
            if bar is not None:
                bar.update(1)
    finally:
        if own_bar:
            bar.close()
    return x


def sampling_bar(steps: int, n_batches: int, desc: str = "sampling", disable: bool = False):
    """A tqdm bar over every unmasking step of ``n_batches`` sampling batches (total
    ``steps * n_batches``, with its rate and ETA), for :func:`sample`'s ``progress``: the unit
    that moves, where a bar over batches would sit at 0 for minutes."""
    from tqdm.auto import tqdm

    return tqdm(total=int(steps) * int(n_batches), desc=desc, unit="step", disable=disable,
                dynamic_ncols=True)


def _unmask_step(model_fn: ModelFn, x: torch.Tensor, s: int, steps: int, n_free: torch.Tensor,
                 generator: torch.Generator, cond: Any, uncond: Any, guidance: float,
                 select: bool, stratified: bool) -> None:
    """Step ``s`` of :func:`sample`, on ``x`` in place."""
    n_cells, n_genes = x.shape
    device = x.device
    masked = x == MASK_TOKEN  # (B, G)
    n_unmask = masked.sum(1) - _masked_after(n_free, s, steps)  # (B,) from the cosine schedule
    if not bool((n_unmask > 0).any()):
        return  # no gene to unmask in any cell: no model call
    # uniform random choice among masked genes: rank random scores, masked genes first
    scores = torch.rand(n_cells, n_genes, generator=generator, device=device)  # (B, G) in [0, 1)
    scores = torch.where(masked, scores, torch.full_like(scores, 2.0))  # unmasked genes last
    order = scores.argsort(dim=1)  # (B, G)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_genes, device=device).expand_as(order))
    chosen = rank < n_unmask[:, None]  # (B, G)

    if select:
        logits = guided_logits(model_fn, x, cond, uncond, guidance, select=chosen)  # (K, 281)
    else:
        logits = guided_logits(model_fn, x, cond, uncond, guidance)[chosen]  # (K, 281)
    probs = torch.softmax(logits.float(), dim=-1)  # (K, 281), K = genes unmasked now
    if stratified:
        u = stratified_uniforms(chosen, generator)[chosen]  # (K,), in logits' row-major order
        x[chosen] = inverse_cdf(probs, u)
    else:
        x[chosen] = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (K,)


def stratified_uniforms(chosen: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, G) uniforms in [0, 1), stratified down each column over its ``chosen`` cells.

    chosen: (B, G) bool. In column g with c chosen cells, those cells get (r + v) / c, where r
    is a uniformly random permutation of 0..c-1 and v ~ U(0, 1) independently per cell: each
    value is U(0, 1) on its own, and the c values fall one in each of c equal strata. Entries
    outside ``chosen`` are meaningless.
    """
    B, G = chosen.shape
    keys = torch.rand(B, G, generator=generator, device=chosen.device)  # (B, G)
    keys = torch.where(chosen, keys, torch.full_like(keys, 2.0))  # chosen cells first
    order = keys.argsort(dim=0)  # (B, G)
    rank = torch.empty_like(order).scatter_(
        0, order, torch.arange(B, device=chosen.device)[:, None].expand(B, G))  # (B, G)
    jitter = torch.rand(B, G, generator=generator, device=chosen.device)  # (B, G)
    count = chosen.sum(0).clamp(min=1)  # (G,)
    return ((rank.float() + jitter) / count.float()).clamp(max=1.0 - 1e-7)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at which each row's cumulative ``probs`` (K, V) first exceeds ``u`` (K,):
    a draw from ``probs`` when u ~ U(0, 1). Returns (K,) long in 0..V-1."""
    cdf = probs.double().cumsum(-1)  # (K, V)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, whatever float rounding left
    tok = torch.searchsorted(cdf, u.double()[:, None], right=True).squeeze(1)  # (K,)
    return tok.clamp(max=probs.shape[-1] - 1)
