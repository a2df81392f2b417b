"""The candidate screen: perturbations with no measured cells, ranked by each model's
predicted effect; a candidate a model cannot encode is listed as such, never dropped."""

import numpy as np
import pandas as pd
import pytest

from lingshu.data.candidates import screen_candidates
from lingshu.data.features import compute_features
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import make_split, write_split
from lingshu.errors import InputError
from lingshu.evaluate.candidates import (
    NOT_ENCODED_STATUS,
    RANKED,
    candidate_screen_job,
    rank_screen,
    screen_conditions,
)
from lingshu.io import read_table, write_table
from lingshu.models.base import ConditionNotEncodable, PerturbationModel
from lingshu.models.harness import build_model, training_data
from lingshu.report.candidates import candidate_screen_html

from conftest import make_entry, make_processed

SPLIT = {"kind": "heldout_perturbations", "test_perturbations": ["G4"]}
# G5..G7 are measured genes no cell was perturbed in; NOTAGENE is neither a gene nor has
# features; G4 is held out (a known answer), G1 a training perturbation.
CANDIDATES = ["G5", "G6", "G7", "NOTAGENE", "G4", "G1"]
SHIFTS = {"G5": 3.0, "G6": 1.0, "G7": 2.0, "G4": 0.5, "G1": 0.25}


class KnownShift(PerturbationModel):
    """Predicts the context's control cells themselves with gene G0 raised by a known shift
    per perturbation, so the L2 mean shift of its prediction is exactly that shift; it cannot
    encode G6 in context B."""

    name = "known_shift"

    def fit(self, data):
        pass

    def predict(self, condition, rng):
        if condition.perturbation == "G6" and condition.context == "B":
            raise ConditionNotEncodable("B", "G6", "no G6 in B, for the test")
        x = np.asarray(log1p_cp10k(condition.control_counts).todense(), dtype=np.float32)
        x = x[np.arange(condition.n_cells) % x.shape[0]]
        x[:, 0] += SHIFTS[condition.perturbation]
        return x

    def get_state(self):
        return {}, {}

    def set_state(self, arrays, meta):
        pass


@pytest.fixture(scope="module")
def tiny():
    adata = make_processed()
    entry = make_entry("genetic", split=SPLIT, screen={"candidates": CANDIDATES})
    split = make_split(adata.obs, SPLIT, seed=0)
    features = compute_features(adata, split, entry, n_components=4, seed=0)
    return adata, split, features, entry


def test_the_candidates_get_features_and_every_model_knows_their_targets(tiny):
    adata, split, features, entry = tiny
    assert screen_candidates(entry) == CANDIDATES
    assert features.loc["G5", "source"] == "target_pca"
    assert features.loc["NOTAGENE", "source"] == "unknown"
    assert training_data(adata, split, features, seed=0, entry=entry).targets["G7"] == ["G7"]


def test_a_model_with_known_shifts_ranks_the_candidates_in_that_order(tiny):
    adata, split, features, entry = tiny
    table = screen_conditions(adata, split, features, entry, CANDIDATES, model=KnownShift(),
                              seed=0, run="known_shift")
    assert len(table) == 2 * len(CANDIDATES)  # every candidate in both contexts, none dropped
    a = table[table["context"] == "A"].set_index("perturbation")
    ranked = a[a["status"] == RANKED].sort_values("rank")
    assert list(ranked.index) == ["G5", "G7", "G6", "G4", "G1"]
    assert list(ranked["rank"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(ranked["predicted_effect"], [3.0, 2.0, 1.0, 0.5, 0.25],
                               rtol=1e-5)
    assert ranked.loc["G5", "top_up"].startswith("G0 +3.000")
    assert ranked.loc["G5", "top_down"] == ""
    n_ctrl = int(a.loc["G5", "n_control_cells"])
    assert a.loc["G5", "n_cells"] == min(n_ctrl, 300) and a.loc["G5", "control_cells"] == "input"
    assert a.loc["G4", "split_role"] == "test" and a.loc["G1", "split_role"] == "train"
    assert a.loc["G5", "split_role"] == "none"
    # Not encodable: listed with the reason, no cells.
    assert a.loc["NOTAGENE", "status"] == NOT_ENCODED_STATUS
    assert "shared unknown perturbation" in a.loc["NOTAGENE", "reason"]
    assert a.loc["NOTAGENE", "n_cells"] == 0 and pd.isna(a.loc["NOTAGENE", "rank"])
    b = table[table["context"] == "B"].set_index("perturbation")
    assert b.loc["G6", "status"] == NOT_ENCODED_STATUS
    assert "no G6 in B, for the test" in b.loc["G6", "reason"]
    assert list(b[b["status"] == RANKED].sort_values("rank").index) == ["G5", "G7", "G4", "G1"]
    # Overall: by the mean effect over the contexts where a candidate is ranked.
    overall = table.drop_duplicates("perturbation").set_index("perturbation")["rank_overall"]
    assert [overall[p] for p in ["G5", "G7", "G6", "G4", "G1"]] == [1, 2, 3, 4, 5]


def test_ranks_treat_effects_equal_up_to_rounding_as_ties():
    table = pd.DataFrame({"context": ["A"] * 3, "perturbation": ["x", "y", "z"],
                          "status": [RANKED] * 3,
                          "predicted_effect": [2.0, 2.0 + 1e-12, 1.0]})
    ranked = rank_screen(table).set_index("perturbation")
    assert ranked.loc["x", "rank"] == ranked.loc["y", "rank"] == 1
    assert ranked.loc["z", "rank"] == 3


def test_a_model_that_ignores_the_perturbation_lists_every_candidate_as_not_encoded(tiny):
    adata, split, features, entry = tiny
    table = screen_conditions(adata, split, features, entry, CANDIDATES, model=None,
                              run="control_mean", reads_perturbation=False)
    assert len(table) == 2 * len(CANDIDATES)
    assert (table["status"] == NOT_ENCODED_STATUS).all()
    assert table["reason"].str.contains("control_mean predicts the same cells").all()


def test_screen_contexts_must_exist_and_have_controls(tiny):
    adata, split, features, _ = tiny
    entry = make_entry("genetic", split=SPLIT, screen={"candidates": ["G5"], "contexts": ["Z"]})
    with pytest.raises(InputError, match=r"datasets\.tiny: screen\.contexts: 'Z'"):
        screen_conditions(adata, split, features, entry, ["G5"], model=KnownShift())
    entry = make_entry("genetic", split=SPLIT, screen={"candidates": ["G5"], "contexts": ["B"],
                                                       "max_cells": 7})
    table = screen_conditions(adata, split, features, entry, ["G5"], model=KnownShift())
    assert list(table["context"]) == ["B"] and list(table["n_cells"]) == [7]


def test_a_candidates_file_is_read_and_joined_to_the_list(tmp_path):
    path = tmp_path / "candidates.txt"
    path.write_text("# more candidates\nG8\nG9\n")
    entry = make_entry("genetic", split=SPLIT,
                       screen={"candidates": ["G5"], "candidates_file": str(path)})
    assert screen_candidates(entry) == ["G5", "G8", "G9"]
    path.write_text("G5\n")
    with pytest.raises(InputError, match="screen.candidates_file.*both listed"):
        screen_candidates(entry)
    path.write_text("control\n")
    with pytest.raises(InputError, match="control label"):
        screen_candidates(entry)


def test_the_screen_job_writes_every_candidate_of_a_fitted_model(tiny, tmp_path):
    adata, split, features, entry = tiny
    processed, split_dir = tmp_path / "processed.h5ad", tmp_path / "split"
    adata.write_h5ad(processed)
    write_split(split, split_dir)
    write_table(features.reset_index(), tmp_path / "features.tsv")
    outputs = {}
    for name in ("linear", "control_mean"):
        model = build_model(name, {"n_components": 4} if name == "linear" else {})
        model.fit(training_data(adata, split, features, seed=0, entry=entry))
        model.save(tmp_path / f"{name}.npz")
        out = tmp_path / "screen" / f"{name}.tsv"
        candidate_screen_job(str(processed), str(split_dir), str(tmp_path / "features.tsv"),
                             str(tmp_path / f"{name}.npz"), entry, name, {}, 0, 1, None,
                             str(out))
        outputs[name] = read_table(out)
    linear = outputs["linear"]
    assert sorted(set(linear["perturbation"])) == sorted(CANDIDATES)
    assert set(linear.loc[linear["perturbation"] == "NOTAGENE", "status"]) == {
        NOT_ENCODED_STATUS}
    ranked = linear[linear["status"] == RANKED]
    assert len(ranked) == 2 * (len(CANDIDATES) - 1) and (ranked["predicted_effect"] > 0).all()
    assert (outputs["control_mean"]["status"] == NOT_ENCODED_STATUS).all()
    page = candidate_screen_html(pd.concat(outputs.values(), ignore_index=True))
    assert "Candidate screen" in page and "NOTAGENE" in page and "G4†" in page
    assert "control_mean</b>" in page  # its not-encoded candidates are listed
