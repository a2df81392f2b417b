"""Tests of lingshu.data.preprocess: bad-input errors, canonical output, QC, gene alignment."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.config import DatasetEntry
from lingshu.constants import BATCH_COL, CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data import preprocess as preprocess_module
from lingshu.data.preprocess import preprocess, preprocess_file, read_raw, validate_raw
from lingshu.errors import InputError
from lingshu.io import write_h5ad

PATH = "raw/synthetic.h5ad"  # only used in messages for in-memory objects
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PAPALEXI = DATA / "papalexi2021_thp1_eccite_sceptredata.h5ad"
KANG = DATA / "kang2018_ifnb_pbmc_muscat.h5ad"
NORMAN = DATA / "perturbench_devel_norman2019_mcfaline2023.h5ad"


def make_adata(n_cells: int = 200, n_genes: int = 50, control: str = "NT", seed: int = 0) -> ad.AnnData:
    """Synthetic raw data: NB counts (float32 CSR, like most files), 4 labels x 2 contexts."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(n=2, p=0.3, size=(n_cells, n_genes)).astype(np.float32)
    genes = [f"G{i}" for i in range(n_genes - 2)] + ["MT-CO1", "MT-ND1"]
    labels = np.array([control, "P1", "P2", "P3"])[np.arange(n_cells) % 4]
    obs = pd.DataFrame(
        {
            "guide_target": pd.Categorical(labels),
            "cell_line": np.where(np.arange(n_cells) % 8 < 4, "A", "B"),
            "lane": pd.Categorical(np.where(np.arange(n_cells) < n_cells // 2, "L1", "L2")),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


def make_raw(**overrides) -> dict:
    """A raw dataset entry as written in a config (``dict`` overrides are merged one level)."""
    entry = {
        "source": {"path": PATH},
        "split": {"kind": "heldout_perturbations", "n_test_perturbations": 1},
        "columns": {"perturbation": "guide_target", "control": "NT", "context": "cell_line", "batch": "lane"},
        "perturbation_type": "genetic",
        "genes": None,
        "layer": None,
        "qc": {"min_counts_per_cell": 0, "min_genes_per_cell": 0, "min_cells_per_gene": 0, "max_pct_mito": None},
        "min_cells_per_condition": 10,
        "drop_small_conditions": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    return entry


def make_entry(**overrides) -> DatasetEntry:
    """The parsed dataset entry ``syn`` (validated, defaults filled) of :func:`make_raw`."""
    return DatasetEntry.parse("syn", make_raw(**overrides))


def assert_input_error(func, field: str, *fragments: str, path: str = PATH) -> str:
    """Run ``func``; check it raises InputError naming the path, the field, the fix and fragments."""
    with pytest.raises(InputError) as err:
        func()
    msg = str(err.value)
    assert str(path) in msg, msg
    assert field in msg, msg
    assert "Fix:" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _set_value(value: float):
    def mutate(adata: ad.AnnData, raw: dict) -> None:
        adata.X.data[3] = value
    return mutate


def _missing_column(adata: ad.AnnData, raw: dict) -> None:
    raw["columns"]["context"] = "cell_typ"


def _no_control(adata: ad.AnnData, raw: dict) -> None:
    raw["columns"]["control"] = "non-targeting"


def _duplicate_genes(adata: ad.AnnData, raw: dict) -> None:
    adata.var_names = ["G0", "G0"] + list(adata.var_names[2:])


def _small_condition(adata: ad.AnnData, raw: dict) -> None:
    # Only 3 cells of P3 in context B.
    labels = adata.obs["guide_target"].astype(str).to_numpy()
    idx = np.flatnonzero((labels == "P3") & (adata.obs["cell_line"].to_numpy() == "B"))
    labels[idx[3:]] = "P2"
    adata.obs["guide_target"] = labels


def _collision(adata: ad.AnnData, raw: dict) -> None:
    labels = adata.obs["guide_target"].astype(str).replace({"P3": CONTROL})
    adata.obs["guide_target"] = labels


def _missing_layer(adata: ad.AnnData, raw: dict) -> None:
    raw["layer"] = "counts"


BAD_INPUTS = {
    "non-integer": (_set_value(0.5), "X", ["not integers"]),
    "negative": (_set_value(-2.0), "X", ["negative"]),
    "nan": (_set_value(np.nan), "X", ["NaN"]),
    "inf": (_set_value(np.inf), "X", ["infinite"]),
    "missing-column": (_missing_column, "columns.context", ["cell_typ", "guide_target", "lane"]),
    "no-control": (_no_control, "columns.control", ["non-targeting", "NT", "P1"]),
    "duplicate-genes": (_duplicate_genes, "var_names", ["G0"]),
    "small-condition": (_small_condition, "min_cells_per_condition", ["B x P3 (3 cells)"]),
    "control-collision": (_collision, "columns.control", [repr(CONTROL)]),
    "missing-layer": (_missing_layer, "layer", ["counts"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    mutate, field, fragments = BAD_INPUTS[case]
    adata, raw = make_adata(), make_raw()
    mutate(adata, raw)
    entry = DatasetEntry.parse("syn", raw)
    assert_input_error(lambda: validate_raw(adata, entry, PATH), field, *fragments)
    assert_input_error(lambda: preprocess(adata, entry, PATH), field, *fragments)


@pytest.mark.parametrize("layout", ["dense", "csc"])
def test_count_checks_on_dense_and_csc(layout):
    adata = make_adata()
    X = adata.X.toarray()
    X[5, 7] = 1.5
    adata.X = X if layout == "dense" else sp.csc_matrix(X)
    assert_input_error(lambda: validate_raw(adata, make_entry(), PATH), "X", "not integers")


def test_bad_layer_counts_named_by_layer():
    adata = make_adata()
    adata.layers["lognorm"] = np.log1p(adata.X)
    assert_input_error(lambda: validate_raw(adata, make_entry(layer="lognorm"), PATH),
                       "layers['lognorm']", "not integers")
    validate_raw(adata, make_entry(), PATH)  # X itself is fine
    adata.layers["counts"], adata.X = adata.X, adata.layers["lognorm"]
    msg = assert_input_error(lambda: validate_raw(adata, make_entry(), PATH), "X", "not integers")
    assert "'counts'" in msg  # the fix points at the layers the counts may be in


def test_empty_after_qc():
    adata = make_adata()
    entry = make_entry(qc={"min_counts_per_cell": 10**9})
    assert_input_error(lambda: preprocess(adata, entry, PATH), "qc", "empty")


def test_condition_small_after_qc():
    adata = make_adata()
    X = adata.X.toarray()
    labels = adata.obs["guide_target"].astype(str).to_numpy()
    in_p1_a = np.flatnonzero((labels == "P1") & (adata.obs["cell_line"].to_numpy() == "A"))
    X[in_p1_a[:-5]] = 0  # QC will leave 5 cells of A x P1
    X[in_p1_a[:-5], 0] = 1
    adata.X = sp.csr_matrix(X)
    entry = make_entry(qc={"min_counts_per_cell": 5})
    assert_input_error(lambda: preprocess(adata, entry, PATH), "min_cells_per_condition",
                       "A x P1 (5 cells)", "after QC")
    out = preprocess(adata, make_entry(qc={"min_counts_per_cell": 5}, drop_small_conditions=True),
                     PATH)
    assert not ((out.obs[CONTEXT_COL] == "A") & (out.obs[PERT_COL] == "P1")).any()


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_bad_backed_counts(tmp_path, layout):
    """Backed X (sparse or dense) is checked block by block from the file."""
    adata = make_adata()
    adata.X.data[0] = 0.25
    if layout == "dense":
        adata.X = adata.X.toarray()
    path = str(tmp_path / "raw.h5ad")
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert_input_error(lambda: validate_raw(backed, make_entry(), path), "X", "not integers", path=path)
    finally:
        backed.file.close()


# ---------------------------------------------------------------------------------------------
# Canonical output
# ---------------------------------------------------------------------------------------------


def test_input_not_modified():
    adata = make_adata()
    X_before, obs_before, var_before = adata.X.copy(), adata.obs.copy(), adata.var_names.copy()
    out = preprocess(adata, make_entry(qc={"min_counts_per_cell": 60, "max_pct_mito": 50}), PATH)
    assert out is not adata
    assert (adata.X != X_before).nnz == 0 and adata.X.dtype == np.float32
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert adata.var_names.equals(var_before)
    assert "lingshu" not in adata.uns


def test_canonical_columns_and_dtypes():
    adata = make_adata()
    out = preprocess(adata, make_entry(), PATH)
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.int32
    assert np.array_equal(out.X.toarray(), adata.X.toarray().astype(np.int32))
    assert set(out.obs[PERT_COL]) == {CONTROL, "P1", "P2", "P3"}
    assert (out.obs.loc[adata.obs["guide_target"] == "NT", PERT_COL] == CONTROL).all()
    assert out.obs[CONTEXT_COL].tolist() == adata.obs["cell_line"].tolist()
    assert out.obs[BATCH_COL].tolist() == adata.obs["lane"].astype(str).tolist()
    assert all(isinstance(v, str) for v in out.obs[PERT_COL])
    for col in ("guide_target", "cell_line", "lane"):  # originals kept
        assert col in out.obs
    assert out.obs_names.is_unique and out.var_names.is_unique
    assert out.uns["lingshu"]["dataset"] == "syn"
    assert out.uns["lingshu"]["control_label"] == "NT"
    assert out.uns["lingshu"]["perturbation_type"] == "genetic"
    assert (out.uns["lingshu"]["n_cells_raw"], out.uns["lingshu"]["n_genes_raw"]) == (200, 50)


def test_defaults_without_context_and_batch():
    adata = make_adata()
    raw = make_raw()
    raw["columns"] = {"perturbation": "guide_target", "control": "NT"}
    entry = DatasetEntry.parse("syn", raw)
    out = preprocess(adata, entry, PATH)
    assert set(out.obs[CONTEXT_COL]) == {"syn"}  # dataset name when no context_label
    assert out.obs[BATCH_COL].equals(out.obs[CONTEXT_COL])
    other = preprocess(adata, DatasetEntry.parse("papalexi", raw), PATH)  # the name is the entry's
    assert set(other.obs[CONTEXT_COL]) == {"papalexi"}
    assert other.uns["lingshu"]["dataset"] == "papalexi"
    entry = replace(entry, columns=replace(entry.columns, context_label="THP-1"))
    assert set(preprocess(adata, entry, PATH).obs[CONTEXT_COL]) == {"THP-1"}


def test_existing_canonical_column_is_kept_aside():
    adata = make_adata()
    adata.obs[PERT_COL] = "something else"
    out = preprocess(adata, make_entry(), PATH)
    assert (out.obs[f"{PERT_COL}_original"] == "something else").all()
    assert set(out.obs[PERT_COL]) == {CONTROL, "P1", "P2", "P3"}


def test_duplicate_obs_names_made_unique():
    adata = make_adata()
    adata.obs_names = ["same"] * adata.n_obs
    out = preprocess(adata, make_entry(), PATH)
    assert out.obs_names.is_unique


def test_gene_list_alignment(tmp_path):
    adata = make_adata()
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 2 == 0
    adata.var["n_cells_raw"] = np.arange(adata.n_vars)
    genes = ["G10", "NEW1", "G3", "G0", "NEW2"]
    gene_file = tmp_path / "genes.txt"
    gene_file.write_text("# panel\n" + "\n".join(genes) + "\n\n")
    out = preprocess(adata, make_entry(genes=str(gene_file)), PATH)
    assert out.var_names.tolist() == genes
    assert out.X.format == "csr" and out.X.dtype == np.int32
    dense = out.X.toarray()
    raw = adata.X.toarray()
    for j, g in enumerate(genes):
        if g.startswith("NEW"):
            assert not dense[:, j].any()
        else:
            assert np.array_equal(dense[:, j], raw[:, adata.var_names.get_loc(g)])
    assert out.var["in_raw_data"].tolist() == [True, False, True, True, False]
    assert out.uns["lingshu"]["n_genes_zero_filled"] == 2
    write_h5ad(out, tmp_path / "out.h5ad")  # nullable var columns must be writable
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.var_names.tolist() == genes and back.X.dtype == np.int32


def test_gene_list_errors(tmp_path):
    adata = make_adata()
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="genes.*does not exist"):
        preprocess(adata, make_entry(genes=missing), PATH)
    other = tmp_path / "ensembl.txt"
    other.write_text("ENSG000001\nENSG000002\n")
    with pytest.raises(InputError, match="none of the 2 listed genes"):
        preprocess(adata, make_entry(genes=str(other)), PATH)


def test_qc_removes_low_count_cells_and_genes():
    adata = make_adata()
    X = adata.X.toarray()
    X[:8] = 0
    X[:8, 0] = 2  # 8 cells with 2 counts
    X[:, 5] = 0
    X[0, 5] = 1  # gene G5 seen in one cell
    adata.X = sp.csr_matrix(X)
    entry = make_entry(qc={"min_counts_per_cell": 10, "min_cells_per_gene": 3})
    out = preprocess(adata, entry, PATH)
    assert out.n_obs == 192 and not set(adata.obs_names[:8]) & set(out.obs_names)
    assert "G5" not in out.var_names and out.n_vars == 49
    assert out.obs["total_counts"].min() >= 10


def test_qc_mito():
    adata = make_adata()
    X = adata.X.toarray()
    X[10, -1] = 10_000  # one cell almost all MT-ND1
    adata.X = sp.csr_matrix(X)
    out = preprocess(adata, make_entry(qc={"max_pct_mito": 20}), PATH)
    assert "cell10" not in out.obs_names and out.n_obs == 199
    assert out.obs["pct_counts_mt"].max() <= 20


def test_drop_small_conditions():
    adata = make_adata()
    _small_condition(adata, make_raw())
    out = preprocess(adata, make_entry(drop_small_conditions=True), PATH)
    assert not ((out.obs[CONTEXT_COL] == "B") & (out.obs[PERT_COL] == "P3")).any()
    assert out.n_obs == 197
    assert ((out.obs[CONTEXT_COL] == "A") & (out.obs[PERT_COL] == "P3")).sum() == 25


def test_read_raw_roundtrip_and_layer(tmp_path):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)
    path = tmp_path / "raw.h5ad"
    adata.write_h5ad(path)
    entry = make_entry(layer="counts")
    raw = read_raw(str(path), entry)
    assert raw.X is None and list(raw.layers) == ["counts"]  # X (lognorm) was never loaded
    out = preprocess(raw, entry, str(path))
    assert out.X.dtype == np.int32 and out.n_obs == 200
    lognorm_x = read_raw(str(path), make_entry())
    assert_input_error(lambda: preprocess(lognorm_x, make_entry(), str(path)), "X", "not integers",
                       path=str(path))
    bad = make_entry(columns={"batch": "plate"})
    assert_input_error(lambda: read_raw(str(path), bad), "columns.batch", "plate", path=str(path))
    assert_input_error(lambda: read_raw(str(tmp_path / "none.h5ad"), entry), "source", "does not exist",
                       path=str(tmp_path / "none.h5ad"))
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    assert_input_error(lambda: read_raw(str(tmp_path / "junk.h5ad"), entry), "source", "h5ad",
                       path=str(tmp_path / "junk.h5ad"))


# ---------------------------------------------------------------------------------------------
# Streaming, file to file: the same result as in memory, in bounded row blocks
# ---------------------------------------------------------------------------------------------


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    assert (a.X != b.X).nnz == 0 and b.X.dtype == np.int32 and b.X.format == "csr"
    assert a.obs_names.equals(b.obs_names) and a.var_names.equals(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs, check_dtype=False, check_categorical=False)
    pd.testing.assert_frame_equal(a.var, b.var, check_dtype=False)
    assert a.uns["lingshu"] == b.uns["lingshu"]
    assert set(a.obsm) == set(b.obsm)
    for key in a.obsm:
        x, y = a.obsm[key], b.obsm[key]
        assert (x != y).nnz == 0 if sp.issparse(x) else np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("layout", ["csr", "dense", "csc"])
@pytest.mark.parametrize("case", ["qc", "gene_list", "drop_small"])
def test_preprocess_file_matches_in_memory(tmp_path, monkeypatch, layout, case):
    """Streaming in blocks of a few rows gives the in-memory result exactly."""
    adata = make_adata(n_cells=203)
    dense = adata.X.toarray()
    dense[np.arange(203) % 10 != 0, :5] = 0  # five rarely detected genes
    adata.X = sp.csr_matrix(dense)
    adata.obsm["X_pca"] = np.arange(adata.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    adata.uns["source"] = {"doi": "10.0/x"}
    if layout == "dense":
        adata.X = adata.X.toarray()
    elif layout == "csc":
        adata.X = sp.csc_matrix(adata.X)
    entry = {
        "qc": make_entry(qc={"min_counts_per_cell": 200, "min_cells_per_gene": 30, "max_pct_mito": 50}),
        "gene_list": make_entry(genes=str(tmp_path / "genes.txt")),
        "drop_small": make_entry(qc={"min_counts_per_cell": 5}, drop_small_conditions=True,
                                 min_cells_per_condition=26),
    }[case]
    (tmp_path / "genes.txt").write_text("G3\nABSENT\nG1\nMT-CO1\n")
    raw_path = tmp_path / "raw.h5ad"
    adata.write_h5ad(raw_path)
    expected = preprocess(read_raw(str(raw_path), entry), entry, str(raw_path))
    monkeypatch.setattr(preprocess_module, "BLOCK_ELEMENTS", 7 * 50)  # blocks of 7 rows
    out_path = tmp_path / "out" / "processed.h5ad"
    preprocess_file(str(raw_path), entry, str(out_path))
    _assert_same(expected, ad.read_h5ad(out_path))
    assert expected.n_obs < 203 or case == "gene_list"
    assert expected.n_vars == {"qc": 45, "gene_list": 4, "drop_small": 50}[case]
    assert [p.name for p in out_path.parent.iterdir()] == ["processed.h5ad"]  # no temporary left


def test_preprocess_file_errors_leave_no_output(tmp_path):
    adata = make_adata()
    raw_path = tmp_path / "raw.h5ad"
    adata.write_h5ad(raw_path)
    out_path = tmp_path / "processed.h5ad"
    assert_input_error(lambda: preprocess_file(str(raw_path), make_entry(qc={"min_counts_per_cell": 10**9}),
                                               str(out_path)),
                       "qc", "empty after QC", path=str(raw_path))
    assert_input_error(lambda: preprocess_file(str(raw_path), make_entry(layer="counts"),
                                               str(out_path)),
                       "layer", "layers/counts", path=str(raw_path))
    adata.X.data[3] = 0.5
    adata.write_h5ad(raw_path)
    assert_input_error(lambda: preprocess_file(str(raw_path), make_entry(), str(out_path)),
                       "X", "not integers", path=str(raw_path))
    assert list(tmp_path.iterdir()) == [raw_path]


def test_preprocess_file_reads_the_counts_in_blocks(tmp_path, monkeypatch):
    """No read of the backed counts asks for more rows than one block."""
    adata = make_adata(n_cells=400)
    raw_path = tmp_path / "raw.h5ad"
    adata.write_h5ad(raw_path)
    monkeypatch.setattr(preprocess_module, "BLOCK_ELEMENTS", 40 * 50)
    seen = []
    real = preprocess_module._csr_block_int32

    def spy(block):
        seen.append(block.shape[0])
        return real(block)

    monkeypatch.setattr(preprocess_module, "_csr_block_int32", spy)
    preprocess_file(str(raw_path), make_entry(), str(tmp_path / "out.h5ad"))
    assert seen and max(seen) <= 40 * 50 / (adata.X.nnz / 400) + 1
    assert sum(seen) == 2 * 400  # two passes: cell statistics, writing (no gene filter)


# ---------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------


def _real(path: Path) -> str:
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return str(path)


def test_papalexi_real():
    path = _real(PAPALEXI)
    entry = DatasetEntry.parse("papalexi", make_raw(
        columns={"perturbation": "perturbation", "control": "control", "context": None,
                 "context_label": "THP-1", "batch": "replicate"},
        qc={"min_counts_per_cell": 100, "min_genes_per_cell": 20, "max_pct_mito": 20}))
    raw = read_raw(path, entry)
    out = preprocess(raw, entry, path)
    assert 15_000 < out.n_obs <= 20_729 and out.n_vars == 299
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.int32
    assert set(out.obs[CONTEXT_COL]) == {"THP-1"}
    assert set(out.obs[BATCH_COL]) == {"rep_1", "rep_2", "rep_3"}
    assert (out.obs[PERT_COL] == CONTROL).sum() > 1_500
    assert out.obs[PERT_COL].nunique() == 26  # 25 targets + control


def test_kang_real():
    path = _real(KANG)
    entry = DatasetEntry.parse("kang", make_raw(
        columns={"perturbation": "condition", "control": "ctrl", "context": "cell_type",
                 "batch": "donor"},
        perturbation_type="stimulation"))
    raw = read_raw(path, entry)
    out = preprocess(raw, entry, path)
    assert out.n_obs == 1_556 and out.n_vars == 1_267
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.int32
    assert set(out.obs[PERT_COL]) == {CONTROL, "stim"}
    assert out.obs[CONTEXT_COL].nunique() == 5 and set(out.obs[BATCH_COL]) == {"101", "107"}
    assert out.uns["lingshu"]["control_label"] == "ctrl"
    # The file's own `perturbation` column (IFN-beta/control) is not the configured one: kept aside.
    assert "perturbation_original" in out.obs


def test_kang_real_collision():
    """Configuring control `ctrl` on the column that already says `control` is a collision."""
    path = _real(KANG)
    entry = DatasetEntry.parse("kang", make_raw(
        columns={"perturbation": "perturbation", "control": "ctrl", "context": "cell_type",
                 "batch": "donor"}))
    assert_input_error(lambda: read_raw(path, entry), "columns.control", "IFN-beta", path=path)


def test_norman_real_lognorm_layer_is_rejected():
    """Norman's `lognorm_original` layer is log-normalised: named as the counts it must fail clearly."""
    path = _real(NORMAN)
    entry = DatasetEntry.parse("norman", make_raw(
        columns={"perturbation": "perturbation", "control": "control", "context": "cell_type",
                 "batch": None},
        layer="lognorm_original"))
    raw = read_raw(path, entry)
    msg = assert_input_error(lambda: preprocess(raw, entry, path), "layers['lognorm_original']",
                             "not integers", "log", path=path)
    assert "`layer`" in msg
    # Its X holds the recovered integer counts and preprocesses fine.
    entry = replace(entry, layer=None)
    out = preprocess(read_raw(path, entry), entry, path)
    assert out.n_obs == 5_961 and out.obs[CONTEXT_COL].nunique() == 4


def test_papalexi_real_streaming_matches(tmp_path):
    path = _real(PAPALEXI)
    entry = DatasetEntry.parse("papalexi", make_raw(
        columns={"perturbation": "perturbation", "control": "control", "context": None,
                 "context_label": "THP-1", "batch": "replicate"},
        qc={"min_counts_per_cell": 100, "min_genes_per_cell": 20, "min_cells_per_gene": 50}))
    preprocess_file(path, entry, str(tmp_path / "p.h5ad"))
    _assert_same(preprocess(read_raw(path, entry), entry, path), ad.read_h5ad(tmp_path / "p.h5ad"))


# ---------------------------------------------------------------------------------------------
# What the user sees: the dataset entry and the configured file, hints, empty cells
# ---------------------------------------------------------------------------------------------


def _linked_source(tmp_path: Path, adata: ad.AnnData) -> tuple[Path, Path]:
    """The user's file, and the pipeline's link to it (results/<dataset>/raw/source.h5ad)."""
    user = tmp_path / "data" / "screen.h5ad"
    user.parent.mkdir()
    adata.write_h5ad(user)
    link = tmp_path / "results" / "syn" / "raw" / "source.h5ad"
    link.parent.mkdir(parents=True)
    link.symlink_to(user)
    return user, link


def test_data_errors_name_the_dataset_entry_and_the_configured_file(tmp_path, capsys,
                                                                    monkeypatch):
    """The job reads the pipeline's link; its error names the entry and the user's path (as
    configured), never the link, and is the last line the command prints."""
    from lingshu.cli import main

    user, link = _linked_source(tmp_path, make_adata())
    raw = make_raw(columns={"control": "non-targeting"}, source={"path": str(user)})
    entry = DatasetEntry.parse("syn", raw)
    out = str(tmp_path / "p.h5ad")
    for run in (lambda: preprocess_file(str(link), entry, out),
                lambda: preprocess(read_raw(str(link), make_entry(source={"path": str(user)})),
                                   entry, str(link)),
                lambda: read_raw(str(link), make_entry(source={"path": str(user)},
                                                       columns={"context": "cell_typ"}))):
        msg = assert_input_error(run, "columns.", "config: datasets.syn",
                                 f"source.path {str(user)!r}", path=str(user))
        assert "source.h5ad" not in msg and "results" not in msg, msg
    # a relative path is named as the user wrote it
    monkeypatch.chdir(tmp_path.parent)
    configured = str(user.relative_to(tmp_path.parent))
    rel = DatasetEntry.parse("syn", {**raw, "source": {"path": configured}})
    msg = assert_input_error(lambda: preprocess_file(str(link), rel, out), "columns.control",
                             f"source.path {configured!r}", path=configured)
    assert "source.h5ad" not in msg
    # a download is named by its URL (and where it was saved: the only local copy)
    url = DatasetEntry.parse("syn", {**raw, "source": {"url": "https://example.org/s.h5ad",
                                                       "sha256": "a" * 64}})
    assert_input_error(lambda: preprocess_file(str(user), url, out), "columns.control",
                       "source.url 'https://example.org/s.h5ad'", f"downloaded to {user}",
                       path="config: datasets.syn")
    # the command line: exit status 2, the message as the last line of stderr, no output
    rc = main(["preprocess", "--raw", str(link), "--entry", entry.to_json(), "--out", out])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"ERROR: config: datasets.syn (source.path {str(user)!r})")
    assert "Fix:" in last and "source.h5ad" not in last
    assert not Path(out).exists()


@pytest.mark.parametrize("configured, labels, meant", [
    ("nt", ["NT", "P1"], "NT"),  # differs only in case
    ("Control", ["control", "P1"], "control"),
    ("non-targetting", ["non-targeting", "P1"], "non-targeting"),  # a near miss
    ("NonTargeting", ["non_targeting", "P1"], "non_targeting"),
])
def test_a_near_miss_control_label_gets_a_did_you_mean_hint(configured, labels, meant):
    adata = make_adata()
    adata.obs["guide_target"] = pd.Categorical(
        np.array(labels * (adata.n_obs // len(labels)))[:adata.n_obs])
    entry = make_entry(columns={"control": configured})
    msg = assert_input_error(lambda: preprocess(adata, entry, PATH), "columns.control",
                             f"did you mean {meant!r}", f"`columns.control: {meant}`")
    assert msg.index("did you mean") < msg.index("Fix:")


def test_no_hint_when_no_label_is_close():
    entry = make_entry(columns={"control": "scrambled"})
    msg = assert_input_error(lambda: preprocess(make_adata(), entry, PATH), "columns.control",
                             "no cell")
    assert "did you mean" not in msg


def _with_empty_cells(adata: ad.AnnData, rows: list[int], keep_genes: list[int] = ()) -> ad.AnnData:
    """``adata`` with the counts of ``rows`` set to 0 (except in ``keep_genes``)."""
    dense = adata.X.toarray()
    for r in rows:
        kept = dense[r, list(keep_genes)].copy()
        dense[r] = 0
        dense[r, list(keep_genes)] = np.maximum(kept, 1)
    adata.X = sp.csr_matrix(dense)
    return adata


@pytest.mark.parametrize("streaming", [False, True])
def test_cells_without_counts_are_dropped_and_counted(tmp_path, caplog, streaming):
    """Whatever the qc thresholds (all 0 here, the defaults): a cell with no counts has no
    log1p(CP10k) profile, so preprocessing drops it, logs how many and records the number."""
    adata = _with_empty_cells(make_adata(n_cells=400), [0, 9, 17])
    entry = make_entry(qc={"min_counts_per_cell": 0, "min_genes_per_cell": 0})
    with caplog.at_level("WARNING", logger="lingshu.data.preprocess"):
        if streaming:
            adata.write_h5ad(tmp_path / "raw.h5ad")
            preprocess_file(str(tmp_path / "raw.h5ad"), entry, str(tmp_path / "out.h5ad"))
            out = ad.read_h5ad(tmp_path / "out.h5ad")
        else:
            out = preprocess(adata, entry, PATH)
    assert out.n_obs == 397 and not {"cell0", "cell9", "cell17"} & set(out.obs_names)
    assert (np.asarray(out.X.sum(axis=1)).ravel() > 0).all()
    assert out.uns["lingshu"]["n_cells_no_counts"] == 3
    assert out.uns["lingshu"]["n_cells_raw"] == 400 and out.uns["lingshu"]["n_cells"] == 397
    assert "dropping 3 cells with no counts" in caplog.text
    # and the number reaches the truth, which the report reads
    from lingshu.data.split import make_split
    from lingshu.data.truth import build_truth

    split = make_split(out.obs, {"kind": "heldout_perturbations", "test_perturbations": ["P1"]},
                       seed=0)
    assert build_truth(out, split).uns["lingshu"]["n_cells_no_counts"] == 3


def test_no_empty_cells_changes_nothing():
    adata = make_adata()
    out = preprocess(adata, make_entry(), PATH)
    assert out.n_obs == adata.n_obs and out.uns["lingshu"]["n_cells_no_counts"] == 0


@pytest.mark.parametrize("case", ["gene_list", "gene_filter"])
def test_cells_without_counts_in_the_kept_genes_are_dropped(tmp_path, case):
    """A cell whose only counts are in genes the gene list leaves out, or the gene filter
    removes, has no counts in the processed data: dropped and counted too."""
    adata = make_adata(n_cells=400)
    dense = adata.X.toarray()
    dense[np.arange(400) % 40 != 0, 47] = 0  # gene 47 detected in 10 cells only
    adata.X = sp.csr_matrix(dense)
    adata = _with_empty_cells(adata, [3, 5], keep_genes=[47])
    (tmp_path / "genes.txt").write_text("\n".join(f"G{i}" for i in range(40)))
    entry = (make_entry(genes=str(tmp_path / "genes.txt")) if case == "gene_list"
             else make_entry(qc={"min_cells_per_gene": 20}))
    adata.write_h5ad(tmp_path / "raw.h5ad")
    expected = preprocess(adata, entry, PATH)
    preprocess_file(str(tmp_path / "raw.h5ad"), entry, str(tmp_path / "out.h5ad"))
    for out in (expected, ad.read_h5ad(tmp_path / "out.h5ad")):
        assert "G47" not in set(out.var_names)
        assert not {"cell3", "cell5"} & set(out.obs_names) and out.n_obs == 398
        assert (np.asarray(out.X.sum(axis=1)).ravel() > 0).all()
        assert out.uns["lingshu"]["n_cells_no_counts"] == 2
