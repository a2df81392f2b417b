"""benchmarks/calibration.py: a fitted Lingshu-Cell's control cells against the real ones."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import make_entry, make_processed

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "calibration.py"


@pytest.fixture(scope="module")
def calibration():
    spec = importlib.util.spec_from_file_location("calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size_factor_cells(n: int = 200, seed: int = 0) -> np.ndarray:
    """Cells that are one expression profile times a per-cell size factor, no other noise:
    their log1p(CP10k) profiles are identical."""
    rng = np.random.default_rng(seed)
    profile = np.geomspace(1, 50, 40)  # (G,)
    size = rng.lognormal(0.0, 0.5, n)  # (n,)
    return np.round(size[:, None] * profile[None, :] * 4)  # (n, G) counts


def test_the_same_cells_or_a_rescaled_copy_score_no_error(calibration):
    real = _size_factor_cells()
    same = calibration.compare(real, real, np.random.default_rng(0))
    assert same["mae"] == pytest.approx(0.0, abs=1e-12)
    assert same["library_cv_sampled"] == pytest.approx(same["library_cv_real"])
    assert all(same[f"signed {name}"] == pytest.approx(0.0, abs=1e-12)
               for name, _, _ in calibration.TIERS)
    doubled = calibration.compare(real, 2 * real, np.random.default_rng(0))  # CP10k cancels it
    assert doubled["mae"] == pytest.approx(0.0, abs=1e-12)
    assert doubled["library_median_sampled"] == pytest.approx(2 * doubled["library_median_real"])


def test_cells_without_the_size_factor_put_the_top_genes_low(calibration):
    """Each gene's real counts shuffled across cells on its own: the same gene means, less
    library-size variation, and lower log means of the most expressed genes (Jensen)."""
    real = _size_factor_cells()
    rng = np.random.default_rng(1)
    shuffled = np.stack([rng.permutation(real[:, g]) for g in range(real.shape[1])], axis=1)
    got = calibration.compare(real, shuffled, np.random.default_rng(0))
    assert got["library_cv_sampled"] < 0.5 * got["library_cv_real"]
    assert got["signed top 10%"] < -0.05
    assert got["mae"] > got["mae_resample"] > 0


def test_a_fitted_model_samples_control_counts_reproducibly(calibration, tmp_path):
    from lingshu.data.features import compute_features
    from lingshu.data.split import make_split
    from lingshu.models.harness import build_model, training_data

    entry = make_entry("genetic")
    adata = make_processed(n_genes=24, perts=("G1", "G2", "G3"), n_per=20, n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations", "test_perturbations": ["G2"]},
                       seed=0)
    features = compute_features(adata, split, entry, n_components=4, seed=0)
    model = build_model("lingshu", {"preset": "tiny", "pretrain_steps": 4, "finetune_steps": 4,
                                    "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 4,
                                    "sample_batch": 8})
    model.fit(training_data(adata, split, features, seed=0, entry=entry, workdir=str(tmp_path)))
    context = model.contexts[0]
    a = calibration.sample_control_counts(model, context, 20, seed=3)  # 3 batches of <= 8
    b = calibration.sample_control_counts(model, context, 20, seed=3)
    assert a.shape == (20, adata.n_vars) and (a >= 0).all() and np.array_equal(a, np.round(a))
    np.testing.assert_array_equal(a, b)
