"""scVI as a benchmark model: scvi-tools trains it, this adapter feeds it and samples from it.

Training (:meth:`ScviModel.fit`): an ``scvi.model.SCVI`` on the raw counts of the training
cells (observed library sizes), with

- ``context`` and the perturbation identity as categorical covariates, and ``batch`` as scVI's
  batch covariate when the training cells carry a batch that is not just the context;
- the shared perturbation features (SPEC 1.2a, :mod:`lingshu.data.features`) as continuous
  covariates (divided by their root mean square; ``unknown`` features are zeros), so that a
  held-out perturbation reaches the decoder the way it reaches every other model;
- identity dropout: the perturbation identity of a seeded ``unseen_fraction`` of the perturbed
  training cells is replaced by one shared ``UNSEEN`` level (their features are kept), so the
  level that every perturbation never seen in training gets at prediction is trained, and
  with it the path from the features to the expression.

The KL weight rises from 0 to 1 over the first ``kl_warmup_fraction`` of the epochs (scvi-tools'
default warm-up, 400 epochs, would never reach 1 in a short run), so that the prior that
unconditional generation samples from is the one the decoder learnt.

Prediction (:meth:`ScviModel.predict`): the context's control cells are drawn (without
replacement while there are enough), encoded to posterior samples of their latents, and decoded
with the condition's covariates: its context, its perturbation's identity (``UNSEEN`` when
training never saw it) and features, and a batch drawn from the context's training cells.
Counts are drawn from the decoded likelihood (ZINB by default) at each control's own library
size, then normalised to log1p(CP10k).

Generation (:meth:`ScviModel.generate`): latents from the prior z ~ N(0, I), covariates
(batch, context, perturbation) drawn jointly from the training cells, library sizes from the
training cells' library-size distribution, counts from the decoded likelihood.

Every draw at prediction and generation comes from the numpy ``rng`` passed in (the networks
run deterministically in eval mode), so the same seed gives the same cells. Training is seeded
by ``TrainingData.seed`` (``scvi.settings.seed``).

A condition the model cannot encode (a context never seen in training, or no control cells to
encode) raises :class:`ConditionNotEncodable`.

State: the scVI module's ``state_dict`` as numpy arrays plus the constructor arguments and the
covariate levels in the JSON meta; :meth:`ScviModel.set_state` rebuilds the module
(``scvi.module.VAE``) and loads the weights, without retraining and without pickles.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from lingshu.constants import BATCH_COL, CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data.features import SOURCE_COL, feature_matrix
from lingshu.data.normalize import log1p_cp10k
from lingshu.models.base import (
    ConditionInput,
    ConditionNotEncodable,
    PerturbationModel,
    TrainingData,
    model_workdir,
)
from lingshu.stats import sample_negative_binomial

log = logging.getLogger(__name__)

UNSEEN = "__unseen__"  # the perturbation level of every perturbation never seen in training
LEVEL_KEY = "_lingshu_perturbation_level"  # obs column of the identity covariate
FEATURE_PREFIX = "_lingshu_feature_"
SAMPLE_BATCH = 1024  # cells decoded at once at prediction and generation
N_QUANTILES = 1001

PRESETS: dict[str, dict[str, Any]] = {
    # tests: seconds on one CPU core
    "tiny": {"epochs": 30, "n_latent": 4, "n_hidden": 32, "n_layers": 1, "lr": 1e-2,
             "batch_size": 64, "unseen_fraction": 0.3, "kl_warmup_fraction": 0.3,
             "gene_likelihood": "zinb", "device": "cpu"},
    # the default pipeline on a CPU (~1,000 genes x ~6,000 cells, ~3,500 of them training
    # cells): under a minute of training on one thread (~1 s an epoch on a busy 2-core
    # machine). scVI's own sizes (128 hidden units, 10 latent dimensions, one layer).
    "cpu": {"epochs": 50, "n_latent": 10, "n_hidden": 128, "n_layers": 1, "lr": 2e-3,
            "batch_size": 128, "unseen_fraction": 0.3, "kl_warmup_fraction": 0.25,
            "gene_likelihood": "zinb", "device": "cpu"},
    # GPU size: scvi-tools' defaults with two layers and the epochs of its heuristic's cap.
    "gpu": {"epochs": 400, "n_latent": 10, "n_hidden": 128, "n_layers": 2, "lr": 1e-3,
            "batch_size": 512, "unseen_fraction": 0.3, "kl_warmup_fraction": 0.25,
            "gene_likelihood": "zinb", "device": "auto"},
}
# Every parameter a config block may set: the preset's keys, the preset itself and threads.
DEFAULTS: dict[str, Any] = {"preset": "cpu", "threads": None,
                            **{k: None for k in PRESETS["cpu"]}}
LIKELIHOODS = ("zinb", "nb")
DEVICES = ("auto", "cpu", "cuda")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's and scvi-tools' INFO logs and routine warnings off (the progress bar stays)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric",
             "pytorch_lightning", "scvi")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (".*does not have many workers.*", ".*GPU available but not used.*",
                            ".*TPU available but not used.*", ".*num_workers.*",
                            ".*has fewer than 3 cells.*", ".*small size of.*",
                            ".*contains unnormalized count data.*", ".*LeafSpec.*",
                            ".*logging interval.*"):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class ScviModel(PerturbationModel):
    """scVI (scvi-tools) with context, batch and perturbation covariates."""

    name = "scvi"

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"scvi: unknown parameters {sorted(unknown)}; "
                             f"known: {sorted(DEFAULTS)}")
        super().__init__(**params)
        preset = params.get("preset") or DEFAULTS["preset"]
        if preset not in PRESETS:
            raise ValueError(f"scvi: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        given = {k: v for k, v in params.items() if v is not None}
        self.cfg: dict[str, Any] = {**DEFAULTS, **PRESETS[preset], **given, "preset": preset}
        for key in ("epochs", "n_latent", "n_hidden", "n_layers", "batch_size"):
            if int(self.cfg[key]) < 1:
                raise ValueError(f"scvi: {key} must be a positive integer, got {self.cfg[key]}")
        if not float(self.cfg["lr"]) > 0:
            raise ValueError(f"scvi: lr must be positive, got {self.cfg['lr']}")
        if not 0.0 <= float(self.cfg["unseen_fraction"]) < 1.0:
            raise ValueError(f"scvi: unseen_fraction must lie in [0, 1), got "
                             f"{self.cfg['unseen_fraction']}")
        if not 0.0 <= float(self.cfg["kl_warmup_fraction"]) <= 1.0:
            raise ValueError(f"scvi: kl_warmup_fraction must lie in [0, 1], got "
                             f"{self.cfg['kl_warmup_fraction']}")
        if self.cfg["gene_likelihood"] not in LIKELIHOODS:
            raise ValueError(f"scvi: gene_likelihood must be one of {LIKELIHOODS}, got "
                             f"{self.cfg['gene_likelihood']!r}")
        if self.cfg["device"] not in DEVICES:
            raise ValueError(f"scvi: device must be one of {DEVICES}, got "
                             f"{self.cfg['device']!r}")
        self.device = torch.device("cuda" if self.cfg["device"] == "cuda" or (
            self.cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu")
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ training
    def fit(self, data: TrainingData) -> None:
        import scvi

        threads = int(self.cfg["threads"] or data.threads or 1)
        torch.set_num_threads(max(1, threads))
        self.genes = [str(g) for g in data.genes]
        obs = data.obs
        labels = obs[PERT_COL].astype(str).to_numpy()
        contexts = obs[CONTEXT_COL].astype(str).to_numpy()
        self.contexts = sorted(set(contexts))
        self.levels = [UNSEEN] + sorted(set(labels))  # perturbation identity levels
        if UNSEEN in set(labels):
            raise ValueError(f"scvi: the perturbation label {UNSEEN!r} is reserved")
        batches = obs[BATCH_COL].astype(str).to_numpy() if BATCH_COL in obs else None
        if batches is not None and not _informative_batch(batches, contexts):
            batches = None  # no batch, or the batch is the context under another name
        self.batches = sorted(set(batches)) if batches is not None else []
        self._set_features(data)

        # Identity dropout: a seeded fraction of the perturbed cells get the UNSEEN level.
        rng = np.random.default_rng(data.seed)
        hide = (labels != CONTROL) & (rng.random(labels.size) < float(self.cfg["unseen_fraction"]))
        level_codes = _codes(labels, self.levels)  # the true identities
        ctx_codes = _codes(contexts, self.contexts)
        batch_codes = (_codes(batches, self.batches) if batches is not None
                       else np.zeros(labels.size, dtype=np.int64))

        counts = sp.csr_matrix(data.count_rows().read_all(), dtype=np.float32)
        library = np.asarray(counts.sum(axis=1)).ravel()
        if (library <= 0).any():  # observed library sizes: log(0) has no place in scVI
            keep = library > 0
            log.warning("scvi: %d training cells without counts left out", int((~keep).sum()))
            counts, library = counts[keep], library[keep]
            level_codes, ctx_codes = level_codes[keep], ctx_codes[keep]
            batch_codes, hide, labels = batch_codes[keep], hide[keep], labels[keep]
        feature_rows = _codes(labels, self.feature_labels)
        train_levels = np.where(hide, 0, level_codes)

        adata = ad.AnnData(X=counts, obs=pd.DataFrame({
            CONTEXT_COL: pd.Categorical.from_codes(ctx_codes, categories=self.contexts),
            LEVEL_KEY: pd.Categorical.from_codes(train_levels, categories=self.levels),
            BATCH_COL: pd.Categorical.from_codes(
                batch_codes, categories=self.batches or ["all"]),
        }, index=[f"cell{i}" for i in range(counts.shape[0])]))
        feature_keys = [f"{FEATURE_PREFIX}{j}" for j in range(self.features.shape[1])]
        for j, key in enumerate(feature_keys):
            adata.obs[key] = self.features[feature_rows, j]

        epochs, batch_size = int(self.cfg["epochs"]), int(self.cfg["batch_size"])
        warmup = int(round(float(self.cfg["kl_warmup_fraction"]) * epochs))
        start = time.perf_counter()
        with _quiet(), model_workdir(data.workdir, "scvi-") as workdir:
            scvi.settings.seed = int(data.seed)
            scvi.settings.dl_num_workers = 0
            scvi.model.SCVI.setup_anndata(
                adata, batch_key=BATCH_COL if self.batches else None,
                categorical_covariate_keys=[CONTEXT_COL, LEVEL_KEY],
                continuous_covariate_keys=feature_keys or None)
            model = scvi.model.SCVI(
                adata, n_hidden=int(self.cfg["n_hidden"]), n_latent=int(self.cfg["n_latent"]),
                n_layers=int(self.cfg["n_layers"]), gene_likelihood=self.cfg["gene_likelihood"],
                dispersion="gene")
            # A last mini-batch of one or two cells breaks batch normalisation: drop it.
            drop_last = adata.n_obs > batch_size and adata.n_obs % batch_size in (1, 2)
            model.train(
                max_epochs=epochs, batch_size=batch_size, train_size=1.0,
                accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
                early_stopping=False, datasplitter_kwargs={"drop_last": drop_last},
                plan_kwargs={"lr": float(self.cfg["lr"]),
                             "n_epochs_kl_warmup": warmup or None},
                default_root_dir=str(workdir), enable_model_summary=False)
            history = model.history
        seconds = time.perf_counter() - start
        module = model.module
        self.module_args = {
            "n_input": len(self.genes), "n_batch": int(module.n_batch),
            "n_labels": int(module.n_labels),
            "n_continuous_cov": len(feature_keys),
            "n_cats_per_cov": [len(self.contexts), len(self.levels)],
            "n_hidden": int(self.cfg["n_hidden"]), "n_latent": int(self.cfg["n_latent"]),
            "n_layers": int(self.cfg["n_layers"]), "dropout_rate": 0.1, "dispersion": "gene",
            "gene_likelihood": self.cfg["gene_likelihood"], "latent_distribution": "normal",
            "use_observed_lib_size": True,
        }
        self.module = module.to(self.device).eval()

        # What prediction and generation draw covariates and library sizes from.
        n_batch = max(len(self.batches), 1)
        self.batch_by_context = np.zeros((len(self.contexts), n_batch))
        np.add.at(self.batch_by_context, (ctx_codes, batch_codes), 1.0)
        combos, weights = np.unique(np.stack([batch_codes, ctx_codes, level_codes], axis=1),
                                    axis=0, return_counts=True)
        self.gen_combos, self.gen_weights = combos.astype(np.int64), weights.astype(np.float64)
        self.library_quantiles = np.quantile(library, np.linspace(0, 1, N_QUANTILES))
        elbo = history.get("elbo_train")
        self.meta = {"fit_seconds": float(seconds), "epochs": epochs,
                     "n_train_cells": int(adata.n_obs), "n_unseen_cells": int(hide.sum()),
                     "final_elbo_train": float(elbo.iloc[-1, 0]) if elbo is not None
                     and len(elbo) else float("nan")}
        log.info("scvi: %d epochs on %d cells in %.1f s (final train ELBO %.1f)", epochs,
                 adata.n_obs, seconds, self.meta["final_elbo_train"])

    def _set_features(self, data: TrainingData) -> None:
        """Feature rows (labels, F) of every perturbation the model may be asked about.

        Divided by their root mean square over the rows that have any, so the decoder sees
        values of order one whatever the feature source; ``unknown`` rows are zeros.
        """
        table = data.features
        labels = set(self.levels[1:]) | set(map(str, data.targets))
        if table is not None:
            labels |= set(map(str, table.index))
        self.feature_labels = sorted(labels)
        feats = feature_matrix(table, self.feature_labels).astype(np.float32)
        if table is not None and SOURCE_COL in table:
            source = table[SOURCE_COL].astype(str).reindex(self.feature_labels)
            feats[(source.fillna("unknown") == "unknown").to_numpy()] = 0.0
        present = np.abs(feats).sum(axis=1) > 0 if feats.shape[1] else np.zeros(len(feats), bool)
        rms = float(np.sqrt(np.mean(feats[present] ** 2))) if present.any() else 1.0
        self.feature_scale = rms if rms > 0 else 1.0
        self.features = (feats / self.feature_scale).astype(np.float32)

    # ------------------------------------------------------------------ sampling
    def _feature_row(self, label: str) -> np.ndarray:
        if label in self.feature_labels:
            return self.features[self.feature_labels.index(label)]
        return np.zeros(self.features.shape[1], dtype=np.float32)

    def _covariates(self, batch: np.ndarray, context: np.ndarray, level: np.ndarray,
                    features: np.ndarray) -> dict[str, torch.Tensor | None]:
        """The module's covariate tensors for cells with these codes and feature rows."""
        d = self.device
        return {
            "batch_index": torch.as_tensor(batch, dtype=torch.long, device=d)[:, None],
            "cat_covs": torch.as_tensor(np.stack([context, level], axis=1), dtype=torch.long,
                                        device=d),
            "cont_covs": (torch.as_tensor(features, dtype=torch.float32, device=d)
                          if features.shape[1] else None),
        }

    def _draw_counts(self, z: torch.Tensor, library: np.ndarray,
                     cov: dict[str, torch.Tensor | None], rng: np.random.Generator) -> np.ndarray:
        """(n, G) counts drawn from the decoded likelihood at latents ``z`` and library sizes."""
        lib = torch.as_tensor(np.log(library)[:, None], dtype=torch.float32, device=self.device)
        px = self.module.generative(z=z, library=lib, **cov)["px"]
        mu = px.mu.detach().double().cpu().numpy()
        theta = np.broadcast_to(px.theta.detach().double().cpu().numpy(), mu.shape)[0]
        counts = sample_negative_binomial(mu, np.ascontiguousarray(theta), rng)
        if self.module_args["gene_likelihood"] == "zinb":
            p_zero = torch.sigmoid(px.zi_logits).detach().double().cpu().numpy()
            counts[rng.random(mu.shape) < p_zero] = 0
        return counts

    @torch.no_grad()
    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        ctx, label = condition.context, condition.perturbation
        if ctx not in self.contexts:
            raise ConditionNotEncodable(ctx, label, f"context {ctx!r} was not seen in training "
                                        f"(seen: {self.contexts}); the decoder has no level "
                                        "for it", model=self.name)
        controls = (sp.csr_matrix(condition.control_counts, dtype=np.float32)
                    if condition.control_counts is not None else sp.csr_matrix((0, 0)))
        if controls.shape[0] and controls.shape[1] != len(self.genes):
            raise ValueError(f"scvi: control cells have {controls.shape[1]} genes, the model "
                             f"{len(self.genes)}")
        library = np.asarray(controls.sum(axis=1)).ravel()
        controls = controls[library > 0]
        n_ctrl, n = controls.shape[0], int(condition.n_cells)
        if n == 0:
            return np.zeros((0, len(self.genes)), dtype=np.float32)
        if n_ctrl == 0:
            raise ConditionNotEncodable(ctx, label, "no control cells with counts in the "
                                        "context to encode", model=self.name)
        rows = rng.choice(n_ctrl, size=n, replace=n > n_ctrl)
        c = self.contexts.index(ctx)
        level = self.levels.index(label) if label in self.levels[1:] else 0
        feat = self._feature_row(label)
        seen = self.batch_by_context[c]
        batch_p = seen / seen.sum() if seen.sum() > 0 else np.full(seen.size, 1.0 / seen.size)
        blocks = []
        for start in range(0, n, SAMPLE_BATCH):
            idx = rows[start:start + SAMPLE_BATCH]
            m = idx.size
            x = torch.as_tensor(controls[idx].toarray(), device=self.device)
            cov = self._covariates(rng.choice(batch_p.size, size=m, p=batch_p),
                                   np.full(m, c), np.full(m, level), np.tile(feat, (m, 1)))
            qz = self.module.inference(x=x, **cov)["qz"]
            eps = torch.as_tensor(rng.standard_normal((m, qz.loc.shape[1])),
                                  dtype=qz.loc.dtype, device=self.device)
            z = qz.loc + qz.scale * eps
            lib = np.asarray(x.sum(dim=1).cpu().numpy(), dtype=np.float64)
            blocks.append(log1p_cp10k(self._draw_counts(z, lib, cov, rng)))
        return np.asarray(np.vstack(blocks), dtype=np.float32)

    @torch.no_grad()
    def generate(self, n_cells: int, rng: np.random.Generator,
                 progress: bool = False) -> np.ndarray:
        """(n_cells, n_genes) counts of cells decoded from the prior z ~ N(0, I), with
        (batch, context, perturbation) drawn jointly from the training cells and library
        sizes from the training cells' library-size distribution (1,001 stored quantiles,
        interpolated)."""
        p = self.gen_weights / self.gen_weights.sum()
        blocks = []
        starts = range(0, n_cells, SAMPLE_BATCH)
        for start in tqdm(starts, desc="generate scvi", unit="batch", disable=not progress):
            m = min(SAMPLE_BATCH, n_cells - start)
            combo = self.gen_combos[rng.choice(p.size, size=m, p=p)]
            feats = np.stack([self._feature_row(self.levels[k]) for k in combo[:, 2]]) \
                if m else np.zeros((0, self.features.shape[1]), np.float32)
            cov = self._covariates(combo[:, 0], combo[:, 1], combo[:, 2], feats)
            z = torch.as_tensor(rng.standard_normal((m, int(self.module_args["n_latent"]))),
                                dtype=torch.float32, device=self.device)
            lib = np.interp(rng.uniform(0, 1, m), np.linspace(0, 1, N_QUANTILES),
                            self.library_quantiles)
            blocks.append(self._draw_counts(z, np.maximum(lib, 1.0), cov, rng)
                          .astype(np.float32))
        return np.vstack(blocks) if blocks else np.zeros((0, len(self.genes)), np.float32)

    # ------------------------------------------------------------------ state
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"module::{k}": v.detach().cpu().numpy()
                  for k, v in self.module.state_dict().items()}
        arrays.update({"features": self.features, "batch_by_context": self.batch_by_context,
                       "gen_combos": self.gen_combos, "gen_weights": self.gen_weights,
                       "library_quantiles": self.library_quantiles})
        meta = {"module_args": self.module_args, "genes": self.genes,
                "contexts": self.contexts, "levels": self.levels, "batches": self.batches,
                "feature_labels": self.feature_labels, "feature_scale": self.feature_scale,
                "fit": self.meta}
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        from scvi.module import VAE

        self.module_args = dict(meta["module_args"])
        self.genes, self.contexts = list(meta["genes"]), list(meta["contexts"])
        self.levels, self.batches = list(meta["levels"]), list(meta["batches"])
        self.feature_labels = list(meta["feature_labels"])
        self.feature_scale = float(meta["feature_scale"])
        self.meta = dict(meta.get("fit", {}))
        for key in ("features", "batch_by_context", "gen_combos", "gen_weights",
                    "library_quantiles"):
            setattr(self, key, arrays[key])
        module = VAE(**self.module_args)
        state = module.state_dict()
        given = {k[len("module::"):]: v for k, v in arrays.items() if k.startswith("module::")}
        if set(given) != set(state):
            raise ValueError("scvi: the saved weights do not match the module "
                             f"(missing {sorted(set(state) - set(given))[:5]}, unexpected "
                             f"{sorted(set(given) - set(state))[:5]})")
        module.load_state_dict({k: torch.from_numpy(np.array(v)).to(state[k].dtype)
                                for k, v in given.items()})
        self.module = module.to(self.device).eval()


def _informative_batch(batches: np.ndarray, contexts: np.ndarray) -> bool:
    """True when the batch labels have several levels and are not the contexts renamed."""
    n_batch = len(set(batches))
    if n_batch < 2:
        return False
    pairs = len(set(zip(batches, contexts)))
    return not (pairs == n_batch == len(set(contexts)))


def _codes(values: np.ndarray, levels: list[str]) -> np.ndarray:
    """int64 positions of ``values`` in ``levels`` (every value is one of them)."""
    codes = pd.Categorical(values, categories=levels).codes.astype(np.int64)
    if (codes < 0).any():
        raise ValueError(f"scvi: {values[codes < 0][0]!r} is not one of the known levels")
    return codes
