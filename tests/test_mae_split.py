"""benchmarks/mae_split.py: a model's MAE split into the genes a condition changes and the rest."""

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mae_split.py"


@pytest.fixture(scope="module")
def mae_split():
    spec = importlib.util.spec_from_file_location("mae_split", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(means: np.ndarray, pert: str, n: int) -> ad.AnnData:
    x = np.tile(means, (n, 1)).astype(np.float32)
    return ad.AnnData(X=x, obs=pd.DataFrame({"perturbation": pert, "context": "A"},
                                            index=[f"{pert}{i}" for i in range(n)]))


def test_control_level_pays_the_whole_effect_on_changed_genes_only(mae_split):
    ctrl = np.ones(20)
    true = ctrl.copy()
    true[:2] += [1.0, 3.0]  # the condition changes 2 of 20 genes (the top 10%)
    truth = ad.concat([_cells(ctrl, "control", 4), _cells(true, "P", 4)])
    at_control = _cells(ctrl, "P", 3)
    got = mae_split.split_mae(truth, at_control, top=0.1)
    assert got["mae_changed"] == pytest.approx(2.0)
    assert got["mae_rest"] == pytest.approx(0.0)
    assert got["mae"] == pytest.approx(4.0 / 20)
    assert got["signed"] == pytest.approx(-4.0 / 20)
    shifted = _cells(true + 0.5, "P", 3)  # right effect, a level bias of 0.5 everywhere
    got = mae_split.split_mae(truth, shifted, top=0.1)
    assert got["mae_changed"] == pytest.approx(0.5)
    assert got["mae_rest"] == pytest.approx(0.5)
    assert got["signed"] == pytest.approx(0.5)


def test_perfect_sampler_noise_is_zero_without_spread_and_positive_with(mae_split):
    ctrl = np.ones(10)
    truth = ad.concat([_cells(ctrl, "control", 6), _cells(ctrl * 2, "P", 6)])
    cond = pd.DataFrame({"perturbation": ["P"], "context": ["A"]})
    assert mae_split.own_noise(truth, cond, 0.1)["mae"] == pytest.approx(0.0)
    truth.X[6:] += np.random.default_rng(0).normal(0, 1, (6, 10)).astype(np.float32)
    assert mae_split.own_noise(truth, cond, 0.1)["mae"] > 0.1


def test_own_context_share_counts_cells_of_the_wrong_cell_type(mae_split):
    """Counts of two contexts whose controls differ in which genes they express: cells of
    context A predicted with B's profile count against A's share, the truth scores 1."""
    a, b = np.array([20, 20, 0, 0, 5]), np.array([0, 0, 20, 20, 5])
    counts = np.vstack([np.tile(a, (3, 1)), np.tile(b, (3, 1))]).astype(np.float32)
    processed = ad.AnnData(X=counts, obs=pd.DataFrame(
        {"perturbation": "control", "context": ["A"] * 3 + ["B"] * 3},
        index=[f"c{i}" for i in range(6)]))
    contexts, centroids = mae_split.control_centroids(processed)
    assert contexts == ["A", "B"]
    logged = np.log1p(np.vstack([a, a, b, b]) / np.vstack([a, a, b, b]).sum(1, keepdims=True) * 1e4)
    cells = ad.AnnData(X=logged.astype(np.float32), obs=pd.DataFrame(
        {"perturbation": "P", "context": ["A", "A", "A", "B"]}, index=list("wxyz")))
    # A: two of three cells look like A (the third has B's profile); B: its one cell is B
    assert mae_split.own_context_share(cells, contexts, centroids) == pytest.approx((2 / 3 + 1) / 2)


def test_quantiser_round_trip_costs_nothing_below_100_counts(mae_split):
    """Counts below 100 are their own token: no error. A count of 151 comes back as its bin's
    centre, 155: an error on that gene only."""
    from lingshu.data.normalize import log1p_cp10k

    counts = np.array([[3, 0, 40, 7], [1, 2, 60, 9], [0, 5, 30, 8], [2, 1, 50, 6]], dtype=np.float32)
    names = [f"c{i}" for i in range(4)]
    obs = pd.DataFrame({"perturbation": ["control", "control", "P", "P"], "context": "A"}, index=names)
    processed = ad.AnnData(X=counts.copy(), obs=obs)
    cond = pd.DataFrame({"perturbation": ["P"], "context": ["A"]})

    def truth_of(x):
        return ad.AnnData(X=np.asarray(log1p_cp10k(x), dtype=np.float32), obs=obs.copy())

    got = mae_split.quantiser_cost(processed, truth_of(counts), cond, top=0.25)
    assert got["mae"] == pytest.approx(0.0, abs=1e-12)
    counts[2, 2] = 151  # a P cell
    processed = ad.AnnData(X=counts.copy(), obs=obs)
    got = mae_split.quantiser_cost(processed, truth_of(counts), cond, top=0.25)
    assert got["mae"] > 0
    expected = counts[2:].copy()
    expected[0, 2] = 155
    exact = np.asarray(log1p_cp10k(counts[2:])).mean(0)
    rounded = np.asarray(log1p_cp10k(expected)).mean(0)
    assert got["mae"] == pytest.approx(np.abs(rounded - exact).mean())
