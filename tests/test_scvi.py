"""scVI (scvi-tools) as a benchmark model, on tiny data: training, prediction, generation, state."""

import numpy as np
import pytest
import torch
from conftest import make_entry, make_processed

from lingshu.data.features import compute_features
from lingshu.data.split import make_split
from lingshu.models.base import ConditionInput, load_state
from lingshu.models.harness import load_model, training_data
from lingshu.models.scvi_tools.model import (
    UNSEEN,
    ConditionNotEncodable,
    ScviModel,
    _informative_batch,
)
from lingshu.models.spec import get_spec

ENTRY = make_entry("genetic")
N_GENES = 24


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks gain nothing from threads, and lose much on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed=0, adata=None):
    adata = adata if adata is not None else make_processed(n_genes=N_GENES, n_per=20, n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    return adata, training_data(adata, split, features, seed=seed, entry=ENTRY)


def _fit(seed=0, **params):
    adata, data = _data(seed)
    model = ScviModel(**{"preset": "tiny", **params})
    model.fit(data)
    return adata, model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("scvi")
    adata, model = _fit()
    model.save(work / "model.npz")
    return adata, model, work


def _controls(adata, context="A"):
    obs = adata.obs
    rows = ((obs["perturbation"] == "control") & (obs["context"] == context)).to_numpy()
    return adata[rows].X


def _predict(model, adata, label, n=64, context="A", seed=0):
    return model.predict(ConditionInput(context, label, _controls(adata, context), n),
                         np.random.default_rng(seed))


def test_spec_is_registered_as_a_generator():
    spec = get_spec("scvi")
    assert spec.generates_from == "fit" and not spec.pretrains
    assert spec.load_class() is ScviModel


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown parameters"):
        ScviModel(epoch=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ScviModel(preset="huge")
    with pytest.raises(ValueError, match="unseen_fraction"):
        ScviModel(unseen_fraction=1.0)
    model = ScviModel(preset="tiny", epochs=7, n_latent=3)
    assert model.cfg["epochs"] == 7 and model.cfg["n_latent"] == 3
    assert model.cfg["n_hidden"] == 32  # the preset's


def test_training_uses_the_unseen_level(fitted):
    _, model, _ = fitted
    assert model.levels[0] == UNSEEN and "G2" not in model.levels and "G1" in model.levels
    assert model.meta["n_unseen_cells"] > 0
    assert model.meta["n_train_cells"] > 0 and np.isfinite(model.meta["final_elbo_train"])
    # the held-out G2 has features (its target is in the panel): they reach the decoder
    assert model.module_args["n_continuous_cov"] == 4
    assert np.abs(model._feature_row("G2")).sum() > 0


def test_prediction_format(fitted):
    adata, model, _ = fitted
    for label in ("G2", "G3", "not_a_gene"):  # held out, seen, no features at all
        x = _predict(model, adata, label, n=7)
        assert x.shape == (7, N_GENES) and x.dtype == np.float32
        assert np.isfinite(x).all() and x.min() >= 0
        sums = np.expm1(x.astype(np.float64)).sum(axis=1)
        assert np.allclose(sums[sums > 0], 1e4, rtol=1e-3)
    # more cells than there are controls: controls are reused
    assert _predict(model, adata, "G2", n=100).shape == (100, N_GENES)


def test_predictions_depend_on_the_perturbation(fitted):
    adata, model, _ = fitted
    means = {p: _predict(model, adata, p, n=256).mean(axis=0)
             for p in ("G1", "G3", "G2", "not_a_gene")}
    # the same controls, rng and draws: only the perturbation's covariates differ
    assert np.abs(means["G1"] - means["G3"]).max() > 0.1
    # G1 knocks gene G1 down: it comes out lower than under G3
    assert means["G1"][1] < means["G3"][1] - 0.5
    # the held-out G2 is reached through its features, unlike a label without any
    assert np.abs(means["G2"] - means["not_a_gene"]).max() > 1e-3


def test_same_seed_same_cells(fitted):
    adata, model, _ = fitted
    a = _predict(model, adata, "G2", seed=5)
    np.testing.assert_array_equal(a, _predict(model, adata, "G2", seed=5))
    assert not np.array_equal(a, _predict(model, adata, "G2", seed=6))
    g = model.generate(20, np.random.default_rng(1))
    np.testing.assert_array_equal(g, model.generate(20, np.random.default_rng(1)))


def test_two_fits_with_the_same_seed_are_identical(fitted):
    _, model, _ = fitted
    _, twin = _fit()
    a, meta_a = model.get_state()
    b, meta_b = twin.get_state()
    assert a.keys() == b.keys() and meta_a["levels"] == meta_b["levels"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_save_load_round_trip_predicts_identically(fitted):
    adata, model, work = fitted
    arrays, meta = load_state(work / "model.npz")
    assert meta["model"] == "scvi" and meta["params"] == {"preset": "tiny"}
    again = load_model(work / "model.npz")  # through the registry, as the predict job does
    assert isinstance(again, ScviModel)
    for label in ("G2", "G3"):
        np.testing.assert_array_equal(_predict(again, adata, label, context="B", seed=3),
                                      _predict(model, adata, label, context="B", seed=3))
    np.testing.assert_array_equal(again.generate(30, np.random.default_rng(2)),
                                  model.generate(30, np.random.default_rng(2)))


def test_generate_returns_counts(fitted):
    _, model, _ = fitted
    x = model.generate(300, np.random.default_rng(0), progress=False)
    assert x.shape == (300, N_GENES) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= 0 and np.array_equal(x, np.round(x))
    assert x.sum(axis=1).mean() > 0
    assert model.generate(0, np.random.default_rng(0)).shape == (0, N_GENES)


def test_a_condition_it_cannot_encode_is_named(fitted):
    adata, model, _ = fitted
    with pytest.raises(ConditionNotEncodable, match="not seen in training") as err:
        model.predict(ConditionInput("Z", "G2", _controls(adata), 2), np.random.default_rng(0))
    assert (err.value.context, err.value.perturbation) == ("Z", "G2")
    empty = _controls(adata)[:0]
    with pytest.raises(ConditionNotEncodable, match="no control cells"):
        model.predict(ConditionInput("A", "G2", empty, 2), np.random.default_rng(0))


def test_batch_is_a_covariate_only_when_it_is_not_the_context():
    ctx = np.array(["A", "A", "B", "B"])
    assert not _informative_batch(ctx.copy(), ctx)  # the context renamed
    assert not _informative_batch(np.array(["x"] * 4), ctx)  # one batch
    assert _informative_batch(np.array(["d1", "d2", "d1", "d2"]), ctx)  # crossed donors
    adata = make_processed(n_genes=N_GENES, n_per=20, n_ctrl=40)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    _, data = _data(adata=adata)
    model = ScviModel(preset="tiny", epochs=2)
    model.fit(data)
    assert model.batches == ["d1", "d2"] and model.module_args["n_batch"] == 2
    assert model.batch_by_context.shape == (2, 2)
    assert _predict(model, adata, "G2", n=5).shape == (5, N_GENES)
