"""scLDM: the autoencoder, the flow-matching pieces, and the benchmark adapter on tiny data."""

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import make_entry, make_processed
from scipy import stats

import lingshu.data.rows as rows_mod
from lingshu.data.features import compute_features
from lingshu.data.split import make_split
from lingshu.io import write_h5ad
from lingshu.models.base import ConditionInput, load_state
from lingshu.models.scldm.autoencoder import AutoencoderConfig, ScLDMAutoencoder, nb_log_likelihood
from lingshu.models.scldm.latent import DiTConfig, LatentDiT, euler_sample, flow_matching_loss
from lingshu.models.harness import training_data
from lingshu.models.scldm.model import ScLDM

TINY = {"preset": "tiny", "device": "cpu"}
ENTRY = make_entry("genetic")
N_GENES = 24


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks gain nothing from threads, and lose much on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- autoencoder
def test_encoder_is_permutation_invariant_and_decoder_equivariant():
    torch.manual_seed(0)
    ae = ScLDMAutoencoder(AutoencoderConfig(n_genes=30, d_model=16, n_heads=2, latent_tokens=3,
                                            latent_dim=4, encoder_layers=1, decoder_layers=1))
    counts = torch.from_numpy(np.random.default_rng(0).negative_binomial(
        2, 0.4, size=(5, 30)).astype(np.float32))
    perm = torch.randperm(30)
    with torch.no_grad():
        z = ae.encode(counts)
        z_perm = ae.encode(counts[:, perm], gene_idx=perm)
        logits = ae.decode_logits(z)
        logits_perm = ae.decode_logits(z, gene_idx=perm)
    assert z.shape == (5, 3, 4)
    torch.testing.assert_close(z_perm, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_perm, logits[:, perm], rtol=1e-5, atol=1e-5)
    # the latent does depend on which gene carries which count
    with torch.no_grad():
        z_shuffled = ae.encode(counts[:, perm])
    assert not torch.allclose(z_shuffled, z, atol=1e-4)


def test_nb_log_likelihood_matches_scipy():
    x = torch.tensor([0.0, 1.0, 3.0, 10.0, 0.0, 25.0, 2.0], dtype=torch.float64)
    mu = torch.tensor([0.5, 1.0, 2.5, 8.0, 3.0, 30.0, 0.01], dtype=torch.float64)
    theta = torch.tensor([1.0, 0.3, 5.0, 2.0, 10.0, 0.8, 100.0], dtype=torch.float64)
    ours = nb_log_likelihood(x, mu, theta).numpy()
    n, p = theta.numpy(), (theta / (theta + mu)).numpy()
    expected = stats.nbinom.logpmf(x.numpy(), n, p)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    # zero mean: a zero count is certain
    assert float(nb_log_likelihood(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(2.0))) \
        == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- latent flow
def test_flow_matching_loss_at_a_known_point():
    x1 = torch.full((2, 3, 4), 2.0)
    noise = torch.full((2, 3, 4), -1.0)
    t = torch.tensor([0.25, 0.5])
    seen = {}

    def constant_velocity(x_t, t_in, **cond):
        seen["x_t"], seen["cond"] = x_t, cond
        return torch.full_like(x_t, 0.5)

    loss = flow_matching_loss(constant_velocity, x1, torch.Generator(), noise=noise, t=t,
                              context=torch.zeros(2, dtype=torch.long))
    # target x1 - x0 = 3 everywhere; (0.5 - 3)^2 = 6.25
    assert float(loss) == pytest.approx(6.25)
    # x_t = (1 - t) x0 + t x1: -0.25 at t = 0.25, 0.5 at t = 0.5
    assert torch.allclose(seen["x_t"][0], torch.full((3, 4), -0.25))
    assert torch.allclose(seen["x_t"][1], torch.full((3, 4), 0.5))
    assert set(seen["cond"]) == {"context"}


def _random_dit() -> LatentDiT:
    torch.manual_seed(0)
    dit = LatentDiT(DiTConfig(latent_tokens=3, latent_dim=4, d_model=16, n_layers=2, n_heads=2,
                              n_contexts=2, n_perturbations=3, feature_dim=2))
    with torch.no_grad():  # the zero-initialised adaLN would make every velocity 0
        for p in dit.parameters():
            p.normal_(0.0, 0.3)
    return dit.eval()


def test_guidance_scale_one_is_conditional_sampling():
    dit = _random_dit()
    cond = {"context": torch.tensor([0, 1]), "perturbation": torch.tensor([1, 2]),
            "features": torch.randn(2, 2), "null": torch.tensor([False, False])}
    uncond = {**cond, "null": torch.tensor([True, True])}
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    plain = euler_sample(dit, noise, 5, cond)
    guided_1 = euler_sample(dit, noise, 5, cond, uncond, guidance=1.0)
    assert torch.equal(guided_1, plain)
    assert torch.equal(euler_sample(dit, noise, 5, cond, uncond, guidance=0.0),
                       euler_sample(dit, noise, 5, uncond))
    guided_3 = euler_sample(dit, noise, 5, cond, uncond, guidance=3.0)
    assert not torch.allclose(guided_3, plain)
    assert guided_3.shape == noise.shape and torch.isfinite(guided_3).all()


# ----------------------------------------------------------------------------- the model
def _fit(workdir, seed=0, backed=False):
    adata = make_processed(n_genes=N_GENES, perts=("G1", "G2", "G3", "G4"), n_per=20,
                           n_ctrl=40)
    if backed:  # as in the pipeline's jobs: the counts are read from the file on demand
        write_h5ad(adata, workdir / "processed.h5ad")
        adata = ad.read_h5ad(workdir / "processed.h5ad", backed="r")
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    model = ScLDM(**TINY)
    pre = training_data(adata, split, features, seed=seed, entry=ENTRY, workdir=str(workdir),
                        include_control_input=True)
    model.pretrain(pre, workdir / "pretrain.pt")
    data = training_data(adata, split, features, seed=seed, entry=ENTRY, workdir=str(workdir))
    model.fit(data, init=workdir / "pretrain.pt")
    return adata, model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("scldm")
    adata, model = _fit(work)
    model.save(work / "model.npz")
    return adata, model, work


def _controls(adata, context="A"):
    obs = adata.obs
    rows = ((obs["perturbation"] == "control") & (obs["context"] == context)).to_numpy()
    return adata[rows].X


def test_both_stages_write_their_state(fitted):
    _, model, work = fitted
    for name in ("pretrain.pt", "autoencoder_state.pt", "flow_state.pt", "model.npz",
                 "autoencoder_loss.png", "flow_loss.png"):
        assert (work / name).exists(), name
    assert np.isfinite(model.meta["reconstruction_pearson_heldout"])
    assert -1.0 <= model.meta["reconstruction_pearson_train"] <= 1.0


def test_prediction_format(fitted):
    adata, model, _ = fitted
    for label in ("G2", "G3", "not_a_gene"):  # held out, seen, no features at all
        x = model.predict(ConditionInput("A", label, _controls(adata), 7),
                          np.random.default_rng(0))
        assert x.shape == (7, N_GENES) and x.dtype == np.float32
        assert np.isfinite(x).all() and x.min() >= 0
        sums = np.expm1(x.astype(np.float64)).sum(axis=1)
        assert np.allclose(sums[sums > 0], 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="not seen in training"):
        model.predict(ConditionInput("Z", "G2", _controls(adata), 2), np.random.default_rng(0))


def test_predictions_depend_on_the_perturbation(fitted):
    adata, model, _ = fitted
    means = {p: model.predict(ConditionInput("A", p, _controls(adata), 64),
                              np.random.default_rng(0)).mean(axis=0)
             for p in ("G1", "G3", "G2", "not_a_gene")}
    assert np.abs(means["G1"] - means["G3"]).max() > 1e-3
    # the held-out G2 is reached through its features, unlike a label without any
    assert np.abs(means["G2"] - means["not_a_gene"]).max() > 1e-3


def test_save_load_round_trip_predicts_identically(fitted):
    adata, model, work = fitted
    arrays, meta = load_state(work / "model.npz")
    again = ScLDM(**meta["params"])
    again.set_state(arrays, meta)
    cond = ConditionInput("B", "G2", _controls(adata, "B"), 9)
    np.testing.assert_array_equal(again.predict(cond, np.random.default_rng(3)),
                                  model.predict(cond, np.random.default_rng(3)))
    assert again.meta["reconstruction_pearson_heldout"] == \
        model.meta["reconstruction_pearson_heldout"]


def test_two_fits_with_the_same_seed_are_identical(fitted, tmp_path):
    _, model, _ = fitted
    _, twin = _fit(tmp_path)
    a, _ = model.get_state()
    b, _ = twin.get_state()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="flow_stepz.*known"):
        ScLDM(flow_stepz=3)
    with pytest.raises(ValueError, match="preset"):
        ScLDM(preset="huge")


def test_unconditional_generation(fitted):
    from lingshu.models.harness import generate_cells, load_generator

    adata, _, work = fitted
    model = load_generator("scldm", None, str(work / "model.npz"))
    cells = generate_cells(model, adata.var_names.to_numpy(), 12, seed=1, progress=False)
    counts = cells.layers["counts"].toarray()
    assert counts.shape == (12, adata.n_vars) and (counts >= 0).all()
    assert np.array_equal(counts, np.round(counts)) and counts.sum() > 0
    # library sizes follow the training cells' (drawn from their quantiles; NB noise on top)
    train_lib = np.asarray(adata.X.sum(axis=1)).ravel()
    assert train_lib.min() * 0.3 < np.median(counts.sum(1)) < train_lib.max() * 3
    again = generate_cells(load_generator("scldm", None, str(work / "model.npz")),
                           adata.var_names.to_numpy(), 12, seed=1, progress=False)
    np.testing.assert_array_equal(again.layers["counts"].toarray(), counts)


def test_a_fit_reading_the_counts_from_the_file_equals_the_fit_in_memory(fitted, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(rows_mod, "BLOCK_ROWS", 50)  # several blocks
    _, model, _ = fitted
    adata, twin = _fit(tmp_path, backed=True)
    assert adata.isbacked
    a, _ = model.get_state()
    b, _ = twin.get_state()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
