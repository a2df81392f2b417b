"""The on-disk token store: written streaming from the processed file, read batch by batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_entry, make_processed

from lingshu.cli import main
from lingshu.data import tokenstore
from lingshu.data.split import make_split, write_split
from lingshu.data.tokenstore import TokenStore, write_tokens
from lingshu.errors import InputError
from lingshu.io import write_table
from lingshu.data.features import compute_features
from lingshu.models.harness import load_model
from lingshu.tokens import quantize_counts


@pytest.fixture()
def processed(tmp_path):
    adata = make_processed(n_genes=30)
    adata.X = sp.csr_matrix(adata.X.multiply(np.arange(1, adata.n_vars + 1) ** 2))  # counts > 100
    path = tmp_path / "processed.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_write_open_and_batches_match_the_counts(processed, tmp_path, monkeypatch):
    adata, path = processed
    monkeypatch.setattr(tokenstore, "BLOCK_VALUES", 50)  # many small blocks
    meta = write_tokens(path, tmp_path / "tokens")
    assert meta["n_cells"] == adata.n_obs and meta["nnz"] == adata.X.nnz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed.h5ad", "tokens"]
    store = TokenStore.open(tmp_path / "tokens", obs_names=adata.obs_names, genes=adata.var_names)
    assert isinstance(store.values, tokenstore.NpyRanges)  # read per batch, never loaded
    assert store.values.dtype == np.uint16 and store.indices.dtype == np.uint16
    expected = quantize_counts(adata.X.toarray())
    assert expected.max() > 100  # the quantised range, not only exact small counts
    idx = np.random.default_rng(0).integers(0, adata.n_obs, 200)
    np.testing.assert_array_equal(store.dense(idx), expected[idx])
    rows = np.array([5, 3, 100])
    sub = store.subset(rows)
    assert sub.shape == (3, adata.n_vars)
    np.testing.assert_array_equal(sub.dense(np.array([2, 0, 0])), expected[[100, 5, 5]])
    np.testing.assert_array_equal(sub.subset(np.array([1])).dense(np.array([0])), expected[[3]])
    # the same tokens as built in memory from the counts
    mem = TokenStore.from_counts(adata.X)
    np.testing.assert_array_equal(mem.dense(idx), expected[idx])
    assert store.fingerprint() == mem.fingerprint()  # the same hash of the same arrays
    assert sub.fingerprint() != store.fingerprint()
    assert store.subset(rows).fingerprint() == sub.fingerprint()


def test_open_refuses_other_data(processed, tmp_path):
    adata, path = processed
    write_tokens(path, tmp_path / "tokens")
    with pytest.raises(InputError, match="other cells"):
        TokenStore.open(tmp_path / "tokens", obs_names=adata.obs_names[::-1], genes=adata.var_names)
    with pytest.raises(InputError, match="other genes"):
        TokenStore.open(tmp_path / "tokens", obs_names=adata.obs_names, genes=adata.var_names[1:])
    with pytest.raises(InputError, match="meta.json"):
        TokenStore.open(tmp_path)
    values = tmp_path / "tokens" / "values.npy"
    values.write_bytes(values.read_bytes()[:-2])  # truncated
    with pytest.raises(InputError, match="unreadable"):
        TokenStore.open(tmp_path / "tokens")
    write_tokens(path, tmp_path / "tokens")
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    meta["nnz"] += 1
    (tmp_path / "tokens" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="damaged"):
        TokenStore.open(tmp_path / "tokens")


def test_failed_tokenise_leaves_nothing(processed, tmp_path, monkeypatch):
    _, path = processed

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenstore, "quantize_counts", broken)
    with pytest.raises(RuntimeError):
        write_tokens(path, tmp_path / "out" / "tokens")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_training_from_tokens_equals_training_from_counts(processed, tmp_path):
    """The pipeline's fit command with --tokens trains exactly as from the counts in memory."""
    adata, path = processed
    split = make_split(adata.obs, {"kind": "heldout_perturbations", "test_perturbations": ["G2"]},
                       seed=0)
    write_split(split, tmp_path / "split")
    entry = make_entry("genetic")
    write_table(compute_features(adata, split, entry, n_components=4, seed=0).reset_index(),
                tmp_path / "features.tsv")
    assert main(["tokenize", "--processed", str(path), "--out", str(tmp_path / "tokens")]) == 0
    params = {"preset": "tiny", "finetune_steps": 6, "batch_size": 8, "warmup_steps": 1,
              "checkpoint_every": 3}
    common = ["fit", "--processed", str(path), "--split", str(tmp_path / "split"), "--features",
              str(tmp_path / "features.tsv"), "--model", "lingshu", "--params", json.dumps(params),
              "--entry", entry.to_json(), "--seed", "0"]
    for name, extra in (("counts", []), ("tokens", ["--tokens", str(tmp_path / "tokens")])):
        assert main(common + ["--workdir", str(tmp_path / name), "--out",
                              str(tmp_path / name / "model.npz")] + extra) == 0
    a, b = (load_model(str(tmp_path / n / "model.npz")).net.state_dict()
            for n in ("counts", "tokens"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # only Lingshu-Cell trains from tokens
    linear = [("linear" if arg == "lingshu" else arg) for arg in common]
    assert main(linear + ["--out", str(tmp_path / "x.npz"),
                          "--tokens", str(tmp_path / "tokens")]) == 2
