"""The export of a frozen split (`snakemake export`): what a model run elsewhere may see, and
the round trip of its predictions back as a `kind: external` entry."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_processed

from lingshu.data.export import EXPORT_FILES, export_split
from lingshu.data.split import make_split, write_split
from lingshu.data.truth import build_truth
from lingshu.io import read_table, sha256_file, write_h5ad
from lingshu.models.external import convert_prediction


@pytest.fixture(params=["heldout_perturbations", "heldout_combinations"])
def exported(request, tmp_path):
    adata = make_processed()
    spec = ({"kind": "heldout_perturbations", "test_perturbations": ["G1", "G2"],
             "reference_fraction": 0.1} if request.param == "heldout_perturbations" else
            {"kind": "heldout_combinations",
             "test_combinations": [{"context": "B", "perturbation": "G3"}],
             "reference_fraction": 0.1})
    split = make_split(adata.obs, spec, seed=3)
    write_split(split, tmp_path / "split")
    write_h5ad(adata, tmp_path / "processed.h5ad")
    features = tmp_path / "features.tsv"
    features.write_text("perturbation\tf0\ncontrol\t0.0\nG1\t0.5\n")
    backed = ad.read_h5ad(tmp_path / "processed.h5ad", backed="r")  # as the rule reads it
    manifest = export_split(backed, split, tmp_path / "split", features, "tiny", 3,
                            tmp_path / "export")
    return adata, split, tmp_path, manifest


def test_the_export_writes_every_file_with_its_hash_in_the_manifest(exported):
    adata, split, tmp_path, manifest = exported
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "tiny" and manifest["seed"] == 3
    for name in EXPORT_FILES:
        assert manifest["files"][name]["sha256"] == sha256_file(out / name), name
    for name in ("cells.tsv", "conditions.tsv"):
        assert manifest["split"][name] == sha256_file(tmp_path / "split" / name)
    assert (out / "features.tsv").read_bytes() == (tmp_path / "features.tsv").read_bytes()
    fmt = manifest["prediction_format"]
    assert fmt["genes"] == list(adata.var_names)
    assert set(fmt["obs_columns"]) == {"perturbation", "context"}
    assert set(fmt["values"]) == {"counts", "log1p_cp10k"}


def test_only_what_a_model_may_see_goes_out(exported):
    adata, split, tmp_path, _ = exported
    out = tmp_path / "export"
    train = ad.read_h5ad(out / "train_counts.h5ad")
    control = ad.read_h5ad(out / "control_input.h5ad")
    cells = split.cells
    held_out = set(cells.index[cells["in_test"]])
    reference = set(cells.index[cells["in_reference"]])
    assert held_out and reference
    # no generation reference cell among the training cells (a control input drawn into the
    # reference stays a control input, as every model in the pipeline gets it)
    assert not reference & set(train.obs_names)
    for part in (train, control):
        assert not held_out & set(part.obs_names)  # no held-out truth cell
        assert list(part.var_names) == list(adata.var_names)
        assert {"perturbation", "context", "batch"} <= set(part.obs.columns)
    assert set(train.obs_names) == set(cells.index[cells["in_train"]])
    test = split.test_conditions()
    assert set(control.obs_names) == set(cells.index[cells["in_control_input"]])
    assert (control.obs["perturbation"] == "control").all()
    assert set(control.obs["context"]) == set(test["context"])
    # raw counts, exactly the processed data's
    np.testing.assert_array_equal(train.X.toarray(), adata[train.obs_names].X.toarray())
    assert np.issubdtype(train.X.dtype, np.integer)
    conditions = read_table(out / "heldout_conditions.tsv")
    assert list(conditions.columns) == ["context", "perturbation", "n_cells"]
    pd.testing.assert_frame_equal(conditions.astype({"context": str, "perturbation": str}),
                                  test.astype({"context": str, "perturbation": str}))


def test_predictions_made_from_the_export_come_back_in(exported):
    """The round trip: a model elsewhere reads the export only (the control input cells, the
    held-out conditions, the manifest's genes) and its counts are accepted and scored."""
    adata, split, tmp_path, manifest = exported
    out = tmp_path / "export"
    control = ad.read_h5ad(out / "control_input.h5ad")
    conditions = read_table(out / "heldout_conditions.tsv").astype(str)
    rows, obs = [], []
    for row in conditions.itertuples(index=False):
        ctx = control[(control.obs["context"] == row.context).to_numpy()]
        n = int(row.n_cells)
        rows.append(ctx.X[np.arange(n) % ctx.n_obs])  # "predict" by copying controls
        obs += [(row.perturbation, row.context)] * n
    genes = manifest["prediction_format"]["genes"]
    pred = ad.AnnData(X=sp.vstack(rows).tocsr(),
                      obs=pd.DataFrame(obs, columns=["perturbation", "context"],
                                       index=[f"p{i}" for i in range(len(obs))]),
                      var=pd.DataFrame(index=genes))
    truth = build_truth(adata, split)
    converted = convert_prediction(pred, truth, split, "counts", "elsewhere.h5ad")
    assert converted.n_obs == int(conditions["n_cells"].astype(int).sum())
