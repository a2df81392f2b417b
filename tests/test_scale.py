"""SCALE: the set-aware encoder, the endpoint objective and sampler, and the benchmark adapter
on tiny data."""

import math

import numpy as np
import pytest
import torch
from conftest import make_entry, make_processed

from lingshu.data.features import compute_features
from lingshu.data.split import make_split
from lingshu.models.base import ConditionInput, ConditionNotEncodable, load_state
from lingshu.models.harness import load_model, training_data
from lingshu.models.scale.model import DEFAULTS, ScaleModel
from lingshu.models.scale.network import (
    GenePooling,
    ScaleConfig,
    ScaleNetwork,
    endpoint_loss,
    endpoint_ode,
    mixed_prior,
    value_basis,
)
from lingshu.models.spec import get_spec

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


def _config(**kw) -> ScaleConfig:
    base = {"n_genes": 30, "n_components": 5, "d_model": 16, "n_heads": 2, "gene_seeds": 3,
            "encoder_layers": 1, "fusion_layers": 1, "velocity_layers": 2, "n_contexts": 2,
            "n_perturbations": 4, "feature_dim": 3}
    return ScaleConfig(**{**base, **kw})


def _random_network(**kw) -> ScaleNetwork:
    torch.manual_seed(0)
    net = ScaleNetwork(_config(**kw))
    with torch.no_grad():  # the zero-initialised adaLN and head would make every output 0
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


def _expression(*shape, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.gamma(1.0, 1.0, size=shape) * (rng.random(shape) < 0.5)
    return torch.from_numpy(np.log1p(x).astype(np.float32))


def _condition(n: int, null: bool = False, pert: int = 1, features=(0.5, -1.0, 2.0),
               targets=(3, -1)) -> dict[str, torch.Tensor]:
    return {"context": torch.zeros(n, dtype=torch.long),
            "perturbation": torch.full((n,), pert, dtype=torch.long),
            "features": torch.tensor([features]).expand(n, -1),
            "has_features": torch.ones(n, dtype=torch.bool),
            "targets": torch.tensor([targets]).expand(n, -1),
            "null": torch.full((n,), null)}


# ----------------------------------------------------------------------------- encoder
def test_gene_pooling_equals_attention_over_explicit_gene_tokens():
    torch.manual_seed(0)
    pool = GenePooling(n_genes=12, d=8, n_seeds=3)
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0.0, 0.5)
    x = _expression(5, 12)
    # reference: build every (cell, gene) token and run plain attention per seed
    tokens = pool.gene_emb[None] + value_basis(x).permute(1, 2, 0) @ pool.value_emb  # (N, G, d)
    q = pool.q(pool.norm_q(pool.seeds))  # (m, d)
    scores = torch.einsum("md,ngd->nmg", q, pool.k(tokens)) / math.sqrt(8)
    attended = torch.softmax(scores, dim=-1) @ pool.v(tokens)  # (N, m, d)
    slots = pool.seeds[None] + pool.out(attended)
    expected = slots + pool.ff(pool.norm_ff(slots))
    torch.testing.assert_close(pool(x), expected, rtol=1e-4, atol=1e-5)


def test_encoder_is_invariant_to_the_order_of_the_genes():
    net = _random_network()
    x = _expression(2, 4, 30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = net.encoder.encode_cells(x)
        h_perm = net.encoder.encode_cells(x[..., perm], gene_idx=perm)
        h_wrong = net.encoder.encode_cells(x[..., perm])  # values on the wrong genes
    assert h.shape == (2, 4, 16)
    torch.testing.assert_close(h_perm, h, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(h_wrong, h, atol=1e-3)


def test_encoder_and_network_are_equivariant_over_the_cells_of_a_set():
    net = _random_network()
    source = _expression(2, 6, 30)
    x_t = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.7])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    cond = _condition(2)
    with torch.no_grad():
        h = net.encoder(source)
        h_perm = net.encoder(source[:, perm])
        out = net(x_t, t, source=source, **cond)
        out_perm = net(x_t[:, perm], t, source=source[:, perm], **cond)
        # the fusion mixes cells: changing one cell moves the latents of the others
        other = source.clone()
        other[:, 0] = _expression(2, 30, seed=5)
        h_other = net.encoder(other)
    torch.testing.assert_close(h_perm, h[:, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 6, 5)
    assert not torch.allclose(h_other[:, 1:], h[:, 1:], atol=1e-4)


def test_the_null_condition_ignores_the_perturbation_and_seed_pooling_sees_it():
    net = _random_network()
    other = {"pert": 2, "features": (-3.0, 0.0, 1.0), "targets": (7, 1)}
    with torch.no_grad():
        c1, c2 = (net.condition_vector(**_condition(3, **kw)) for kw in ({}, other))
        n1, n2 = (net.condition_vector(**_condition(3, null=True, **kw)) for kw in ({}, other))
        # each perturbation token on its own moves the conditional vector
        for key, value in other.items():
            alone = net.condition_vector(**_condition(3, **{key: value}))
            assert not torch.allclose(alone, c1, atol=1e-4), key
        # a missing target (-1) is ignored
        pad = net.condition_vector(**_condition(3, targets=(3, -1, -1)))
    assert not torch.allclose(c1, c2, atol=1e-4)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(pad, c1)
    assert not torch.allclose(n1, c1, atol=1e-4)
    # mean pooling (the paper's ablation) works on the same tokens
    mean_net = _random_network(condition_pooling="mean")
    with torch.no_grad():
        assert mean_net.condition_vector(**_condition(3)).shape == (3, 16)
    with pytest.raises(ValueError, match="condition_pooling"):
        _config(condition_pooling="max")


# ----------------------------------------------------------------------------- objective
def test_endpoint_loss_at_known_points():
    x1 = torch.full((2, 3, 4), 2.0)
    x0 = torch.full((2, 3, 4), -1.0)
    t = torch.tensor([0.25, 0.5])
    seen = {}

    def perfect(x_t, t_in, **cond):
        seen["x_t"], seen["cond"] = x_t, cond
        return x1.clone()

    assert float(endpoint_loss(perfect, x1, x0, t, null=torch.zeros(2))) == 0.0
    # x_t = (1 - t) x0 + t x1: -0.25 at t = 0.25, 0.5 at t = 0.5
    assert torch.allclose(seen["x_t"][0], torch.full((3, 4), -0.25))
    assert torch.allclose(seen["x_t"][1], torch.full((3, 4), 0.5))
    assert set(seen["cond"]) == {"null"}

    # the loss is on the endpoint, not the velocity: predicting x_t itself costs (x1 - x_t)^2
    loss = endpoint_loss(lambda x_t, t_in: x_t, x1, x0, t)
    expected = ((2.0 + 0.25) ** 2 + (2.0 - 0.5) ** 2) / 2  # 3.65625
    assert float(loss) == pytest.approx(expected)


def test_mixed_prior_is_the_control_plus_scaled_noise():
    control, noise = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]])
    assert torch.equal(mixed_prior(control, 0.0, noise), control)
    assert torch.allclose(mixed_prior(control, 0.5, noise), torch.tensor([[1.25, 0.0]]))


def test_endpoint_ode_lands_on_the_endpoint_and_guides_it():
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    target_c, target_u = torch.full_like(x0, 1.5), torch.full_like(x0, -0.5)
    times = []

    def cond(x, t):
        times.append(float(t[0]))
        return target_c

    for steps in (1, 3, 10):
        times.clear()
        out = endpoint_ode(cond, x0, steps)
        torch.testing.assert_close(out, target_c)
        assert times == pytest.approx(np.linspace(0, 1, steps + 1)[:-1].tolist())
    for w in (0.0, 1.0):  # no guidance: the unconditional branch is not even evaluated
        out = endpoint_ode(cond, x0, 4, lambda x, t: pytest.fail("called"), guidance=w)
        torch.testing.assert_close(out, target_c)
    guided = endpoint_ode(cond, x0, 4, lambda x, t: target_u, guidance=2.0)
    torch.testing.assert_close(guided, target_u + 2.0 * (target_c - target_u))

    # a network's endpoint: guided and plain sampling both keep the shape
    net = _random_network()
    source = _expression(2, 3, 30)
    with torch.no_grad():
        h = net.encoder(source)
        c = net.condition_vector(**_condition(2))
        cu = net.condition_vector(**_condition(2, null=True))
        z0 = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3))
        plain = endpoint_ode(lambda x, t: net.endpoint(x, t, h, c), z0, 5)
        guided = endpoint_ode(lambda x, t: net.endpoint(x, t, h, c), z0, 5,
                              lambda x, t: net.endpoint(x, t, h, cu), guidance=2.5)
    assert plain.shape == guided.shape == (2, 3, 5)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided, atol=1e-4)
    with pytest.raises(ValueError, match="sample_steps"):
        endpoint_ode(cond, x0, 0)


# ----------------------------------------------------------------------------- the model
def _data(seed=0):
    adata = make_processed(n_genes=N_GENES, perts=("G1", "G2", "G3", "G4"), n_per=20,
                           n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    return adata, training_data(adata, split, features, seed=seed, entry=ENTRY)


def _fit(workdir=None, seed=0, **params):
    adata, data = _data(seed)
    data.workdir = workdir
    model = ScaleModel(**{**TINY, **params})
    model.fit(data)
    return adata, model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    adata, model = _fit(work)
    model.save(work / "model.npz")
    return adata, model, work


def _controls(adata, context="A"):
    obs = adata.obs
    rows = ((obs["perturbation"] == "control") & (obs["context"] == context)).to_numpy()
    return adata[rows].X


def _predict(model, adata, label, n=7, context="A", seed=0):
    return model.predict(ConditionInput(context, label, _controls(adata, context), n),
                         np.random.default_rng(seed))


def test_training_writes_its_state_and_the_fit_is_recorded(fitted):
    _, model, work = fitted
    assert (work / "scale_state.pt").exists() and (work / "scale_loss.png").exists()
    assert np.isfinite(model.meta["final_loss"])
    assert model.meta["n_conditions"] == 8  # 2 contexts x (control + 3 training targets)
    assert model.components.shape == (8, N_GENES)  # the tiny preset's 8 components


@pytest.mark.parametrize("decode", ["residual", "pca"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_prediction_format(fitted, decode, guidance):
    adata, model, _ = fitted
    model.set_sampling({"decode": decode, "guidance": guidance})
    try:
        for label, n in (("G2", 7), ("G3", 19), ("not_a_gene", 1), ("G1", 0)):
            x = _predict(model, adata, label, n)
            assert x.shape == (n, N_GENES) and x.dtype == np.float32
            assert np.isfinite(x).all() and (x >= 0).all()
    finally:
        model.set_sampling({"decode": "residual", "guidance": 1.0})
    with pytest.raises(ConditionNotEncodable, match="not seen in training"):
        _predict(model, adata, "G2", context="Z")
    no_controls = ConditionInput("A", "G2", _controls(adata)[:0], 3)
    with pytest.raises(ConditionNotEncodable, match="no control cells"):
        model.predict(no_controls, np.random.default_rng(0))
    # the harness's route: the condition is reported as not encoded, not a failed run
    out = list(model.predict_many([no_controls], np.random.default_rng(0)))
    assert isinstance(out[0], ConditionNotEncodable)


def test_guidance_changes_the_prediction_and_is_checked(fitted):
    adata, model, _ = fitted
    plain = _predict(model, adata, "G2", 16)
    model.set_sampling({"guidance": 3.0})
    try:
        guided = _predict(model, adata, "G2", 16)
    finally:
        model.set_sampling({"guidance": 1.0})
    assert guided.shape == plain.shape and not np.allclose(guided, plain)
    model.set_sampling({"guidance": 0})
    try:  # 0 and 1 are both the plain conditional prediction
        np.testing.assert_array_equal(_predict(model, adata, "G2", 16), plain)
    finally:
        model.set_sampling({"guidance": 1.0})
    with pytest.raises(ValueError, match="guidance"):
        model.set_sampling({"guidance": 0.5})
    model.set_sampling({"guidance": 1.0})
    with pytest.raises(ValueError, match="not settings of sampling"):
        model.set_sampling({"steps": 3})


def test_predictions_depend_on_the_perturbation(fitted):
    adata, model, _ = fitted
    means = {p: _predict(model, adata, p, 64).mean(axis=0)
             for p in ("G1", "G3", "G2", "not_a_gene")}
    assert np.abs(means["G1"] - means["G3"]).max() > 1e-3
    # the held-out G2 is reached through its features and target gene, unlike a bare label
    assert np.abs(means["G2"] - means["not_a_gene"]).max() > 1e-3
    # same seed, same condition: the same cells
    np.testing.assert_array_equal(_predict(model, adata, "G2", 9), _predict(model, adata, "G2", 9))
    assert not np.array_equal(_predict(model, adata, "G2", 9),
                              _predict(model, adata, "G2", 9, seed=1))


def test_save_load_round_trip_predicts_identically(fitted):
    adata, model, work = fitted
    arrays, meta = load_state(work / "model.npz")
    again = ScaleModel(**meta["params"])
    again.set_state(arrays, meta)
    for label in ("G2", "G4"):
        np.testing.assert_array_equal(_predict(again, adata, label, 9, context="B", seed=3),
                                      _predict(model, adata, label, 9, context="B", seed=3))
    # through the harness, with a run's sampling settings
    loaded = load_model(work / "model.npz", {"guidance": 2.0, "sample_steps": 2})
    assert loaded.cfg["guidance"] == 2.0 and loaded.cfg["sample_steps"] == 2
    model.set_sampling({"guidance": 2.0, "sample_steps": 2})
    try:
        np.testing.assert_array_equal(_predict(loaded, adata, "G2", 9),
                                      _predict(model, adata, "G2", 9))
    finally:
        model.set_sampling({"guidance": 1.0, "sample_steps": 4})


def test_two_fits_with_the_same_seed_are_identical(fitted):
    adata, model, _ = fitted
    _, twin = _fit()
    a, meta_a = model.get_state()
    b, meta_b = twin.get_state()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(_predict(twin, adata, "G2"), _predict(model, adata, "G2"))
    _, other = _fit(seed=1)
    assert not np.array_equal(other.get_state()[0]["net::endpoint.head.weight"],
                              a["net::endpoint.head.weight"])


def test_random_coupling_and_stimulation_data_train():
    adata, data = _data()
    data.targets = {p: [] for p in data.targets}  # no target genes (stimulation-like)
    data.features = None  # no perturbation features at all
    model = ScaleModel(**TINY, coupling="random", steps=5, condition_pooling="mean")
    model.fit(data)
    assert model.features.shape[1] == 0
    x = _predict(model, adata, "G3", 5)
    assert x.shape == (5, N_GENES) and np.isfinite(x).all()


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="stepz.*known"):
        ScaleModel(stepz=3)
    with pytest.raises(ValueError, match="preset"):
        ScaleModel(preset="huge")
    with pytest.raises(ValueError, match="coupling"):
        ScaleModel(coupling="sinkhorn")
    with pytest.raises(ValueError, match="decode"):
        ScaleModel(decode="counts")
    assert ScaleModel().cfg["preset"] == "cpu"
    assert ScaleModel(preset="tiny", steps=7).cfg["steps"] == 7


def test_spec_sampling_keys_are_parameters():
    spec = get_spec("scale")
    assert spec.load_class() is ScaleModel
    assert {"guidance", "sample_steps"} <= spec.sampling_keys <= set(DEFAULTS)
    assert not spec.pretrains and spec.generates_from is None
