"""Training counts read on demand from the processed file (FileRows) against the same counts
in memory: the same rows, blocks, sums and fingerprints, and the same fitted baselines."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_entry, make_processed

import lingshu.data.rows as rows_mod
import lingshu.io as io_mod
from lingshu.data.features import compute_features
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import FileRows, MemoryRows, column_sums, group_means, row_sums
from lingshu.data.split import make_split
from lingshu.io import write_h5ad, write_h5ad_streaming
from lingshu.models.harness import build_model, training_data

BASELINES = ("control_mean", "perturbation_mean", "linear")


def _counts(n=57, g=13, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.5, 2.0, size=g), size=(n, g)).astype(np.int32)
    x[5] = 0  # an empty row
    x[20:23] = 0  # a run of empty rows
    return sp.csr_matrix(x)


def _streamed_file(path, x, chunk, monkeypatch):
    """The counts as the preprocess stage writes them (chunked CSR), with tiny chunks so that
    rows straddle chunk edges."""
    monkeypatch.setattr(io_mod, "H5_CHUNK", chunk)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])])
    write_h5ad_streaming(path, obs, var, (x[s:s + 10] for s in range(0, x.shape[0], 10)))
    return path


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "compressed"])
def test_file_rows_read_what_memory_holds(tmp_path, monkeypatch, layout):
    x = _counts()
    path = tmp_path / "p.h5ad"
    if layout == "chunked":
        _streamed_file(path, x, chunk=7, monkeypatch=monkeypatch)
    else:  # anndata's own writer: contiguous arrays, or gzip (read through h5py)
        adata = ad.AnnData(X=x)
        adata.write_h5ad(path, compression="gzip" if layout == "compressed" else None)
    chosen = np.array([0, 1, 2, 5, 6, 9, 20, 21, 22, 30, 31, 44, 56])
    disk, memory = FileRows(path, chosen), MemoryRows(x[chosen])
    assert (disk.arrays is None) == (layout == "compressed")
    assert disk.shape == memory.shape == (13, 13)
    rng = np.random.default_rng(1)
    cases = [rng.integers(0, 13, size=40), np.arange(13)[::-1], [3], [], np.arange(2, 9)]
    for idx in cases:
        a, b = disk.read(idx), memory.read(idx)
        assert a.shape == b.shape and (a != b).nnz == 0, idx
        assert a.data.flags.writeable
    sub = disk.subset([4, 5, 6])
    assert (sub.read_all() != x[chosen[4:7]]).nnz == 0
    blocks = list(disk.blocks(4))
    assert [s for s, _ in blocks] == [0, 4, 8, 12]
    assert (sp.vstack([b for _, b in blocks]) != x[chosen]).nnz == 0
    assert disk.fingerprint() == memory.fingerprint()
    assert FileRows(path, chosen[:-1]).fingerprint() != disk.fingerprint()


def test_streamed_sums_and_means_equal_the_in_memory_ones(tmp_path, monkeypatch):
    x = _counts(n=50)
    disk = FileRows(_streamed_file(tmp_path / "p.h5ad", x, 5, monkeypatch))
    monkeypatch.setattr(rows_mod, "BLOCK_ROWS", 8)  # several blocks
    labels = np.array(list("abcab") * 10)
    uniq, means = group_means(disk, labels, transform=log1p_cp10k)
    logs = log1p_cp10k(x).toarray()
    assert list(uniq) == ["a", "b", "c"]
    for i, lab in enumerate(uniq):
        np.testing.assert_allclose(means[i], logs[labels == lab].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(row_sums(disk), x.toarray().sum(axis=1))
    select = labels == "a"
    np.testing.assert_array_equal(column_sums(disk, select=select),
                                  x.toarray()[select].sum(axis=0))
    with pytest.raises(ValueError, match="labels for"):
        group_means(disk, labels[:-1])


def test_a_dense_or_foreign_file_is_refused_by_name(tmp_path):
    path = tmp_path / "dense.h5ad"
    ad.AnnData(X=np.ones((3, 2), dtype=np.float32)).write_h5ad(path)
    with pytest.raises(ValueError, match=r"dense\.h5ad: X is not a CSR matrix"):
        FileRows(path)
    sparse = tmp_path / "s.h5ad"
    ad.AnnData(X=sp.csr_matrix(np.eye(3, dtype=np.int32))).write_h5ad(sparse)
    with pytest.raises(IndexError, match="rows outside"):
        FileRows(sparse, [0, 3])


def test_dense_streaming_writer_reads_back(tmp_path):
    x = _counts(n=23)
    obs = pd.DataFrame({"k": pd.Categorical(["u", "v"] * 11 + ["u"])},
                       index=[f"c{i}" for i in range(23)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(13)])
    path = tmp_path / "d.h5ad"
    write_h5ad_streaming(path, obs, var, (x[s:s + 6] for s in range(0, 23, 6)),
                         dtype=np.float32, dense=True)
    back = ad.read_h5ad(path)
    assert isinstance(back.X, np.ndarray) and back.X.dtype == np.float32
    np.testing.assert_array_equal(back.X, x.toarray())
    assert list(back.obs["k"].cat.categories) == ["u", "v"]
    with pytest.raises(ValueError, match="rows of counts for 23 cells"):
        write_h5ad_streaming(tmp_path / "short.h5ad", obs, var, [x[:5]], dense=True)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_fitted_from_the_file_equal_those_fitted_in_memory(tmp_path, monkeypatch,
                                                                     name):
    monkeypatch.setattr(rows_mod, "BLOCK_ROWS", 37)  # blocks that cut across conditions
    adata = make_processed()
    write_h5ad(adata, tmp_path / "p.h5ad")
    backed = ad.read_h5ad(tmp_path / "p.h5ad", backed="r")
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    entry = make_entry("genetic")
    features = compute_features(adata, split, entry, n_components=4, seed=0)
    on_disk = training_data(backed, split, features, seed=0, entry=entry)
    in_memory = training_data(adata, split, features, seed=0, entry=entry)
    assert isinstance(on_disk.counts, FileRows) and sp.issparse(in_memory.counts)
    a, b = build_model(name), build_model(name)
    a.fit(on_disk)
    b.fit(in_memory)
    (arrays_a, meta_a), (arrays_b, meta_b) = a.get_state(), b.get_state()
    assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_allclose(arrays_a[key], arrays_b[key], rtol=1e-9, atol=1e-12,
                                   err_msg=key)
