import anndata as ad
import numpy as np
import pytest

from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import MemoryRows, group_means
from lingshu.data.split import make_split
from lingshu.data.features import compute_features
from lingshu.data.truth import build_truth
from lingshu.models.harness import build_model, load_model, predict_conditions, training_data
from lingshu.models.spec import all_specs

from conftest import make_entry, make_processed

SPEC = {"kind": "heldout_perturbations", "test_perturbations": ["G2", "G3"]}
ENTRY = make_entry("genetic", split=SPEC)
BASELINES = ("control_mean", "perturbation_mean", "linear")


def _fit(name, adata, split, params=None):
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    model = build_model(name, params)
    model.fit(training_data(adata, split, features, seed=0, entry=ENTRY))
    return model, features


def test_log1p_cp10k_sparse_equals_dense():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(20, 15))
    counts[3] = 0  # an empty cell stays zero
    import scipy.sparse as sp

    dense = log1p_cp10k(counts)
    sparse = log1p_cp10k(sp.csr_matrix(counts)).toarray()
    np.testing.assert_allclose(dense, sparse, rtol=1e-6)
    np.testing.assert_allclose(np.expm1(dense[0]).sum(), 1e4, rtol=1e-4)
    assert not dense[3].any()
    labels, means = group_means(MemoryRows(sp.csr_matrix(counts)), np.array(list("ab") * 10))
    np.testing.assert_allclose(means[0], counts[::2].mean(axis=0))


@pytest.mark.parametrize("name", BASELINES)
def test_prediction_format(tiny_processed, name, tmp_path):
    split = make_split(tiny_processed.obs, SPEC, seed=0)
    truth = build_truth(tiny_processed, split)
    model, _ = _fit(name, tiny_processed, split)
    model.save(tmp_path / "m.npz")
    model = load_model(str(tmp_path / "m.npz"))
    pred = predict_conditions(model, tiny_processed, split, seed=0, progress=False)
    # the processed data's genes in its order, the truth's test conditions and cell counts,
    # and the predicted cells only: the evaluation adds the real control cells itself
    assert list(pred.var_names) == list(tiny_processed.var_names)
    assert list(pred.var_names) == list(truth.var_names)
    assert sorted(pred.obs.columns) == ["context", "perturbation"]
    assert "control" not in set(pred.obs["perturbation"])
    key = ["context", "perturbation"]
    held_out = truth.obs[~truth.obs["is_real_control"].to_numpy()]
    assert (pred.obs.groupby(key).size().sort_index()
            .equals(held_out.groupby(key).size().sort_index()))
    assert pred.n_obs == int(split.test_conditions()["n_cells"].sum())
    assert pred.uns["lingshu"]["model"] == name and pred.uns["lingshu"]["run"] == name
    assert np.isfinite(pred.X.toarray()).all() and pred.X.min() >= 0


def _profile(model, adata, split, ctx, pert):
    pred = predict_conditions(model, adata, split, seed=0, progress=False)
    sel = ((pred.obs["context"] == ctx) & (pred.obs["perturbation"] == pert)).to_numpy()
    return np.asarray(pred[sel].X.mean(axis=0)).ravel()


def test_baselines_on_a_known_case(tiny_processed):
    split = make_split(tiny_processed.obs, SPEC, seed=0)
    truth = build_truth(tiny_processed, split)
    ctrl = truth[(truth.obs["is_real_control"] & (truth.obs["context"] == "A")).to_numpy()]
    ctrl_mean = np.asarray(ctrl.X.mean(axis=0)).ravel()

    control_model, _ = _fit("control_mean", tiny_processed, split)
    pred = predict_conditions(control_model, tiny_processed, split, seed=0, progress=False)
    sel = ((pred.obs["context"] == "A") & (pred.obs["perturbation"] == "G2")).to_numpy()
    # the predicted cells are real control cells (30 of the 30 held-out controls of A)
    ctrl_rows = {tuple(r) for r in ctrl.X.toarray().round(5)}
    assert all(tuple(r) in ctrl_rows for r in pred[sel].X.toarray().round(5))
    np.testing.assert_allclose(np.asarray(pred[sel].X.mean(axis=0)).ravel(), ctrl_mean,
                               atol=1e-5)

    pm, _ = _fit("perturbation_mean", tiny_processed, split)
    train = tiny_processed[split.cells["in_train"].to_numpy()]
    a_pert = train[((train.obs["context"] == "A") & (train.obs["perturbation"] != "control")).to_numpy()]
    expected = np.asarray(log1p_cp10k(a_pert.X).mean(axis=0)).ravel()
    np.testing.assert_allclose(_profile(pm, tiny_processed, split, "A", "G2"),
                               expected, rtol=1e-5)


def _modular_dataset(seed=0):
    """4 co-expressed modules of 10 genes; knocking down any gene lowers its whole module."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_mod, size = 4, 10
    genes = [f"M{m}_{j}" for m in range(n_mod) for j in range(size)]
    perts = ["control"] * 400 + [g for g in genes if not g.endswith("_9") for _ in range(30)]
    activity = rng.lognormal(0, 0.6, size=(len(perts), n_mod))  # shared within a module
    for i, p in enumerate(perts):
        if p != "control":
            activity[i, int(p[1])] *= 0.2
    mu = 3.0 * np.repeat(activity, size, axis=1)
    x = sp.csr_matrix(rng.poisson(mu).astype(np.int32))
    obs = pd.DataFrame({"perturbation": perts, "context": "A"},
                       index=[f"c{i}" for i in range(len(perts))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


def test_linear_model_transfers_through_target_features():
    # A held-out target's module comes out lower than in controls, learned from the other
    # targets of the same module through the target-gene PCA features (SPEC 1.2a).
    adata = _modular_dataset()
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["M1_3", "M2_5"]}, seed=0)
    truth = build_truth(adata, split)
    model, features = _fit("linear", adata, split)
    assert features.loc["M1_3", "source"] == "target_pca"
    ctrl = truth[truth.obs["is_real_control"].to_numpy()]
    ctrl_mean = np.asarray(ctrl.X.mean(axis=0)).ravel()
    for target, module in (("M1_3", 1), ("M2_5", 2)):
        change = _profile(model, adata, split, "A", target) - ctrl_mean
        in_module = change[module * 10:(module + 1) * 10].mean()
        others = np.delete(change, np.s_[module * 10:(module + 1) * 10]).mean()
        assert in_module < -0.3 and in_module < others - 0.3


def test_linear_model_combination_split_transfers_shift():
    adata = make_processed(contexts=("A", "B", "C"), perts=("G1",), n_per=40)
    split = make_split(adata.obs, {"kind": "heldout_combinations", "test_combinations": [
        {"context": "A", "perturbation": "G1"}]}, seed=0)
    truth = build_truth(adata, split)
    model, _ = _fit("linear", adata, split)
    prof = _profile(model, adata, split, "A", "G1")
    ctrl = truth[truth.obs["is_real_control"].to_numpy()]
    ctrl_mean = np.asarray(ctrl.X.mean(axis=0)).ravel()
    assert prof[1] < ctrl_mean[1] - 0.5 and prof[11] > ctrl_mean[11] + 0.5


def test_truth_holds_test_cells_and_control_inputs(tiny_processed):
    split = make_split(tiny_processed.obs, SPEC, seed=0)
    truth = build_truth(tiny_processed, split)
    assert set(truth.obs.loc[~truth.obs["is_real_control"], "perturbation"]) == {"G2", "G3"}
    assert (truth.obs.loc[truth.obs["is_real_control"], "perturbation"] == "control").all()
    assert truth.X.dtype == np.float32
    np.testing.assert_allclose(np.expm1(truth.X[:5].toarray()).sum(axis=1), 1e4, rtol=1e-3)


def test_unknown_model_name():
    with pytest.raises(KeyError, match="registered"):
        build_model("nope")


def test_baselines_are_the_registered_baseline_specs():
    baselines = {name for name, spec in all_specs().items()
                 if spec.cls.startswith("lingshu.models.baselines.")}
    assert baselines == set(BASELINES)


def test_data_fingerprint_changes_with_the_inputs(tiny_processed):
    from lingshu.data.split import make_split
    from lingshu.models.base import data_fingerprint

    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G2"]}, seed=0)
    data = training_data(tiny_processed, split, None, seed=0, entry=ENTRY)
    fp = data_fingerprint(data, params={"a": 1})
    assert fp == data_fingerprint(training_data(tiny_processed, split, None, seed=0, entry=ENTRY),
                                  params={"a": 1})
    assert fp != data_fingerprint(data, params={"a": 2})
    assert fp != data_fingerprint(training_data(tiny_processed, split, None, seed=1, entry=ENTRY),
                                  params={"a": 1})
    other = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G3"]}, seed=0)
    assert fp != data_fingerprint(training_data(tiny_processed, other, None, seed=0, entry=ENTRY),
                                  params={"a": 1})


def test_stages_read_a_backed_file_as_in_memory(tiny_processed, tmp_path):
    """The stages read only the rows they need from the backed processed file: same results."""
    import pandas as pd

    from lingshu.data.features import gene_embedding

    adata = tiny_processed
    adata.write_h5ad(tmp_path / "p.h5ad")
    backed = ad.read_h5ad(tmp_path / "p.h5ad", backed="r")
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    entry = make_entry("genetic")
    pd.testing.assert_frame_equal(compute_features(backed, split, entry, n_components=4, seed=3),
                                  compute_features(adata, split, entry, n_components=4, seed=3))
    a, b = build_truth(backed, split), build_truth(adata, split)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    # the embedding of the seeded subsample is the embedding of all the cells
    x = np.random.default_rng(0).poisson(2.0, size=(300, 12)).astype(np.float32)
    np.testing.assert_allclose(gene_embedding(x, 3, seed=1, max_cells=100),
                               gene_embedding(x[np.sort(np.random.default_rng(1).choice(
                                   300, 100, replace=False))], 3, seed=1, max_cells=100),
                               rtol=1e-5)


def test_a_condition_the_model_cannot_encode_is_listed_not_dropped_nor_fatal(tiny_processed):
    """A model that raises ConditionNotEncodable for one condition: the prediction holds the
    other conditions and lists that one (context, perturbation, reason) in uns."""
    import json

    from lingshu.models.base import ConditionNotEncodable

    split = make_split(tiny_processed.obs, SPEC, seed=0)
    model, _ = _fit("control_mean", tiny_processed, split)
    skipped = split.test_conditions().iloc[0]
    real_predict = model.predict

    def predict(condition, rng):
        if (condition.context, condition.perturbation) == (skipped["context"],
                                                           skipped["perturbation"]):
            raise ConditionNotEncodable(condition.context, condition.perturbation,
                                        "never seen", model="control_mean")
        return real_predict(condition, rng)

    model.predict = predict
    pred = predict_conditions(model, tiny_processed, split, seed=0, progress=False)
    listed = json.loads(pred.uns["lingshu"]["not_encoded"])
    assert listed == [{"context": skipped["context"], "perturbation": skipped["perturbation"],
                       "reason": "never seen"}]
    pairs = set(zip(pred.obs["context"], pred.obs["perturbation"]))
    assert (skipped["context"], skipped["perturbation"]) not in pairs
    assert pred.n_obs == int(split.test_conditions()["n_cells"].sum()) - int(skipped["n_cells"])


def test_a_bad_model_file_is_a_clear_error_naming_the_file(tiny_processed, tmp_path):
    """model.npz is read as data only; a truncated, garbage or pickle-carrying one stops with
    the file's name and the fix, never a crash deep in numpy and never code run."""
    from lingshu.errors import CorruptFileError

    split = make_split(tiny_processed.obs, SPEC, seed=0)
    model, _ = _fit("control_mean", tiny_processed, split)
    good = tmp_path / "model.npz"
    model.save(good)
    assert load_model(good).name == "control_mean"
    data = good.read_bytes()
    bad = {"truncated.npz": data[: len(data) // 2], "garbage.npz": bytes(range(256)) * 8,
           "empty.npz": b""}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
    with open(tmp_path / "objects.npz", "wb") as fh:  # an object array: needs pickle to load
        np.savez(fh, __meta__=np.array('{"model": "control_mean"}'),
                 w=np.array([{"a": 1}], dtype=object))
    with open(tmp_path / "no_meta.npz", "wb") as fh:
        np.savez(fh, w=np.zeros(3))
    for name in [*bad, "objects.npz", "no_meta.npz"]:
        path = tmp_path / name
        with pytest.raises(CorruptFileError) as info:
            load_model(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: cannot be read as a model file"), msg
        assert "delete it and re-run the rule" in msg
