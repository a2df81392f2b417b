"""A candidate screen: each model ranks perturbations nobody measured by their predicted effect.

A dataset entry's ``screen`` lists candidate perturbations (:mod:`lingshu.data.candidates`);
one job per run (:func:`candidate_screen_job`) writes ``screen/<run>.tsv``.

**Conditions.** Every candidate in every screened context (``screen.contexts``, default every
context with control cells). A context's **control cells** are the split's control input cells
of that context (what held-out conditions are predicted from), else, in a context that holds
none, its control cells in training (``control_cells`` says which). Each condition is
predicted like a held-out one (:func:`lingshu.models.harness.predict_conditions`), from those
control cells, with ``min(number of control cells, screen.max_cells)`` cells.

**Effect.** The primary effect of the screening evaluation
(:mod:`lingshu.evaluate.screening`, whose functions compute it): the L2 norm of the shift of
the predicted cells' mean log1p(CP10k) profile from the mean of the same control cells; beside
it the number of genes a Welch test calls DE between the two (``predicted_n_de``). The top
**up** and **down** genes are the 5 with the largest positive and negative mean shift (mean
log1p(CP10k) difference, i.e. the log fold change of CP10k + 1), with that shift. The L2
shift is not corrected for the sampling noise of the two means (see the screening module): at
no effect it sits at a floor set by the number of cells, the same for every candidate of a
context (each gets as many cells), so the ranks within a context are not biased by it.

**Ranks.** ``rank``: within the context, 1 = the largest predicted effect among the ranked
candidates; ``rank_overall``: the candidate's rank by its mean predicted effect over the
contexts where it is ranked (a candidate is what one would run next), the same on each of its
rows. Effects closer than 1e-6 of the largest are tied (they differ by rounding only) and share
the best rank of their group (1, 1, 3).

**Not encoded** (``status``; ``reason`` says why), never dropped:

- every candidate, for a model whose spec says its prediction does not read the perturbation
  (``reads_perturbation=False``: ``control_mean`` predicts the context's control cells and
  ``perturbation_mean`` the context's mean training perturbation, for any label; ranking them
  would order sampling noise or ties);
- a candidate no training cell carries whose features are ``unknown`` (no target gene among
  the measured genes and no row in the dataset's perturbation feature table): every model
  would predict it as the one shared unknown perturbation, so the order of such candidates
  says nothing;
- a condition the model itself refuses (:class:`~lingshu.models.base.ConditionNotEncodable`,
  e.g. scVI in a context it never saw), with the model's reason.

Every other model ranks every other candidate: linear, scVI, scLDM, SCALE and STATE through
the candidate's shared features, Lingshu-Cell and SCALE also through its target genes (all
fitted knowing the candidates, which the features table lists). A candidate that is already a
training perturbation is ranked too (the model has seen its cells; ``split_role`` says
``train``); a held-out one (``test``) is a known answer the report points out.
"""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

from lingshu.config import DatasetEntry
from lingshu.constants import (
    CONTEXT_COL,
    CONTROL,
    NOT_ENCODED,
    PERT_COL,
    SPLIT_CONTROL_INPUT,
    SPLIT_TRAIN,
)
from lingshu.data.candidates import screen_candidates
from lingshu.data.features import SOURCE_COL, read_features
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import read_rows
from lingshu.data.split import Split, read_split
from lingshu.errors import input_error
from lingshu.evaluate.screening import (
    PRIMARY,
    condition_rng,
    effects_against,
    reference,
    tied_within_rounding,
)
from lingshu.io import write_table

log = logging.getLogger(__name__)

RANKED = "ranked"
NOT_ENCODED_STATUS = "not encoded"
N_TOP_GENES = 5
DEFAULT_MAX_CELLS = 300
COLUMNS = ["run", "rank", "rank_overall", CONTEXT_COL, PERT_COL, "status", "reason",
           "predicted_effect", "predicted_n_de", "n_cells", "n_control_cells", "control_cells",
           "split_role", "feature_source", "top_up", "top_down"]
REASON_READS_NO_PERTURBATION = (
    "{model} predicts the same cells for every perturbation of a context (it does not read "
    "the perturbation): a ranking would order sampling noise")
REASON_UNKNOWN = (
    "no training cell carries it, and it has no target gene among the measured genes and no "
    "row in the perturbation feature table: every model would predict the one shared unknown "
    "perturbation")


def screen_controls(split: Split, entry: DatasetEntry) -> dict[str, tuple[np.ndarray, str]]:
    """context -> (sorted row numbers of its control cells, ``input`` or ``training``) for
    every screened context: the split's control input cells of the context, else its control
    cells in training. Raises InputError for a listed context the data lack or one without
    control cells."""
    cells = split.cells
    ctx = cells[CONTEXT_COL].astype(str).to_numpy()
    is_ctrl = (cells[PERT_COL].astype(str) == CONTROL).to_numpy()
    given = cells[SPLIT_CONTROL_INPUT].to_numpy(bool) & is_ctrl
    trained = cells[SPLIT_TRAIN].to_numpy(bool) & is_ctrl
    with_controls = sorted(set(ctx[given]) | set(ctx[trained]))
    listed = (entry.screen or {}).get("contexts")
    where = f"config: datasets.{entry.name}"
    for c in listed or ():
        if c not in set(ctx):
            raise input_error(where, "screen.contexts", f"{c!r} is not a context of the data "
                              f"(found: {sorted(set(ctx))})", "list contexts of the data")
        if c not in with_controls:
            raise input_error(where, "screen.contexts", f"context {c!r} has no control cells "
                              "to predict from (in training or as control input)",
                              f"screen contexts with control cells: {with_controls}")
    out = {}
    for c in listed or with_controls:
        rows = np.flatnonzero(given & (ctx == c))
        out[c] = (rows, "input") if rows.size else (np.flatnonzero(trained & (ctx == c)),
                                                    "training")
    return out


def _top_genes(shift: np.ndarray, genes: np.ndarray, sign: int, n: int = N_TOP_GENES) -> str:
    """The ``n`` genes with the largest shift of this sign, ``"G1 +0.512, G2 +0.300"``."""
    order = np.argsort(-sign * shift, kind="stable")[:n]
    return ", ".join(f"{genes[i]} {shift[i]:+.3f}" for i in order if sign * shift[i] > 0)


def rank_screen(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``rank`` (within each context) and ``rank_overall`` (by the candidate's mean effect
    over the contexts where it is ranked) to a table with ``context``, ``perturbation``,
    ``status`` and ``predicted_effect``; only ``ranked`` rows get ranks (1 = the largest
    effect; ties within rounding share the best rank). Returns it sorted by context, rank and
    perturbation (rows without a rank last in their context)."""
    table = table.copy()
    table["rank"] = pd.array([pd.NA] * len(table), dtype="Int64")
    table["rank_overall"] = pd.array([pd.NA] * len(table), dtype="Int64")
    ranked = table[table["status"] == RANKED]

    def ranks(effects: np.ndarray) -> np.ndarray:
        rounded = tied_within_rounding(effects, effects)
        return stats.rankdata(-rounded, method="min").astype(int)

    for _, group in ranked.groupby(CONTEXT_COL, sort=False):
        table.loc[group.index, "rank"] = ranks(group["predicted_effect"].to_numpy(float))
    if len(ranked):
        mean = ranked.groupby(PERT_COL)["predicted_effect"].mean()
        overall = dict(zip(mean.index, ranks(mean.to_numpy(float))))
        table.loc[ranked.index, "rank_overall"] = [overall[p] for p in ranked[PERT_COL]]
    order = table.assign(_r=table["rank"].astype("float").fillna(np.inf))
    order = order.sort_values([CONTEXT_COL, "_r", PERT_COL], kind="stable")
    return order.drop(columns="_r").reset_index(drop=True)


def screen_conditions(adata: ad.AnnData, split: Split, features: pd.DataFrame | None,
                      entry: DatasetEntry, candidates: list[str], model=None, seed: int = 0,
                      run: str | None = None, sampling: dict | None = None,
                      prior: dict[str, list[str]] | None = None,
                      reads_perturbation: bool = True, progress: bool = False) -> pd.DataFrame:
    """Predict and rank every candidate in every screened context (see the module docstring).

    adata: the processed data (raw counts; may be backed). split / features: the dataset's.
    model: the fitted model (its sampling settings applied); unused when
        ``reads_perturbation`` is False (every candidate is then not encoded).
    prior: perturbation -> prior genes (runs that inject priors).
    Returns the table of :data:`COLUMNS`, one row per context x candidate, ranked.
    """
    from lingshu.models.harness import predict_conditions

    controls = screen_controls(split, entry)
    max_cells = int((entry.screen or {}).get("max_cells", DEFAULT_MAX_CELLS))
    seen = set(split.cells.loc[split.cells[SPLIT_TRAIN].to_numpy(bool), PERT_COL].astype(str))
    roles = {(str(c), str(p)): str(r) for c, p, r in
             split.conditions[[CONTEXT_COL, PERT_COL, "role"]].itertuples(index=False)}
    source = (features[SOURCE_COL].astype(str).to_dict()
              if features is not None and SOURCE_COL in features else {})
    name = run or getattr(model, "name", "model")
    rows = []
    for ctx, (ctrl_rows, kind) in controls.items():
        for cand in candidates:
            reason = ""
            if not reads_perturbation:
                reason = REASON_READS_NO_PERTURBATION.format(model=name)
            elif cand not in seen and source.get(cand, "unknown") == "unknown":
                reason = REASON_UNKNOWN
            rows.append({CONTEXT_COL: ctx, PERT_COL: cand, "reason": reason,
                         "n_cells": min(ctrl_rows.size, max_cells),
                         "n_control_cells": int(ctrl_rows.size), "control_cells": kind,
                         "split_role": roles.get((ctx, cand), "none"),
                         "feature_source": source.get(cand, "unknown")})
    table = pd.DataFrame(rows, columns=[CONTEXT_COL, PERT_COL, "reason", "n_cells",
                                        "n_control_cells", "control_cells", "split_role",
                                        "feature_source"])
    wanted = table[table["reason"] == ""]
    effects = {}
    if len(wanted):
        pred = predict_conditions(model, adata, split, seed, progress=progress, prior=prior,
                                  run=run, sampling=sampling,
                                  conditions=wanted[[CONTEXT_COL, PERT_COL, "n_cells"]],
                                  control_rows={c: r for c, (r, _) in controls.items()})
        for record in json.loads(pred.uns["lingshu"].get(NOT_ENCODED, "[]")):
            hit = ((table[CONTEXT_COL] == record["context"])
                   & (table[PERT_COL] == record["perturbation"]))
            table.loc[hit, "reason"] = f"{name}: {record['reason']}"
        genes = adata.var_names.to_numpy().astype(str)
        obs = pred.obs[[CONTEXT_COL, PERT_COL]].astype(str)
        by_condition = obs.groupby([CONTEXT_COL, PERT_COL], sort=False).indices
        refs = {c: reference(log1p_cp10k(read_rows(adata, controls[c][0])))
                for c in {c for c, _ in by_condition}}
        for (ctx, pert), idx in by_condition.items():
            cells = pred.X[np.sort(idx)]
            found = effects_against(cells, refs[ctx], None, condition_rng(seed, ctx, pert))
            shift = np.asarray(cells.mean(axis=0), dtype=np.float64).ravel() - refs[ctx].mean
            effects[(ctx, pert)] = {"predicted_effect": found[PRIMARY],
                                    "predicted_n_de": found["n_de"],
                                    "top_up": _top_genes(shift, genes, +1),
                                    "top_down": _top_genes(shift, genes, -1)}
    for key in ("predicted_effect", "predicted_n_de"):
        table[key] = [effects.get((c, p), {}).get(key, np.nan)
                      for c, p in zip(table[CONTEXT_COL], table[PERT_COL])]
    for key in ("top_up", "top_down"):
        table[key] = [effects.get((c, p), {}).get(key, "")
                      for c, p in zip(table[CONTEXT_COL], table[PERT_COL])]
    done = [(c, p) in effects for c, p in zip(table[CONTEXT_COL], table[PERT_COL])]
    table["status"] = np.where(done, RANKED, NOT_ENCODED_STATUS)
    table.loc[done, "reason"] = ""
    table.loc[~np.asarray(done), "n_cells"] = 0
    table.insert(0, "run", name)
    return rank_screen(table)[COLUMNS]


def candidate_screen_job(processed: str, split_dir: str, features: str, model_file: str,
                         entry: DatasetEntry, run: str, sampling: dict, seed: int,
                         threads: int, prior: str | None, out: str) -> pd.DataFrame:
    """The ``screen`` rule: one run's screen of the entry's candidates to ``out`` (TSV,
    written atomically). The model is loaded with the run's sampling settings as by the
    ``predict`` rule; a model whose spec says it does not read the perturbation is not
    loaded (every candidate is listed as not encoded)."""
    from lingshu.models.harness import _limit_threads, load_model
    from lingshu.models.spec import get_spec, parse_run

    if not entry.screen:
        raise input_error(f"config: datasets.{entry.name}", "screen",
                          "the dataset has no screen", "add a `screen:` block to the entry")
    candidates = screen_candidates(entry)
    adata = ad.read_h5ad(processed, backed="r")
    split = read_split(split_dir)
    reads = get_spec(parse_run(run)[0]).reads_perturbation
    model, prior_genes = None, None
    if reads:
        model = load_model(model_file, sampling)
        model.threads = max(1, int(threads))
        _limit_threads(threads)
        if prior:
            from lingshu.data.prior import prior_of_labels, read_prior

            prior_genes = prior_of_labels(read_prior(prior), candidates, entry)
    table = screen_conditions(adata, split, read_features(features), entry, candidates,
                              model=model, seed=seed, run=run, sampling=sampling,
                              prior=prior_genes, reads_perturbation=reads, progress=True)
    n_ranked = int((table["status"] == RANKED).sum())
    log.info("%s: %d of %d context x candidate conditions ranked", run, n_ranked, len(table))
    write_table(table, out)
    return table
