"""Generation fidelity (SPEC 2.2): how close a set of generated cells is to a set of real ones.

Every function takes log1p(CP10k) matrices (numpy or scipy sparse, cells x genes, the same
genes in the same order) and is deterministic given its ``seed``. The established pieces come
from libraries: PCA and the cell-type classifier from scikit-learn, the 1-Wasserstein distance
from scipy, LISI from harmonypy (the Python port of Korsunsky et al.'s LISI). The multi-scale
Gaussian MMD has no library form with the SPEC's bandwidth rule, so it is written out here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL

GENE_CHUNK = 512  # genes densified at a time by wasserstein_per_gene


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _check_pair(real, generated) -> None:
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real cells have {real.shape[1]} genes, generated cells "
                         f"{generated.shape[1]}; both must share one gene list")
    if real.shape[0] < 2 or generated.shape[0] < 2:
        raise ValueError(f"need at least 2 cells per side, got {real.shape[0]} real and "
                         f"{generated.shape[0]} generated")


def gene_mean_correlation(real, generated) -> dict[str, float]:
    """Pearson and Spearman correlation of the per-gene means (NaN when a side is constant)."""
    _check_pair(real, generated)
    a = np.asarray(real.mean(axis=0)).ravel().astype(np.float64)
    b = np.asarray(generated.mean(axis=0)).ravel().astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(stats.pearsonr(a, b)[0]),
            "spearman": float(stats.spearmanr(a, b)[0])}


def joint_pca(real, generated, n_components: int = 50,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of both sets on a PCA fitted to their union: (n_real, k) and (n_gen, k)."""
    from sklearn.decomposition import PCA

    _check_pair(real, generated)
    z = np.vstack([_dense(real), _dense(generated)])
    k = max(1, min(n_components, z.shape[0] - 1, z.shape[1]))
    scores = PCA(n_components=k, random_state=seed).fit_transform(z)
    return scores[: real.shape[0]], scores[real.shape[0]:]


def mmd(x: np.ndarray, y: np.ndarray, n_kernels: int = 5, multiplier: float = 2.0) -> float:
    """Squared maximum mean discrepancy with a multi-scale Gaussian kernel (SPEC 2.2).

    On the joint set z = [x; y] the base bandwidth is the mean squared distance over distinct
    pairs, divided by ``multiplier ** (n_kernels // 2)``; the kernel is the sum over
    i < n_kernels of exp(-d^2 / (base * multiplier ** i)). Returns the biased (V-statistic)
    estimate mean K_xx + mean K_yy - 2 mean K_xy, so identical sets give exactly 0.
    x: (n, d); y: (m, d).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = np.vstack([x, y])
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)  # (n+m, n+m)
    n_all = z.shape[0]
    base = d2.sum() / (n_all * n_all - n_all)
    if base <= 0:  # every point identical
        return 0.0
    base /= multiplier ** (n_kernels // 2)
    kernel = sum(np.exp(-d2 / (base * multiplier ** i)) for i in range(n_kernels))
    n = x.shape[0]
    value = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()
    return float(max(value, 0.0))


def wasserstein_per_gene(real, generated) -> float:
    """Mean over genes of the 1-Wasserstein distance between the two sets' values."""
    _check_pair(real, generated)
    real = sp.csc_matrix(real) if sp.issparse(real) else np.asarray(real)
    generated = sp.csc_matrix(generated) if sp.issparse(generated) else np.asarray(generated)
    total, n_genes = 0.0, real.shape[1]
    for start in range(0, n_genes, GENE_CHUNK):
        a = _dense(real[:, start:start + GENE_CHUNK])
        b = _dense(generated[:, start:start + GENE_CHUNK])
        total += sum(stats.wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1]))
    return float(total / n_genes)


def ilisi(real_pcs: np.ndarray, generated_pcs: np.ndarray, perplexity: float = 30) -> float:
    """Mixing of real and generated cells: median LISI of the real/generated label on the joint
    scores (harmonypy), scaled as scib does: (LISI - 1) / (2 - 1); 0 = no mixing, 1 = full."""
    import harmonypy

    z = np.vstack([real_pcs, generated_pcs])
    labels = pd.DataFrame({"source": ["real"] * len(real_pcs) + ["generated"] * len(generated_pcs)})
    perplexity = min(float(perplexity), max(1.0, (z.shape[0] - 1) // 3))
    lisi = harmonypy.compute_lisi(z, labels, ["source"], perplexity=perplexity)[:, 0]
    return float((np.median(lisi) - 1.0) / (2.0 - 1.0))


def celltype_proportions(train_X, train_labels, real_X, real_labels, generated_X,
                         seed: int = 0) -> dict:
    """Cell-type shares of generated cells as judged by a classifier trained on real cells.

    The classifier is PCA (up to 50 components, fitted on ``train_X``) then logistic
    regression. Returns ``accuracy`` on (real_X, real_labels), ``real`` and ``generated``
    (label -> share; every class listed), ``predicted_labels`` (the generated cells' labels)
    and ``tvd``, the total-variation distance 0.5 * sum |p_real - p_generated|.
    """
    train_labels = np.asarray(train_labels).astype(str)
    real_labels = np.asarray(real_labels).astype(str)
    classes = sorted(set(train_labels) | set(real_labels))
    if len(set(train_labels)) == 1:
        predicted = np.full(generated_X.shape[0], train_labels[0])
        accuracy = float(np.mean(real_labels == train_labels[0]))
    else:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        k = max(1, min(50, train_X.shape[0] - 1, train_X.shape[1]))
        clf = make_pipeline(PCA(n_components=k, random_state=seed),
                            LogisticRegression(max_iter=2000, random_state=seed))
        clf.fit(_dense(train_X), train_labels)
        accuracy = float(np.mean(clf.predict(_dense(real_X)) == real_labels))
        predicted = clf.predict(_dense(generated_X)).astype(str)

    def shares(labels: np.ndarray) -> dict[str, float]:
        return {c: float(np.mean(labels == c)) if labels.size else 0.0 for c in classes}

    real, generated = shares(real_labels), shares(predicted)
    tvd = 0.5 * sum(abs(real[c] - generated[c]) for c in classes)
    return {"accuracy": accuracy, "real": real, "generated": generated,
            "predicted_labels": predicted, "tvd": float(tvd)}


def fidelity_metrics(real, generated, train_X=None, train_labels=None, real_labels=None,
                     n_components: int = 50, seed: int = 0) -> dict[str, float]:
    """Every SPEC 2.2 metric of ``generated`` against ``real``.

    Keys: ``pearson_mean``, ``spearman_mean`` (gene means), ``mmd`` and ``ilisi`` (in the joint
    PCA space), ``wasserstein``; with ``train_X``, ``train_labels`` and ``real_labels`` also
    ``celltype_tvd`` and ``celltype_accuracy`` (see :func:`celltype_proportions`).
    """
    corr = gene_mean_correlation(real, generated)
    real_pcs, gen_pcs = joint_pca(real, generated, n_components=n_components, seed=seed)
    out = {"pearson_mean": corr["pearson"], "spearman_mean": corr["spearman"],
           "mmd": mmd(real_pcs, gen_pcs), "wasserstein": wasserstein_per_gene(real, generated),
           "ilisi": ilisi(real_pcs, gen_pcs)}
    if train_X is not None and train_labels is not None and real_labels is not None:
        props = celltype_proportions(train_X, train_labels, real, real_labels, generated, seed)
        out.update(celltype_tvd=props["tvd"], celltype_accuracy=props["accuracy"])
    return out


def _perturbed(adata) -> np.ndarray:
    keep = (adata.obs[PERT_COL].astype(str) != CONTROL).to_numpy()
    if "is_real_control" in adata.obs:
        keep &= ~adata.obs["is_real_control"].astype(bool).to_numpy()
    return keep


def condition_fidelity(truth, pred, n_components: int = 50, seed: int = 0) -> pd.DataFrame:
    """Distribution metrics of predicted against real cells, per held-out condition.

    truth / pred: AnnData in log1p space with ``context`` and ``perturbation`` in obs (control
    cells and rows flagged ``is_real_control`` are ignored). One row per condition present in
    both: context, perturbation, n_truth, n_pred, pearson_mean, mmd (joint PCA of the
    condition), wasserstein. Conditions with fewer than 2 cells on a side get NaN metrics.
    """
    if list(truth.var_names) != list(pred.var_names):
        raise ValueError("truth and prediction have different genes")
    keys = [CONTEXT_COL, PERT_COL]
    t_keep, p_keep = _perturbed(truth), _perturbed(pred)
    t_obs = truth.obs.loc[t_keep, keys].astype(str)
    p_obs = pred.obs.loc[p_keep, keys].astype(str)
    t_rows, p_rows = np.flatnonzero(t_keep), np.flatnonzero(p_keep)
    rows = []
    for (ctx, pert), t_idx in t_obs.groupby(keys, sort=True).indices.items():
        p_hit = p_rows[((p_obs[CONTEXT_COL] == ctx) & (p_obs[PERT_COL] == pert)).to_numpy()]
        t_hit = t_rows[t_idx]
        row = {CONTEXT_COL: ctx, PERT_COL: pert, "n_truth": t_hit.size, "n_pred": p_hit.size,
               "pearson_mean": np.nan, "mmd": np.nan, "wasserstein": np.nan}
        if t_hit.size >= 2 and p_hit.size >= 2:
            real, gen = truth.X[t_hit], pred.X[p_hit]
            real_pcs, gen_pcs = joint_pca(real, gen, n_components=n_components, seed=seed)
            row.update(pearson_mean=gene_mean_correlation(real, gen)["pearson"],
                       mmd=mmd(real_pcs, gen_pcs), wasserstein=wasserstein_per_gene(real, gen))
        rows.append(row)
    return pd.DataFrame(rows, columns=[CONTEXT_COL, PERT_COL, "n_truth", "n_pred",
                                       "pearson_mean", "mmd", "wasserstein"])
