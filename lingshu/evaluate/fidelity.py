"""Generation fidelity (SPEC 2.2): how close a set of generated cells is to a set of real ones.

Every function takes log1p(CP10k) matrices (numpy or scipy sparse, cells x genes, the same
genes in the same order) and is deterministic given its ``seed``. The established pieces come
from libraries: PCA and the cell-type classifier from scikit-learn, the correlations and the
1-Wasserstein distance from scipy, LISI from harmonypy (the Python port of Korsunsky et al.'s
LISI). The multi-scale Gaussian MMD has no library form with the SPEC's bandwidth rule (the
one of scDiffusion), so it is written out here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data.normalize import dense64

# Metric -> (title, True when higher is better): the columns of the paper's Table 1 layout.
FIDELITY_METRICS = {
    "pearson_mean": ("Pearson (gene means)", True),
    "spearman_mean": ("Spearman (gene means)", True),
    "ilisi": ("iLISI", True),
    "mmd": ("MMD", False),
    "wasserstein": ("1-Wasserstein", False),
    "celltype_tvd": ("cell-type proportion TVD", False),
}
CELL_TYPE = "cell_type"  # obs column of real / generated cells: context or classifier label

GENE_CHUNK = 512  # genes densified at a time by wasserstein_per_gene
MMD_BLOCK = 1024  # rows of one kernel block in mmd: a block is MMD_BLOCK x n_other float64
IS_REAL_CONTROL = "is_real_control"
CONDITION_COLUMNS = [CONTEXT_COL, PERT_COL, "n_truth", "n_pred", "pearson_mean", "mmd",
                     "wasserstein"]


def _check_pair(real, generated) -> None:
    if real.ndim != 2 or generated.ndim != 2:
        raise ValueError("real and generated must be 2-D (cells x genes)")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real cells have {real.shape[1]} genes, generated cells "
                         f"{generated.shape[1]}; both must share one gene list")
    if real.shape[0] < 2 or generated.shape[0] < 2:
        raise ValueError(f"need at least 2 cells per side, got {real.shape[0]} real and "
                         f"{generated.shape[0]} generated")


def gene_mean_correlation(real, generated) -> dict[str, float]:
    """Pearson and Spearman correlation of the per-gene means of two sets of cells.

    Parameters
    ----------
    real : array or sparse matrix, shape (n_real, n_genes)
        Real cells, log1p(CP10k).
    generated : array or sparse matrix, shape (n_gen, n_genes)
        Generated cells, same genes in the same order.

    Returns
    -------
    dict
        ``{"pearson": float, "spearman": float}``; both NaN when the gene means of one side
        are constant (a correlation is undefined there).
    """
    _check_pair(real, generated)
    a = np.asarray(real.mean(axis=0), dtype=np.float64).ravel()
    b = np.asarray(generated.mean(axis=0), dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(stats.pearsonr(a, b)[0]),
            "spearman": float(stats.spearmanr(a, b)[0])}


def joint_pca(real, generated, n_components: int = 50,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of both sets on one PCA fitted to their union.

    Parameters
    ----------
    real : array or sparse matrix, shape (n_real, n_genes)
    generated : array or sparse matrix, shape (n_gen, n_genes)
    n_components : int
        Number of components, capped at ``min(n_real + n_gen - 1, n_genes)``.
    seed : int
        ``random_state`` of scikit-learn's PCA (the randomised solver), for determinism.

    Returns
    -------
    real_pcs : ndarray, shape (n_real, k)
    generated_pcs : ndarray, shape (n_gen, k)
    """
    from sklearn.decomposition import PCA

    _check_pair(real, generated)
    z = np.vstack([dense64(real), dense64(generated)])
    k = max(1, min(int(n_components), z.shape[0] - 1, z.shape[1]))
    scores = PCA(n_components=k, random_state=seed).fit_transform(z)
    n_real = real.shape[0]
    return scores[:n_real], scores[n_real:]


def _kernel_sum(a: np.ndarray, b: np.ndarray, inv_bandwidths: list[float]) -> float:
    """Sum over all pairs (i in a, j in b) of sum_s exp(-|a_i - b_j|^2 * inv_bandwidths[s]).

    Works through ``MMD_BLOCK`` rows of ``a`` at a time, so the largest array is
    ``MMD_BLOCK x len(b)``.
    """
    sq_b = np.einsum("ij,ij->i", b, b)
    total = 0.0
    for start in range(0, a.shape[0], MMD_BLOCK):
        blk = a[start:start + MMD_BLOCK]
        d2 = blk @ b.T
        d2 *= -2.0
        d2 += np.einsum("ij,ij->i", blk, blk)[:, None]
        d2 += sq_b[None, :]
        np.maximum(d2, 0.0, out=d2)  # rounding can leave tiny negatives
        tmp = np.empty_like(d2)
        for inv in inv_bandwidths:
            np.multiply(d2, -inv, out=tmp)
            np.exp(tmp, out=tmp)
            total += float(tmp.sum())
    return total


def mmd(x: np.ndarray, y: np.ndarray, n_kernels: int = 5, multiplier: float = 2.0) -> float:
    """Squared maximum mean discrepancy with a multi-scale Gaussian kernel (SPEC 2.2).

    The kernel is the one of scDiffusion: on the joint set ``z = [x; y]`` (N points) the base
    bandwidth is the mean squared distance over distinct pairs, ``sum_ij |z_i - z_j|^2 /
    (N^2 - N)``, divided by ``multiplier ** (n_kernels // 2)``; the kernel is
    ``k(a, b) = sum_{i < n_kernels} exp(-|a - b|^2 / (base * multiplier ** i))``.

    Parameters
    ----------
    x : ndarray, shape (n, d)
        First set (e.g. real cells in a joint PCA space).
    y : ndarray, shape (m, d)
        Second set, same dimensions.
    n_kernels : int
        Number of bandwidths.
    multiplier : float
        Ratio of consecutive bandwidths.

    Returns
    -------
    float
        The biased (V-statistic) estimate ``mean K_xx + mean K_yy - 2 mean K_xy``, clipped at
        0; identical sets give exactly 0. Computed in float64, in row blocks, so the largest
        temporary is ``MMD_BLOCK x max(n, m)`` (about 40 MB for 5,000 cells a side).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be 2-D with the same columns, got {x.shape} and {y.shape}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError("mmd needs at least one point per set")
    # Distances do not change under translation; centring on the joint mean keeps the
    # |a|^2 + |b|^2 - 2ab expansion accurate and gives the pair sum in closed form:
    # sum_ij |z_i - z_j|^2 = 2 N sum_i |z_i|^2 when sum_i z_i = 0.
    center = (x.sum(0) + y.sum(0)) / (len(x) + len(y))
    x, y = x - center, y - center
    n_all = len(x) + len(y)
    sq_total = float(np.einsum("ij,ij->", x, x) + np.einsum("ij,ij->", y, y))
    base = 2.0 * n_all * sq_total / (n_all * n_all - n_all)
    if base <= 0:  # every point identical
        return 0.0
    base /= multiplier ** (n_kernels // 2)
    inv = [1.0 / (base * multiplier ** i) for i in range(n_kernels)]
    k_xx = _kernel_sum(x, x, inv) / (len(x) * len(x))
    k_yy = _kernel_sum(y, y, inv) / (len(y) * len(y))
    k_xy = _kernel_sum(x, y, inv) / (len(x) * len(y))
    return float(max(k_xx + k_yy - 2.0 * k_xy, 0.0))


def wasserstein_per_gene(real, generated) -> float:
    """Mean over genes of the 1-Wasserstein distance between the two sets' values of a gene.

    Parameters
    ----------
    real : array or sparse matrix, shape (n_real, n_genes)
    generated : array or sparse matrix, shape (n_gen, n_genes)
        The set sizes may differ.

    Returns
    -------
    float
        ``mean_g W1(real[:, g], generated[:, g])`` with ``scipy.stats.wasserstein_distance``
        (exact for unequal sizes). Genes are densified ``GENE_CHUNK`` at a time, so a sparse
        18,080-gene matrix is never densified whole.
    """
    _check_pair(real, generated)
    real = sp.csc_matrix(real) if sp.issparse(real) else np.asarray(real)
    generated = sp.csc_matrix(generated) if sp.issparse(generated) else np.asarray(generated)
    total, n_genes = 0.0, real.shape[1]
    for start in range(0, n_genes, GENE_CHUNK):
        a = dense64(real[:, start:start + GENE_CHUNK])
        b = dense64(generated[:, start:start + GENE_CHUNK])
        total += sum(stats.wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1]))
    return float(total / n_genes)


def ilisi(real_pcs: np.ndarray, generated_pcs: np.ndarray, perplexity: float = 30) -> float:
    """Integration LISI of the label real/generated on joint scores, scaled as in scib.

    Parameters
    ----------
    real_pcs : ndarray, shape (n_real, k)
    generated_pcs : ndarray, shape (n_gen, k)
        Scores in one space, e.g. from :func:`joint_pca`.
    perplexity : float
        Perplexity of harmonypy's LISI (it uses ``3 * perplexity`` neighbours); capped at
        ``(n_real + n_gen - 1) // 3`` so small inputs work.

    Returns
    -------
    float
        ``(median LISI - 1) / (2 - 1)``: 0 = the two sets do not mix, 1 = perfect mixing.
    """
    import harmonypy

    z = np.vstack([np.asarray(real_pcs, np.float64), np.asarray(generated_pcs, np.float64)])
    if len(real_pcs) == 0 or len(generated_pcs) == 0:
        raise ValueError("ilisi needs cells on both sides")
    labels = pd.DataFrame({"source": ["real"] * len(real_pcs)
                           + ["generated"] * len(generated_pcs)})
    perplexity = min(float(perplexity), max(1.0, float((z.shape[0] - 1) // 3)))
    lisi = harmonypy.compute_lisi(z, labels, ["source"], perplexity=perplexity)[:, 0]
    return float((np.median(lisi) - 1.0) / (2.0 - 1.0))


def celltype_classifier(train_X, train_labels, seed: int = 0):
    """The cell-type classifier of :func:`celltype_proportions`, fitted: PCA
    (``min(50, n_train - 1, n_genes)`` components, no scaling) then
    ``LogisticRegression(max_iter=2000)``, both seeded. train_X: (n_train, n_genes) in
    log1p(CP10k), dense or sparse; train_labels: (n_train,), at least two classes."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    labels = np.asarray(train_labels).astype(str)
    if len(set(labels)) < 2:
        raise ValueError("celltype_classifier: the training labels hold fewer than two classes")
    k = max(1, min(50, train_X.shape[0] - 1, train_X.shape[1]))
    clf = make_pipeline(PCA(n_components=k, random_state=seed),
                        LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(dense64(train_X), labels)


def celltype_proportions(train_X, train_labels, real_X, real_labels, generated_X,
                         seed: int = 0) -> dict:
    """Cell-type shares of generated cells against those of real cells, both as judged by a
    classifier trained on other real cells.

    Both sides are labelled by the same classifier, so its errors cancel: an equally large
    sample of real cells scores near 0 whatever the classifier's accuracy (comparing the
    classifier's shares on generated cells with the real cells' own labels would count the
    classifier's mistakes against every model). The classifier is PCA (``min(50, n_train - 1, n_genes)`` components, no scaling, fitted on
    ``train_X``) followed by ``LogisticRegression(max_iter=2000)``. With a single class in
    the training labels no classifier is fitted: every generated cell gets that label.

    Parameters
    ----------
    train_X : array or sparse matrix, shape (n_train, n_genes)
    train_labels : array-like, shape (n_train,)
    real_X : array or sparse matrix, shape (n_real, n_genes)
        Held-out real cells: the classifier's accuracy is measured on them (with their
        labels), and its shares on them are the real proportions the generated ones are
        compared with.
    real_labels : array-like, shape (n_real,)
    generated_X : array or sparse matrix, shape (n_gen, n_genes)
    seed : int
        ``random_state`` of the PCA and of the logistic regression.

    Returns
    -------
    dict
        ``accuracy`` (float, on real_X), ``real`` and ``generated`` (dict label -> share as
        the classifier labels real_X and generated_X; every class of train and real labels
        listed, zeros included), ``real_labelled`` (the shares of ``real_labels`` themselves),
        ``predicted_labels`` (ndarray of str, shape (n_gen,)) and
        ``tvd`` = 0.5 * sum |p_real - p_generated|.
    """
    train_labels = np.asarray(train_labels).astype(str)
    real_labels = np.asarray(real_labels).astype(str)
    if len(train_labels) != train_X.shape[0] or len(real_labels) != real_X.shape[0]:
        raise ValueError("each label array must have one label per cell of its matrix")
    if not train_X.shape[1] == real_X.shape[1] == generated_X.shape[1]:
        raise ValueError(f"train, real and generated cells have different gene counts "
                         f"({train_X.shape[1]}, {real_X.shape[1]}, {generated_X.shape[1]})")
    train_classes = sorted(set(train_labels))
    classes = sorted(set(train_classes) | set(real_labels))
    if len(train_classes) == 1:
        predicted = np.full(generated_X.shape[0], train_classes[0])
        real_predicted = np.full(real_X.shape[0], train_classes[0])
        # 1.0 whenever the real cells are that one class too (the single-class case)
        accuracy = float(np.mean(real_labels == train_classes[0]))
    else:
        clf = celltype_classifier(train_X, train_labels, seed)
        real_predicted = clf.predict(dense64(real_X)).astype(str)
        accuracy = float(np.mean(real_predicted == real_labels))
        predicted = clf.predict(dense64(generated_X)).astype(str)

    def shares(labels: np.ndarray) -> dict[str, float]:
        return {c: float(np.mean(labels == c)) if labels.size else 0.0 for c in classes}

    real, generated = shares(real_predicted), shares(predicted)
    tvd = 0.5 * sum(abs(real[c] - generated[c]) for c in classes)
    return {"accuracy": accuracy, "real": real, "real_labelled": shares(real_labels),
            "generated": generated, "predicted_labels": predicted, "tvd": float(tvd)}


def fidelity_metrics(real, generated, train_X=None, train_labels=None, real_labels=None,
                     n_components: int = 50, seed: int = 0) -> dict[str, float]:
    """Every SPEC 2.2 metric of ``generated`` against ``real`` in one call.

    Parameters
    ----------
    real : array or sparse matrix, shape (n_real, n_genes)
    generated : array or sparse matrix, shape (n_gen, n_genes)
    train_X, train_labels, real_labels : optional
        Real training cells and labels, and the labels of ``real``, for
        :func:`celltype_proportions`; all three are needed for the cell-type metrics.
    n_components : int
        Dimensions of the joint PCA in which MMD and iLISI are computed.
    seed : int

    Returns
    -------
    dict
        ``pearson_mean``, ``spearman_mean`` (of gene means), ``mmd`` and ``ilisi`` (joint PCA
        space), ``wasserstein`` (mean per-gene 1-Wasserstein, expression space); with labels
        also ``celltype_tvd`` and ``celltype_accuracy``.
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


def _condition_rows(adata) -> dict[tuple[str, str], np.ndarray]:
    """(context, perturbation) -> row indices of the perturbed cells of each condition
    (control cells and cells flagged ``is_real_control`` left out)."""
    obs = adata.obs
    keep = (obs[PERT_COL].astype(str) != CONTROL).to_numpy()
    if IS_REAL_CONTROL in obs:
        keep &= ~obs[IS_REAL_CONTROL].astype(bool).to_numpy()
    rows = np.flatnonzero(keep)
    keys = obs.iloc[rows][[CONTEXT_COL, PERT_COL]].astype(str)
    return {key: rows[idx] for key, idx in keys.groupby([CONTEXT_COL, PERT_COL]).indices.items()}


def condition_fidelity(truth, pred, n_components: int = 50, seed: int = 0) -> pd.DataFrame:
    """Distribution metrics of predicted against real cells, per perturbed condition.

    Parameters
    ----------
    truth, pred : AnnData
        Cells in log1p space, the same genes in the same order, with obs columns ``context``,
        ``perturbation`` and (optionally) ``is_real_control`` (bool). Control cells and cells
        flagged as real controls are ignored.
    n_components : int
        Dimensions of the joint PCA (fitted per condition) in which MMD is computed.
    seed : int

    Returns
    -------
    DataFrame
        One row per (context, perturbation) present in both, sorted: columns ``context``,
        ``perturbation``, ``n_truth``, ``n_pred``, ``pearson_mean`` (of gene means), ``mmd``
        and ``wasserstein``; the metrics are NaN when a side has fewer than 2 cells.
    """
    if list(truth.var_names) != list(pred.var_names):
        raise ValueError("truth and prediction have different genes (or gene order)")
    t_rows, p_rows = _condition_rows(truth), _condition_rows(pred)
    rows = []
    for key in sorted(set(t_rows) & set(p_rows)):
        t_hit, p_hit = t_rows[key], p_rows[key]
        row = {CONTEXT_COL: key[0], PERT_COL: key[1], "n_truth": int(t_hit.size),
               "n_pred": int(p_hit.size), "pearson_mean": np.nan, "mmd": np.nan,
               "wasserstein": np.nan}
        if t_hit.size >= 2 and p_hit.size >= 2:
            real, gen = truth.X[t_hit], pred.X[p_hit]
            real_pcs, gen_pcs = joint_pca(real, gen, n_components=n_components, seed=seed)
            row.update(pearson_mean=gene_mean_correlation(real, gen)["pearson"],
                       mmd=mmd(real_pcs, gen_pcs), wasserstein=wasserstein_per_gene(real, gen))
        rows.append(row)
    return pd.DataFrame(rows, columns=CONDITION_COLUMNS)
