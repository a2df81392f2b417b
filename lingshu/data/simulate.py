"""Simulated single-cell perturbation screens: the pipeline's embedded default dataset.

The generative model, per cell ``c`` and gene ``g`` (natural logs throughout)::

    log mu[c, g] = context_log_mean[type(c), g]      # gene base mean + type shift + markers
                 + donor_effect[donor(c), g]           # small per-donor gene shifts
                 + batch_effect[batch(c), g]           # small per-lane gene shifts
                 + true_lfc[pert(c), type(c), g]       # 0 for controls
                 + scores[c] @ program_loadings[:, g]  # continuous within-type heterogeneity
                 + log size_factor[c]                  # library size (log-normal x lane depth)
    counts[c, g] ~ NegativeBinomial(mean=mu[c, g], theta=theta[g])   # var = mu + mu^2 / theta

``true_lfc`` of a knockdown sets its target to 10-30 % of its level and propagates the change
through a sparse signed random gene-regulatory network (a DAG, a few saturating steps, edges
partly context-specific). A stimulation raises / lowers a shared response program whose size
differs by cell type, plus a few type-specific genes, then propagates through the same network.

The ground truth (params, GRN, base means, markers, donor / batch effects, every true
log-fold-change vector) is stored in ``adata.uns['simulation']`` so evaluations can use it.

Counts are drawn chunk by chunk of cells and assembled into CSR, so memory stays near the size of
the final sparse matrix (200,000 cells x 18,080 genes fits in a few GB).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from lingshu.constants import CONTROL
from lingshu.errors import InputError, input_error
from lingshu.stats import sample_negative_binomial

# Cells x genes entries per chunk: arrays of ~16 MB (float32) keep the peak memory small while
# the per-chunk Python overhead stays negligible. Fixed, so the output never depends on the machine.
_CHUNK_ENTRIES = 4_000_000
# Ceiling of a single NB mean (UMIs): guards against exp() overflow from stacked effects.
_MAX_MEAN = 1e4


@dataclass
class SimulationParams:
    """Everything that defines a simulated dataset; the defaults are the default pipeline's data.

    Effects are natural-log fold changes. Means are UMIs per cell at size factor 1.
    """

    # --- sizes
    n_genes: int = 1500
    n_cells: int = 6000
    n_contexts: int = 3  # cell types
    n_donors: int = 2
    n_batches: int = 2  # sequencing lanes; donors are multiplexed across lanes
    n_knockdowns: int = 16
    n_stimulations: int = 0
    control_fraction: float = 0.2  # fraction of cells that are controls
    # --- gene means and dispersion
    gene_mean_median: float = 0.05  # median per-gene mean (UMIs/cell): ~85 % zeros overall
    gene_mean_log_sd: float = 2.0  # log-normal spread: means span ~1e-3 .. ~50
    gene_mean_min: float = 3e-4
    gene_mean_max: float = 100.0
    dispersion_theta_median: float = 3.0  # NB theta at the median mean (smaller = noisier)
    dispersion_mean_slope: float = 0.2  # theta grows with the mean, as in real UMI data
    dispersion_log_sd: float = 0.5  # gene-specific scatter of log theta
    # --- library size
    library_size_log_sd: float = 0.35  # per-cell log-normal size factor
    batch_depth_log_sd: float = 0.1  # per-lane sequencing depth
    # --- cell types, donors, batches, within-type programs
    context_shift_sd: float = 0.25  # every gene shifts a little between types
    n_markers_per_context: int = 10
    marker_lfc_min: float = 1.5
    marker_lfc_max: float = 3.5
    donor_effect_sd: float = 0.1
    batch_effect_sd: float = 0.05
    n_cell_programs: int = 3  # continuous latent programs (e.g. cell cycle, stress)
    program_gene_fraction: float = 0.05
    program_loading_sd: float = 0.4
    # --- gene-regulatory network
    grn_regulator_fraction: float = 0.05  # genes with outgoing edges (knockdown targets always are)
    grn_mean_out_degree: float = 20.0  # heavy-tailed (log-normal) out-degree around this mean
    grn_weight_median: float = 0.35  # |edge weight|: LFC passed on per unit LFC of the regulator
    grn_positive_fraction: float = 0.6
    regulator_strength_log_sd: float = 0.8  # per-regulator scale: some strong, many weak
    grn_context_edge_keep: float = 0.85  # each edge is active in a type with this probability
    grn_propagation_steps: int = 3
    lfc_saturation: float = 3.0  # |LFC| saturates smoothly at this value (tanh)
    # --- knockdowns
    knockdown_residual_min: float = 0.1  # the target keeps 10-30 % of its level
    knockdown_residual_max: float = 0.3
    knockdown_min_mean: float = 0.3  # targets are chosen among genes at least this expressed
    # --- stimulations
    stim_n_up: int = 40
    stim_n_down: int = 15
    stim_lfc_median: float = 1.0
    stim_lfc_log_sd: float = 0.5
    stim_context_scale_min: float = 0.3  # the whole program is scaled per type in this range
    stim_context_scale_max: float = 1.5
    stim_n_context_specific: int = 10  # genes responding in one type only
    seed: int = 0


# Checks applied to every params object: (fields, predicate, what must hold).
_POSITIVE = (
    "n_genes", "n_cells", "n_contexts", "n_donors", "n_batches", "gene_mean_median",
    "gene_mean_min", "gene_mean_max", "dispersion_theta_median", "grn_weight_median",
    "grn_propagation_steps", "lfc_saturation", "stim_lfc_median", "grn_mean_out_degree",
)
_NON_NEGATIVE = (
    "n_knockdowns", "n_stimulations", "gene_mean_log_sd", "dispersion_log_sd",
    "library_size_log_sd", "batch_depth_log_sd", "context_shift_sd", "n_markers_per_context",
    "marker_lfc_min", "donor_effect_sd", "batch_effect_sd", "n_cell_programs",
    "program_loading_sd", "regulator_strength_log_sd", "knockdown_min_mean", "stim_n_up",
    "stim_n_down", "stim_lfc_log_sd", "stim_context_scale_min", "stim_n_context_specific", "seed",
)
_FRACTIONS = (
    "program_gene_fraction", "grn_regulator_fraction", "grn_positive_fraction",
    "grn_context_edge_keep",
)
_ORDERED = (
    ("gene_mean_min", "gene_mean_max"), ("marker_lfc_min", "marker_lfc_max"),
    ("knockdown_residual_min", "knockdown_residual_max"),
    ("stim_context_scale_min", "stim_context_scale_max"),
)


# ----------------------------------------------------------------------------- parameters


def params_from_dict(d: Mapping, source: str = "simulation params") -> SimulationParams:
    """Build :class:`SimulationParams` from a config mapping (missing keys keep their defaults).

    ``source`` names where the mapping came from, for the error message. Raises
    :class:`~lingshu.errors.InputError` naming the key on an unknown key, a value of the wrong
    type or a value out of range.
    """
    if not isinstance(d, Mapping):
        raise input_error(source, "simulate", f"expected a mapping of parameters, got {type(d).__name__}",
                          "write the parameters as `key: value` pairs, e.g. {n_knockdowns: 16}")
    fields = {f.name: f for f in dataclasses.fields(SimulationParams)}
    values = {}
    for key, value in d.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise input_error(source, str(key), "unknown simulation parameter",
                              f"{hint}valid keys are: {', '.join(sorted(fields))}")
        values[key] = _coerce(key, value, fields[key].type, source)
    params = SimulationParams(**values)
    validate_params(params, source)
    return params


def _coerce(key: str, value: object, annotation: str, source: str) -> int | float:
    """Check one value against its field's type (``'int'`` or ``'float'``) and return it typed."""
    # bool is an int subclass; `n_cells: true` is always a mistake.
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise input_error(source, key, f"expected an integer, got {value!r}", f"set `{key}` to a whole number")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise input_error(source, key, f"expected a number, got {value!r}", f"set `{key}` to a number")
    if not math.isfinite(float(value)):
        raise input_error(source, key, f"expected a finite number, got {value!r}", f"set `{key}` to a finite number")
    return float(value)


def validate_params(params: SimulationParams, source: str = "SimulationParams") -> None:
    """Raise :class:`~lingshu.errors.InputError` naming the first field whose value cannot work."""
    p = params
    for name in _POSITIVE:
        if not getattr(p, name) > 0:
            raise input_error(source, name, f"must be > 0, got {getattr(p, name)!r}", f"set `{name}` to a positive value")
    for name in _NON_NEGATIVE:
        if not getattr(p, name) >= 0:
            raise input_error(source, name, f"must be >= 0, got {getattr(p, name)!r}", f"set `{name}` to 0 or more")
    for name in _FRACTIONS:
        if not 0 <= getattr(p, name) <= 1:
            raise input_error(source, name, f"must lie in [0, 1], got {getattr(p, name)!r}", f"set `{name}` between 0 and 1")
    for lo, hi in _ORDERED:
        if getattr(p, lo) > getattr(p, hi):
            raise input_error(source, lo, f"{lo}={getattr(p, lo)!r} exceeds {hi}={getattr(p, hi)!r}",
                              f"make `{lo}` <= `{hi}`")
    if not 0 < p.control_fraction < 1:
        raise input_error(source, "control_fraction", f"must lie strictly between 0 and 1, got {p.control_fraction!r}",
                          "set `control_fraction` to e.g. 0.2")
    if not 0 < p.knockdown_residual_min <= p.knockdown_residual_max < 1:
        raise input_error(source, "knockdown_residual_min", "knockdown residuals must satisfy 0 < min <= max < 1",
                          "use e.g. knockdown_residual_min: 0.1, knockdown_residual_max: 0.3")
    if p.n_knockdowns + p.n_stimulations < 1:
        raise input_error(source, "n_knockdowns", "the dataset would have no perturbation",
                          "set `n_knockdowns` or `n_stimulations` to 1 or more")
    # Every gene set is drawn without replacement; keep half the panel free of designed roles.
    reserved = p.n_knockdowns + p.n_contexts * p.n_markers_per_context
    if reserved > p.n_genes // 2:
        raise input_error(source, "n_genes", f"{p.n_genes} genes cannot hold {p.n_knockdowns} knockdown targets and "
                          f"{p.n_contexts} x {p.n_markers_per_context} marker genes in half the panel",
                          f"set `n_genes` to at least {2 * reserved}")
    stim_genes = p.stim_n_up + p.stim_n_down + p.n_contexts * p.stim_n_context_specific
    if p.n_stimulations and stim_genes > p.n_genes // 2:
        raise input_error(source, "n_genes", f"a stimulation program of {stim_genes} genes needs more than "
                          f"{p.n_genes} genes", f"set `n_genes` to at least {2 * stim_genes} or shrink stim_n_up")
    # Every (perturbation, type, donor) combination must receive cells (property of the design).
    combos = p.n_contexts * p.n_donors
    n_ctrl, per_pert = _condition_sizes(p)
    if n_ctrl < combos or per_pert < combos:
        n_perts = p.n_knockdowns + p.n_stimulations
        need = math.ceil(max(combos / p.control_fraction, combos * n_perts / (1 - p.control_fraction) + 1))
        raise input_error(source, "n_cells", f"{p.n_cells} cells leave fewer than one cell per condition x "
                          f"cell type x donor ({n_ctrl} controls, {per_pert} cells per perturbation)",
                          f"set `n_cells` to at least {need}")


def _condition_sizes(p: SimulationParams) -> tuple[int, int]:
    """Return (number of control cells, minimum number of cells per perturbation)."""
    n_ctrl = int(round(p.control_fraction * p.n_cells))
    n_perts = p.n_knockdowns + p.n_stimulations
    return n_ctrl, (p.n_cells - n_ctrl) // max(n_perts, 1)


# ----------------------------------------------------------------------------- names


def gene_symbols(n_genes: int) -> np.ndarray:
    """Gene symbols ``GENE00001`` ... (at least five digits), shape (n_genes,)."""
    width = max(5, len(str(n_genes)))
    return np.array([f"GENE{i:0{width}d}" for i in range(1, n_genes + 1)])


def context_names(n: int) -> list[str]:
    """Cell type names ``type_A``, ``type_B``, ... (``type_27`` ... past the alphabet)."""
    return [f"type_{chr(ord('A') + i)}" if i < 26 else f"type_{i + 1}" for i in range(n)]


def _numbered(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n + 1)]


# ----------------------------------------------------------------------------- structure


@dataclass
class _Truth:
    """The dataset-level ground truth (everything except the per-cell draws)."""

    genes: np.ndarray  # (G,) symbols
    gene_log_mean: np.ndarray  # (G,) log base mean, before type effects
    theta: np.ndarray  # (G,) NB dispersion (var = mu + mu^2 / theta)
    contexts: list[str]
    context_log_mean: np.ndarray  # (C, G) base + type shift + markers
    markers: dict[str, list[str]]
    donors: list[str]
    donor_effects: np.ndarray  # (D, G)
    batches: list[str]
    batch_effects: np.ndarray  # (B, G)
    batch_depth: np.ndarray  # (B,) multiplicative depth per lane
    program_loadings: np.ndarray  # (K, G), zero outside the program genes
    grn_source: np.ndarray  # (E,) gene index
    grn_target: np.ndarray  # (E,)
    grn_weight: np.ndarray  # (E,)
    grn_active: np.ndarray  # (E, C) bool
    regulators: np.ndarray  # (R,) gene index
    perturbations: list[str]  # (P,) knockdowns then stimulations
    perturbation_kind: list[str]  # (P,) 'knockdown' | 'stimulation'
    knockdown_residual: np.ndarray  # (n_knockdowns,)
    stim_programs: dict[str, dict]
    true_lfc: np.ndarray  # (P, C, G) float32


def _draw_gene_means(p: SimulationParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene log base mean and NB theta, each shape (n_genes,).

    Log-normal means span several orders of magnitude; theta rises gently with the mean (real
    UMI data: highly expressed genes are relatively less overdispersed) with gene-specific scatter.
    """
    mean = rng.lognormal(math.log(p.gene_mean_median), p.gene_mean_log_sd, p.n_genes)
    log_mean = np.log(np.clip(mean, p.gene_mean_min, p.gene_mean_max))
    log_theta = (math.log(p.dispersion_theta_median)
                 + p.dispersion_mean_slope * (log_mean - math.log(p.gene_mean_median))
                 + rng.normal(0.0, p.dispersion_log_sd, p.n_genes))
    return log_mean, np.exp(np.clip(log_theta, math.log(0.05), math.log(1e3)))


def _choose_knockdown_targets(p: SimulationParams, log_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of the knockdown targets, shape (n_knockdowns,), among reasonably expressed genes.

    Falls back to the most expressed genes when too few pass ``knockdown_min_mean``.
    """
    eligible = np.flatnonzero(log_mean >= math.log(max(p.knockdown_min_mean, 1e-12)))
    if eligible.size < p.n_knockdowns:
        eligible = np.argsort(-log_mean)[: max(p.n_knockdowns, 1)]
    return rng.choice(eligible, size=p.n_knockdowns, replace=False)


def _draw_context_effects(p: SimulationParams, log_mean: np.ndarray, reserved: np.ndarray,
                          rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-type log means (n_contexts, n_genes) and each type's marker gene indices.

    Markers are moderately expressed genes (not knockdown targets, which must stay comparable
    across types) raised strongly in their own type only.
    """
    ctx_log_mean = log_mean[None, :] + rng.normal(0.0, p.context_shift_sd, (p.n_contexts, p.n_genes))
    candidates = np.setdiff1d(np.flatnonzero((log_mean > math.log(0.01)) & (log_mean < math.log(3.0))), reserved)
    n_needed = p.n_contexts * p.n_markers_per_context
    if candidates.size < n_needed:  # tiny or unusual panels: any non-reserved gene will do
        candidates = np.setdiff1d(np.arange(p.n_genes), reserved)
    chosen = rng.choice(candidates, size=n_needed, replace=False)
    markers = [chosen[i * p.n_markers_per_context:(i + 1) * p.n_markers_per_context] for i in range(p.n_contexts)]
    for ctx, idx in enumerate(markers):
        ctx_log_mean[ctx, idx] += rng.uniform(p.marker_lfc_min, p.marker_lfc_max, idx.size)
    return ctx_log_mean, markers


def _draw_programs(p: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Loadings (n_cell_programs, n_genes) of continuous within-type programs; mostly zeros."""
    loadings = np.zeros((p.n_cell_programs, p.n_genes))
    n_prog = max(1, int(round(p.program_gene_fraction * p.n_genes)))
    for k in range(p.n_cell_programs):
        idx = rng.choice(p.n_genes, size=n_prog, replace=False)
        loadings[k, idx] = rng.normal(0.0, p.program_loading_sd, n_prog)
    return loadings


def _draw_grn(p: SimulationParams, must_regulate: np.ndarray, rng: np.random.Generator):
    """A sparse signed random DAG over genes.

    Regulators come first in a random topological order and each regulates later regulators and
    any non-regulator, so knockdown cascades are possible but cycles are not. Out-degrees are
    log-normal and each regulator has a log-normal strength, so a few targets are strong hubs and
    most are weak, as in real CRISPR screens.

    Returns (source, target, weight, active, regulators): edge arrays of shape (E,), the
    per-type activity mask (E, n_contexts) and the regulator indices (R,).
    """
    n_reg = max(must_regulate.size, int(round(p.grn_regulator_fraction * p.n_genes)))
    others = rng.permutation(np.setdiff1d(np.arange(p.n_genes), must_regulate))
    regulators = rng.permutation(np.concatenate([must_regulate, others[: n_reg - must_regulate.size]]))
    non_regulators = np.setdiff1d(np.arange(p.n_genes), regulators)
    # Mean of a log-normal = exp(mu + s^2/2): pick mu so the mean out-degree is as asked.
    degree_sd = 0.7
    degree_mu = math.log(p.grn_mean_out_degree) - degree_sd**2 / 2
    knockdown_set = set(must_regulate.tolist())
    sources, targets, weights = [], [], []
    for i, reg in enumerate(regulators):
        downstream = np.concatenate([regulators[i + 1:], non_regulators])
        if downstream.size == 0:
            continue
        # Knockdown targets get at least half the mean out-degree so every knockdown has a
        # phenotype beyond its target; how strong it is still varies with the regulator strength.
        floor = max(3, int(p.grn_mean_out_degree / 2)) if reg in knockdown_set else 3
        degree = int(np.clip(round(rng.lognormal(degree_mu, degree_sd)), min(floor, downstream.size), downstream.size))
        tgt = rng.choice(downstream, size=degree, replace=False)
        strength = rng.lognormal(0.0, p.regulator_strength_log_sd)
        sign = np.where(rng.random(degree) < p.grn_positive_fraction, 1.0, -1.0)
        sources.append(np.full(degree, reg))
        targets.append(tgt)
        weights.append(sign * strength * rng.lognormal(math.log(p.grn_weight_median), 0.5, degree))
    source = np.concatenate(sources) if sources else np.zeros(0, dtype=np.int64)
    target = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    weight = np.concatenate(weights) if weights else np.zeros(0)
    active = rng.random((source.size, p.n_contexts)) < p.grn_context_edge_keep
    return source, target, weight, active, regulators


def _saturate(x: np.ndarray, limit: float) -> np.ndarray:
    """Smooth clip of log-fold changes to (-limit, limit): cells cannot change a gene unboundedly."""
    return limit * np.tanh(x / limit)


def _propagate(direct: np.ndarray, clamp: np.ndarray, weights: sp.csr_matrix, steps: int, limit: float) -> np.ndarray:
    """Propagate direct log-fold changes through the network.

    direct: (G, P) direct effects per perturbation; clamp: (G, P) bool, entries held at their
    direct value (a knocked-down target stays knocked down); weights: (G, G) CSR with rows =
    regulators. Each step every gene receives ``sum_regulators w * lfc(regulator)``; on a DAG,
    ``steps`` steps capture every cascade of up to that length. Returns (G, P).
    """
    lfc = _saturate(direct, limit)
    lfc[clamp] = direct[clamp]
    weights_t = weights.T.tocsr()
    for _ in range(steps):
        lfc = _saturate(direct + weights_t @ lfc, limit)
        lfc[clamp] = direct[clamp]
    return lfc


def _draw_stimulations(p: SimulationParams, log_mean: np.ndarray, contexts: list[str],
                       rng: np.random.Generator) -> tuple[np.ndarray, dict[str, dict]]:
    """Direct effects of each stimulation per type, shape (n_stimulations, n_contexts, n_genes).

    A shared program (genes up and down) is scaled per type and jittered per gene; a few genes
    respond in one type only. Program genes are drawn among detectably expressed genes.
    """
    direct = np.zeros((p.n_stimulations, p.n_contexts, p.n_genes))
    programs: dict[str, dict] = {}
    candidates = np.flatnonzero(log_mean > math.log(0.02))
    n_program = p.stim_n_up + p.stim_n_down + p.n_contexts * p.stim_n_context_specific
    if candidates.size < n_program:
        candidates = np.arange(p.n_genes)
    for s, name in enumerate(_numbered("STIM", p.n_stimulations)):
        chosen = rng.choice(candidates, size=n_program, replace=False)
        up, down = chosen[: p.stim_n_up], chosen[p.stim_n_up: p.stim_n_up + p.stim_n_down]
        specific = chosen[p.stim_n_up + p.stim_n_down:].reshape(p.n_contexts, p.stim_n_context_specific)
        program = np.zeros(p.n_genes)
        program[up] = rng.lognormal(math.log(p.stim_lfc_median), p.stim_lfc_log_sd, up.size)
        program[down] = -rng.lognormal(math.log(0.7 * p.stim_lfc_median), p.stim_lfc_log_sd, down.size)
        scale = rng.uniform(p.stim_context_scale_min, p.stim_context_scale_max, p.n_contexts)
        for c in range(p.n_contexts):
            jitter = rng.lognormal(0.0, 0.3, p.n_genes)  # gene-level differences between types
            direct[s, c] = scale[c] * program * jitter
            direct[s, c, specific[c]] = rng.lognormal(math.log(p.stim_lfc_median), p.stim_lfc_log_sd,
                                                      p.stim_n_context_specific)
        programs[name] = {
            "up": up, "down": down, "program_lfc": program.astype(np.float32),
            "context_scale": scale.astype(np.float32),
            "context_specific": {contexts[c]: specific[c] for c in range(p.n_contexts)},
        }
    return direct, programs


def _build_truth(p: SimulationParams, rng: np.random.Generator) -> _Truth:
    """Draw every dataset-level quantity (genes, types, donors, network, perturbation effects)."""
    genes = gene_symbols(p.n_genes)
    contexts = context_names(p.n_contexts)
    donors = _numbered("donor_", p.n_donors)
    batches = _numbered("lane_", p.n_batches)
    log_mean, theta = _draw_gene_means(p, rng)
    kd_targets = _choose_knockdown_targets(p, log_mean, rng)
    ctx_log_mean, markers = _draw_context_effects(p, log_mean, kd_targets, rng)
    donor_effects = rng.normal(0.0, p.donor_effect_sd, (p.n_donors, p.n_genes))
    batch_effects = rng.normal(0.0, p.batch_effect_sd, (p.n_batches, p.n_genes))
    batch_depth = rng.lognormal(0.0, p.batch_depth_log_sd, p.n_batches)
    loadings = _draw_programs(p, rng)
    source, target, weight, active, regulators = _draw_grn(p, kd_targets, rng)
    stim_direct, stim_programs = _draw_stimulations(p, log_mean, contexts, rng)

    # Direct effects (G, P) per type, then one propagation per type through that type's edges.
    n_perts = p.n_knockdowns + p.n_stimulations
    residual = rng.uniform(p.knockdown_residual_min, p.knockdown_residual_max, p.n_knockdowns)
    true_lfc = np.zeros((n_perts, p.n_contexts, p.n_genes), dtype=np.float32)
    for c in range(p.n_contexts):
        direct = np.zeros((p.n_genes, n_perts))
        clamp = np.zeros((p.n_genes, n_perts), dtype=bool)
        direct[kd_targets, np.arange(p.n_knockdowns)] = np.log(residual)
        clamp[kd_targets, np.arange(p.n_knockdowns)] = True
        direct[:, p.n_knockdowns:] = stim_direct[:, c, :].T
        keep = active[:, c]
        w = sp.csr_matrix((weight[keep], (source[keep], target[keep])), shape=(p.n_genes, p.n_genes))
        true_lfc[:, c, :] = _propagate(direct, clamp, w, p.grn_propagation_steps, p.lfc_saturation).T

    def to_names(idx: np.ndarray) -> list[str]:
        return [str(g) for g in genes[idx]]

    for prog in stim_programs.values():
        prog["up"], prog["down"] = to_names(prog["up"]), to_names(prog["down"])
        prog["context_specific"] = {k: to_names(v) for k, v in prog["context_specific"].items()}
    return _Truth(
        genes=genes, gene_log_mean=log_mean, theta=theta, contexts=contexts,
        context_log_mean=ctx_log_mean, markers={contexts[c]: to_names(m) for c, m in enumerate(markers)},
        donors=donors, donor_effects=donor_effects, batches=batches, batch_effects=batch_effects,
        batch_depth=batch_depth, program_loadings=loadings, grn_source=source, grn_target=target,
        grn_weight=weight, grn_active=active, regulators=regulators,
        perturbations=to_names(kd_targets) + _numbered("STIM", p.n_stimulations),
        perturbation_kind=["knockdown"] * p.n_knockdowns + ["stimulation"] * p.n_stimulations,
        knockdown_residual=residual, stim_programs=stim_programs, true_lfc=true_lfc,
    )


# ----------------------------------------------------------------------------- cells


def _assign_cells(p: SimulationParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-cell design codes, each shape (n_cells,), in a random cell order.

    ``pert``: 0 = control, 1..P = perturbation index + 1; ``ctx``, ``donor``, ``batch``: indices.
    Within each condition the cells cycle through every (type, donor) pair, so every
    perturbation appears in every type and donor with near-equal numbers; lanes cycle likewise.
    """
    n_perts = p.n_knockdowns + p.n_stimulations
    n_ctrl, per_pert = _condition_sizes(p)
    sizes = np.full(n_perts, per_pert)
    sizes[rng.permutation(n_perts)[: p.n_cells - n_ctrl - per_pert * n_perts]] += 1
    sizes = np.concatenate([[n_ctrl], sizes])
    combos = p.n_contexts * p.n_donors
    pert, ctx, donor, batch = [], [], [], []
    for code, n in enumerate(sizes):
        # A random combo order per condition spreads the remainder cells over different pairs.
        combo = rng.permutation(combos)[np.arange(n) % combos]
        pert.append(np.full(n, code))
        ctx.append(combo // p.n_donors)
        donor.append(combo % p.n_donors)
        batch.append(rng.permutation((np.arange(n) + rng.integers(p.n_batches)) % p.n_batches))
    order = rng.permutation(p.n_cells)
    return {k: np.concatenate(v)[order] for k, v in
            {"pert": pert, "ctx": ctx, "donor": donor, "batch": batch}.items()}


def _cell_factors(p: SimulationParams, cells: dict[str, np.ndarray], truth: _Truth,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Size factors (n_cells,) and latent program scores (n_cells, n_cell_programs)."""
    size_factor = rng.lognormal(0.0, p.library_size_log_sd, p.n_cells) * truth.batch_depth[cells["batch"]]
    scores = rng.normal(0.0, 1.0, (p.n_cells, p.n_cell_programs))
    return size_factor, scores


# ----------------------------------------------------------------------------- counts


def _chunk_means(rows: slice, cells: dict[str, np.ndarray], size_factor: np.ndarray, scores: np.ndarray,
                 truth: _Truth, lfc_with_control: np.ndarray) -> np.ndarray:
    """NB means (n_chunk, G) float32 for the cells in ``rows``.

    The log mean depends on the cell only through its (type, donor, lane, perturbation) group,
    plus size factor and program scores: compute one row per group present, then gather.
    """
    ctx, donor, batch, pert = (cells[k][rows] for k in ("ctx", "donor", "batch", "pert"))
    n_d, n_b, n_p = len(truth.donors), len(truth.batches), lfc_with_control.shape[0]
    code = ((ctx * n_d + donor) * n_b + batch) * n_p + pert
    uniq, inverse = np.unique(code, return_inverse=True)
    u_pert, rest = uniq % n_p, uniq // n_p
    u_batch, rest = rest % n_b, rest // n_b
    u_donor, u_ctx = rest % n_d, rest // n_d
    log_table = (truth.context_log_mean[u_ctx] + truth.donor_effects[u_donor]
                 + truth.batch_effects[u_batch] + lfc_with_control[u_pert, u_ctx])
    means = np.exp(log_table).astype(np.float32)[inverse]
    means *= size_factor[rows, None].astype(np.float32)
    program_genes = np.flatnonzero(np.any(truth.program_loadings != 0, axis=0))
    if program_genes.size:  # only a few genes carry programs: touch just those columns
        means[:, program_genes] *= np.exp(scores[rows] @ truth.program_loadings[:, program_genes]).astype(np.float32)
    return np.minimum(means, _MAX_MEAN, out=means)


def _simulate_counts(p: SimulationParams, cells: dict[str, np.ndarray], size_factor: np.ndarray,
                     scores: np.ndarray, truth: _Truth, progress: bool) -> tuple[sp.csr_matrix, np.ndarray]:
    """All counts as CSR int32 (n_cells, n_genes), drawn chunk by chunk of cells, and the
    per-cell totals (n_cells,) int64.

    Each chunk has its own random stream (spawned from the seed), so results do not depend on
    anything but the params.
    """
    n_perts = len(truth.perturbations)
    lfc_with_control = np.zeros((n_perts + 1, p.n_contexts, p.n_genes), dtype=np.float32)
    lfc_with_control[1:] = truth.true_lfc
    chunk = max(1, _CHUNK_ENTRIES // p.n_genes)
    starts = range(0, p.n_cells, chunk)
    streams = np.random.SeedSequence([p.seed, 2]).spawn(len(starts))
    builder = _CsrBuilder(p.n_genes)
    for start, stream in tqdm(list(zip(starts, streams)), disable=not progress, desc="simulating cells", unit="chunk"):
        rows = slice(start, min(start + chunk, p.n_cells))
        means = _chunk_means(rows, cells, size_factor, scores, truth, lfc_with_control)
        counts = sample_negative_binomial(means, truth.theta, np.random.default_rng(stream))
        del means
        builder.add(counts)
    return builder.finish()


class _CsrBuilder:
    """Collects dense int32 chunks of rows into one CSR matrix with a peak memory near its size.

    Small per-chunk pieces are merged into blocks of ~``block_bytes`` (large allocations that the
    allocator returns to the OS when freed); ``finish`` copies the blocks into the final arrays
    one at a time, freeing each, so the matrix is never held twice.
    """

    def __init__(self, n_genes: int, block_bytes: int = 64 * 2**20):
        self.n_genes = n_genes
        self.block_entries = max(1, block_bytes // 8)  # int32 data + int32 index per entry
        self.pieces: tuple[list, list] = ([], [])
        self.piece_entries = 0
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = []
        self.row_nnz: list[np.ndarray] = []
        self.row_sums: list[np.ndarray] = []

    def add(self, counts: np.ndarray) -> None:
        """Append a dense chunk (n_rows, n_genes) of counts."""
        flat = np.flatnonzero(counts)  # row-major, so already in CSR order
        self.pieces[0].append(counts.reshape(-1)[flat])
        self.pieces[1].append((flat % self.n_genes).astype(np.int32))
        self.row_nnz.append(np.bincount(flat // self.n_genes, minlength=counts.shape[0]))
        self.row_sums.append(counts.sum(axis=1, dtype=np.int64))
        self.piece_entries += flat.size
        if self.piece_entries >= self.block_entries:
            self._merge_pieces()

    def _merge_pieces(self) -> None:
        if self.piece_entries:
            self.blocks.append((np.concatenate(self.pieces[0]), np.concatenate(self.pieces[1])))
        self.pieces = ([], [])
        self.piece_entries = 0

    def finish(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """Return (CSR int32 matrix (n_rows, n_genes), per-row totals (n_rows,) int64)."""
        self._merge_pieces()
        nnz_per_row = np.concatenate(self.row_nnz)
        indptr = np.zeros(nnz_per_row.size + 1, dtype=np.int64)
        np.cumsum(nnz_per_row, out=indptr[1:])
        # scipy wants indices and indptr of one dtype; int32 halves the index memory when it fits.
        index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max else np.int64
        data = np.empty(indptr[-1], dtype=np.int32)  # pages are committed as blocks are copied in
        indices = np.empty(indptr[-1], dtype=index_dtype)
        offset = 0
        while self.blocks:
            block_data, block_indices = self.blocks.pop(0)
            data[offset:offset + block_data.size] = block_data
            indices[offset:offset + block_data.size] = block_indices
            offset += block_data.size
            del block_data, block_indices
        matrix = sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(nnz_per_row.size, self.n_genes),
                               copy=False)
        return matrix, np.concatenate(self.row_sums)


# ----------------------------------------------------------------------------- assembly


def _ground_truth(p: SimulationParams, truth: _Truth) -> dict:
    """``uns['simulation']``: the ground truth as h5ad-serialisable arrays, strings and dicts."""
    g = truth.genes
    kd = [n for n, k in zip(truth.perturbations, truth.perturbation_kind) if k == "knockdown"]
    return {
        "params": dataclasses.asdict(p),
        "description": "Natural-log effects. true_lfc[p, c] = log mean(perturbation p) - log mean(control) "
                       "in cell type c at equal donor, lane, size factor and program scores.",
        "contexts": list(truth.contexts),
        "donors": list(truth.donors),
        "batches": list(truth.batches),
        "perturbations": list(truth.perturbations),
        "perturbation_kind": list(truth.perturbation_kind),
        "true_lfc": truth.true_lfc,
        "gene_log_mean": truth.gene_log_mean.astype(np.float32),
        "dispersion_theta": truth.theta.astype(np.float32),
        "context_log_mean": truth.context_log_mean.astype(np.float32),
        "marker_genes": {k: list(v) for k, v in truth.markers.items()},
        "donor_effects": truth.donor_effects.astype(np.float32),
        "batch_effects": truth.batch_effects.astype(np.float32),
        "batch_depth": truth.batch_depth.astype(np.float32),
        "program_loadings": truth.program_loadings.astype(np.float32),
        "grn": {
            "source": g[truth.grn_source].astype(str), "target": g[truth.grn_target].astype(str),
            "weight": truth.grn_weight.astype(np.float32), "active": truth.grn_active,
            "regulators": g[truth.regulators].astype(str),
        },
        "knockdowns": {"target": list(kd), "residual": truth.knockdown_residual.astype(np.float32)},
        "stimulations": truth.stim_programs,
    }


def simulate_dataset(params: SimulationParams, progress: bool = False) -> ad.AnnData:
    """Simulate a perturbation screen; returns AnnData (n_cells, n_genes) of raw UMI counts.

    ``X``: CSR int32. ``obs``: ``perturbation`` (``"control"``, target symbols, ``STIM1``...),
    ``cell_type``, ``donor``, ``batch``, ``n_counts``, ``size_factor``. ``var``: ``mean_true``,
    ``dispersion_theta``, ``is_regulator``. ``uns['simulation']``: the ground truth.
    ``progress`` shows a tqdm bar over the chunks of cells.
    """
    validate_params(params)
    root = np.random.SeedSequence([params.seed, 0])
    structure_seed, cells_seed = root.spawn(2)
    truth = _build_truth(params, np.random.default_rng(structure_seed))
    cell_rng = np.random.default_rng(cells_seed)
    cells = _assign_cells(params, cell_rng)
    size_factor, scores = _cell_factors(params, cells, truth, cell_rng)
    X, n_counts = _simulate_counts(params, cells, size_factor, scores, truth, progress)

    labels = np.array([CONTROL] + truth.perturbations, dtype=object)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels[cells["pert"]], categories=list(labels)),
            "cell_type": pd.Categorical.from_codes(cells["ctx"], categories=truth.contexts),
            "donor": pd.Categorical.from_codes(cells["donor"], categories=truth.donors),
            "batch": pd.Categorical.from_codes(cells["batch"], categories=truth.batches),
            "n_counts": n_counts,
            "size_factor": size_factor.astype(np.float32),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(params.n_cells)]),
    )
    is_regulator = np.zeros(params.n_genes, dtype=bool)
    is_regulator[truth.regulators] = True
    var = pd.DataFrame(
        {
            "mean_true": np.exp(truth.gene_log_mean).astype(np.float32),
            "dispersion_theta": truth.theta.astype(np.float32),
            "is_regulator": is_regulator,
        },
        index=pd.Index(truth.genes),
    )
    return ad.AnnData(X=X, obs=obs, var=var, uns={"simulation": _ground_truth(params, truth)})


__all__ = [
    "InputError", "SimulationParams", "gene_symbols", "context_names", "params_from_dict",
    "simulate_dataset", "validate_params",
]
