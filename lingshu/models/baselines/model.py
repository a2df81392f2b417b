"""The three reference baselines every perturbation benchmark must show (SPEC 3).

- ``control_mean``: predicts no change: the context's real control cells, resampled, so its
  pseudobulk is the control pseudobulk and its DE calls are those of control vs control.
- ``perturbation_mean``: the VCC cell-mean baseline, the mean profile of every training
  perturbed cell (within the context when it has training perturbations, else pooled).
- ``linear``: ridge regression of the change from control on context and perturbation
  embeddings, after Ahlmann-Eltze et al. (2025): prediction = context control mean +
  predicted change (see :class:`LinearModel`).

All work in log1p(CP10k) space; the last two predict one profile repeated for every cell.
These definitions reproduce the reference figures of SPEC 5 on the Papalexi split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data.features import feature_matrix
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import group_means
from lingshu.models.base import ConditionInput, PerturbationModel, TrainingData


def _control_profile(condition: ConditionInput) -> np.ndarray:
    """(n_genes,) mean log1p(CP10k) of the condition's real control cells."""
    return np.asarray(log1p_cp10k(condition.control_counts).mean(axis=0)).ravel()


def _repeat(profile: np.ndarray, n_cells: int) -> np.ndarray:
    return np.repeat(np.clip(profile, 0, None)[None, :], n_cells, axis=0).astype(np.float32)


def _condition_means(data: TrainingData):
    """Return (contexts (k,), perts (k,), means (k, n_genes)) of every training condition."""
    keys = (data.obs[CONTEXT_COL].astype(str) + "\x1f" + data.obs[PERT_COL].astype(str))
    uniq, means = group_means(data.count_rows(), keys.to_numpy(), transform=log1p_cp10k)
    ctx, pert = zip(*(u.split("\x1f") for u in uniq))
    return np.array(ctx), np.array(pert), means


class ControlMean(PerturbationModel):
    """Predicts no change: the context's real control cells for every perturbation.

    Cells are drawn without replacement while there are enough (with replacement beyond), so
    the prediction keeps the controls' cell-to-cell spread: a constant profile would make the
    Wilcoxon DE test call spurious genes wherever a gene's mean differs from its median.
    """

    name = "control_mean"

    def fit(self, data: TrainingData) -> None:
        self.n_genes = len(data.genes)

    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        controls = log1p_cp10k(condition.control_counts)
        n_ctrl = controls.shape[0]
        rows = rng.choice(n_ctrl, size=condition.n_cells, replace=condition.n_cells > n_ctrl)
        return controls[rows].toarray().astype(np.float32)

    def get_state(self):
        return {}, {"n_genes": int(self.n_genes)}

    def set_state(self, arrays, meta):
        self.n_genes = meta["n_genes"]


class PerturbationMean(PerturbationModel):
    """The VCC cell-mean baseline: the mean profile of all training perturbed cells.

    Cell-weighted (every perturbed training cell counts once), which reproduces the
    reference figures of SPEC 5; per context when the context has training perturbations.
    """

    name = "perturbation_mean"

    def fit(self, data: TrainingData) -> None:
        labels = data.obs[PERT_COL].astype(str).to_numpy()
        mask = labels != CONTROL
        if not mask.any():
            raise ValueError("perturbation_mean: the training cells hold no perturbed cells")
        # Controls get their own label; the perturbed cells' means follow per context.
        contexts = np.where(mask, data.obs[CONTEXT_COL].astype(str).to_numpy(), "\x1fcontrol")
        labels, means = group_means(data.count_rows(), contexts, transform=log1p_cp10k)
        n_cells = np.unique(contexts, return_counts=True)[1].astype(np.float64)  # labels' order
        keep = labels != "\x1fcontrol"
        self.contexts, self.per_context = labels[keep], means[keep]
        self.pooled = (n_cells[keep] @ means[keep]) / n_cells[keep].sum()

    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        hit = np.flatnonzero(self.contexts == condition.context)
        profile = self.per_context[hit[0]] if hit.size else self.pooled
        return _repeat(profile, condition.n_cells)

    def get_state(self):
        return ({"per_context": self.per_context, "pooled": self.pooled},
                {"contexts": self.contexts.tolist()})

    def set_state(self, arrays, meta):
        self.per_context, self.pooled = arrays["per_context"], arrays["pooled"]
        self.contexts = np.array(meta["contexts"], dtype=object)


class LinearModel(PerturbationModel):
    """Ridge regression of the change from control, after Ahlmann-Eltze et al. (2025).

    Two parts, both fitted on the training conditions' pseudobulk changes Δ(c, p) = mean of
    (c, p) - control mean of c, in log1p(CP10k):

    - seen perturbations (a held-out context x perturbation combination): a full-gene ridge on
      [one-hot(context), one-hot(perturbation)], so the prediction is the context's controls
      plus the perturbation's shift learned in other contexts, adjusted by the context's term;
    - unseen perturbations: the bilinear model Δ ≈ ȳ + C_c + G W f(p), with G the genes'
      loadings on the top PCs of the training cells, f(p) the shared perturbation features
      (SPEC 1.2a: the target gene's row of G, or a user's feature table) and W fitted in closed
      form with ridge penalties on both sides; an unseen perturbation without features gets
      the context's mean shift.

    params: ``ridge`` (penalty, relative to each side's scale; default 0.1),
    ``n_components`` (width of G; default 16).
    """

    name = "linear"

    def fit(self, data: TrainingData) -> None:
        from lingshu.data.features import embedding_rows, gene_embedding

        ridge = float(self.params.get("ridge", 0.1))
        n_components = int(self.params.get("n_components", 16))
        ctx, pert, means = _condition_means(data)
        ctrl_of = {c: means[i] for i, c in enumerate(ctx) if pert[i] == CONTROL}
        rows = [i for i in range(len(ctx)) if pert[i] != CONTROL and ctx[i] in ctrl_of]
        if not rows:
            raise ValueError("linear: no perturbed training condition has controls in its context")
        ctx, pert = ctx[rows], pert[rows]
        delta = np.stack([means[i] - ctrl_of[c] for i, c in zip(rows, ctx)])  # (k, n_genes)
        self.contexts = sorted(set(ctx))
        self.train_perts = sorted(set(pert))
        self.y_mean = delta.mean(axis=0)
        resid = delta - self.y_mean

        # Seen perturbations: full-gene ridge on context and perturbation identities.
        design = np.stack([self._identity_row(c, p) for c, p in zip(ctx, pert)])  # (k, d)
        gram = design.T @ design + ridge * np.eye(design.shape[1])
        self.identity_coef = np.linalg.solve(gram, design.T @ resid)  # (d, n_genes)

        # Unseen perturbations: context offsets, then the bilinear low-rank map.
        self.context_offset = np.stack([resid[ctx == c].mean(axis=0) for c in self.contexts])
        resid2 = resid - self.context_offset[[self.contexts.index(c) for c in ctx]]
        rows = data.count_rows()  # the embedding's subsample only is read
        self.gene_emb = gene_embedding(
            log1p_cp10k(rows.read(embedding_rows(rows.shape[0], data.seed))), n_components,
            data.seed)
        self.feature_labels = list(data.features.index) if data.features is not None else []
        self.features = feature_matrix(data.features, self.feature_labels)
        feats = feature_matrix(data.features, list(pert))  # (k, f)
        g = self.gene_emb.astype(np.float64)  # (n_genes, K)
        lam_g = ridge * max(np.trace(g.T @ g) / g.shape[1], 1e-12)
        lam_f = ridge * max(np.trace(feats.T @ feats) / max(feats.shape[1], 1), 1e-12)
        left = np.linalg.solve(g.T @ g + lam_g * np.eye(g.shape[1]), g.T @ resid2.T)  # (K, k)
        right = np.linalg.solve(feats.T @ feats + lam_f * np.eye(feats.shape[1]), feats.T).T
        self.bilinear = left @ right  # (K, f)

    def _identity_row(self, context: str, perturbation: str) -> np.ndarray:
        ctx = [context == c for c in self.contexts]
        ident = [perturbation == p for p in self.train_perts]
        return np.array(ctx + ident, dtype=np.float64)

    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        c, p = condition.context, condition.perturbation
        if p in self.train_perts:
            delta = self.y_mean + self._identity_row(c, p) @ self.identity_coef
        else:
            offset = (self.context_offset[self.contexts.index(c)] if c in self.contexts
                      else np.zeros_like(self.y_mean))
            idx = self.feature_labels.index(p) if p in self.feature_labels else None
            f = self.features[idx] if idx is not None else np.zeros(self.bilinear.shape[1])
            delta = self.y_mean + offset + self.gene_emb @ (self.bilinear @ f)
        return _repeat(_control_profile(condition) + delta, condition.n_cells)

    def get_state(self):
        keys = ("y_mean", "identity_coef", "context_offset", "gene_emb", "features", "bilinear")
        arrays = {k: np.asarray(getattr(self, k)) for k in keys}
        meta: dict[str, Any] = {"contexts": self.contexts, "train_perts": self.train_perts,
                                "feature_labels": self.feature_labels}
        return arrays, meta

    def set_state(self, arrays, meta):
        for key, value in arrays.items():
            setattr(self, key, value)
        self.contexts, self.train_perts = meta["contexts"], meta["train_perts"]
        self.feature_labels = meta["feature_labels"]
