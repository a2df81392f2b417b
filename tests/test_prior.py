"""Tests of lingshu.data.prior: prior gene sets for prior injection (SPEC 1.4)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.data.prior import (
    PRIOR_COLUMNS,
    prior_genes,
    prior_table_for,
    read_prior,
    targets_of_labels,
    write_prior,
)
from lingshu.errors import InputError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
NORMAN_MCFALINE = SHARED / "perturbench_devel_norman2019_mcfaline2023.h5ad"
PATH = "external/synthetic.h5ad"  # only used in messages


def make_external(n_per: int = 80, seed: int = 0, dense: bool = False) -> ad.AnnData:
    """Two cell lines (A, B), controls "NT" and targets T1, T2, T3 over 50 genes.

    In line A only, T1 knocks g1..g3 down to 2% (control mean 8 counts). T1 also raises g4
    six-fold, silences g5 (control mean 1.5: too low to count) and lowers g6 to 30%
    (control mean 10: the perturbed mean 3 stays too high). Genes T1..T3 are not affected.
    """
    rng = np.random.default_rng(seed)
    genes = ["T1", "T2", "T3", "g1", "g2", "g3", "g4", "g5", "g6"]
    genes += [f"f{i}" for i in range(50 - len(genes))]
    base = rng.gamma(5.0, 1.0, size=len(genes))
    base[[3, 4, 5]] = 8.0
    base[6], base[7], base[8] = 5.0, 1.5, 10.0
    blocks, obs = [], []
    for line in ("A", "B"):
        for pert in ("NT", "T1", "T2", "T3"):
            mu = base.copy()
            if pert == "T1" and line == "A":
                mu[[3, 4, 5]] *= 0.02
                mu[6] *= 6.0
                mu[7] *= 0.01
                mu[8] *= 0.3
            size = rng.lognormal(0.0, 0.2, size=(n_per, 1))
            blocks.append(rng.poisson(mu * size))
            obs += [(pert, line)] * n_per
    x = np.vstack(blocks).astype(np.float32)
    obs = pd.DataFrame(obs, columns=["guide", "line"], index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(X=x if dense else sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def external() -> ad.AnnData:
    return make_external()


@pytest.fixture(scope="module")
def prior(external) -> pd.DataFrame:
    return prior_genes(external, "guide", "NT", context_col="line", path=PATH)


def _genes(prior: pd.DataFrame, pert: str, reason: str | None = None) -> set[str]:
    rows = prior[prior["perturbation"] == pert]
    if reason:
        rows = rows[rows["reason"] == reason]
    return set(rows["gene"])


# ---------------------------------------------------------------------------------------------
# prior_genes on synthetic data
# ---------------------------------------------------------------------------------------------


def test_knocked_down_genes_are_found_in_their_cell_line(prior):
    assert list(prior.columns) == PRIOR_COLUMNS
    assert _genes(prior, "T1", "de") == {"g1", "g2", "g3"}
    de = prior[(prior["perturbation"] == "T1") & (prior["reason"] == "de")]
    assert (de["context"] == "A").all() and (de["n_contexts"] == 1).all()
    assert (de["padj"] < 0.05).all() and (de["log2fc"] < -1).all()
    assert (de["control_mean"] > 2).all() and (de["perturbed_mean"] < 1).all()


def test_target_gene_is_included(prior):
    for target in ("T1", "T2", "T3"):
        assert _genes(prior, target, "target") == {target}
    # no effect of T2, T3: their target is all they get
    assert _genes(prior, "T2") == {"T2"} and _genes(prior, "T3") == {"T3"}
    assert "NT" not in set(prior["perturbation"])


def test_up_regulated_low_expressed_and_mild_genes_are_excluded(prior):
    t1 = _genes(prior, "T1")
    assert "g4" not in t1  # up six-fold
    assert "g5" not in t1  # silenced, but control mean 1.5 <= 2
    assert "g6" not in t1  # down, but perturbed mean 3 >= 1
    assert _genes(prior_genes(make_external(), "guide", "NT", context_col="line",
                              min_control_mean=1.0), "T1", "de") >= {"g5"}
    # without the mean thresholds g6 counts, g4 still does not: only down-regulation is kept
    loose = prior_genes(make_external(), "guide", "NT", context_col="line", min_control_mean=0,
                        max_perturbed_mean=np.inf)
    assert _genes(loose, "T1", "de") == {"g1", "g2", "g3", "g5", "g6"}


def test_contexts_are_tested_separately(external):
    pooled = prior_genes(external, "guide", "NT")  # line B dilutes the knockdown of line A
    assert _genes(pooled, "T1", "de") == set()
    assert set(pooled["context"]) == {"(all cells)"}


def test_panel_drops_other_genes(external):
    panel = [g for g in external.var_names if g not in ("g2", "T3")]
    restricted = prior_genes(external, "guide", "NT", context_col="line", genes=panel)
    assert _genes(restricted, "T1") == {"T1", "g1", "g3"}
    assert _genes(restricted, "T3") == set()


def test_target_in_panel_but_not_measured_is_kept_without_statistics(external, tmp_path):
    measured = external[:, [g for g in external.var_names if g != "T2"]].copy()
    result = prior_genes(measured, "guide", "NT", context_col="line",
                         genes=list(external.var_names))
    row = result[(result["perturbation"] == "T2")]
    assert row["gene"].tolist() == ["T2"] and row["reason"].tolist() == ["target"]
    assert row["context"].tolist() == [""] and row["log2fc"].isna().all()
    path = tmp_path / "prior.tsv"
    write_prior(result, path)
    pd.testing.assert_frame_equal(read_prior(path), result)


def test_dense_input_gives_the_same_table(prior):
    dense = prior_genes(make_external(dense=True), "guide", "NT", context_col="line")
    pd.testing.assert_frame_equal(dense, prior)


# ---------------------------------------------------------------------------------------------
# prior_table_for, read/write
# ---------------------------------------------------------------------------------------------


def test_combinations_get_the_union_and_unknown_labels_nothing(prior):
    labels = ["T1", "T2", "T1+T2", "X9", "X9+T3", "control"]
    table = prior_table_for(targets_of_labels(labels), prior)
    assert table["T1"] == ["T1", "g1", "g2", "g3"]
    assert table["T2"] == ["T2"]
    assert table["T1+T2"] == ["T1", "T2", "g1", "g2", "g3"]
    assert table["X9"] == [] and table["control"] == []
    assert table["X9+T3"] == ["T3"]


def test_combination_label_measured_as_such_adds_its_own_genes():
    prior = pd.DataFrame({"perturbation": ["A", "A+B", "B"], "gene": ["y", "z", "x"]})
    table = prior_table_for({"A+B": ["A", "B"], "B+A": ["B", "A"]}, prior)
    assert table == {"A+B": ["x", "y", "z"], "B+A": ["x", "y"]}


def test_targets_of_labels_splits_combinations():
    assert targets_of_labels(["A+B", "C", "D_E"], combo_separator="+") == {
        "A+B": ["A", "B"], "C": ["C"], "D_E": ["D_E"]}


def test_write_read_round_trip(prior, tmp_path):
    path = tmp_path / "sub" / "prior.tsv"
    write_prior(prior, path)
    back = read_prior(path)
    pd.testing.assert_frame_equal(back, prior)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file


def test_read_prior_names_missing_columns(tmp_path):
    path = tmp_path / "bad.tsv"
    pd.DataFrame({"perturbation": ["A"], "gene": ["x"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError, match=r"bad\.tsv: columns: .*'padj'"):
        read_prior(path)
    with pytest.raises(InputError, match="columns"):
        write_prior(pd.DataFrame({"gene": ["x"]}), tmp_path / "out.tsv")
    assert not (tmp_path / "out.tsv").exists()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_columns_are_named(external):
    with pytest.raises(InputError, match=r"synthetic\.h5ad: obs\['target'\]: .*guide.*Fix"):
        prior_genes(external, "target", "NT", path=PATH)
    with pytest.raises(InputError, match=r"obs\['cell_line'\].*context_col"):
        prior_genes(external, "guide", "NT", context_col="cell_line", path=PATH)


def test_control_label_absent(external):
    with pytest.raises(InputError, match="control label 'control'.*Fix: pass `control_label=`"):
        prior_genes(external, "guide", "control", path=PATH)
    with pytest.raises(InputError, match="control label 'nt'; did you mean 'NT'"):
        prior_genes(external, "guide", "nt", path=PATH)


def test_context_without_controls(external):
    no_b_controls = external[~((external.obs["guide"] == "NT") & (external.obs["line"] == "B"))]
    with pytest.raises(InputError, match="context 'B'.*no control cells"):
        prior_genes(no_b_controls.copy(), "guide", "NT", context_col="line", path=PATH)


def test_unlabelled_cells(external):
    bad = external.copy()
    bad.obs["guide"] = bad.obs["guide"].astype(object)
    bad.obs.iloc[0, 0] = np.nan
    with pytest.raises(InputError, match="1 cells have no label"):
        prior_genes(bad, "guide", "NT", path=PATH)


def test_normalised_input_is_refused(external):
    lognorm = external.copy()
    lognorm.X = np.log1p(lognorm.X)
    with pytest.raises(InputError, match=r": X: .*not raw counts"):
        prior_genes(lognorm, "guide", "NT", path=PATH)


def test_panel_without_overlap_and_bad_thresholds(external):
    with pytest.raises(InputError, match="none of the 2 panel genes"):
        prior_genes(external, "guide", "NT", genes=["ENSG1", "ENSG2"], path=PATH)
    with pytest.raises(InputError, match="fdr"):
        prior_genes(external, "guide", "NT", fdr=0.0, path=PATH)


# ---------------------------------------------------------------------------------------------
# Real data: the McFaline-Figueroa 2023 CRISPRi glioblastoma lines
# ---------------------------------------------------------------------------------------------


def test_mcfaline_crispri_lines():
    if not NORMAN_MCFALINE.exists():
        pytest.skip(f"{NORMAN_MCFALINE} is absent")
    full = ad.read_h5ad(NORMAN_MCFALINE)
    crispri = full[full.obs["perturbation_type"] == "CRISPRi"].copy()
    assert set(crispri.obs["cell_type"]) == {"A172", "T98G", "U87MG"}
    targets = set(crispri.obs["perturbation"].astype(str)) - {"control"}
    assert not targets & set(crispri.var_names)  # no target among the 500 genes: no target rows

    result = prior_genes(crispri, "perturbation", "control", context_col="cell_type")
    assert list(result.columns) == PRIOR_COLUMNS
    assert set(result["perturbation"]) <= targets and (result["reason"] == "de").all()
    assert (result["padj"] < 0.05).all() and (result["log2fc"] < -1).all()
    assert (result["control_mean"] > 2).all() and (result["perturbed_mean"] < 1).all()

    # plant a knockdown of the most expressed gene in A172's SGK1 cells (binomial thinning to 3%)
    x = crispri.X.toarray()
    line, pert = crispri.obs["cell_type"].to_numpy(), crispri.obs["perturbation"].to_numpy()
    gene = int(np.argmax(x[(line == "A172") & (pert == "control")].mean(0)))
    hit = (line == "A172") & (pert == "SGK1")
    x[hit, gene] = np.random.default_rng(0).binomial(x[hit, gene].astype(int), 0.03)
    crispri.X = sp.csr_matrix(x)
    planted = prior_genes(crispri, "perturbation", "control", context_col="cell_type")
    name = crispri.var_names[gene]
    row = planted[(planted["perturbation"] == "SGK1") & (planted["gene"] == name)]
    assert row["context"].tolist() == ["A172"] and row["n_contexts"].tolist() == [1]
    assert name in prior_table_for({"SGK1+MAPK1": ["SGK1", "MAPK1"]}, planted)["SGK1+MAPK1"]
    assert name not in set(result["gene"])  # found because of the planted knockdown only


# ---------------------------------------------------------------------------------------------
# The pipeline's prior stage and its way to the model
# ---------------------------------------------------------------------------------------------


def test_prior_command_and_predict_pass_the_genes_to_the_model(tmp_path):
    """`lingshu prior` on external lines -> genes.tsv; predict_conditions hands each held-out
    perturbation its prior genes."""
    from conftest import make_entry, make_processed

    from lingshu.cli import main
    from lingshu.data.prior import prior_of_labels, read_prior
    from lingshu.data.split import make_split
    from lingshu.models.baselines.model import ControlMean
    from lingshu.models.harness import predict_conditions, training_data

    external = make_processed(n_genes=30, contexts=("lineX", "lineY"), n_per=60, n_ctrl=80, seed=5)
    external.obs = external.obs.rename(columns={"perturbation": "gene", "context": "line"})
    external.obs["gene"] = external.obs["gene"].replace({"control": "non-targeting"})
    external.var["gene_name"] = external.var_names  # symbols in a column, IDs as the index
    external.var_names = [f"ENSG{i:05d}" for i in range(external.n_vars)]
    external.write_h5ad(tmp_path / "external.h5ad")
    adata = make_processed(n_genes=30)
    adata.write_h5ad(tmp_path / "processed.h5ad")
    spec = {"source": {"path": "unused"}, "layer": None, "fdr": 0.05, "min_abs_log2fc": 1.0,
            "min_control_mean": 2.0, "max_perturbed_mean": 1.0, "gene_column": "gene_name",
            "columns": {"perturbation": "gene", "control": "non-targeting", "context": "line"}}
    entry = make_entry("genetic", prior=spec)

    def args(prior_spec):  # the prior block travels in the dataset entry
        return ["prior", "--external", str(tmp_path / "external.h5ad"), "--processed",
                str(tmp_path / "processed.h5ad"), "--entry",
                make_entry("genetic", prior=prior_spec).to_json(), "--out",
                str(tmp_path / "genes.tsv")]

    assert main(args(spec)) == 0
    table = read_prior(tmp_path / "genes.tsv")
    # each Gk knocks Gk down to 10 %: the target (and only knocked-down genes) are priors
    prior = prior_of_labels(table, ["G1", "G2", "G3", "G1+G3", "G9"], entry)
    assert "G1" in prior["G1"] and "G2" in prior["G2"] and prior["G9"] == []
    assert set(prior["G1+G3"]) == set(prior["G1"]) | set(prior["G3"])
    assert (table.loc[table["reason"] == "de", "log2fc"] < -1).all()

    for bad in (dict(spec, columns={"perturbation": "guide", "control": "non-targeting"}),
                dict(spec, gene_column="symbol"), dict(spec, gene_column=None)):
        assert main(args(bad)) == 2

    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    model = ControlMean()
    model.fit(training_data(adata, split, None, seed=0, entry=entry))
    seen = []
    real = model.predict

    def spy(condition, rng):
        seen.append(condition.prior_genes)
        return real(condition, rng)

    model.predict = spy
    predict_conditions(model, adata, split, seed=0, progress=False, prior=prior)
    assert seen and all(genes == tuple(prior["G2"]) for genes in seen)
