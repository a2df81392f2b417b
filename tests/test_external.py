"""Predictions made outside the pipeline (a `kind: external` model entry): the config entry,
the checks of the user's file against the truth and the split, its conversion to the
prediction format, and the report's note about it."""

import copy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import make_processed

from lingshu.cli import main
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import make_split, write_split
from lingshu.data.truth import build_truth
from lingshu.errors import InputError
from lingshu.io import sha256_file, write_h5ad
from lingshu.models.external import convert_prediction, external_prediction_job
from lingshu.plan import validate_config
from lingshu.report.html import run_note

ROOT = Path(__file__).resolve().parent.parent
SPLIT = {"kind": "heldout_perturbations", "test_perturbations": ["G1", "G2"],
         "reference_fraction": 0.1}


# -- the config entry ---------------------------------------------------------------------------


def _config(**entry):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"]["mine"] = {"kind": "external", "path": "preds/{dataset}.h5ad",
                             "values": "log1p_cp10k", **entry}
    return cfg


def test_an_external_entry_validates_beside_the_registered_models():
    cfg = validate_config(_config(note="our model, trained on a GPU cluster"), "my.yaml")
    assert cfg["models"]["mine"] == {"kind": "external", "path": "preds/{dataset}.h5ad",
                                     "values": "log1p_cp10k",
                                     "note": "our model, trained on a GPU cluster"}
    one = _config(path="preds/genetic.h5ad", values="counts")
    one["datasets"]["sim_genetic"]["models"] = ["linear", "mine"]
    one["datasets"]["sim_stimulation"]["models"] = ["linear"]
    validate_config(one, "my.yaml")  # one dataset reads it: no {dataset} needed


def _bad(cfg_or_mutate):
    cfg = cfg_or_mutate
    with pytest.raises(InputError) as info:
        validate_config(cfg, "my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ") and "Fix:" in msg
    return msg


@pytest.mark.parametrize("entry, field, words", [
    ({"path": None}, "models.mine.path", "missing"),
    ({"values": None}, "models.mine.values", "missing"),
    ({"values": "log1p"}, "models.mine.values", "'log1p' is not one of"),
    ({"path": "preds/all.h5ad"}, "models.mine.path", "has no {dataset}, but 2 datasets"),
    ({"path": "preds/{name}.h5ad"}, "models.mine.path", "placeholder {name}"),
    ({"kind": "remote"}, "models.mine.kind", "'remote' is not a kind"),
    ({"threads": 2}, "models.mine", "['threads'] are not keys of an external entry"),
    ({"note": 3}, "models.mine.note", "one line of text"),
])
def test_a_bad_external_entry_names_the_field_and_the_fix(entry, field, words):
    cfg = _config()
    for key, value in entry.items():
        if value is None:
            cfg["models"]["mine"].pop(key)
        else:
            cfg["models"]["mine"][key] = value
    msg = _bad(cfg)
    assert f"my.yaml: {field}:" in msg and words in msg, msg


def test_an_external_entry_may_not_take_a_registered_model_s_name():
    cfg = _config()
    cfg["models"]["linear"] = cfg["models"].pop("mine")
    msg = _bad(cfg)
    assert "models.linear: an external entry may not take the name of the registered model" in msg
    assert "linear_external" in msg


def test_an_unknown_name_without_kind_points_at_external_entries():
    cfg = _config()
    cfg["models"]["magic"] = {}
    msg = _bad(cfg)
    assert "'magic' is not one of" in msg and "kind: external" in msg


def test_an_external_entry_takes_no_dataset_parameters():
    cfg = _config()
    cfg["datasets"]["sim_genetic"]["model_params"] = {"mine": {"path": "x.h5ad"}}
    msg = _bad(cfg)
    assert "datasets.sim_genetic.model_params.mine: an external entry has no parameters" in msg


def test_the_snakefile_s_own_schema_check_accepts_and_rejects_external_entries():
    from snakemake.utils import validate

    cfg = _config()
    validate(copy.deepcopy(cfg), str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    cfg["models"]["mine"]["values"] = "tpm"
    with pytest.raises(Exception, match="tpm"):
        validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))


# -- the checks of the prediction file ----------------------------------------------------------


@pytest.fixture(scope="module")
def dataset():
    """A processed dataset, its split (G1, G2 held out in contexts A and B) and its truth."""
    adata = make_processed()
    split = make_split(adata.obs, SPLIT, seed=0)
    return adata, split, build_truth(adata, split)


def _prediction(dataset, values="counts") -> ad.AnnData:
    """A perfect prediction: the held-out cells themselves (raw counts or log1p(CP10k))."""
    adata, split, truth = dataset
    test = truth.obs_names[~truth.obs["is_real_control"].to_numpy()]
    cells = adata[test]
    x = cells.X.copy() if values == "counts" else log1p_cp10k(cells.X)
    obs = cells.obs[["perturbation", "context"]].copy()
    obs.index = [f"my_{i}" for i in range(len(obs))]
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=adata.var_names))


def _convert(dataset, pred, values="counts"):
    _, split, truth = dataset
    return convert_prediction(pred, truth, split, values, "preds/mine.h5ad")


def _error(dataset, pred, values="counts") -> str:
    with pytest.raises(InputError) as info:
        _convert(dataset, pred, values)
    msg = str(info.value)
    assert msg.startswith("preds/mine.h5ad: ") and "Fix:" in msg
    return msg


def test_counts_are_normalised_to_the_truth_s_log1p_cp10k(dataset):
    _, _, truth = dataset
    out = _convert(dataset, _prediction(dataset, "counts"), "counts")
    held = truth[~truth.obs["is_real_control"].to_numpy()]
    assert out.X.dtype == np.float32 and sp.isspmatrix_csr(out.X)
    np.testing.assert_allclose(out.X.toarray(), held.X.toarray(), rtol=1e-6)
    assert list(out.obs.columns) == ["perturbation", "context"]
    assert (out.obs["perturbation"].to_numpy() == held.obs["perturbation"].to_numpy()).all()
    assert list(out.var_names) == list(truth.var_names)


def test_log1p_values_pass_unchanged_extra_genes_dropped_and_genes_reordered(dataset):
    pred = _prediction(dataset, "log1p_cp10k")
    expected = pred.X.toarray().astype(np.float32)
    extra = ad.AnnData(X=sp.hstack([pred.X, sp.csr_matrix(np.ones((pred.n_obs, 1)))]).tocsr(),
                       obs=pred.obs, var=pd.DataFrame(index=[*pred.var_names, "EXTRA"]))
    shuffled = extra[:, extra.var_names[::-1]].copy()
    control = shuffled[:5].copy()  # control cells a prediction carries are dropped
    control.obs["perturbation"] = "control"
    control.obs_names = [f"ctrl_{i}" for i in range(5)]
    out = _convert(dataset, ad.concat([shuffled, control]), "log1p_cp10k")
    np.testing.assert_array_equal(out.X.toarray(), expected)


def test_missing_genes_are_an_error_naming_how_many_and_examples(dataset):
    pred = _prediction(dataset)
    msg = _error(dataset, pred[:, pred.var_names[3:]].copy())
    assert "var_names: 3 of the truth's 40 genes are missing: G0, G1, G2" in msg


def test_a_missing_condition_is_an_error_naming_it(dataset):
    pred = _prediction(dataset)
    keep = ~((pred.obs["context"] == "B") & (pred.obs["perturbation"] == "G2")).to_numpy()
    msg = _error(dataset, pred[keep].copy())
    assert "obs: 1 of the 4 held-out conditions have no predicted cells: context 'B' x " \
           "perturbation 'G2'" in msg


def test_a_wrong_number_of_cells_names_the_condition_found_and_expected(dataset):
    pred = _prediction(dataset)
    msg = _error(dataset, pred[1:].copy())
    assert "context 'A' x perturbation 'G1': found 29 predicted cells, expected 30" in msg


def test_a_condition_that_is_not_held_out_is_an_error(dataset):
    pred = _prediction(dataset)
    more = pred[:3].copy()
    more.obs["perturbation"] = "G3"
    more.obs_names = ["x0", "x1", "x2"]
    msg = _error(dataset, ad.concat([pred, more]))
    assert "1 condition(s) are not held out: context 'A' x perturbation 'G3'" in msg


def test_missing_obs_columns_are_an_error(dataset):
    pred = _prediction(dataset)
    del pred.obs["context"]
    assert "obs['context']: column missing" in _error(dataset, pred)


def test_log1p_values_declared_as_counts_are_an_error(dataset):
    msg = _error(dataset, _prediction(dataset, "log1p_cp10k"), "counts")
    assert "X: declared `values: counts`, but holds non-integer values (found max" in msg
    assert "they look like log1p(CP10k)" in msg and "values: log1p_cp10k" in msg


def test_counts_declared_as_log1p_are_an_error(dataset):
    pred = _prediction(dataset, "counts")
    pred.X = pred.X * 20
    msg = _error(dataset, pred, "log1p_cp10k")
    assert "declared `values: log1p_cp10k`, but holds integers only (found max" in msg
    assert "they look like raw counts" in msg and "`values: counts`" in msg
    small = _prediction(dataset, "counts")  # integers below 50: still not log1p(CP10k)
    small.X.data = np.minimum(small.X.data, 5)
    assert "they look like raw counts" in _error(dataset, small, "log1p_cp10k")


def test_values_beyond_log1p_cp10k_are_an_error(dataset):
    pred = _prediction(dataset, "log1p_cp10k")
    pred.X = pred.X * 1.6  # e.g. log1p(CPM)
    assert "above log1p(10,000) = 9.21" in _error(dataset, pred, "log1p_cp10k")


@pytest.mark.parametrize("bad, words", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                        (-1.0, "1 values are negative")])
def test_non_finite_or_negative_values_are_an_error(dataset, bad, words):
    pred = _prediction(dataset, "log1p_cp10k")
    pred.X.data[7] = bad
    assert words in _error(dataset, pred, "log1p_cp10k")


# -- the job ------------------------------------------------------------------------------------


def test_the_job_writes_the_prediction_format_and_never_touches_the_source(dataset, tmp_path):
    from lingshu.evaluate.perturbation import _run_record, validate_inputs

    _, split, truth = dataset
    write_split(split, tmp_path / "split")
    write_h5ad(truth, tmp_path / "truth.h5ad")
    source = tmp_path / "preds" / "tiny.h5ad"
    write_h5ad(_prediction(dataset, "counts"), source)
    before = sha256_file(source)
    out = tmp_path / "results" / "predictions" / "mine.h5ad"
    external_prediction_job(str(source), "counts", str(tmp_path / "truth.h5ad"),
                            str(tmp_path / "split"), "mine", "", str(out))
    assert sha256_file(source) == before
    assert [p.name for p in out.parent.iterdir()] == ["mine.h5ad"]  # no temporary file left
    pred = ad.read_h5ad(out)
    meta = pred.uns["lingshu"]
    assert meta["run"] == "mine" and meta["model"] == "mine" and bool(meta["external"])
    assert meta["space"] == "log1p_cp10k" and meta["source"] == str(source)
    assert meta["source_sha256"] == before and meta["values"] == "counts"
    validate_inputs(truth, pred, "truth", str(out))  # the evaluation takes it as it is
    assert _run_record(str(out)) == {"run": "mine", "sampling": {}, "external": {
        "source": str(source), "sha256": before, "note": ""}}

    # A bad file: the job fails with the file and the problem; no output is left behind.
    bad = _prediction(dataset, "log1p_cp10k")
    bad_path = tmp_path / "preds" / "bad.h5ad"
    write_h5ad(bad, bad_path)
    out.unlink()
    with pytest.raises(InputError, match=r"bad\.h5ad \(models\.mine\.path\): X: declared "):
        external_prediction_job(str(bad_path), "counts", str(tmp_path / "truth.h5ad"),
                                str(tmp_path / "split"), "mine", "", str(out))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_the_command_line_ends_with_the_error(dataset, tmp_path, capsys):
    _, split, truth = dataset
    write_split(split, tmp_path / "split")
    write_h5ad(truth, tmp_path / "truth.h5ad")
    pred = _prediction(dataset, "log1p_cp10k")
    pred.X.data[0] = np.nan
    write_h5ad(pred, tmp_path / "p.h5ad")
    code = main(["external", "--source", str(tmp_path / "p.h5ad"), "--values", "log1p_cp10k",
                 "--truth", str(tmp_path / "truth.h5ad"), "--split", str(tmp_path / "split"),
                 "--run", "mine", "--note=", "--out", str(tmp_path / "out.h5ad")])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: {tmp_path / 'p.h5ad'} (models.mine.path): X: 1 values are "
                           "NaN or infinite (the first in cell 'my_0', context 'A' x "
                           "perturbation 'G1')")


# -- the report ---------------------------------------------------------------------------------


def test_the_report_prints_the_entry_s_note_or_where_it_came_from():
    assert run_note("mine", {}, {"source": "preds/kang.h5ad", "note": ""}) == (
        "predictions made outside this pipeline, read from preds/kang.h5ad")
    assert run_note("mine", {}, {"source": "x", "note": "our GPU model"}) == "our GPU model"
    assert "does not know" in run_note("mine")  # no spec and no record: no crash
