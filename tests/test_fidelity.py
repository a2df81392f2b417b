"""Generation-fidelity metrics (SPEC 2.2) on cases with a known answer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from lingshu.evaluate import fidelity
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
    """log1p of Poisson counts with gene means spread over 0.2..3, plus a constant shift."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0.2, 3.0, g)
    return np.log1p(rng.poisson(base, size=(n, g))).astype(np.float64) + shift


def test_identical_sets_score_perfectly():
    x = cells()
    m = fidelity_metrics(x, x.copy())
    assert m["mmd"] == pytest.approx(0.0, abs=1e-12)
    assert m["pearson_mean"] == pytest.approx(1.0) and m["spearman_mean"] == pytest.approx(1.0)
    assert m["wasserstein"] == pytest.approx(0.0, abs=1e-12)
    assert set(m) == {"pearson_mean", "spearman_mean", "mmd", "wasserstein", "ilisi"}
    # the same on sparse input, and far from the origin (no loss of precision)
    assert mmd(x + 1e3, x.copy() + 1e3) == pytest.approx(0.0, abs=1e-12)
    assert fidelity_metrics(sp.csr_matrix(x), sp.csr_matrix(x))["mmd"] == pytest.approx(
        0.0, abs=1e-12)


def test_shift_grows_mmd_and_wasserstein_monotonically():
    real = cells(seed=0)
    fresh = fidelity_metrics(real, cells(seed=1))
    shifted = [fidelity_metrics(real, cells(seed=1, shift=s)) for s in (0.2, 0.5, 1.0)]
    mmds = [fresh["mmd"]] + [m["mmd"] for m in shifted]
    wds = [fresh["wasserstein"]] + [m["wasserstein"] for m in shifted]
    assert all(np.diff(mmds) > 0), mmds
    assert all(np.diff(wds) > 0), wds
    assert fresh["pearson_mean"] > 0.99  # a fresh draw keeps the gene means


def test_wasserstein_matches_scipy_on_unequal_and_sparse_sets(monkeypatch):
    a, b = cells(n=37, seed=2), cells(n=81, seed=3)
    expected = np.mean([stats.wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1])])
    assert expected > 0.01
    assert wasserstein_per_gene(a, b) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(fidelity, "GENE_CHUNK", 7)  # several chunks, the last one partial
    assert wasserstein_per_gene(sp.csr_matrix(a), sp.csr_matrix(b)) == pytest.approx(
        expected, rel=1e-12)
    assert wasserstein_per_gene(sp.csr_matrix(a), b) == pytest.approx(expected, rel=1e-12)


def test_wasserstein_of_a_constant_shift_is_the_shift():
    a = cells(n=50, seed=4)
    assert wasserstein_per_gene(a, a + 0.7) == pytest.approx(0.7)
    assert wasserstein_per_gene(a, a) == 0.0


def _brute_force_mmd(x, y, n_kernels=5, multiplier=2.0):
    z = np.vstack([x, y])
    d2 = np.array([[np.sum((p - q) ** 2) for q in z] for p in z])
    base = d2.sum() / (len(z) ** 2 - len(z)) / multiplier ** (n_kernels // 2)

    def k(p, q):
        d = np.sum((p - q) ** 2)
        return sum(np.exp(-d / (base * multiplier ** i)) for i in range(n_kernels))

    return (np.mean([[k(p, q) for q in x] for p in x]) + np.mean([[k(p, q) for q in y] for p in y])
            - 2 * np.mean([[k(p, q) for q in y] for p in x]))


def test_mmd_matches_a_brute_force_reference(monkeypatch):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(4, 3))
    ref = _brute_force_mmd(x, y)
    assert ref > 0.01
    assert mmd(x, y) == pytest.approx(ref, rel=1e-10)
    assert mmd(x, y, n_kernels=3, multiplier=3.0) == pytest.approx(
        _brute_force_mmd(x, y, 3, 3.0), rel=1e-10)
    monkeypatch.setattr(fidelity, "MMD_BLOCK", 4)  # row blocks, the last one partial
    assert mmd(x, y) == pytest.approx(ref, rel=1e-10)


def test_ilisi_is_high_for_mixed_and_low_for_separated_sets():
    real = cells(n=150, seed=0)
    mixed = ilisi(*joint_pca(real, cells(n=150, seed=1), n_components=10))
    apart = ilisi(*joint_pca(real, cells(n=150, seed=1, shift=3.0), n_components=10))
    assert mixed > 0.8 and apart < 0.1
    # 15 + 15 cells: perplexity 30 is capped at 29 // 3 (harmonypy would otherwise weigh
    # every cell alike and call two distant clusters mixed)
    rng = np.random.default_rng(0)
    small = rng.normal(size=(15, 3))
    assert ilisi(small, rng.normal(size=(15, 3)) + 20.0) < 0.1
    assert ilisi(small, rng.normal(size=(15, 3))) > 0.5


def test_joint_pca_shapes_and_cap():
    r, g = joint_pca(cells(n=4, g=30), cells(n=3, g=30, seed=1), n_components=50)
    assert r.shape == (4, 6) and g.shape == (3, 6)  # capped at n_total - 1
    r, g = joint_pca(cells(n=40, g=5), cells(n=30, g=5, seed=1), n_components=50)
    assert r.shape == (40, 5) and g.shape == (30, 5)  # capped at n_genes


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
    out = celltype_proportions(train_x, train_y, real_x, real_y, sp.csr_matrix(gen_x))
    assert out["accuracy"] == 1.0
    assert out["real"] == pytest.approx({"A": 0.5, "B": 0.5})
    assert out["generated"] == pytest.approx({"A": 0.8, "B": 0.2}, abs=0.02)
    assert out["tvd"] == pytest.approx(0.3, abs=0.02)
    assert out["predicted_labels"].shape == (200,)
    m = fidelity_metrics(real_x, gen_x, train_x, train_y, real_y)
    assert m["celltype_tvd"] == pytest.approx(0.3, abs=0.02) and m["celltype_accuracy"] == 1.0


def test_celltype_proportions_cancel_the_classifiers_errors():
    """Two types the classifier cannot tell apart (identical expression): a real sample drawn
    like the reference scores near 0, although the classifier is at chance and the labelled
    shares would give a large TVD."""
    def mixed(n_a, n_b, seed):
        r = np.random.default_rng(seed)
        return (np.log1p(r.poisson(1.0, size=(n_a + n_b, 20))),
                np.array(["A"] * n_a + ["B"] * n_b))

    train_x, train_y = mixed(150, 50, 0)  # the classifier learns to call most cells A
    real_x, real_y = mixed(100, 100, 1)
    same_x, _ = mixed(100, 100, 2)
    out = celltype_proportions(train_x, train_y, real_x, real_y, same_x)
    assert out["real_labelled"] == pytest.approx({"A": 0.5, "B": 0.5})
    assert out["real"]["A"] > 0.7  # the classifier's shares, errors and all
    assert out["tvd"] < 0.1
    assert 0.5 * sum(abs(out["real_labelled"][c] - out["generated"][c]) for c in "AB") > 0.2


def test_celltype_proportions_list_every_class_and_handle_one_class():
    train_x, train_y = _typed({"A": 60, "B": 60}, seed=0)
    gen_x, _ = _typed({"A": 50}, seed=2)
    out = celltype_proportions(train_x, train_y, train_x, train_y, gen_x)
    assert out["generated"] == {"A": 1.0, "B": 0.0}  # the absent class is listed
    assert out["tvd"] == pytest.approx(0.5)
    single = celltype_proportions(train_x[:50], ["A"] * 50, train_x[:20], ["A"] * 20, gen_x)
    assert single["tvd"] == 0.0 and single["accuracy"] == 1.0
    assert single["generated"] == {"A": 1.0}
    assert set(single["predicted_labels"]) == {"A"} and len(single["predicted_labels"]) == 50


def _anndata(x, conditions, real_control=None):
    obs = pd.DataFrame(conditions, columns=["context", "perturbation"])
    obs["is_real_control"] = ((obs["perturbation"] == "control") if real_control is None
                              else real_control)
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]))


def test_condition_fidelity_per_condition_ignores_controls():
    x = cells(n=94, seed=4)
    conds = ([("A", "P1")] * 30 + [("A", "P2")] * 30 + [("A", "control")] * 30
             + [("B", "P3")] + [("B", "P4")] * 3)
    truth = _anndata(x, conds)
    # the prediction repeats the truth, plus wild cells that must be ignored: flagged real
    # controls under P1's label, and a condition absent from the truth
    wild = cells(n=20, seed=9, shift=5.0)
    # (B, P4) has no predicted cells: only conditions present in both get a row
    pred = _anndata(np.vstack([x[:91], wild]),
                    conds[:91] + [("A", "P1")] * 10 + [("A", "P9")] * 10,
                    real_control=[p == "control" for _, p in conds[:91]] + [True] * 10
                    + [False] * 10)
    table = condition_fidelity(truth, pred, n_components=5)
    # a prediction as the predict stage writes it (predicted cells only, no is_real_control
    # column) scores the same
    only = pred[~pred.obs["is_real_control"].to_numpy()].copy()
    only.obs = only.obs.drop(columns=["is_real_control"])
    pd.testing.assert_frame_equal(condition_fidelity(truth, only, n_components=5), table)
    assert list(zip(table["context"], table["perturbation"], strict=True)) == [
        ("A", "P1"), ("A", "P2"), ("B", "P3")]
    assert list(table["n_truth"]) == [30, 30, 1] and list(table["n_pred"]) == [30, 30, 1]
    assert np.allclose(table["mmd"][:2], 0.0, atol=1e-12)
    assert np.allclose(table["pearson_mean"][:2], 1.0)
    assert table.iloc[2][["pearson_mean", "mmd", "wasserstein"]].isna().all()  # 1 cell a side
    worse = _anndata(x + np.r_[np.zeros((30, 1)), np.ones((64, 1))], conds)
    table = condition_fidelity(truth, worse, n_components=5).set_index("perturbation")
    assert table.loc["P1", "mmd"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc["P2", "mmd"] > 0.05 and table.loc["P2", "wasserstein"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different genes"):
        condition_fidelity(truth, truth[:, ::-1].copy())
