"""In-silico screening: does a model find the strong hits among the held-out conditions?

The use a virtual cell is built for is the screen: predict many perturbations and pick the
few worth running. This module scores that use, for every run of a dataset, on the held-out
conditions (context x perturbation) of its truth.

**Effects.** Each held-out condition gets an effect size from a set of its cells against the
real control cells of its context (``truth.h5ad``: log1p(CP10k)), three ways:

- ``l2_shift`` (the **primary** effect): the L2 norm over genes of the difference between
  the mean of the cells and the mean of the controls (pseudobulk shift). The **measured**
  one (real held-out cells) is corrected for the sampling noise of the two means
  (:func:`noise_corrected_shift`: the square root of the squared norm less each side's sum
  over genes of variance / cells, at least 0), which is unbiased in the square for two
  independent samples. Uncorrected, it sits at a floor at no effect that rises as the number
  of cells falls, so conditions with few cells looked strong: on a weak CRISPRi screen of four
  held-out conditions (69 to 100 cells), 79 to 94% of three conditions' squared norms were
  that floor, and a model whose predicted effects were only the noise of smaller subsamples
  of the controls ranked them perfectly (Spearman 1.0; 0.63 against the corrected effects).
  The **predicted** one is not corrected: a run's cells are taken as it gives them (a model
  that samples cells carries its sampling noise, as in MAE), and no one correction fits
  every model, since many derive their cells from the very control cells they are compared
  with (where the independent-sample correction would remove about twice the control mean's
  noise and flatten small effects to 0);
- ``energy``: the energy distance (Székely, Euclidean; within-set terms over distinct pairs,
  so that it does not grow as the number of cells falls) between the cells and the controls
  in a PCA space fitted once per dataset on the
  truth's real cells (held-out and control cells; scikit-learn ``PCA`` with the ARPACK solver,
  ``random_state`` = the config seed, ``N_PCS`` components, fitted on at most
  ``MAX_PCA_CELLS`` cells drawn with that seed); each side subsampled to at most
  ``MAX_ENERGY_CELLS`` cells (seeded per condition, so every run sees the same controls);
- ``n_de``: the number of genes differentially expressed between the cells and the controls:
  Welch's t-test per gene, Benjamini-Hochberg adjusted, ``padj < 0.05``.

The **predicted** effect takes a run's predicted cells of the condition, the **measured**
effect the real held-out cells; both against the same real controls.

**Hits.** The measured top quarter of the scored conditions, ``ceil(n / 4)`` of ``n`` (ties
in the measured effect broken by the L2 shift, then by the condition's name). **k** equals
the number of hits, so precision@k = recall@k (an R-precision) and a random ranking scores
the hit prevalence on both.

**Scores** (per run and effect quantity; predicted effects that differ by less than
``EFFECT_RTOL`` = 1e-6 of the largest measured effect, i.e. by rounding only, are ties): the
Spearman correlation of predicted vs measured
effects across conditions (average ranks for ties; a prediction that is the same for every
condition orders nothing and scores 0, the chance value, not NaN; NaN only with fewer than 3
conditions or constant measured effects); precision@k and recall@k of the hits among the k
conditions with the largest predicted effects (ties at the k-th place: the expected value
under random tie-breaking); the area under the precision-recall curve of calling hits by the
predicted effect, as average precision over the distinct predicted values (tied conditions
enter together), so that an all-tied prediction scores exactly the prevalence. Each has a
95% percentile interval from ``n_boot`` bootstrap draws of the conditions, drawn with
replacement within the hits and within the other conditions (so k and the prevalence stay
fixed), seeded from the config seed: every run is resampled with the same draws.

**Not encoded.** Conditions a model could not encode (``uns['lingshu']['not_encoded']``)
have no predicted cells: they are left out of that run's scores (hits stay those of all
conditions; k is the number of hits among the run's scored conditions) and counted.

**Data ceiling.** Each condition's real cells and each context's controls are split into two
seeded halves; the effects of half A (against control half A) "predict" those of half B
(against control half B), hits taken from half B. At half the cells on each side this is a
conservative (low) ceiling; it is not corrected to full depth.

**When.** Datasets whose truth holds at least ``MIN_CONDITIONS`` (4) held-out conditions,
whatever the split's kind; with fewer, the job writes an empty score table (and the measured
effects) and the report says why.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.evaluate.perturbation import (
    _read,
    not_encoded,
    validate_inputs,
    without_conditions,
)
from lingshu.io import write_table

log = logging.getLogger(__name__)

EFFECTS = ("l2_shift", "energy", "n_de")  # the primary first
PRIMARY = "l2_shift"
EFFECT_LABELS = {
    "l2_shift": "L2 mean shift (noise-corrected)",
    "energy": "energy distance (PCA)",
    "n_de": "number of DE genes",
}
SCORES = ("spearman", "precision_at_k", "recall_at_k", "auprc")
SCORE_LABELS = {
    "spearman": "Spearman",
    "precision_at_k": "precision@k",
    "recall_at_k": "recall@k",
    "auprc": "AUPRC",
}
MIN_CONDITIONS = 4  # fewer held-out conditions: no screening scores
EFFECT_RTOL = 1e-6  # predicted effects closer than this x the largest measured one are tied
HIT_FRACTION = 0.25  # hits: the measured top quarter
DE_ALPHA = 0.05  # BH-adjusted p-value threshold of n_de
N_PCS = 50
MAX_PCA_CELLS = 20_000
MAX_ENERGY_CELLS = 500
CEILING_RUN = "data ceiling"
ID_COLUMNS = [CONTEXT_COL, PERT_COL]
TABLE_COLUMNS = (
    ["run", "effect", "primary"]
    + [c for s in SCORES for c in (s, f"{s}_low", f"{s}_high")]
    + ["k", "n_conditions", "n_hits", "prevalence", "not_encoded"]
)


# --------------------------------------------------------------------------------------------
# Effects of a set of cells against controls
# --------------------------------------------------------------------------------------------


def _moments(x) -> tuple[int, np.ndarray, np.ndarray]:
    """(n cells, per-gene mean, per-gene unbiased variance) in float64; dense or sparse."""
    n = x.shape[0]
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0), dtype=np.float64).ravel()
        var = np.clip(sq - mean**2, 0.0, None)
        var[var < 1e-12 * (1.0 + mean**2)] = 0.0  # rounding on constant genes
    else:
        dense = np.asarray(x, dtype=np.float64)
        mean = dense.mean(axis=0)
        var = dense.var(axis=0)
    if n > 1:
        var = var * n / (n - 1)
    return n, mean, var


def welch_pvalues(n1: int, mean1: np.ndarray, var1: np.ndarray, n2: int, mean2: np.ndarray,
                  var2: np.ndarray) -> np.ndarray:
    """Two-sided p-values of Welch's t-test per gene from each side's moments.

    A gene with no variance on either side gets p = 1 when the means agree and p = 0 when
    they differ (the limit of the test; scipy's ``ttest_ind`` does the same).
    """
    s1, s2 = var1 / n1, var2 / n2
    se2 = s1 + s2
    diff = mean1 - mean2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = diff / np.sqrt(se2)
        df = se2**2 / (s1**2 / max(n1 - 1, 1) + s2**2 / max(n2 - 1, 1))
        p = 2.0 * stats.t.sf(np.abs(t), df)
    zero = se2 <= 0
    p[zero] = np.where(diff[zero] == 0, 1.0, 0.0)
    return np.where(np.isfinite(p), p, 1.0)


def count_de(n1, mean1, var1, n2, mean2, var2, alpha: float = DE_ALPHA) -> int:
    """Genes with Benjamini-Hochberg adjusted Welch p-value below ``alpha``."""
    if n1 < 2 or n2 < 2 or mean1.size == 0:
        return -1  # undefined (read as NaN by callers)
    padj = stats.false_discovery_control(welch_pvalues(n1, mean1, var1, n2, mean2, var2),
                                         method="bh")
    return int(np.sum(padj < alpha))


def _within(x: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs of rows (0 with fewer than 2 rows)."""
    n = len(x)
    return float(cdist(x, x).sum() / (n * (n - 1))) if n > 1 else 0.0


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance ``2 E|A - B| - E|A - A'| - E|B - B'|`` (Euclidean; the within-set
    terms over distinct pairs, i.e. U-statistics, so that its expected value does not depend
    on the number of cells: it is about 0, and may come out slightly negative, for two
    samples of one distribution, and exactly 0 between identical constant sets)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(2 * cdist(a, b).mean() - _within(a) - _within(b))


@dataclass
class PcaBasis:
    """A PCA fitted on real cells: what :func:`project` needs."""

    mean: np.ndarray  # (n_genes,)
    components: np.ndarray  # (k, n_genes)


def fit_basis(x, n_components: int = N_PCS, seed: int = 0,
              max_cells: int = MAX_PCA_CELLS) -> PcaBasis:
    """PCA of real cells (scikit-learn, ARPACK solver, ``random_state=seed``; the same basis
    for dense and sparse input), fitted on at most ``max_cells`` rows drawn with ``seed``."""
    from sklearn.decomposition import PCA

    n, g = x.shape
    if n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
        x = x[rows]
        n = max_cells
    k = max(1, min(int(n_components), n - 1, g - 1))
    pca = PCA(n_components=k, svd_solver="arpack", random_state=seed)
    pca.fit(x if sp.issparse(x) else np.asarray(x, dtype=np.float64))
    return PcaBasis(mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64))


def project(x, basis: PcaBasis) -> np.ndarray:
    """Scores of cells on a fitted basis, (n, k)."""
    scores = x @ basis.components.T
    scores = np.asarray(scores, dtype=np.float64)
    return scores - basis.mean @ basis.components.T


@dataclass
class Reference:
    """The control cells of one context, summarised once for every condition of it."""

    n: int
    mean: np.ndarray
    var: np.ndarray
    scores: np.ndarray | None  # PCA scores of the controls (None without a basis)


def reference(controls, basis: PcaBasis | None = None) -> Reference:
    n, mean, var = _moments(controls)
    return Reference(n, mean, var, None if basis is None else project(controls, basis))


def _subsample(n: int, rng: np.random.Generator, max_cells: int = MAX_ENERGY_CELLS) -> np.ndarray:
    return np.arange(n) if n <= max_cells else np.sort(rng.choice(n, max_cells, replace=False))


def condition_rng(seed: int, context: str, perturbation: str) -> np.random.Generator:
    """The generator of one condition's subsamples: the same for every run and the truth."""
    return np.random.default_rng([int(seed), zlib.crc32(f"{context}\x1f{perturbation}".encode())])


def noise_corrected_shift(n: int, mean: np.ndarray, var: np.ndarray, ref: Reference) -> float:
    """sqrt(max(0, ||mean - ref.mean||^2 - sum(var) / n - sum(ref.var) / ref.n)): the L2 norm
    of a mean shift less the sampling noise of the two means (each side's term only with at
    least 2 cells; ``var``: unbiased per-gene variances). ``E||xbar - ybar||^2 = ||delta||^2
    + sum(var_x) / n_x + sum(var_y) / n_y`` for independent samples."""
    d2 = float(np.sum((mean - ref.mean) ** 2))
    noise = (float(var.sum()) / n if n > 1 else 0.0) + (
        float(ref.var.sum()) / ref.n if ref.n > 1 else 0.0)
    return math.sqrt(max(d2 - noise, 0.0))


def effects_against(cells, ref: Reference, basis: PcaBasis | None,
                    rng: np.random.Generator, corrected: bool = False) -> dict[str, float]:
    """The three effect sizes of ``cells`` (log1p(CP10k), cells x genes) against controls
    summarised in ``ref``: ``l2_shift`` (less the means' sampling noise with ``corrected``,
    for a measured effect), ``energy`` (NaN without a basis) and ``n_de`` (NaN with fewer than
    2 cells on a side)."""
    n, mean, var = _moments(cells)
    if n == 0:
        return {"l2_shift": float("nan"), "energy": float("nan"), "n_de": float("nan")}
    energy = float("nan")
    if basis is not None and ref.scores is not None:
        ctrl = ref.scores[_subsample(len(ref.scores), rng)]  # controls first: same for all runs
        rows = _subsample(n, rng)
        energy = energy_distance(project(cells[rows], basis), ctrl)
    n_de = count_de(n, mean, var, ref.n, ref.mean, ref.var)
    shift = (noise_corrected_shift(n, mean, var, ref) if corrected
             else float(np.linalg.norm(mean - ref.mean)))
    return {"l2_shift": shift, "energy": energy,
            "n_de": float("nan") if n_de < 0 else float(n_de)}


def effects(cells, controls, basis: PcaBasis | None = None, seed: int = 0,
            corrected: bool = False) -> dict[str, float]:
    """The effect sizes of a set of cells against a set of control cells (see the module's
    docstring); ``energy`` needs a ``basis`` (:func:`fit_basis`), else NaN."""
    return effects_against(cells, reference(controls, basis), basis,
                           np.random.default_rng(seed), corrected)


# --------------------------------------------------------------------------------------------
# Effects of every held-out condition
# --------------------------------------------------------------------------------------------


def _rows_by_condition(adata: ad.AnnData) -> dict[tuple[str, str], np.ndarray]:
    """(context, perturbation) -> row indices; controls under (context, CONTROL)."""
    obs = adata.obs[ID_COLUMNS].astype(str)
    return {key: np.asarray(idx) for key, idx in obs.groupby(ID_COLUMNS, sort=True).indices.items()}


def heldout_conditions(truth: ad.AnnData) -> list[tuple[str, str]]:
    """The truth's held-out conditions (context, perturbation), sorted."""
    return sorted(k for k in _rows_by_condition(truth) if k[1] != CONTROL)


def _references(truth: ad.AnnData, rows: dict, basis: PcaBasis | None) -> dict[str, Reference]:
    return {ctx: reference(truth.X[idx], basis) for (ctx, pert), idx in rows.items()
            if pert == CONTROL}


def condition_effects(cells: ad.AnnData, truth: ad.AnnData, basis: PcaBasis | None,
                      seed: int = 0, references: dict[str, Reference] | None = None,
                      corrected: bool = False) -> pd.DataFrame:
    """Effects of every held-out condition of ``cells`` (the truth itself, or a prediction)
    against the truth's real controls of its context (``corrected``: the measured effects'
    L2 shift, less the means' sampling noise).

    Returns one row per (context, perturbation) of ``cells`` other than controls, sorted:
    ``context``, ``perturbation``, ``n_cells`` and one column per effect (:data:`EFFECTS`).
    """
    t_rows = _rows_by_condition(truth)
    refs = references if references is not None else _references(truth, t_rows, basis)
    out = []
    for (ctx, pert), idx in _rows_by_condition(cells).items():
        if pert == CONTROL:
            continue
        if ctx not in refs:
            raise ValueError(f"no real control cells for context {ctx!r} in the truth")
        found = effects_against(cells.X[idx], refs[ctx], basis, condition_rng(seed, ctx, pert),
                                corrected)
        out.append({CONTEXT_COL: ctx, PERT_COL: pert, "n_cells": int(idx.size), **found})
    return pd.DataFrame(out, columns=[*ID_COLUMNS, "n_cells", *EFFECTS])


def ceiling_effects(truth: ad.AnnData, basis: PcaBasis | None, seed: int = 0) -> pd.DataFrame:
    """The data ceiling's effects: per held-out condition, half A of its real cells against
    half A of the context's controls (``predicted_*``, as a run's) and half B against half B
    (``measured_*``, the L2 shift corrected as the truth's); the halves drawn with ``seed``
    (controls per context, cells per condition). Conditions with fewer than 2 cells have no
    halves and are left out."""
    rows = _rows_by_condition(truth)
    halves = {}
    for (ctx, pert), idx in rows.items():
        rng = condition_rng(seed + 1, ctx, pert)
        order = rng.permutation(idx)
        halves[(ctx, pert)] = (np.sort(order[: idx.size // 2]), np.sort(order[idx.size // 2:]))
    refs = {ctx: tuple(reference(truth.X[half], basis) for half in pair)
            for (ctx, pert), pair in halves.items() if pert == CONTROL}
    out = []
    for (ctx, pert), (a, b) in halves.items():
        if pert == CONTROL or a.size < 1 or b.size < 1:
            continue
        if ctx not in refs:
            raise ValueError(f"no real control cells for context {ctx!r} in the truth")
        rng = condition_rng(seed, ctx, pert)
        pa = effects_against(truth.X[a], refs[ctx][0], basis, rng)
        pb = effects_against(truth.X[b], refs[ctx][1], basis, rng, corrected=True)
        out.append({CONTEXT_COL: ctx, PERT_COL: pert, "n_cells": int(a.size + b.size),
                    **{f"predicted_{e}": pa[e] for e in EFFECTS},
                    **{f"measured_{e}": pb[e] for e in EFFECTS}})
    columns = [*ID_COLUMNS, "n_cells", *(f"{s}_{e}" for s in ("predicted", "measured")
                                         for e in EFFECTS)]
    return pd.DataFrame(out, columns=columns).sort_values(ID_COLUMNS, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def n_hits_of(n: int, fraction: float = HIT_FRACTION) -> int:
    """Number of hits among ``n`` conditions: the top ``fraction``, at least 1."""
    return max(1, math.ceil(fraction * n)) if n > 0 else 0


def hit_flags(measured: np.ndarray, tiebreak: np.ndarray | None = None,
              fraction: float = HIT_FRACTION) -> np.ndarray:
    """True for the ``n_hits_of(n)`` largest measured effects; ties broken by ``tiebreak``
    (larger first), then by position (the callers' rows are sorted by condition)."""
    measured = np.asarray(measured, dtype=np.float64)
    n = measured.size
    tie = np.zeros(n) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
    order = np.lexsort((np.arange(n), -tie, -measured))  # last key sorts first
    flags = np.zeros(n, dtype=bool)
    flags[order[: n_hits_of(n, fraction)]] = True
    return flags


def spearman(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Spearman correlation with average ranks; 0 (chance) when the prediction is constant,
    NaN with fewer than 3 conditions or constant measured effects."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.size < 3 or np.ptp(m) == 0:
        return float("nan")
    if np.ptp(p) == 0:
        return 0.0
    rp, rm = stats.rankdata(p), stats.rankdata(m)
    rp, rm = rp - rp.mean(), rm - rm.mean()
    return float((rp * rm).sum() / np.sqrt((rp**2).sum() * (rm**2).sum()))


def expected_hits_in_top_k(predicted: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Expected number of hits among the ``k`` largest predicted effects when ties at the
    k-th place are broken at random: every condition above the k-th value counts, the tied
    group at it contributes ``(places left) x (its share of hits)``."""
    p, h = np.asarray(predicted, np.float64), np.asarray(hits, bool)
    if k <= 0 or p.size == 0:
        return 0.0
    k = min(int(k), p.size)
    threshold = np.sort(p)[::-1][k - 1]
    above = p > threshold
    tied = p == threshold
    left = k - int(above.sum())
    return float(h[above].sum() + left * h[tied].sum() / tied.sum())


def precision_at_k(predicted: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Expected share of hits among the k largest predicted effects (random tie-breaking)."""
    return expected_hits_in_top_k(predicted, hits, k) / k if k > 0 else float("nan")


def recall_at_k(predicted: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Expected share of the hits found among the k largest predicted effects."""
    n_hits = int(np.sum(hits))
    return expected_hits_in_top_k(predicted, hits, k) / n_hits if n_hits else float("nan")


def average_precision(predicted: np.ndarray, hits: np.ndarray) -> float:
    """Area under the precision-recall curve of calling hits by predicted effect: average
    precision over the distinct predicted values, ``sum_t (R_t - R_t-1) P_t`` (a tied group
    enters at once; scikit-learn's ``average_precision_score``), so an all-tied prediction
    scores the prevalence and a perfect ranking 1."""
    p, h = np.asarray(predicted, np.float64), np.asarray(hits, bool)
    n_hits = int(h.sum())
    if n_hits == 0:
        return float("nan")
    order = np.argsort(-p, kind="stable")
    p, h = p[order], h[order]
    last = np.r_[np.flatnonzero(np.diff(p) != 0), p.size - 1]  # end of each tied group
    tp = np.cumsum(h)[last]
    precision = tp / (last + 1)
    recall = tp / n_hits
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tied_within_rounding(predicted: np.ndarray, measured: np.ndarray,
                         rtol: float = EFFECT_RTOL) -> np.ndarray:
    """Predicted effects rounded to ``rtol`` x the largest measured effect, so that effects
    differing by floating-point rounding only (the same predicted profile against two
    contexts' controls, a no-change prediction) are ties, not an order."""
    scale = float(np.max(np.abs(measured))) if len(measured) else 0.0
    if not np.isfinite(scale) or scale == 0:
        return predicted
    step = rtol * scale
    return np.round(predicted / step) * step


def _all_scores(predicted, measured, hits, k) -> dict[str, float]:
    return {"spearman": spearman(predicted, measured),
            "precision_at_k": precision_at_k(predicted, hits, k),
            "recall_at_k": recall_at_k(predicted, hits, k),
            "auprc": average_precision(predicted, hits)}


def screening_scores(predicted: np.ndarray, measured: np.ndarray,
                     hits: np.ndarray | None = None, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """The screening scores of one run and effect quantity, with bootstrap 95% intervals.

    predicted / measured: effects of the same conditions (NaN pairs dropped). hits: the hit
    flags (default :func:`hit_flags` of ``measured``). k is the number of hits. The
    intervals: ``n_boot`` draws of the conditions with replacement within the hits and within
    the others (k and the prevalence stay fixed), ``np.random.default_rng(seed)``; the 2.5th
    and 97.5th percentiles of each score (NaN draws ignored; NaN when ``n_boot`` is 0).

    Returns every score of :data:`SCORES`, its ``_low`` and ``_high``, and ``k``,
    ``n_conditions``, ``n_hits``, ``prevalence``.
    """
    p = np.asarray(predicted, np.float64)
    m = np.asarray(measured, np.float64)
    h = hit_flags(m) if hits is None else np.asarray(hits, bool)
    keep = np.isfinite(p) & np.isfinite(m)
    p, m, h = tied_within_rounding(p[keep], m[keep]), m[keep], h[keep]
    n, n_hits = int(p.size), int(h.sum())
    k = n_hits
    out: dict[str, float] = {}
    point = _all_scores(p, m, h, k) if n else dict.fromkeys(SCORES, float("nan"))
    draws = {s: [] for s in SCORES}
    if n_boot > 0 and n and n_hits:
        rng = np.random.default_rng(seed)
        pos, neg = np.flatnonzero(h), np.flatnonzero(~h)
        for _ in range(n_boot):
            idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size) if neg.size
                        else np.zeros(0, int)]
            for name, value in _all_scores(p[idx], m[idx], h[idx], k).items():
                draws[name].append(value)
    for name in SCORES:
        out[name] = point[name]
        values = np.asarray(draws[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [2.5, 97.5]) if values.size
                     else (float("nan"), float("nan")))
        out[f"{name}_low"], out[f"{name}_high"] = float(low), float(high)
    out.update(k=k, n_conditions=n, n_hits=n_hits, prevalence=n_hits / n if n else float("nan"))
    return out


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _hit_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``hit_<effect>`` from the ``measured_<effect>`` columns (NaN effects: no hit)."""
    for effect in EFFECTS:
        m = frame[f"measured_{effect}"].to_numpy(float)
        tie = frame[f"measured_{PRIMARY}"].to_numpy(float)
        flags = np.zeros(len(frame), dtype=bool)
        ok = np.isfinite(m)
        flags[ok] = hit_flags(m[ok], np.nan_to_num(tie[ok], nan=-np.inf))
        frame[f"hit_{effect}"] = flags
    return frame


def _score_rows(run: str, frame: pd.DataFrame, n_boot: int, seed: int,
                n_not_encoded: int) -> list[dict]:
    """One row per effect quantity of a run's effects table (hits already flagged)."""
    rows = []
    for effect in EFFECTS:
        scored = frame[frame[f"predicted_{effect}"].notna() & frame[f"measured_{effect}"].notna()]
        scores = screening_scores(scored[f"predicted_{effect}"].to_numpy(float),
                                  scored[f"measured_{effect}"].to_numpy(float),
                                  scored[f"hit_{effect}"].to_numpy(bool), n_boot=n_boot,
                                  seed=seed)
        rows.append({"run": run, "effect": effect, "primary": effect == PRIMARY, **scores,
                     "not_encoded": n_not_encoded})
    return rows


EFFECT_COLUMNS = (["run", *ID_COLUMNS, "n_cells_predicted", "n_cells_measured"]
                  + [f"{s}_{e}" for e in EFFECTS for s in ("predicted", "measured", "hit")])


def screening_job(truth_path: str, pred_paths: dict[str, str], table_path: str,
                  effects_path: str, n_boot: int = 1000, seed: int = 0,
                  ceiling: bool = True) -> pd.DataFrame:
    """Score every run's screen of the held-out conditions and write both tables.

    Args:
        truth_path: the dataset's ``truth.h5ad``.
        pred_paths: run name -> prediction h5ad (or AnnData).
        table_path: ``screening.tsv``: one row per run (and the data ceiling) and effect
            quantity: ``run``, ``effect``, ``primary`` (the L2 shift), each score of
            :data:`SCORES` with ``_low`` / ``_high`` (95% bootstrap interval), ``k``,
            ``n_conditions`` (scored), ``n_hits``, ``prevalence`` (n_hits / n_conditions:
            chance for precision@k, recall@k and AUPRC), ``not_encoded`` (conditions left
            out). No rows when the truth holds fewer than :data:`MIN_CONDITIONS` held-out
            conditions.
        effects_path: ``screening_effects.tsv``: per run (and the ceiling) and condition,
            ``predicted_<effect>``, ``measured_<effect>`` and ``hit_<effect>`` of every effect.
        n_boot / seed: bootstrap draws and seed (also the seed of the PCA, the subsamples and
            the ceiling's halves).
        ceiling: also score the data ceiling.

    Returns the score table.
    """
    truth, truth_label = _read(truth_path, "truth")
    conditions = heldout_conditions(truth)
    basis = fit_basis(truth.X, seed=seed)
    t_rows = _rows_by_condition(truth)
    refs = _references(truth, t_rows, basis)
    measured = condition_effects(truth, truth, basis, seed, refs, corrected=True).rename(
        columns={"n_cells": "n_cells_measured", **{e: f"measured_{e}" for e in EFFECTS}})
    measured = _hit_columns(measured)
    effects_rows, table_rows = [], []
    enough = len(conditions) >= MIN_CONDITIONS
    if not enough:
        log.warning("%s: %d held-out condition(s); screening scores need at least %d",
                    truth_label, len(conditions), MIN_CONDITIONS)
    for run, path in pred_paths.items():
        pred, pred_label = _read(path, "prediction")
        skipped = not_encoded(pred)
        validate_inputs(without_conditions(truth, skipped), pred, truth_label, pred_label)
        predicted = condition_effects(pred, truth, basis, seed, refs).rename(
            columns={"n_cells": "n_cells_predicted", **{e: f"predicted_{e}" for e in EFFECTS}})
        frame = measured.merge(predicted, on=ID_COLUMNS, how="inner")
        frame.insert(0, "run", run)
        effects_rows.append(frame)
        if enough:
            table_rows += _score_rows(run, frame, n_boot, seed, len(skipped))
        log.info("%s: %d conditions scored, %d not encoded", run, len(frame), len(skipped))
    if ceiling and enough:
        frame = _hit_columns(ceiling_effects(truth, basis, seed).rename(
            columns={"n_cells": "n_cells_measured"}))
        frame["n_cells_predicted"] = frame["n_cells_measured"]
        frame.insert(0, "run", CEILING_RUN)
        effects_rows.append(frame)
        table_rows += _score_rows(CEILING_RUN, frame, n_boot, seed, 0)
    if not effects_rows:  # no run: the measured effects alone
        effects_rows.append(measured.assign(run=""))
    effects_table = pd.concat(effects_rows, ignore_index=True).reindex(columns=EFFECT_COLUMNS)
    table = pd.DataFrame(table_rows, columns=TABLE_COLUMNS)
    write_table(effects_table, effects_path)
    write_table(table, table_path)
    return table
