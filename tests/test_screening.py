"""Tests of the screening evaluation (lingshu.evaluate.screening) and its report section:
scores on cases with known answers, ties, effects of a known shift, the bootstrap, the job."""

from __future__ import annotations

import itertools
import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from lingshu.constants import CONTEXT_COL, CONTROL, NOT_ENCODED, PERT_COL
from lingshu.evaluate import screening as scr
from lingshu.io import read_table
from test_evaluate import make_prediction, make_truth

PERTS = tuple(f"P{i}" for i in range(8))


# ------------------------------------------------------------------------------ the scores


def test_a_perfect_ranking_scores_one():
    measured = np.array([8.0, 1.0, 5.0, 3.0, 7.0, 2.0, 6.0, 4.0])
    out = scr.screening_scores(measured * 3 + 1, measured, n_boot=50, seed=0)
    assert out["k"] == out["n_hits"] == 2 and out["n_conditions"] == 8
    for score in scr.SCORES:
        assert out[score] == pytest.approx(1.0)
        assert out[f"{score}_low"] == pytest.approx(1.0) == out[f"{score}_high"]


def test_a_shared_shift_scores_chance():
    # Every condition gets the same predicted effect: no ranking at all.
    measured = np.arange(1.0, 13.0)
    out = scr.screening_scores(np.full(12, 0.7), measured, n_boot=50, seed=0)
    assert out["n_hits"] == 3 and out["prevalence"] == pytest.approx(0.25)
    assert out["precision_at_k"] == pytest.approx(0.25)
    assert out["recall_at_k"] == pytest.approx(0.25)
    assert out["auprc"] == pytest.approx(0.25)
    assert out["spearman"] == 0.0  # constant prediction: chance, by definition (not NaN)
    assert out["spearman_low"] == 0.0 == out["spearman_high"]
    assert out["auprc_low"] == pytest.approx(0.25) == out["auprc_high"]


def test_spearman_is_nan_only_without_a_measured_order():
    assert np.isnan(scr.spearman([1, 2, 3], [5, 5, 5]))
    assert np.isnan(scr.spearman([1, 2], [1, 2]))
    assert scr.spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894427, abs=1e-6)


def _brute_force_precision(predicted, hits, k):
    """Mean precision@k over every order of the tied conditions (random tie-breaking)."""
    values = []
    for perm in itertools.permutations(range(len(predicted))):
        # a strict order: by predicted value, ties broken by the permutation
        order = sorted(range(len(predicted)), key=lambda i: (-predicted[i], perm.index(i)))
        values.append(np.mean([hits[i] for i in order[:k]]))
    return float(np.mean(values))


def test_ties_at_the_k_boundary_count_at_their_expected_value():
    measured = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    hits = scr.hit_flags(measured)
    assert hits.tolist() == [True, True] + [False] * 6
    predicted = np.array([9.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # top 2: condition 0 (a hit) for sure, then one of three tied conditions, one a hit
    assert scr.expected_hits_in_top_k(predicted, hits, 2) == pytest.approx(1 + 1 / 3)
    assert scr.precision_at_k(predicted, hits, 2) == pytest.approx(2 / 3)
    assert scr.recall_at_k(predicted, hits, 2) == pytest.approx(2 / 3)
    small = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    small_hits = np.array([False, True, False, False, True])
    for k in (1, 2, 3, 4):
        assert scr.precision_at_k(small, small_hits, k) == pytest.approx(
            _brute_force_precision(small.tolist(), small_hits.tolist(), k))


def test_auprc_is_average_precision_over_distinct_values():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    for _ in range(20):
        hits = rng.random(16) < 0.3
        hits[0] = True
        predicted = rng.integers(0, 4, 16).astype(float)  # many ties
        assert scr.average_precision(predicted, hits) == pytest.approx(
            average_precision_score(hits, predicted))


def test_hits_are_the_top_quarter_with_ties_broken_by_the_tiebreak():
    assert scr.n_hits_of(4) == 1 and scr.n_hits_of(12) == 3 and scr.n_hits_of(13) == 4
    measured = np.array([5.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 0.5])
    assert np.flatnonzero(scr.hit_flags(measured, tiebreak=np.arange(8.0))).tolist() == [1, 2]
    counts = np.array([10.0, 10.0, 10.0, 1.0])  # tied measured counts: the tiebreak decides
    assert np.flatnonzero(scr.hit_flags(counts, tiebreak=[0.1, 0.9, 0.5, 0.0])).tolist() == [1]


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    rng = np.random.default_rng(0)
    measured = rng.lognormal(0, 1.5, 40)
    predicted = measured * rng.lognormal(0, 1.0, 40)
    a = scr.screening_scores(predicted, measured, n_boot=200, seed=7)
    b = scr.screening_scores(predicted, measured, n_boot=200, seed=7)
    c = scr.screening_scores(predicted, measured, n_boot=200, seed=8)
    assert a == b
    assert a != c
    for score in scr.SCORES:
        assert a[f"{score}_low"] <= a[score] <= a[f"{score}_high"], score
        assert a[f"{score}_low"] < a[f"{score}_high"], score
    none = scr.screening_scores(predicted, measured, n_boot=0)
    assert np.isnan(none["spearman_low"]) and none["spearman"] == a["spearman"]


# ------------------------------------------------------------------------------ the effects


def test_the_l2_shift_does_not_grow_as_the_number_of_cells_falls():
    # Uncorrected, the norm of a mean shift carries the two means' sampling noise, which
    # grows as the cells fall: at no effect 20 cells looked stronger than 400, and with a
    # true shift of norm 1 the estimate was biased up. The corrected one is unbiased in the
    # square whatever the number of cells.
    rng = np.random.default_rng(1)
    genes, sd = 200, 0.5
    controls = rng.normal(1.0, sd, size=(300, genes))
    ref = scr.reference(controls)
    shift = np.zeros(genes)
    shift[:4] = 0.5  # norm 1
    for n in (20, 400):
        raw, corrected = [], []
        for _ in range(30):
            cells = rng.normal(1.0, sd, size=(n, genes)) + shift
            n_, mean, var = scr._moments(cells)
            raw.append(np.sum((mean - ref.mean) ** 2))
            corrected.append(scr.noise_corrected_shift(n_, mean, var, ref) ** 2)
        floor = genes * sd**2 * (1 / n + 1 / 300)
        assert np.mean(raw) == pytest.approx(1.0 + floor, rel=0.15)
        assert np.mean(corrected) == pytest.approx(1.0, abs=0.25), n
    # at no effect: 0 (clipped) or near it; and the controls against themselves exactly 0
    null = scr.effects(rng.normal(1.0, sd, size=(20, genes)), controls, corrected=True)
    assert null["l2_shift"] < 0.5 < np.sqrt(genes * sd**2 / 20)
    assert scr.effects(controls, controls, corrected=True)["l2_shift"] == 0.0



def test_effects_of_a_known_shift():
    rng = np.random.default_rng(0)
    controls = rng.normal(2.0, 0.3, size=(200, 30))
    shift = np.zeros(30)
    shift[[1, 5, 9]] = [1.0, -2.0, 2.0]
    cells = rng.normal(2.0, 0.3, size=(150, 30)) + shift
    basis = scr.fit_basis(np.vstack([controls, cells]), n_components=10, seed=0)
    found = scr.effects(cells, controls, basis, seed=0)
    expected = np.linalg.norm(cells.mean(0) - controls.mean(0))
    assert found["l2_shift"] == pytest.approx(expected)  # a predicted effect: as given
    noise = cells.var(0, ddof=1).sum() / 150 + controls.var(0, ddof=1).sum() / 200
    measured = scr.effects(cells, controls, basis, seed=0, corrected=True)
    assert measured["l2_shift"] == pytest.approx(np.sqrt(expected**2 - noise))
    assert measured["l2_shift"] == pytest.approx(3.0, abs=0.15)
    assert measured["l2_shift"] < found["l2_shift"]
    assert found["n_de"] == 3
    assert found["energy"] > 1.0
    same = scr.effects(controls, controls, basis, seed=0)
    assert same["l2_shift"] == 0.0 and same["n_de"] == 0
    null = scr.effects(rng.normal(2.0, 0.3, size=(40, 30)), controls, basis, seed=0)
    assert abs(null["energy"]) < 0.05 * found["energy"] and null["n_de"] == 0
    # sparse input gives the same numbers
    sparse = scr.effects(sp.csr_matrix(cells), sp.csr_matrix(controls), basis, seed=0)
    assert sparse["l2_shift"] == pytest.approx(found["l2_shift"])
    assert sparse["n_de"] == found["n_de"]
    assert sparse["energy"] == pytest.approx(found["energy"])


def test_energy_distance_does_not_grow_as_cells_fall():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 5))
    small = [scr.energy_distance(rng.normal(size=(8, 5)), ref) for _ in range(200)]
    large = [scr.energy_distance(rng.normal(size=(80, 5)), ref) for _ in range(50)]
    assert abs(np.mean(small)) < 0.05 and abs(np.mean(large)) < 0.05  # unbiased at any size
    constant = np.ones((10, 5))
    assert scr.energy_distance(constant, constant) == 0.0


def test_welch_limits_without_variance():
    zero = np.zeros(3)
    p = scr.welch_pvalues(5, np.array([0.0, 1.0, 1.0]), zero, 5, np.array([0.0, 0.0, 1.0]), zero)
    assert p.tolist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def truth():
    return make_truth(contexts=("A", "B"), perts=PERTS, n_genes=40, n_cells=20, n_ctrl=30)


def _shared_shift(truth: ad.AnnData) -> ad.AnnData:
    """A model that predicts the same cells (controls, one shared shift) for every condition."""
    pred = make_prediction(truth, "perfect")
    ctrl = truth[(truth.obs[PERT_COL] == CONTROL).to_numpy()]
    for ctx in ("A", "B"):
        base = np.asarray(ctrl.X[(ctrl.obs[CONTEXT_COL] == ctx).to_numpy()][:20]) + 0.5
        for pert in PERTS:
            rows = ((pred.obs[CONTEXT_COL] == ctx) & (pred.obs[PERT_COL] == pert)).to_numpy()
            pred.X[rows] = base[: rows.sum()]
    pred.uns["lingshu"]["run"] = "shared"
    return pred


def _without(pred: ad.AnnData, context: str, pert: str) -> ad.AnnData:
    """The prediction of a model that could not encode one condition."""
    keep = ~((pred.obs[CONTEXT_COL] == context) & (pred.obs[PERT_COL] == pert)).to_numpy()
    out = pred[keep].copy()
    out.uns["lingshu"] = {**pred.uns["lingshu"], NOT_ENCODED: json.dumps(
        [{"context": context, "perturbation": pert, "reason": "no features"}])}
    return out


@pytest.fixture(scope="module")
def job(truth, tmp_path_factory):
    out = tmp_path_factory.mktemp("screening")
    perfect = make_prediction(truth, "perfect")
    preds = {"perfect": perfect, "shared": _shared_shift(truth),
             "partial": _without(perfect, "B", "P3"),
             "no_change": make_prediction(truth, "control_mean")}
    table = scr.screening_job(truth, preds, str(out / "screening.tsv"),
                              str(out / "screening_effects.tsv"), n_boot=50, seed=0)
    return out, table


def test_the_job_writes_both_files(job):
    out, table = job
    scores = read_table(out / "screening.tsv")
    assert list(scores.columns) == scr.TABLE_COLUMNS
    assert len(scores) == 5 * len(scr.EFFECTS)  # four runs and the ceiling
    assert set(scores["run"]) == {"perfect", "shared", "partial", "no_change", scr.CEILING_RUN}
    assert scores.loc[scores["primary"], "effect"].unique().tolist() == [scr.PRIMARY]
    effects = read_table(out / "screening_effects.tsv")
    assert list(effects.columns) == scr.EFFECT_COLUMNS
    perfect = effects[effects["run"] == "perfect"]
    assert len(perfect) == 16 and perfect["hit_l2_shift"].sum() == 4  # top quarter of 16
    # the same cells: the measured effect is the predicted one less the means' noise
    assert (perfect["measured_l2_shift"] < perfect["predicted_l2_shift"]).all()
    assert np.allclose(perfect["predicted_energy"], perfect["measured_energy"])
    primary = scores[scores["effect"] == scr.PRIMARY].set_index("run")
    # the real cells as a prediction keep their sampling noise, the measured effects not
    assert 0.99 < primary.loc["perfect", "spearman"] < 1.0
    assert primary.loc["perfect", "precision_at_k"] == pytest.approx(1.0)
    assert primary.loc["perfect", "auprc"] == pytest.approx(1.0)
    assert primary.loc["perfect", "k"] == 4
    ceiling = primary.loc[scr.CEILING_RUN]
    assert np.isfinite(ceiling["spearman"]) and 0 <= ceiling["auprc"] <= 1


def test_a_shared_shift_model_scores_chance_in_the_job(job):
    _, table = job
    shared = table[table["run"] == "shared"].set_index("effect")
    # the same predicted cells per context; the two contexts' controls differ, so the
    # predicted effects tie within each context: chance up to the context split
    effects = read_table(job[0] / "screening_effects.tsv")
    rows = effects[effects["run"] == "shared"]
    assert rows.groupby(CONTEXT_COL)["predicted_l2_shift"].nunique().max() == 1
    assert rows.groupby(CONTEXT_COL)["predicted_n_de"].nunique().max() == 1
    for effect in ("l2_shift", "n_de"):
        top = rows.loc[rows[f"predicted_{effect}"] == rows[f"predicted_{effect}"].max()]
        assert len(top) == 8 and shared.loc[effect, "k"] == 4
        # k = 4 picks among the 8 tied conditions of the top context: its share of hits
        assert shared.loc[effect, "precision_at_k"] == pytest.approx(top[f"hit_{effect}"].mean())


def test_a_no_change_model_scores_chance_despite_rounding(job):
    # Each context's control pseudobulk for every condition: its effects are rounding noise
    # (about 1e-6, differing between contexts), which must tie rather than rank.
    _, table = job
    row = table[(table["run"] == "no_change") & table["primary"]].iloc[0]
    assert row["spearman"] == 0.0
    for score in ("precision_at_k", "recall_at_k", "auprc"):
        assert row[score] == pytest.approx(0.25)


def test_not_encoded_conditions_are_left_out(job):
    out, table = job
    partial = table[(table["run"] == "partial") & table["primary"]].iloc[0]
    assert partial["n_conditions"] == 15 and partial["not_encoded"] == 1
    effects = read_table(out / "screening_effects.tsv")
    rows = effects[effects["run"] == "partial"]
    assert len(rows) == 15
    assert not ((rows[CONTEXT_COL] == "B") & (rows[PERT_COL] == "P3")).any()
    assert (table.loc[table["run"] == "perfect", "not_encoded"] == 0).all()


def test_too_few_conditions_give_an_empty_table(tmp_path):
    small = make_truth(contexts=("A",), perts=("P1", "P2", "P3"), n_genes=20, n_cells=10,
                       n_ctrl=15)
    table = scr.screening_job(small, {"perfect": make_prediction(small, "perfect")},
                              str(tmp_path / "s.tsv"), str(tmp_path / "e.tsv"), n_boot=10)
    assert len(table) == 0 and len(read_table(tmp_path / "s.tsv")) == 0
    assert len(read_table(tmp_path / "e.tsv")) == 3  # the effects are still written
    from lingshu.report.screening import EFFECTS_TABLE, TABLE, draw_screening, screening_html

    (tmp_path / "s.tsv").rename(tmp_path / TABLE)
    (tmp_path / "e.tsv").rename(tmp_path / EFFECTS_TABLE)
    drawn = draw_screening(tmp_path, tmp_path / "report")
    assert drawn["figure"] is None and (tmp_path / "report" / TABLE).exists()
    assert "Not scored: this dataset holds 3 held-out condition(s)" in screening_html(drawn, str)


def test_the_report_section(job, tmp_path):
    from lingshu.report.screening import draw_screening, screening_html

    out, _ = job
    drawn = draw_screening(out, tmp_path)
    assert (tmp_path / "screening.tsv").exists()
    assert (tmp_path / "figures" / "screening.png").stat().st_size > 0
    page = screening_html(drawn, lambda png: f"<img src='{png.name}'>")
    assert "Screening" in page and "screening.png" in page
    assert "k</b> = 4" in page and "0.250" in page  # k and chance stated
    assert "data ceiling" in page and "not encoded" in page
