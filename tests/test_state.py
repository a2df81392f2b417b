"""STATE through arc-state: the adapter's choices (fast) and a tiny real train + infer (slower)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.data.split import make_split
from lingshu.models.base import ConditionInput
from lingshu.data.features import compute_features
from lingshu.data.truth import build_truth
from lingshu.models.harness import build_model, load_model, predict_conditions, training_data
from lingshu.models.state.model import PRESETS, StateError, StateModel

from conftest import make_entry, make_processed

ENTRY = make_entry("genetic")
TINY = {"preset": "tiny"}
KEEP = {"preset": "tiny", "keep_training_files": True}


def _data(tmp_path, kind="heldout_perturbations"):
    adata = make_processed(n_genes=24, perts=("G1", "G2", "G3", "G4"), n_per=24, n_ctrl=48)
    spec = ({"kind": kind, "test_perturbations": ["G2"]} if kind == "heldout_perturbations"
            else {"kind": kind, "test_combinations": [{"context": "A", "perturbation": "G2"}]})
    split = make_split(adata.obs, spec, seed=0)
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    data = training_data(adata, split, features, seed=0, entry=ENTRY, workdir=str(tmp_path))
    return adata, split, features, data


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown parameters.*'hiden_dim'"):
        StateModel(hiden_dim=3)
    with pytest.raises(ValueError, match="unknown preset"):
        StateModel(preset="huge")
    with pytest.raises(ValueError, match="perturbation_encoding"):
        StateModel(perturbation_encoding="esm")


def test_overrides_switch_off_dropout_wandb_and_validation(tmp_path):
    model = StateModel(preset="cpu", steps=50, overrides=["training.weight_decay=0.01"])
    o = model.hydra_overrides(tmp_path / "s.toml", tmp_path / "out", seed=7, features_file=None)
    assert "+model.kwargs.dropout=0.0" in o  # SPEC 3: dropout 0.1 breaks inference
    assert "use_wandb=false" in o
    assert "training.max_steps=50" in o and "training.val_freq=51" in o
    assert "training.train_seed=7" in o and "+data.kwargs.random_seed=7" in o
    assert "model.kwargs.hidden_dim=128" in o
    assert o[-1] == "training.weight_decay=0.01"  # the user's overrides come last and win
    assert not any("perturbation_features_file" in x for x in o)
    assert PRESETS["state_sm"]["model"] == "state_sm"


def test_encoding_follows_the_split(tmp_path):
    _, _, _, data = _data(tmp_path)
    assert StateModel(**TINY).choose_encoding(data) == "features"  # G2 never trains
    with pytest.raises(StateError, match="no trained encoding for 1 perturbation.*G2"):
        StateModel(perturbation_encoding="onehot").choose_encoding(data)
    _, _, _, combos = _data(tmp_path, kind="heldout_combinations")
    assert StateModel(**TINY).choose_encoding(combos) == "onehot"  # G2 trains in context B


def test_feature_vectors_mark_unknown_perturbations():
    features = pd.DataFrame({"f0": [0.5, 0.0], "f1": [-1.0, 0.0],
                             "source": ["target_pca", "unknown"]}, index=["G1", "NT9"])
    vec = StateModel.feature_vectors(features, ["control", "G1", "NT9"])
    np.testing.assert_array_equal(vec["control"], [0, 0, 0])
    np.testing.assert_array_equal(vec["G1"], [0.5, -1.0, 0])
    np.testing.assert_array_equal(vec["NT9"], [0, 0, 1])
    with pytest.raises(StateError, match="no row for G7"):
        StateModel.feature_vectors(features, ["control", "G7"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("state")
    adata, split, features, data = _data(work)
    model = build_model("state", KEEP)
    model.fit(data)
    model.save(work / "model.npz")
    return adata, split, model, work


def test_training_file_holds_only_training_cells(fitted):
    adata, split, _, work = fitted
    train = ad.read_h5ad(work / "state" / "train.h5ad")
    assert train.n_obs == int(split.cells["in_train"].sum())
    assert "G2" not in set(train.obs["perturbation"])  # held out
    # every label is a category, so that the one-hot / feature maps know all of them
    assert "G2" in set(train.obs["perturbation"].cat.categories)
    toml = (work / "state" / "split.toml").read_text()
    assert "[training]" in toml and "fewshot" not in toml and "zeroshot" not in toml
    assert (work / "state" / "train_loss.png").stat().st_size > 5_000


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
    assert "is_real_control" not in pred.obs
    x = pred.X.toarray()
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 14
    assert x.std(axis=0).max() > 0  # cells, not a copied mean
    again = predict_conditions(load_model(str(work / "model.npz")), adata, split,
                               seed=0, progress=False)
    np.testing.assert_array_equal(again.X.toarray(), pred.X.toarray())


def test_predictions_depend_on_the_perturbation(fitted):
    adata, split, model, _ = fitted
    ctrl = sp.csr_matrix(adata[(adata.obs["context"] == "A").to_numpy()
                               & (adata.obs["perturbation"] == "control").to_numpy()].X)
    conds = [ConditionInput("A", p, ctrl, 64) for p in ("G1", "G2", "G4")]
    means = [x.mean(axis=0) for x in model.predict_many(conds, np.random.default_rng(0))]
    assert np.abs(means[0] - means[1]).max() > 1e-3
    assert np.abs(means[0] - means[2]).max() > 1e-3


def test_unknown_label_is_an_error_not_the_control_encoding(fitted):
    adata, _, model, _ = fitted
    ctrl = sp.csr_matrix(adata[:5].X)
    with pytest.raises(StateError, match="no encoding for perturbation 'G99'"):
        list(model.predict_many([ConditionInput("A", "G99", ctrl, 3)],
                                np.random.default_rng(0)))


def test_packed_files_are_read_as_data_only(tmp_path):
    """`state tx infer` unpickles some of STATE's run files (pickle.load, weights_only=False):
    loading a model.npz checks each packed file as data only first, and refuses code."""
    import io
    import json
    import pickle

    import torch

    from lingshu.errors import CorruptFileError
    from lingshu.models.state.model import CKPT, _check_packed_files

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    good = {"config.yaml": b"data: {}\n",
            "var_dims.pkl": pickle.dumps({"input_dim": 24, "gene_names": ["G0"],
                                          "n": np.int64(3)}),
            "pert_onehot_map.pt": saved({"control": torch.zeros(2)}),
            "batch_onehot_map.torch": saved({np.str_("A"): torch.ones(2)}),
            "cell_type_onehot_map.torch": saved({np.str_("A"): torch.ones(2)}),
            CKPT: saved({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 1e-3}})}
    _check_packed_files(good)

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    for name, blob in [("var_dims.pkl", pickle.dumps({"x": Exploit()})),
                       ("pert_onehot_map.pt", saved({"control": Exploit()})),
                       (CKPT, saved({"state_dict": {}, "callbacks": Exploit()})),
                       ("var_dims.pkl", pickle.dumps({"x": 1})[:-5]),
                       ("other.pkl", pickle.dumps({}))]:
        with pytest.raises(CorruptFileError, match=name.replace(".", r"\.")):
            _check_packed_files({**good, name: blob})
    assert not (tmp_path / "pwned").exists()

    # through load_model: the model file is named, with the fix
    arrays = {f"file::{k}": np.frombuffer(v, dtype=np.uint8) for k, v in good.items()}
    arrays["file::var_dims.pkl"] = np.frombuffer(pickle.dumps({"x": Exploit()}), dtype=np.uint8)
    meta = {"model": "state", "params": TINY, "genes": ["G0"], "labels": ["control"],
            "contexts": ["A"], "encoding": "onehot"}
    path = tmp_path / "model.npz"
    with open(path, "wb") as fh:
        np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(CorruptFileError, match=rf"^{path}: .*var_dims\.pkl.*delete it"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
