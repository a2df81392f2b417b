"""The harness between files and a model: everything a model's jobs do around the model.

Models never read files or the config. The harness does, and hands them arrays:

- pre-train / fit: processed.h5ad + split + features (+ count tokens) -> :class:`TrainingData`
  -> ``model.pretrain`` / ``model.fit`` -> ``pretrain.pt`` / ``model.npz``;
- predict: a fitted model + its run's sampling settings + each test context's real control
  cells -> ``predictions/<run>.h5ad``, the predicted cells only (the evaluation adds the real
  controls itself);
- generate: a generative model's pre-trained or fitted state -> ``generation/<run>.h5ad``.

Each ``*_job`` function is one pipeline job, called by the command line with paths.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.config import DatasetEntry
from lingshu.constants import (
    BATCH_COL,
    CONTEXT_COL,
    NOT_ENCODED,
    PERT_COL,
    SPLIT_CONTROL_INPUT,
    SPLIT_TRAIN,
)
from lingshu.data.features import read_features
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import read_rows, rows_on_demand
from lingshu.data.split import Split, read_split
from lingshu.errors import CorruptFileError, InputError, corrupt_file_error
from lingshu.io import write_h5ad
from lingshu.models.base import (
    ConditionInput,
    ConditionNotEncodable,
    PerturbationModel,
    TrainingData,
    is_main_process,
    load_state,
)
from lingshu.models.spec import RESOURCE_KEYS, get_spec

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Building and loading models
# ------------------------------------------------------------------------------------------


def build_model(name: str, params: dict[str, Any] | None = None) -> PerturbationModel:
    """Instantiate a registered model with its config parameters (resource keys removed)."""
    params = {k: v for k, v in (params or {}).items() if k not in RESOURCE_KEYS}
    return get_spec(name).load_class()(**params)


def apply_sampling(model: PerturbationModel, sampling: dict[str, Any] | None) -> None:
    """Give a model its run's sampling settings, after checking they are sampling keys of its
    spec (a training setting here would silently differ from the one the model was fit with)."""
    sampling = dict(sampling or {})
    spec = get_spec(model.name)
    wrong = sorted(set(sampling) - spec.sampling_keys)
    if wrong:
        raise InputError(f"{model.name}: {wrong} are not sampling settings (those are "
                         f"{sorted(spec.sampling_keys)}). Fix: move them to the model's "
                         f"training settings")
    model.set_sampling(sampling)


def load_model(path: str | Path, sampling: dict[str, Any] | None = None) -> PerturbationModel:
    """Load a model saved with :meth:`PerturbationModel.save`, with sampling settings."""
    arrays, meta = load_state(path)
    model = build_model(meta["model"], meta.get("params"))
    try:
        model.set_state(arrays, meta)
    except CorruptFileError as err:  # e.g. files packed inside it that hold more than data
        raise corrupt_file_error(path, f"a {meta['model']} model file", str(err)) from err
    apply_sampling(model, sampling)
    return model


def load_generator(name: str, params: dict[str, Any] | None, path: str | Path,
                   sampling: dict[str, Any] | None = None) -> PerturbationModel:
    """A generative model ready for ``generate()``, from the output of the stage its spec
    names: the pre-training checkpoint (built from ``params``) or the fitted model file."""
    spec = get_spec(name)
    if spec.generates_from is None:
        raise KeyError(f"model {name!r} does not generate cells unconditionally")
    if spec.generates_from == "fit":
        return load_model(path, sampling)
    model = build_model(name, params)
    apply_sampling(model, sampling)
    model.load_pretrained(path)
    return model


# ------------------------------------------------------------------------------------------
# Training data
# ------------------------------------------------------------------------------------------


def training_data(adata: ad.AnnData, split: Split, features: pd.DataFrame | None,
                  seed: int, entry: DatasetEntry, workdir: str | Path | None = None,
                  threads: int = 1, include_control_input: bool = False,
                  tokens=None) -> TrainingData:
    """The training cells' counts and labels, with the shared perturbation features.

    include_control_input: also hand over the control input cells that are not reference cells
    (for unconditional pre-training on every cell that is neither held-out truth nor reference).
    tokens: a :class:`~lingshu.data.tokenstore.TokenStore` of every processed cell; the
        training cells' rows of it are handed over instead of their counts (which are then
        never read).
    With ``adata`` backed the counts are handed over as rows of the file, read on demand.
    """
    train = split.rows(SPLIT_TRAIN, adata.obs_names)
    if include_control_input:  # never the reference cells, some of which may be control inputs
        extra = np.setdiff1d(split.rows(SPLIT_CONTROL_INPUT), split.reference_rows())
        train = np.union1d(train, extra)
    cols = [c for c in (PERT_COL, CONTEXT_COL, BATCH_COL) if c in adata.obs]
    # Every label a model may be asked about: the data's, and those only the feature table
    # knows (a screen's candidates, lingshu.data.candidates), so that each has its targets.
    labels = sorted(set(adata.obs[PERT_COL].astype(str))
                    | (set(map(str, features.index)) if features is not None else set()))

    def cells(rows: np.ndarray, validation=None) -> TrainingData:
        return TrainingData(
            counts=rows_on_demand(adata, rows) if tokens is None else None,
            obs=adata.obs.iloc[rows][cols].astype(str).reset_index(drop=True),
            genes=adata.var_names.to_numpy(), features=features, seed=seed,
            targets=entry.targets(labels, adata.var_names),
            perturbation_type=entry.perturbation_type,
            workdir=Path(workdir) if workdir else None, threads=threads,
            tokens=None if tokens is None else tokens.subset(rows), validation=validation)

    reference = split.reference_rows()
    return cells(train, validation=cells(reference) if reference.size else None)


def _job_training_data(processed: str, split_dir: str, features: str, entry: DatasetEntry,
                       model: str, seed: int, threads: int, workdir: str | None,
                       tokens: str | None, include_control_input: bool) -> TrainingData:
    """The training data of a pre-train or fit job, from its files."""
    from lingshu.data.tokenstore import TokenStore

    if tokens and not get_spec(model).tokens:
        raise InputError(f"command line: --tokens is for models that train from count tokens, "
                         f"not {model}. Fix: drop --tokens")
    adata = ad.read_h5ad(processed, backed="r")  # each model reads only the rows it needs
    store = (TokenStore.open(tokens, obs_names=adata.obs_names, genes=adata.var_names)
             if tokens else None)
    return training_data(adata, read_split(split_dir), read_features(features), seed=seed,
                         entry=entry, workdir=workdir, threads=threads,
                         include_control_input=include_control_input, tokens=store)


def _limit_threads(threads: int) -> None:
    """Keep torch (when a model uses it) to the job's threads."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, int(threads)))


def pretrain_job(processed: str, split_dir: str, features: str, entry: DatasetEntry, model: str,
                 params: dict[str, Any], seed: int, threads: int, workdir: str | None,
                 tokens: str | None, out: str) -> None:
    """Pre-train a model that has a pre-training stage on every cell that is not held-out
    truth nor reference (the training cells and the control input cells)."""
    if not get_spec(model).pretrains:
        raise InputError(f"command line: --model {model}: this model has no pre-training "
                         f"stage. Fix: use a model whose spec has pretrains=True")
    instance = build_model(model, params)
    _limit_threads(threads)
    instance.pretrain(_job_training_data(processed, split_dir, features, entry, model, seed,
                                         threads, workdir, tokens, True), out)


def fit_job(processed: str, split_dir: str, features: str, entry: DatasetEntry, model: str,
            params: dict[str, Any], seed: int, threads: int, workdir: str | None,
            tokens: str | None, init: str | None, out: str) -> None:
    """Fit a model on the training cells (from its pre-trained weights when ``init``)."""
    instance = build_model(model, params)
    _limit_threads(threads)
    data = _job_training_data(processed, split_dir, features, entry, model, seed, threads,
                              workdir, tokens, False)
    start = time.perf_counter()
    if init:
        instance.fit(data, init=init)
    else:
        instance.fit(data)
    log.info("fit %s in %.1f s", model, time.perf_counter() - start)
    if is_main_process():  # under torchrun, rank 0 writes the model
        instance.save(out)


# ------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------


def predict_conditions(model: PerturbationModel, adata: ad.AnnData, split: Split, seed: int,
                       progress: bool = True, prior: dict[str, list[str]] | None = None,
                       run: str | None = None,
                       sampling: dict[str, Any] | None = None,
                       conditions: pd.DataFrame | None = None,
                       control_rows: dict[str, np.ndarray] | None = None) -> ad.AnnData:
    """Predict every test condition of the split (or the given ``conditions``).

    Each condition gets as many cells as the truth holds for it; the model sees that context's
    control input cells (raw counts) and, with a ``prior`` (perturbation -> genes), the
    perturbation's prior genes. Returns the predicted cells only, log1p(CP10k) float32 CSR in
    the processed data's gene order, obs ``perturbation`` and ``context``; ``uns['lingshu']``
    records the model, the run, its sampling settings and the time taken, and (as JSON, under
    ``not_encoded``) the conditions the model could not encode, which get no cells.

    conditions: (context, perturbation, n_cells) rows to predict instead of the split's test
        conditions (a candidate screen, :mod:`lingshu.evaluate.candidates`).
    control_rows: context -> rows of ``adata`` handed to the model as that context's control
        cells, instead of the split's control input cells.
    """
    ctrl_rows = split.rows(SPLIT_CONTROL_INPUT, adata.obs_names)
    ctrl_context = split.cells[CONTEXT_COL].to_numpy()[ctrl_rows]
    conditions = split.test_conditions() if conditions is None else conditions
    blocks, obs_rows = [], []
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    inputs, controls_of = [], {}
    for row in conditions.itertuples(index=False):
        ctx, pert, n = getattr(row, CONTEXT_COL), getattr(row, PERT_COL), int(row.n_cells)
        if ctx not in controls_of:
            rows = (ctrl_rows[ctrl_context == ctx] if control_rows is None
                    else np.asarray(control_rows[ctx]))
            controls_of[ctx] = read_rows(adata, rows)
        inputs.append(ConditionInput(ctx, pert, controls_of[ctx], n,
                                     prior_genes=tuple((prior or {}).get(pert, ()))))
    outputs = iter(model.predict_many(inputs, rng, progress=progress))
    not_encoded = []
    for cond in inputs:
        x = next(outputs, None)
        if x is None:
            raise ValueError(f"{model.name} returned fewer predictions than the "
                             f"{len(inputs)} conditions")
        if isinstance(x, ConditionNotEncodable):
            log.warning("%s", x)
            not_encoded.append(x.record())
            continue
        ctx, pert, n = cond.context, cond.perturbation, cond.n_cells
        if x.shape != (n, adata.n_vars):
            raise ValueError(f"{model.name} returned shape {x.shape} for {ctx}/{pert}; "
                             f"expected {(n, adata.n_vars)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{model.name} returned non-finite values for {ctx}/{pert}")
        blocks.append(sp.csr_matrix(x.astype(np.float32)))
        obs_rows.append(pd.DataFrame({PERT_COL: pert, CONTEXT_COL: ctx}, index=range(n)))
    obs = (pd.concat(obs_rows, ignore_index=True) if obs_rows
           else pd.DataFrame({PERT_COL: [], CONTEXT_COL: []}))
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    x = (sp.vstack(blocks, format="csr") if blocks
         else sp.csr_matrix((0, adata.n_vars), dtype=np.float32))
    pred = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    pred.uns["lingshu"] = {"model": model.name, "run": run or model.name,
                           "sampling": json.dumps(sampling or {}, sort_keys=True),
                           "space": "log1p_cp10k",
                           "predict_seconds": time.perf_counter() - start}
    if not_encoded:
        pred.uns["lingshu"][NOT_ENCODED] = json.dumps(not_encoded)
    if model.diagnostics:
        pred.uns["lingshu"]["diagnostics"] = json.dumps(model.diagnostics)
    return pred


def predict_job(processed: str, split_dir: str, model_file: str, entry: DatasetEntry, run: str,
                sampling: dict[str, Any], seed: int, threads: int, prior: str | None,
                out: str) -> None:
    """Predict every held-out condition with a fitted model and a run's sampling settings."""
    adata = ad.read_h5ad(processed, backed="r")
    split = read_split(split_dir)
    model = load_model(model_file, sampling)
    model.threads = max(1, int(threads))
    _limit_threads(threads)
    prior_genes = None
    if prior:
        from lingshu.data.prior import prior_of_labels, read_prior

        prior_genes = prior_of_labels(read_prior(prior),
                                      split.test_conditions()[PERT_COL].unique(), entry)
    write_h5ad(predict_conditions(model, adata, split, seed=seed, prior=prior_genes, run=run,
                                  sampling=sampling), out)


# ------------------------------------------------------------------------------------------
# Unconditional generation
# ------------------------------------------------------------------------------------------


def generate_cells(model: PerturbationModel, genes: np.ndarray, n_cells: int, seed: int,
                   progress: bool = True, run: str | None = None) -> ad.AnnData:
    """``n_cells`` cells generated by ``model``: raw counts in ``layers['counts']``,
    log1p(CP10k) in ``X``; ``uns['lingshu']`` records the model, the run and the time taken."""
    model_genes = [str(g) for g in getattr(model, "genes", genes)]
    if model_genes != [str(g) for g in genes]:
        raise ValueError(f"{model.name}: the model's {len(model_genes)} genes differ from the "
                         f"processed data's {len(genes)}; re-run its training rules")
    start = time.perf_counter()
    counts = np.asarray(model.generate(n_cells, np.random.default_rng(seed), progress=progress))
    seconds = time.perf_counter() - start
    if counts.shape != (n_cells, len(genes)):
        raise ValueError(f"{model.name} generated shape {counts.shape}; expected "
                         f"{(n_cells, len(genes))}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{model.name} generated negative or non-finite counts")
    counts = sp.csr_matrix(counts.astype(np.float32))
    out = ad.AnnData(X=sp.csr_matrix(log1p_cp10k(counts), dtype=np.float32),
                     obs=pd.DataFrame(index=[f"gen_{i}" for i in range(n_cells)]),
                     var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    out.layers["counts"] = counts
    out.uns["lingshu"] = {"model": model.name, "run": run or model.name,
                          "space": "log1p_cp10k", "generate_seconds": seconds}
    log.info("%s generated %d cells in %.1f s (%.1f cells/s)", run or model.name, n_cells,
             seconds, n_cells / max(seconds, 1e-9))
    return out


def generate_job(processed: str, split_dir: str, model: str, params: dict[str, Any],
                 sampling: dict[str, Any], checkpoint: str, run: str, seed: int, threads: int,
                 out: str) -> None:
    """Generate as many cells as the split has reference cells, unconditionally."""
    split = read_split(split_dir)
    adata = ad.read_h5ad(processed, backed="r")  # the gene list only
    genes = adata.var_names.to_numpy()
    adata.file.close()
    generator = load_generator(model, params, checkpoint, sampling)
    generator.threads = max(1, int(threads))
    _limit_threads(threads)
    n_cells = int(split.reference_rows().size)
    if n_cells == 0:
        raise InputError(f"{split_dir}: no reference cells to generate against. Fix: set "
                         "split.reference_fraction above 0 in the dataset's config entry")
    write_h5ad(generate_cells(generator, genes, n_cells, seed=seed, run=run), out)
