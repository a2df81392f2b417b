"""Lingshu-Cell inside the benchmark: pre-train, fine-tune, sample, in the prediction format."""

import numpy as np
import pytest
import torch

from lingshu.data.split import make_split
from lingshu.data.features import compute_features
from lingshu.data.truth import build_truth
from lingshu.errors import InputError
from lingshu.models.harness import build_model, load_model, predict_conditions, training_data

from conftest import make_entry, make_processed

TINY = {"preset": "tiny", "pretrain_steps": 20, "finetune_steps": 40, "batch_size": 16,
        "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 20, "sample_batch": 64,
        # the default config's condition path (ours): a rank-r head path, a faster learning rate
        "network": {"cond_head_rank": 2}, "cond_lr_scale": 5.0}
ENTRY = make_entry("genetic")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("lingshu")
    adata = make_processed(n_genes=24, perts=("G1", "G2", "G3", "G4"), n_per=20, n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    model = build_model("lingshu", TINY)
    pre = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(work),
                        include_control_input=True)
    model.pretrain(pre, work / "pretrain.pt")
    data = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(work))
    model.fit(data, init=work / "pretrain.pt")
    model.save(work / "model.npz")
    return adata, split, model, work


def test_pretrain_and_finetune_write_their_state(fitted):
    _, _, _, work = fitted
    for name in ("pretrain.pt", "pretrain_state.pt", "finetune_state.pt", "model.npz",
                 "pretrain_loss.png", "finetune_loss.png"):
        assert (work / name).exists(), name
    # the condition's head path starts at zero and fine-tuning trained it
    assert fitted[2].net.cond_head_up.abs().max() > 0


def test_training_records_held_out_diagnostics(fitted):
    """Bits per masked gene of the reference cells at 4 points of each run, beside the floors;
    saved with the model and copied into its predictions."""
    adata, split, model, work = fitted
    assert split.reference_rows().size > 0
    for stage in ("pretrain", "finetune"):
        rows = model.diagnostics[stage]
        assert len(rows) == 4 * 3 and {r["mask_rate"] for r in rows} == {0.15, 0.5, 0.9}
        assert all(0 < r["bits_model"] < np.log2(281) for r in rows)
        assert all(np.isfinite([r["bits_marginal"], r["bits_context"]]).all() for r in rows)
    assert (work / "finetune_diagnostics.tsv").exists()
    assert load_model(str(work / "model.npz")).diagnostics == model.diagnostics
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    assert "diagnostics" in pred.uns["lingshu"]


def test_prediction_format_and_reload(fitted):
    adata, split, model, work = fitted
    truth = build_truth(adata, split)
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    assert list(pred.var_names) == list(adata.var_names) == list(truth.var_names)
    # the predicted cells only (the evaluation adds the truth's real control cells)
    key = ["context", "perturbation"]
    held_out = truth.obs[~truth.obs["is_real_control"].to_numpy()]
    assert (pred.obs.groupby(key).size().sort_index()
            .equals(held_out.groupby(key).size().sort_index()))
    assert "control" not in set(pred.obs["perturbation"])
    x = pred.X.toarray()
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() < 15
    # library-size normalised: every predicted cell with counts sums to 1e4 in CP10k
    sums = np.expm1(x).sum(axis=1)
    assert np.allclose(sums[sums > 0], 1e4, rtol=1e-3)
    again = predict_conditions(load_model(str(work / "model.npz")), adata, split,
                               seed=0, progress=False)
    np.testing.assert_array_equal(again.X.toarray(), pred.X.toarray())


def test_predictions_depend_on_the_condition(fitted):
    import torch

    from lingshu.models.base import ConditionInput
    from lingshu.tokens import MASK_TOKEN

    adata, split, model, _ = fitted
    masked = torch.full((1, 24), MASK_TOKEN, dtype=torch.long)
    with torch.no_grad():
        logits = {p: model.net(masked, **model.condition_tensors("A", p))
                  for p in ("G2", "G3", "control")}
    # the held-out G2 (target-gene path) and the seen G3 (identity) are different conditions
    assert not torch.allclose(logits["G2"], logits["G3"])
    assert not torch.allclose(logits["G3"], logits["control"])
    ctrl = adata[(adata.obs["perturbation"] == "control").to_numpy()].X[:5]
    a = model.predict(ConditionInput("A", "G2", ctrl, 8), np.random.default_rng(1))
    assert a.shape == (8, 24)
    with pytest.raises(ValueError, match="not seen in training"):
        model.predict(ConditionInput("Z", "G2", ctrl, 2), np.random.default_rng(0))


def test_sampling_settings_of_a_fitted_model(fitted):
    from lingshu.errors import InputError
    from lingshu.models.base import load_state

    _, _, model, work = fitted
    _, meta = load_state(work / "model.npz")
    assert meta["perturbation_type"] == "genetic" and "guidance" not in meta
    assert model.guidance() == 2.0  # SPEC 1.4's default for genetic data
    loaded = load_model(str(work / "model.npz"), sampling={"guidance": 0.5, "sample_steps": 1})
    assert loaded.guidance() == 0.5 and loaded.cfg["sample_steps"] == 1
    assert load_model(str(work / "model.npz")).guidance() == 2.0  # the file is unchanged
    loaded.perturbation_type = "stimulation"
    loaded.set_sampling({"guidance": None})
    assert loaded.guidance() == 3.0  # SPEC 1.4's default for stimulation data
    with pytest.raises(InputError, match="not sampling settings"):
        load_model(str(work / "model.npz"), sampling={"finetune_steps": 3})


def test_stratified_draws_are_a_sampling_setting_of_the_fitted_model(fitted):
    from lingshu.models.base import ConditionInput

    adata, _, _, work = fitted
    ctrl = adata[(adata.obs["perturbation"] == "control").to_numpy()].X[:5]
    cells = {}
    for stratified in (False, True):
        model = load_model(str(work / "model.npz"), sampling={"stratified": stratified})
        assert model.cfg["stratified"] is stratified
        draw = [model.predict(ConditionInput("A", "G3", ctrl, 40), np.random.default_rng(2))
                for _ in range(2)]
        np.testing.assert_array_equal(draw[0], draw[1])  # seeded either way
        cells[stratified] = draw[0]
    assert cells[True].shape == cells[False].shape == (40, 24)
    assert not np.array_equal(cells[True], cells[False])
    with pytest.raises(InputError, match="models.lingshu.stratified: 'false' is not true or false"):
        load_model(str(work / "model.npz"), sampling={"stratified": "false"})
    with pytest.raises(InputError, match="models.lingshu.stratified"):
        build_model("lingshu", {**TINY, "stratified": 1})


def test_cond_lr_scale_must_be_positive():
    with pytest.raises(ValueError, match="cond_lr_scale"):
        build_model("lingshu", {**TINY, "cond_lr_scale": 0})
    with pytest.raises(InputError, match="models.lingshu.cond_lr_scale: 'fast' is not a positive"):
        build_model("lingshu", {**TINY, "cond_lr_scale": "fast"})


@pytest.mark.parametrize("network, field", [
    ({"cond_head_rank": -2}, "models.lingshu.network.cond_head_rank: -2"),
    ({"cond_head_rank": 1.5}, "models.lingshu.network.cond_head_rank: 1.5"),
    ({"gene_head_rank": -1}, "models.lingshu.network.gene_head_rank: -1"),
    ({"cond_hed_rank": 2}, r"models.lingshu.network: \['cond_hed_rank'\] are not network options"),
])
def test_bad_network_options_name_the_field_and_the_fix(network, field):
    with pytest.raises(InputError, match=field) as err:
        build_model("lingshu", {**TINY, "network": network})
    assert "Fix:" in str(err.value)


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="pretrain_stepz"):
        build_model("lingshu", {"pretrain_stepz": 3})


def test_unconditional_generation_from_the_pretrained_model(fitted):
    from lingshu.models.harness import generate_cells, load_generator

    adata, _, _, work = fitted
    params = dict(TINY, unconditional_steps=12)
    model = load_generator("lingshu", params, str(work / "pretrain.pt"))
    cells = generate_cells(model, adata.var_names.to_numpy(), 10, seed=2, progress=False)
    counts = cells.layers["counts"].toarray()
    assert counts.shape == (10, adata.n_vars) and (counts >= 0).all()
    assert np.array_equal(counts, np.round(counts))  # detokenised counts are integers
    assert counts.sum() > 0 and len({tuple(r) for r in counts}) == 10  # cells differ
    again = generate_cells(load_generator("lingshu", params, str(work / "pretrain.pt")),
                           adata.var_names.to_numpy(), 10, seed=2, progress=False)
    np.testing.assert_array_equal(again.layers["counts"].toarray(), counts)
    with pytest.raises(ValueError, match="genes differ"):
        generate_cells(model, adata.var_names.to_numpy()[::-1], 10, seed=2, progress=False)
    with pytest.raises(ValueError, match="not a Lingshu-Cell pre-training checkpoint"):
        load_generator("lingshu", params, str(work / "finetune_state.pt"))


def test_prior_injection_fixes_the_prior_genes(fitted, monkeypatch):
    """With prior_injection, a condition's prior genes start at count 1 and stay there."""
    from lingshu.models.base import ConditionInput
    from lingshu.models.mddm import model as mddm_model

    adata, _, model, _ = fitted
    seen = []
    real = mddm_model.sample

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mddm_model, "sample", spy)
    ctrl = adata[(adata.obs["perturbation"] == "control").to_numpy()].X[:5]
    cond = ConditionInput("A", "G2", ctrl, 40, prior_genes=("G2", "G7", "NOT_IN_PANEL"))
    plain = model.predict(cond, np.random.default_rng(0))
    assert "fixed_mask" not in seen[-1]  # prior_injection is off by default
    model.set_sampling({"prior_injection": True})
    try:
        x = model.predict(cond, np.random.default_rng(0))
    finally:
        model.set_sampling({"prior_injection": False})
    mask = seen[-1]["fixed_mask"]
    assert mask.sum() == 2 and bool(mask[2]) and bool(mask[7])
    assert (seen[-1]["fixed_tokens"][mask] == 1).all()
    # count 1 in every cell: nonzero, and the same CP10k share as any other gene at count 1
    assert (x[:, [2, 7]] > 0).all() and np.allclose(x[:, 2], x[:, 7])
    assert not np.allclose(plain[:, 7], x[:, 7])


def test_head_bias_starts_at_each_genes_marginal_with_a_negligible_unseen_share():
    """``head_bias_init: marginal``: the head's per-gene bias is each gene's log marginal token
    distribution in the training cells; the tokens a gene never showed share about 1/n**2."""
    import scipy.sparse as sp
    import torch

    from lingshu.data.tokenstore import TokenStore
    from lingshu.models.mddm.model import init_head_bias
    from lingshu.models.mddm.network import LingshuNetwork, config_from_preset

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.7, size=(200, 12))
    counts[:, 3] = 0  # a gene never expressed: token 0 certain
    store = TokenStore.from_counts(sp.csr_matrix(counts))
    net = LingshuNetwork(config_from_preset("tiny", 12))
    init_head_bias(net, store, seed=0)
    probs = net.head_bias.detach().double().exp()  # (G, 281)
    assert torch.allclose(probs.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-5)
    empirical = np.stack([np.bincount(counts[:, g], minlength=281) / 200 for g in range(12)])
    assert np.allclose(probs.numpy(), empirical, atol=1e-4)
    unseen = probs.numpy()[empirical == 0].reshape(-1)
    assert unseen.max() < 1e-6  # ~1 / (281 * 200**2) each
    assert probs[3, 0] > 1 - 1e-4


def test_head_bias_init_is_checked_and_zero_keeps_the_bias_at_zero(tmp_path):
    with pytest.raises(ValueError, match="head_bias_init"):
        build_model("lingshu", {**TINY, "head_bias_init": "mean"})
    adata = make_processed(n_genes=24, perts=("G1", "G2"), n_per=10, n_ctrl=20)
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    model = build_model("lingshu", {**TINY, "pretrain_steps": 1, "lr": 0.0, "min_lr": 0.0,
                                    "head_bias_init": "zero"})
    pre = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path),
                        include_control_input=True)
    model.pretrain(pre, tmp_path / "pretrain.pt")
    from lingshu.models.mddm.model import pretrained_weights

    assert float(pretrained_weights(tmp_path / "pretrain.pt")["head_bias"].abs().max()) == 0.0


def test_numeric_options_written_as_yaml_text_are_numbers_and_bad_ones_name_the_field():
    # YAML reads 1e-5 (no dot) as the text "1e-5": taken as the number it spells
    model = build_model("lingshu", {**TINY, "min_lr": "1e-5", "lr": "2e-3", "finetune_steps": "3"})
    assert model.cfg["min_lr"] == 1e-5 and model.cfg["lr"] == 2e-3
    assert model.cfg["finetune_steps"] == 3 and isinstance(model.cfg["finetune_steps"], int)
    with pytest.raises(InputError, match=r"models\.lingshu\.lr: 'fast' is not a number"):
        build_model("lingshu", {**TINY, "lr": "fast"})
    with pytest.raises(InputError, match=r"models\.lingshu\.batch_size: 6\.5 is not a whole number"):
        build_model("lingshu", {**TINY, "batch_size": 6.5})
    with pytest.raises(InputError, match=r"models\.lingshu\.ema_decay: True is not a number"):
        build_model("lingshu", {**TINY, "ema_decay": True})


def test_gene_head_readout_pretrains_fine_tunes_and_reloads(tmp_path):
    """``network: {gene_head_rank: r}``: pre-training trains the per-gene readout, fine-tuning
    starts from it (its weights carried over, not re-initialised) and a saved model predicts
    the same after reloading."""
    adata = make_processed(n_genes=24, perts=("G1", "G2", "G3"), n_per=20, n_ctrl=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    params = {**TINY, "pretrain_steps": 10, "finetune_steps": 10,
              "network": {"cond_head_rank": 2, "gene_head_rank": 2}}
    model = build_model("lingshu", params)
    pre = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path),
                        include_control_input=True)
    model.pretrain(pre, tmp_path / "pretrain.pt")
    model.load_pretrained(tmp_path / "pretrain.pt")
    pretrained = model.pretrained.gene_head_up.detach().clone()
    assert pretrained.abs().max() > 0  # trained from zero
    data = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path))
    model.fit(data, init=tmp_path / "pretrain.pt")
    moved = (model.net.gene_head_up.detach() - pretrained).abs().max()
    assert 0 < moved < pretrained.abs().max()  # fine-tuned from the pre-trained readout
    model.save(tmp_path / "model.npz")
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    again = predict_conditions(load_model(str(tmp_path / "model.npz")), adata, split, seed=0,
                               progress=False)
    assert (pred.X != again.X).nnz == 0


def _two_depth_data(n_genes: int = 24, n: int = 200, seed: int = 0):
    """One context, every cell sequenced at one of two depths (size factor 1 or 6) with the
    same gene proportions: the depth is the only structure between genes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    mu = rng.gamma(2.0, 1.0, size=n_genes)
    obs, rows = [], []
    for pert, m in (("control", 2 * n), ("G1", n), ("G2", n)):
        size = rng.choice([1.0, 6.0], size=m)
        rows.append(rng.poisson(mu[None] * size[:, None]))
        obs += [("A", pert)] * m
    obs = pd.DataFrame(obs, columns=["context", "perturbation"], index=[f"c{i}" for i in range(len(obs))])
    obs["batch"] = "A"
    adata = ad.AnnData(X=sp.csr_matrix(np.vstack(rows).astype(np.int32)), obs=obs,
                       var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    adata.uns["lingshu"] = {"dataset": "tiny", "control_label": "control",
                            "perturbation_type": "genetic"}
    return adata


def test_library_size_input_sets_the_depth_of_sampled_cells(tmp_path):
    """``network: {library_size: true}`` on cells of two depths: the pre-training carries the
    training cells' library distribution and standardisation, unconditional cells sampled at
    a shallow and at a deep library size come out about that shallow and that deep (the real
    totals differ 9x; a network that ignored the input would give both the same mixture),
    fine-tuning keeps the pre-training's standardisation, and prediction draws each cell's
    size from the context's control cells and reloads to the same cells."""
    from lingshu.models.mddm.model import log_library_of_counts, pretrained_network

    adata = _two_depth_data()
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    params = {**TINY, "pretrain_steps": 200, "finetune_steps": 20, "batch_size": 32,
              "unconditional_steps": 8, "diagnostics_cells": 16,
              "network": {"cond_head_rank": 2, "library_size": True}}
    model = build_model("lingshu", params)
    pre = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path),
                        include_control_input=True)
    model.pretrain(pre, tmp_path / "pretrain.pt")
    model.load_pretrained(tmp_path / "pretrain.pt")
    quantiles = np.asarray(model.pretrained_library)
    real = log_library_of_counts(adata.X)
    # the pre-training cells are most of the cells (the held-out ones excluded)
    assert real.min() - 1e-5 <= quantiles[0] < quantiles[-1] <= real.max() + 1e-5
    assert np.all(np.diff(quantiles) >= 0)
    assert quantiles[len(quantiles) // 2] == pytest.approx(np.median(real), abs=0.15)
    totals = []
    for level in (np.quantile(real, 0.05), np.quantile(real, 0.95)):
        model.pretrained_library = [level, level]  # every cell drawn at this library size
        cells = model.generate(200, np.random.default_rng(0))
        totals.append(cells.sum(1).mean() / np.expm1(level))
    assert 0.6 < totals[0] < 1.6 and 0.6 < totals[1] < 1.6, totals

    data = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path))
    model.fit(data, init=tmp_path / "pretrain.pt")
    pre_cfg = pretrained_network(tmp_path / "pretrain.pt")
    assert model.net_cfg.library_size
    assert (model.net_cfg.library_center, model.net_cfg.library_scale) == \
        (pre_cfg["library_center"], pre_cfg["library_scale"])
    model.save(tmp_path / "model.npz")
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    assert pred.n_obs > 0 and np.isfinite(pred.X.toarray()).all()
    again = predict_conditions(load_model(str(tmp_path / "model.npz")), adata, split, seed=0,
                               progress=False)
    assert (pred.X != again.X).nnz == 0


@pytest.mark.parametrize("key", ["library_size", "cond_head_masked"])
def test_network_switches_must_be_true_or_false(key):
    with pytest.raises(InputError, match=f"models.lingshu.network.{key}"):
        build_model("lingshu", {**TINY, "network": {key: "yes"}})


@pytest.mark.parametrize("share", [-0.1, 1.0, "half"])
def test_full_mask_share_must_lie_in_zero_one(share):
    with pytest.raises(InputError, match="models.lingshu.full_mask_share"):
        build_model("lingshu", {**TINY, "full_mask_share": share})


def test_recalibration_refits_the_head_bias_alone(fitted, tmp_path):
    """``calibrate_steps``: after fine-tuning, only the per-gene head bias moves (the same
    fine-tuning as without it), toward the training cells' token frequencies."""
    adata, split, model, work = fitted
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    cal = build_model("lingshu", {**TINY, "calibrate_steps": 30})
    data = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path))
    cal.fit(data, init=work / "pretrain.pt")
    before, after = model.net.state_dict(), cal.net.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if key == "head_bias":
            assert not torch.equal(before[key], after[key])
        else:
            torch.testing.assert_close(before[key], after[key], rtol=0, atol=0, msg=key)
    cal.save(tmp_path / "model.npz")
    torch.testing.assert_close(load_model(str(tmp_path / "model.npz")).net.head_bias,
                               cal.net.head_bias, rtol=0, atol=0)
    with pytest.raises(InputError, match="models.lingshu.calibrate_steps"):
        build_model("lingshu", {**TINY, "calibrate_steps": -1})
