"""Generation-fidelity metrics (SPEC 2.2) on cases with a known answer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from lingshu.evaluate.fidelity import (
    celltype_proportions,
    condition_fidelity,
    fidelity_metrics,
    gene_mean_correlation,
    ilisi,
    joint_pca,
    mmd,
    wasserstein_per_gene,
)


def cells(n=200, g=30, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.2, 3.0, g)
    return np.log1p(rng.poisson(base, size=(n, g))).astype(np.float64) + shift


def test_identical_sets_score_perfectly():
    x = cells()
    m = fidelity_metrics(x, x.copy())
    assert m["mmd"] == pytest.approx(0.0, abs=1e-12)
    assert m["pearson_mean"] == pytest.approx(1.0) and m["spearman_mean"] == pytest.approx(1.0)
    assert m["wasserstein"] == pytest.approx(0.0, abs=1e-12)


def test_shift_grows_mmd_and_wasserstein_monotonically():
    real = cells(seed=0)
    fresh = fidelity_metrics(real, cells(seed=1))
    shifted = [fidelity_metrics(real, cells(seed=1, shift=s)) for s in (0.2, 0.5, 1.0)]
    assert fresh["mmd"] < shifted[0]["mmd"] < shifted[1]["mmd"] < shifted[2]["mmd"]
    assert fresh["wasserstein"] < shifted[0]["wasserstein"] < shifted[1]["wasserstein"]
    assert shifted[2]["wasserstein"] > shifted[1]["wasserstein"]


def test_wasserstein_matches_scipy_on_unequal_sparse_sets_and_equals_a_constant_shift():
    a, b = cells(n=37, seed=2), cells(n=81, seed=3)
    expected = np.mean([stats.wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1])])
    assert wasserstein_per_gene(sp.csr_matrix(a), sp.csr_matrix(b)) == pytest.approx(expected)
    assert wasserstein_per_gene(a, a + 0.7) == pytest.approx(0.7)


def test_mmd_matches_a_brute_force_reference():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(4, 3))
    z = np.vstack([x, y])
    d2 = np.array([[np.sum((p - q) ** 2) for q in z] for p in z])
    base = d2.sum() / (len(z) ** 2 - len(z)) / 2.0 ** 2  # 5 kernels: divide by 2^(5 // 2)

    def k(p, q):
        d = np.sum((p - q) ** 2)
        return sum(np.exp(-d / (base * 2.0 ** i)) for i in range(5))

    ref = (np.mean([[k(p, q) for q in x] for p in x]) + np.mean([[k(p, q) for q in y] for p in y])
           - 2 * np.mean([[k(p, q) for q in y] for p in x]))
    assert mmd(x, y) == pytest.approx(ref, rel=1e-10)


def test_ilisi_is_high_for_mixed_and_low_for_separated_sets():
    real = cells(n=150, seed=0)
    mixed = ilisi(*joint_pca(real, cells(n=150, seed=1), n_components=10))
    apart = ilisi(*joint_pca(real, cells(n=150, seed=1, shift=3.0), n_components=10))
    assert mixed > 0.8 and apart < 0.1


def test_gene_mean_correlation_of_a_constant_side_is_nan():
    out = gene_mean_correlation(cells(), np.zeros((5, 30)))
    assert np.isnan(out["pearson"]) and np.isnan(out["spearman"])
    with pytest.raises(ValueError, match="genes"):
        gene_mean_correlation(cells(g=30), cells(g=31))


def _typed(n_per, seed):
    """Two well separated cell types: A expresses genes 0-9, B genes 10-19."""
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for t, n in n_per.items():
        lam = np.full(20, 0.1)
        lam[:10] = 5.0 if t == "A" else 0.1
        lam[10:] = 5.0 if t == "B" else 0.1
        blocks.append(np.log1p(rng.poisson(lam, size=(n, 20))))
        labels += [t] * n
    return np.vstack(blocks), np.array(labels)


def test_celltype_proportions_recover_a_known_shift():
    train_x, train_y = _typed({"A": 100, "B": 100}, seed=0)
    real_x, real_y = _typed({"A": 100, "B": 100}, seed=1)
    gen_x, _ = _typed({"A": 160, "B": 40}, seed=2)
    out = celltype_proportions(train_x, train_y, real_x, real_y, gen_x)
    assert out["accuracy"] == 1.0
    assert out["generated"] == pytest.approx({"A": 0.8, "B": 0.2})
    assert out["tvd"] == pytest.approx(0.3)
    single = celltype_proportions(train_x[:50], ["A"] * 50, real_x[:50], ["A"] * 50, gen_x)
    assert single["tvd"] == 0.0 and single["accuracy"] == 1.0
    assert set(single["predicted_labels"]) == {"A"}


def _anndata(x, conditions, real_control=None):
    obs = pd.DataFrame(conditions, columns=["context", "perturbation"])
    obs["is_real_control"] = (obs["perturbation"] == "control") if real_control is None \
        else real_control
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]))


def test_condition_fidelity_per_condition_ignores_controls():
    x = cells(n=90, seed=4)
    conds = [("A", "P1")] * 30 + [("A", "P2")] * 30 + [("A", "control")] * 30
    truth = _anndata(x, conds)
    table = condition_fidelity(truth, truth.copy(), n_components=5)
    assert list(table["perturbation"]) == ["P1", "P2"]
    assert np.allclose(table["mmd"], 0.0) and np.allclose(table["pearson_mean"], 1.0)
    worse = _anndata(x + np.r_[np.zeros((30, 1)), np.ones((60, 1))], conds)
    table = condition_fidelity(truth, worse, n_components=5).set_index("perturbation")
    assert table.loc["P1", "mmd"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc["P2", "mmd"] > 0.05 and table.loc["P2", "wasserstein"] == pytest.approx(1.0)
