"""Tests of lingshu.evaluate: cell-eval wiring, summaries, the paper's scores, bootstrap, input errors.

Tiny synthetic data (60 genes, 3 perturbations x 30 cells, 1-2 contexts): cell-eval runs on it in
a fraction of a second. ``make_truth`` / ``make_prediction`` are reused by test_report.py.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.errors import InputError
from lingshu.evaluate import (
    PAPER_METRICS,
    average_score,
    bootstrap_ci,
    evaluate_predictions,
    evaluate_to_dir,
    read_summary,
    sampler_mae_floor,
    summarize,
    vcc_score,
)

PERTS = ("P1", "P2", "P3")


def make_truth(
    contexts=("A",), perts=PERTS, n_genes=60, n_cells=30, n_ctrl=40, seed=0, sparse=False
) -> ad.AnnData:
    """Held-out cells + control cells, log1p(CP10k) of Poisson counts; each perturbation
    multiplies 8 random genes by 0.2 or 4 so that DE finds something."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 2.0, n_genes)
    blocks, labels = [], []
    for ctx in contexts:
        ctx_base = base * rng.lognormal(0.0, 0.2, n_genes)
        for pert in (CONTROL, *perts):
            effect = np.ones(n_genes)
            if pert != CONTROL:
                effect[rng.choice(n_genes, 8, replace=False)] = rng.choice([0.2, 4.0], 8)
            n = n_ctrl if pert == CONTROL else n_cells
            counts = rng.poisson(ctx_base * effect, size=(n, n_genes)).astype(np.float64)
            library = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
            blocks.append(np.log1p(counts / library * 1e4).astype(np.float32))
            labels += [(pert, ctx)] * n
    obs = pd.DataFrame(labels, columns=[PERT_COL, CONTEXT_COL])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    X = np.vstack(blocks)
    var = pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=var)


def make_prediction(truth: ad.AnnData, kind: str, with_controls: bool = False) -> ad.AnnData:
    """A prediction file as the predict stage writes it: the predicted cells of every test
    condition only (the evaluation adds the truth's real control cells itself).

    kind: ``perfect`` (the truth itself), ``control_mean`` (each context's control pseudobulk),
    ``perturbation_mean`` (each context's mean over all its perturbed cells).
    with_controls: append the truth's control cells, flagged ``is_real_control`` (the layout
    predictions had before; still accepted, the controls are not used).
    """
    pred = truth.copy()
    X = pred.X.toarray() if sp.issparse(pred.X) else pred.X.copy()
    obs = pred.obs
    is_ctrl = (obs[PERT_COL] == CONTROL).to_numpy()
    if kind != "perfect":
        for ctx in obs[CONTEXT_COL].unique():
            in_ctx = (obs[CONTEXT_COL] == ctx).to_numpy()
            source = in_ctx & is_ctrl if kind == "control_mean" else in_ctx & ~is_ctrl
            X[in_ctx & ~is_ctrl] = X[source].mean(axis=0)
    pred.X = X
    if with_controls:
        pred.obs["is_real_control"] = is_ctrl
        pred = pred[np.r_[np.flatnonzero(~is_ctrl), np.flatnonzero(is_ctrl)]].copy()
    else:
        pred = pred[~is_ctrl].copy()
    pred.uns["lingshu"] = {"model": kind, "run": kind, "sampling": "{}", "space": "log1p_cp10k"}
    return pred


@pytest.fixture(scope="module")
def truth() -> ad.AnnData:
    return make_truth()


@pytest.fixture(scope="module")
def results(truth, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Per-condition tables of the three reference predictions on one context."""
    out = tmp_path_factory.mktemp("eval")
    return {
        kind: evaluate_predictions(truth, make_prediction(truth, kind), str(out / kind), progress=False)
        for kind in ("perfect", "control_mean", "perturbation_mean")
    }


def test_perfect_prediction_scores_perfectly(results):
    table = results["perfect"]
    assert list(table.columns[:2]) == [CONTEXT_COL, PERT_COL]
    assert sorted(table[PERT_COL]) == list(PERTS)
    # What cell-eval 0.8.2 gives for a prediction equal to the truth:
    assert np.allclose(table["pearson_delta"], 1.0)
    assert np.allclose(table["mae"], 0.0)
    assert np.allclose(table["discrimination_score_l1"], 1.0)
    assert np.allclose(table["overlap_at_N"], 1.0)
    assert (table["de_nsig_counts_real"] == table["de_nsig_counts_pred"]).all()
    for column in PAPER_METRICS.values():
        assert column == "spearman_nsig" or column in table
    assert summarize(table)["spearman_nsig"] == pytest.approx(1.0)


def test_control_mean_prediction_has_no_signal(results):
    table = results["control_mean"]
    # The predicted change from control is float round-off, uncorrelated with the real one.
    assert abs(table["pearson_delta"].mean()) < 0.5
    assert table["mae"].min() > 0
    assert table["overlap_at_N"].mean() < results["perfect"]["overlap_at_N"].mean()


def test_writes_per_condition_and_cell_eval_csvs(results, tmp_path_factory, truth):
    out = tmp_path_factory.mktemp("eval_files")
    evaluate_predictions(truth, make_prediction(truth, "perfect"), str(out), progress=False)
    written = pd.read_csv(out / "per_condition.tsv", sep="\t")
    assert len(written) == len(PERTS)
    assert (out / "cell_eval" / "A" / "results.csv").exists()


def test_two_contexts_sparse_truth(tmp_path):
    truth = make_truth(contexts=("A", "B/C"), sparse=True)
    table = evaluate_predictions(truth, make_prediction(truth, "perfect"), str(tmp_path), progress=False)
    assert len(table) == 2 * len(PERTS)
    assert set(table[CONTEXT_COL]) == {"A", "B/C"}
    assert (tmp_path / "cell_eval" / "B_C").is_dir()
    assert np.allclose(table["pearson_delta"], 1.0)


def test_edited_controls_are_replaced_by_the_real_ones(truth, results, tmp_path):
    pred = make_prediction(truth, "perfect", with_controls=True)
    is_ctrl = (pred.obs[PERT_COL] == CONTROL).to_numpy()
    pred.X[is_ctrl] = pred.X[is_ctrl] + 1.0  # a model that shifts its controls
    table = evaluate_predictions(truth, pred, str(tmp_path), progress=False)
    assert np.allclose(table["pearson_delta"], 1.0)


def test_controls_come_from_the_truth_whatever_the_prediction_holds(truth, tmp_path):
    """A prediction file without control cells is scored exactly like the same prediction
    with the truth's control cells appended, and one whose controls were edited is still
    scored against the real controls."""
    plain = make_prediction(truth, "perturbation_mean")
    assert CONTROL not in set(plain.obs[PERT_COL]) and "is_real_control" not in plain.obs
    appended = make_prediction(truth, "perturbation_mean", with_controls=True)
    is_ctrl = (appended.obs[PERT_COL] == CONTROL).to_numpy()
    assert is_ctrl.sum() == (truth.obs[PERT_COL] == CONTROL).sum()
    edited = appended.copy()
    rng = np.random.default_rng(0)
    # a model that edits its controls gene by gene (not a constant shift, which some
    # metrics would not notice): silence half the genes, double the others
    scale = np.where(rng.random(edited.n_vars) < 0.5, 0.0, 2.0).astype(np.float32)
    edited.X[is_ctrl] = edited.X[is_ctrl] * scale
    truth.write_h5ad(tmp_path / "truth.h5ad")
    tables = {}
    for name, pred in (("plain", plain), ("appended", appended), ("edited", edited)):
        pred.write_h5ad(tmp_path / f"{name}.h5ad")
        evaluate_to_dir(str(tmp_path / "truth.h5ad"), str(tmp_path / f"{name}.h5ad"),
                        str(tmp_path / name))
        tables[name] = {f: pd.read_csv(tmp_path / name / f, sep="\t")
                        for f in ("per_condition.tsv", "distribution.tsv")}
    for name in ("appended", "edited"):
        for f in ("per_condition.tsv", "distribution.tsv"):
            pd.testing.assert_frame_equal(tables[name][f], tables["plain"][f], obj=f"{name} {f}")
    assert len(tables["plain"]["per_condition.tsv"]) == len(PERTS)
    # the edit does change the scores when those controls are taken as the real ones
    fake = truth.copy()
    fake_ctrl = (fake.obs[PERT_COL] == CONTROL).to_numpy()
    fake.X = np.asarray(fake.X, dtype=np.float32)
    fake.X[fake_ctrl] = fake.X[fake_ctrl] * scale
    evaluate_predictions(fake, plain, str(tmp_path / "fake"), progress=False)
    with_fake = pd.read_csv(tmp_path / "fake" / "per_condition.tsv", sep="\t")
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(with_fake, tables["plain"]["per_condition.tsv"])


def test_ceiling(truth, tmp_path):
    table = evaluate_predictions(truth, None, str(tmp_path), ceiling=True, progress=False)
    assert sorted(table[PERT_COL]) == list(PERTS)
    agg = pd.read_csv(tmp_path / "ceiling_agg.tsv", sep="\t")
    assert list(agg[CONTEXT_COL]) == ["A"]
    assert np.isnan(agg["mae"]).all()  # cell-eval gives error metrics no ceiling
    assert 0 < agg["pearson_delta"].iloc[0] <= 1


def test_evaluate_to_dir_writes_summary(truth, tmp_path):
    truth_path, pred_path = tmp_path / "truth.h5ad", tmp_path / "control_mean.h5ad"
    truth.write_h5ad(truth_path)
    make_prediction(truth, "control_mean").write_h5ad(pred_path)
    evaluate_to_dir(str(truth_path), str(pred_path), str(tmp_path / "out"), threads=1)
    summary = read_summary(str(tmp_path / "out"))
    assert summary["model"] == "control_mean" and summary["sampling"] == {}
    assert summary["n_conditions"] == len(PERTS)
    distribution = pd.read_csv(tmp_path / "out" / "distribution.tsv", sep="\t")
    assert sorted(distribution[PERT_COL]) == list(PERTS)
    assert {"pearson_mean", "mmd", "wasserstein"} <= set(distribution.columns)
    assert summary["seconds"] > 0
    assert "overlap_at_N" in summary["metrics"] and "spearman_nsig" in summary["metrics"]
    json.loads((tmp_path / "out" / "summary.json").read_text())  # valid JSON (no NaN tokens)

    evaluate_to_dir(str(truth_path), None, str(tmp_path / "ceiling"), ceiling=True)
    ceiling = read_summary(str(tmp_path / "ceiling"))
    # cell-eval gives MAE no ceiling; the perfect sampler's expected MAE stands in
    assert ceiling["ceiling"]
    assert ceiling["metrics"]["mae"] == pytest.approx(sampler_mae_floor(truth))
    assert 0 < ceiling["metrics"]["mae"] < summary["metrics"]["mae"] * 5


def test_sampler_mae_floor_has_the_known_value_and_matches_fresh_draws():
    """One condition of 4 cells whose gene takes 0, 0, 2, 2: var 4/3, so the floor is
    sqrt(2/pi) * sqrt(2 * (4/3) / 4). On normal data it is what a second draw of as many cells
    from the same distribution scores against the first (averaged over 300 genes x 40 draws),
    and what a mean-exact model scores is 1/sqrt(2) of it; controls are not counted."""
    obs = pd.DataFrame({PERT_COL: ["P"] * 4 + [CONTROL] * 3, CONTEXT_COL: "A",
                        "is_real_control": [False] * 4 + [True] * 3})
    x = np.array([[0.0], [0.0], [2.0], [2.0], [9.0], [0.0], [5.0]])
    one = ad.AnnData(X=x, obs=obs.set_axis([f"c{i}" for i in range(7)]))
    assert sampler_mae_floor(one) == pytest.approx(np.sqrt(2 / np.pi) * np.sqrt(2 * (4 / 3) / 4))

    rng = np.random.default_rng(0)
    n, genes = 30, 300
    sd = rng.uniform(0.2, 1.5, genes)
    cells = rng.normal(2.0, sd, (n, genes))
    truth = ad.AnnData(X=cells, obs=pd.DataFrame({PERT_COL: "P", CONTEXT_COL: "A"},
                                                 index=[f"c{i}" for i in range(n)]))
    floor = sampler_mae_floor(truth)
    fresh = np.mean([np.abs(rng.normal(2.0, sd, (n, genes)).mean(0) - cells.mean(0)).mean()
                     for _ in range(40)])
    assert floor == pytest.approx(fresh, rel=0.08)
    exact = np.abs(2.0 - cells.mean(0)).mean()  # a model that predicts the true mean
    assert exact == pytest.approx(floor / np.sqrt(2), rel=0.15)


def test_summary_names_the_run_and_its_sampling(truth, tmp_path):
    truth_path = tmp_path / "truth.h5ad"
    truth.write_h5ad(truth_path)
    variant = make_prediction(truth, "perfect")
    variant.uns["lingshu"] = {"model": "lingshu", "run": "lingshu@w3",
                              "sampling": json.dumps({"guidance": 3.0})}
    unnamed = make_prediction(truth, "perfect")
    del unnamed.uns["lingshu"]
    model_only = make_prediction(truth, "perfect")
    model_only.uns["lingshu"] = {"model": "linear"}
    expected = {"variant": ("lingshu@w3", {"guidance": 3.0}), "stem_name": ("stem_name", {}),
                "model_only": ("linear", {})}
    for name, pred in (("variant", variant), ("stem_name", unnamed), ("model_only", model_only)):
        pred.write_h5ad(tmp_path / f"{name}.h5ad")
        evaluate_to_dir(str(truth_path), str(tmp_path / f"{name}.h5ad"), str(tmp_path / name))
        summary = read_summary(str(tmp_path / name))
        assert (summary["model"], summary["sampling"]) == expected[name], name
    evaluate_to_dir(str(truth_path), None, str(tmp_path / "ceiling"), ceiling=True)
    assert read_summary(str(tmp_path / "ceiling"))["model"] == "data ceiling"


def test_summarize_balances_contexts():
    table = pd.DataFrame({
        CONTEXT_COL: ["A", "A", "A", "B"],
        PERT_COL: ["x", "y", "z", "x"],
        "mae": [1.0, 1.0, 1.0, 3.0],
        "de_nsig_counts_real": [1, 2, 3, 4],
        "de_nsig_counts_pred": [2, 4, 6, 8],
    })
    summary = summarize(table)
    assert summary["mae"] == pytest.approx(2.0)  # (1 + 3) / 2, not 6 / 4
    assert summary["spearman_nsig"] == pytest.approx(1.0)
    assert np.isnan(summarize(table.iloc[:2])["spearman_nsig"])  # < 3 conditions


def _summary(des, pds, mae, nsig, lfc, auprc, pdelta) -> dict[str, float]:
    return dict(zip(PAPER_METRICS.values(), (des, pds, mae, nsig, lfc, auprc, pdelta)))


def test_average_score_hand_computed():
    base = _summary(0.0, 0.5, 0.10, 0.2, 0.1, 0.2, 0.0)
    model = _summary(0.2, 0.75, 0.05, 0.6, 0.0, np.nan, 0.5)
    scores = average_score(model, base)
    expected = {
        "overlap_at_N": 0.2,  # (0.2 - 0) / (1 - 0)
        "discrimination_score_l1": 0.5,  # (0.75 - 0.5) / 0.5
        "mae": 0.5,  # (0.10 - 0.05) / 0.10
        "spearman_nsig": 0.5,  # (0.6 - 0.2) / 0.8
        "de_spearman_lfc_sig": 0.0,  # worse than baseline: clipped
        "pr_auc": 0.0,  # NaN -> 0
        "pearson_delta": 0.5,
    }
    for metric, value in expected.items():
        assert scores[metric] == pytest.approx(value)
    assert scores["average_score"] == pytest.approx(sum(expected.values()) / 7)
    assert average_score(base, base)["average_score"] == 0.0


def test_scores_of_real_evaluations(results):
    summaries = {kind: summarize(table) for kind, table in results.items()}
    control = summaries["control_mean"]
    assert average_score(control, control)["average_score"] == 0.0
    assert average_score(summaries["perfect"], control)["average_score"] > 0.5
    cell_mean = summaries["perturbation_mean"]
    perfect_vcc = vcc_score(summaries["perfect"], cell_mean)
    assert perfect_vcc["vcc_score"] > vcc_score(cell_mean, cell_mean)["vcc_score"] == 0.0
    assert set(perfect_vcc) == {"overlap_at_N", "discrimination_score_l1", "mae", "vcc_score"}


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    table = pd.DataFrame({
        CONTEXT_COL: ["A"] * 20 + ["B"] * 10,
        PERT_COL: [f"p{i}" for i in range(30)],
        "mae": rng.normal(1.0, 0.3, 30),
        "de_nsig_counts_real": rng.integers(0, 50, 30),
    })
    table["de_nsig_counts_pred"] = table["de_nsig_counts_real"] + rng.integers(0, 10, 30)
    low, high = bootstrap_ci(table, "mae", n_boot=500, seed=3)
    assert low < summarize(table)["mae"] < high
    assert (low, high) == bootstrap_ci(table, "mae", n_boot=500, seed=3)
    assert (low, high) != bootstrap_ci(table, "mae", n_boot=500, seed=4)
    s_low, s_high = bootstrap_ci(table, "spearman_nsig", n_boot=200, seed=0)
    assert s_low <= summarize(table)["spearman_nsig"] <= s_high
    assert np.isnan(bootstrap_ci(table, "mae", n_boot=0)[0])


def test_gene_order_mismatch_raises(truth, tmp_path):
    pred = make_prediction(truth, "perfect")
    pred = pred[:, pred.var_names[::-1]].copy()
    with pytest.raises(InputError, match="var_names"):
        evaluate_predictions(truth, pred, str(tmp_path), progress=False)


def test_truth_without_controls_raises(truth, tmp_path):
    # the real controls come from the truth: a context without any cannot be scored
    no_ctrl = truth[(truth.obs[PERT_COL] != CONTROL).to_numpy()].copy()
    with pytest.raises(InputError, match="no 'control' cells in context 'A'"):
        evaluate_predictions(no_ctrl, make_prediction(truth, "perfect"), str(tmp_path),
                             progress=False)
    with pytest.raises(InputError, match="control"):
        evaluate_predictions(no_ctrl, None, str(tmp_path), ceiling=True, progress=False)


def test_missing_perturbation_raises(truth, tmp_path):
    pred = make_prediction(truth, "perfect")
    pred = pred[pred.obs[PERT_COL] != "P2"].copy()
    with pytest.raises(InputError, match="P2"):
        evaluate_predictions(truth, pred, str(tmp_path), progress=False)


def test_a_prediction_with_some_controls_is_scored_against_all_real_ones(truth, tmp_path):
    pred = make_prediction(truth, "perturbation_mean", with_controls=True)
    drop = pred.obs_names[(pred.obs[PERT_COL] == CONTROL).to_numpy()][:5]
    partial = pred[~pred.obs_names.isin(drop)].copy()
    pd.testing.assert_frame_equal(
        evaluate_predictions(truth, partial, str(tmp_path / "partial"), progress=False),
        evaluate_predictions(truth, make_prediction(truth, "perturbation_mean"),
                             str(tmp_path / "plain"), progress=False))


def test_raw_counts_raise(truth, tmp_path):
    pred = make_prediction(truth, "perfect")
    pred.X = np.round(np.expm1(pred.X))
    with pytest.raises(InputError, match="integer counts|log1p"):
        evaluate_predictions(truth, pred, str(tmp_path), progress=False)


def test_bootstrap_pools_contexts_of_one_condition_each():
    import pandas as pd

    from lingshu.evaluate import bootstrap_ci

    table = pd.DataFrame({"context": ["A", "B"], "perturbation": ["stim", "stim"],
                          "pearson_delta": [0.2, 0.8]})
    low, high = bootstrap_ci(table, "pearson_delta", n_boot=500, seed=0)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.8)


def test_conditions_a_model_could_not_encode_are_left_out_of_its_scores(truth, tmp_path):
    from lingshu.evaluate.perturbation import without_conditions

    truth_path, pred_path = tmp_path / "truth.h5ad", tmp_path / "pred.h5ad"
    truth.write_h5ad(truth_path)
    pred = make_prediction(truth, "perfect")
    skipped = PERTS[0]
    pred = pred[(pred.obs[PERT_COL] != skipped).to_numpy()].copy()
    ctx = str(truth.obs[CONTEXT_COL].iloc[0])
    pred.uns["lingshu"] = {"model": "m", "run": "m", "not_encoded": json.dumps(
        [{"context": ctx, "perturbation": skipped, "reason": "never seen"}])}
    pred.write_h5ad(pred_path)
    evaluate_to_dir(str(truth_path), str(pred_path), str(tmp_path / "out"), threads=1)
    summary = read_summary(str(tmp_path / "out"))
    assert summary["n_conditions"] == len(PERTS) - 1
    assert summary["not_encoded"][0]["perturbation"] == skipped
    # without the list the missing condition is an error, as before
    del pred.uns["lingshu"]["not_encoded"]
    pred.write_h5ad(pred_path)
    with pytest.raises(InputError, match="missing") as err:
        evaluate_to_dir(str(truth_path), str(pred_path), str(tmp_path / "out2"), threads=1)
    assert "pred.h5ad" in str(err.value)  # read once by evaluate_to_dir, still named by its file
    with pytest.raises(ValueError, match="does not hold"):
        without_conditions(truth, [{"context": ctx, "perturbation": "nope", "reason": ""}])
