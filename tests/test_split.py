import numpy as np
import pandas as pd
import pytest
from conftest import make_processed

from lingshu.constants import SPLIT_CONTROL_INPUT, SPLIT_REFERENCE, SPLIT_TEST, SPLIT_TRAIN
from lingshu.data.split import (
    check_no_leakage,
    make_split,
    read_perturbation_list,
    read_split,
    write_split,
)
from lingshu.errors import InputError


def test_heldout_perturbations_never_reach_training(tiny_processed):
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G1", "G3"]}, seed=0)
    cells = split.cells
    train_perts = set(cells.loc[cells[SPLIT_TRAIN], "perturbation"])
    assert not {"G1", "G3"} & train_perts
    assert set(cells.loc[cells[SPLIT_TEST], "perturbation"]) == {"G1", "G3"}
    # held-out controls: half of each test context's controls, out of training
    ctrl_in = cells[SPLIT_CONTROL_INPUT]
    assert not (ctrl_in & cells[SPLIT_TRAIN]).any()
    assert ctrl_in.sum() == 60  # 2 contexts x 60 controls x 0.5
    tc = split.test_conditions()
    assert set(map(tuple, tc[["context", "perturbation"]].to_numpy())) == {
        ("A", "G1"), ("A", "G3"), ("B", "G1"), ("B", "G3")}
    assert (tc["n_cells"] == 30).all()


def test_random_heldout_is_seeded(tiny_processed):
    spec = {"kind": "heldout_perturbations", "n_test_perturbations": 2}
    a = make_split(tiny_processed.obs, spec, seed=1).cells
    b = make_split(tiny_processed.obs, spec, seed=1).cells
    pd.testing.assert_frame_equal(a, b)


def test_heldout_combinations_keep_perturbation_seen_elsewhere(tiny_processed):
    split = make_split(tiny_processed.obs, {
        "kind": "heldout_combinations",
        "test_combinations": [{"context": "A", "perturbation": "G2"}]}, seed=0)
    cells = split.cells
    train = cells[cells[SPLIT_TRAIN]]
    assert not ((train["context"] == "A") & (train["perturbation"] == "G2")).any()
    assert ((train["context"] == "B") & (train["perturbation"] == "G2")).any()
    # the context's controls are seen in training (but for those drawn into the generation
    # reference) and all of them are handed to the models
    ctrl_a = (cells["context"] == "A") & (cells["perturbation"] == "control")
    assert cells.loc[ctrl_a, SPLIT_CONTROL_INPUT].all()
    assert (cells.loc[ctrl_a, SPLIT_TRAIN] ^ cells.loc[ctrl_a, SPLIT_REFERENCE]).all()
    assert not cells.loc[cells["context"] == "B", SPLIT_CONTROL_INPUT].any()


def test_random_combinations_leave_each_perturbation_seen(tiny_processed):
    split = make_split(tiny_processed.obs, {"kind": "heldout_combinations",
                                            "n_test_combinations": 4}, seed=3)
    test = split.test_conditions()
    assert len(test) == 4
    train = split.cells[split.cells[SPLIT_TRAIN]]
    for pert in test["perturbation"]:
        assert (train["perturbation"] == pert).any()


def test_per_context_protocol_holds_out_k_perturbations_in_each_test_context():
    obs = make_processed(contexts=("D1", "D2", "D3", "D4"), perts=("G1", "G2", "G3", "G4"),
                         n_per=12, n_ctrl=12).obs
    spec = {"kind": "heldout_combinations", "n_test_contexts": 2,
            "n_test_perturbations_per_context": 3}
    split = make_split(obs, spec, seed=5)
    test = split.test_conditions()
    assert test.groupby("context").size().tolist() == [3, 3]  # two donors, 3 of 4 each
    train = split.cells[split.cells[SPLIT_TRAIN]]
    for ctx, group in test.groupby("context"):
        seen = set(train.loc[train["context"] == ctx, "perturbation"])
        assert "control" in seen and len(seen - {"control"}) == 1  # one perturbation trains
        assert not set(group["perturbation"]) & seen
    assert make_split(obs, spec, seed=5).test_conditions().equals(test)  # seeded
    named = make_split(obs, {"kind": "heldout_combinations", "test_contexts": ["D4"],
                             "n_test_perturbations_per_context": 2}, seed=0).test_conditions()
    assert set(named["context"]) == {"D4"} and len(named) == 2


@pytest.mark.parametrize("spec, field", [
    ({"kind": "heldout_combinations", "test_contexts": ["ZZ"],
      "n_test_perturbations_per_context": 1}, "test_contexts"),
    ({"kind": "heldout_combinations", "test_contexts": ["A"],
      "n_test_perturbations_per_context": 4}, "n_test_perturbations_per_context"),
    ({"kind": "heldout_combinations", "n_test_contexts": 2,
      "n_test_perturbations_per_context": 1}, "n_test_contexts"),
    ({"kind": "heldout_perturbations", "test_perturbations": ["NOPE"]}, "test_perturbations"),
    ({"kind": "heldout_perturbations", "n_test_perturbations": 4}, "n_test_perturbations"),
    ({"kind": "heldout_perturbations"}, "split"),
    ({"kind": "heldout_combinations", "test_combinations": [
        {"context": "A", "perturbation": "G1"}, {"context": "B", "perturbation": "G1"}]},
     "test_combinations"),
    ({"kind": "heldout_combinations", "test_combinations": [
        {"context": "C", "perturbation": "G1"}]}, "test_combinations"),
    ({"kind": "sideways"}, "split.kind"),
])
def test_bad_split_specs_are_clear(tiny_processed, spec, field):
    with pytest.raises(InputError, match=field) as info:
        make_split(tiny_processed.obs, spec, seed=0, where="cfg.yaml: datasets.tiny")
    assert "cfg.yaml" in str(info.value) and "Fix:" in str(info.value)


def test_leakage_check_catches_a_leak(tiny_processed):
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G1"]}, seed=0)
    cells = split.cells.copy()
    leak = cells.index[(cells["perturbation"] == "G1")][0]
    cells.loc[leak, SPLIT_TEST] = False
    cells.loc[leak, SPLIT_TRAIN] = True
    with pytest.raises(InputError, match="leakage"):
        check_no_leakage(cells, "heldout_perturbations")


def test_split_round_trip(tmp_path, tiny_processed):
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G4"]}, seed=0)
    write_split(split, tmp_path)
    back = read_split(tmp_path)
    pd.testing.assert_frame_equal(back.cells, split.cells, check_dtype=False)
    assert np.array_equal(back.conditions["n_cells"], split.conditions["n_cells"])


def test_reference_cells_are_kept_out_of_training_and_seeded(tiny_processed):
    spec = {"kind": "heldout_perturbations", "test_perturbations": ["G1"],
            "reference_fraction": 0.2}
    cells = make_split(tiny_processed.obs, spec, seed=3).cells
    ref = cells[SPLIT_REFERENCE]
    eligible = ~cells[SPLIT_TEST] & ~cells[SPLIT_CONTROL_INPUT]
    assert ref.sum() == round(0.2 * eligible.sum())
    assert not (ref & (cells[SPLIT_TRAIN] | cells[SPLIT_TEST] | cells[SPLIT_CONTROL_INPUT])).any()
    assert set(cells.loc[ref, "perturbation"]) > {"control"}  # drawn from every training condition
    again = make_split(tiny_processed.obs, spec, seed=3).cells
    assert again[SPLIT_REFERENCE].equals(ref)
    assert not make_split(tiny_processed.obs, spec, seed=4).cells[SPLIT_REFERENCE].equals(ref)
    capped = make_split(tiny_processed.obs, dict(spec, max_reference_cells=7), seed=3).cells
    assert capped[SPLIT_REFERENCE].sum() == 7
    none = make_split(tiny_processed.obs, dict(spec, reference_fraction=0), seed=3).cells
    assert not none[SPLIT_REFERENCE].any()
    # the leakage check refuses a reference cell that trains
    cells = cells.copy()
    cells.loc[cells.index[ref.to_numpy()][0], SPLIT_TRAIN] = True
    with pytest.raises(InputError, match="generation-reference"):
        check_no_leakage(cells, "heldout_perturbations")


def test_reference_has_the_training_cells_composition_when_control_inputs_train(tiny_processed):
    """heldout_combinations hands the test contexts' training controls to the models; the
    reference is drawn from them too, so it has the training cells' composition, and the
    unconditional pre-training (which adds the control inputs) still never sees it."""
    from conftest import make_entry

    from lingshu.models.harness import training_data

    spec = {"kind": "heldout_combinations",
            "test_combinations": [{"context": "A", "perturbation": "G2"},
                                  {"context": "B", "perturbation": "G3"}],
            "reference_fraction": 0.5}
    split = make_split(tiny_processed.obs, spec, seed=0)
    cells = split.cells
    ref, train = cells[SPLIT_REFERENCE], cells[SPLIT_TRAIN]
    # every control cell is a control input here; half of all would-be training cells drawn
    assert (cells.loc[cells["perturbation"] == "control", SPLIT_CONTROL_INPUT]).all()
    assert ref.sum() == round(0.5 * (ref | train).sum())
    assert (ref & cells[SPLIT_CONTROL_INPUT]).sum() > 0
    assert not (ref & (train | cells[SPLIT_TEST])).any()
    check_no_leakage(cells, "heldout_combinations")
    # the reference's share of controls follows the training pool's, within sampling noise
    is_ctrl = cells["perturbation"] == "control"
    pool = ref | train
    assert abs(is_ctrl[ref].mean() - is_ctrl[pool].mean()) < 0.1
    entry = make_entry("stimulation", split=spec)
    pre = training_data(tiny_processed, split, None, seed=0, entry=entry,
                        include_control_input=True)
    # the training cells and nothing else: every control input here trains or is reference
    assert len(pre.obs) == int(train.sum())


def test_split_folder_and_rows(tmp_path, tiny_processed):
    spec = {"kind": "heldout_perturbations", "test_perturbations": ["G1"],
            "reference_fraction": 0.2}
    split = make_split(tiny_processed.obs, spec, seed=3)
    write_split(split, tmp_path / "split")
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["cells.tsv",
                                                                      "conditions.tsv"]
    back = read_split(tmp_path / "split")
    for column in (SPLIT_TRAIN, SPLIT_TEST, SPLIT_CONTROL_INPUT, SPLIT_REFERENCE):
        rows = back.rows(column, tiny_processed.obs_names)
        np.testing.assert_array_equal(rows, np.flatnonzero(split.cells[column].to_numpy()))
    np.testing.assert_array_equal(back.reference_rows(), back.rows(SPLIT_REFERENCE))
    assert back.reference_rows().size == int(split.cells[SPLIT_REFERENCE].sum()) > 0
    with pytest.raises(ValueError, match="cell names differ"):  # never applied by position
        back.rows(SPLIT_TRAIN, tiny_processed.obs_names[::-1])
    (tmp_path / "split" / "conditions.tsv").unlink()
    with pytest.raises(InputError, match="conditions.tsv"):
        read_split(tmp_path / "split")


def test_split_without_reference_column_reads_as_no_reference(tmp_path, tiny_processed):
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G4"]}, seed=0)
    write_split(split, tmp_path)
    old = pd.read_csv(tmp_path / "cells.tsv", sep="\t").drop(columns=[SPLIT_REFERENCE])
    old.to_csv(tmp_path / "cells.tsv", sep="\t", index=False)
    assert not read_split(tmp_path)\
        .cells[SPLIT_REFERENCE].any()


# Explicit, file-given splits (the Virtual Cell Challenge's official 150/50/100 targets).

def _roles(cells):
    return cells[[SPLIT_TRAIN, SPLIT_TEST, SPLIT_CONTROL_INPUT, SPLIT_REFERENCE]]


def test_test_perturbations_from_a_plain_file(tmp_path, tiny_processed):
    listed = tmp_path / "test.txt"
    listed.write_text("# held out\nG3\n\nG1\nG3\n")
    by_file = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                              "test_perturbations_file": str(listed)}, seed=0)
    by_list = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                              "test_perturbations": ["G1", "G3"]}, seed=0)
    pd.testing.assert_frame_equal(by_file.cells, by_list.cells)
    assert set(by_file.test_conditions()["perturbation"]) == {"G1", "G3"}


def test_list_and_file_are_joined(tmp_path, tiny_processed):
    listed = tmp_path / "test.txt"
    listed.write_text("G1\n")
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G2"],
                                            "test_perturbations_file": str(listed)}, seed=0)
    assert set(split.test_conditions()["perturbation"]) == {"G1", "G2"}


@pytest.mark.parametrize("text", [
    "target_gene,n_cells,median_umi_per_cell\nG2,30,5000\nG4,30,5100\n",  # VCC pert_counts
    "n_cells,perturbation\n30,G2\n30,G4\n",
    "gene\tn\nG2\t1\nG4\t2\n",  # first column of a TSV
    "target_gene\nG2\nG4\n",
    '"G2"\n"G4"\n',
])
def test_perturbation_list_files_plain_and_csv(tmp_path, text):
    path = tmp_path / "targets.csv"
    path.write_text(text)
    assert read_perturbation_list(path) == ["G2", "G4"]


def test_relative_list_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch,
                                                                   tiny_processed):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.csv").write_text("target_gene,n_cells\nG4,30\n")
    monkeypatch.chdir(tmp_path)
    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations_file": "data/test.csv"}, seed=0)
    assert set(split.test_conditions()["perturbation"]) == {"G4"}


def test_excluded_perturbations_have_no_role(tmp_path, tiny_processed):
    excluded = tmp_path / "validation.csv"
    excluded.write_text("target_gene,n_cells\nG2,30\n")
    spec = {"kind": "heldout_perturbations", "test_perturbations": ["G1"],
            "exclude_perturbations_file": str(excluded), "reference_fraction": 0.3}
    split = make_split(tiny_processed.obs, spec, seed=2)
    cells = split.cells
    g2 = cells["perturbation"] == "G2"
    assert g2.sum() == 60 and not _roles(cells)[g2].any().any()
    assert not (cells[SPLIT_TRAIN] & g2).any()
    assert set(cells.loc[cells[SPLIT_TRAIN], "perturbation"]) == {"control", "G3", "G4"}
    assert set(split.test_conditions()["perturbation"]) == {"G1"}
    roles = split.conditions.set_index(["context", "perturbation"])["role"]
    assert roles[("A", "G2")] == roles[("B", "G2")] == "excluded"
    assert roles[("A", "G3")] == "train" and roles[("A", "G1")] == "test"
    # the list key does the same; the split is deterministic from the seed
    same = make_split(tiny_processed.obs, {**{k: v for k, v in spec.items()
                                              if k != "exclude_perturbations_file"},
                                           "exclude_perturbations": ["G2"]}, seed=2)
    pd.testing.assert_frame_equal(same.cells, cells)
    # a seeded draw never picks an excluded perturbation
    drawn = {"kind": "heldout_perturbations", "n_test_perturbations": 2,
             "exclude_perturbations": ["G2"]}
    for seed in range(6):
        test = set(make_split(tiny_processed.obs, drawn, seed=seed)
                   .test_conditions()["perturbation"])
        assert len(test) == 2 and "G2" not in test
    pd.testing.assert_frame_equal(make_split(tiny_processed.obs, drawn, seed=1).cells,
                                  make_split(tiny_processed.obs, drawn, seed=1).cells)


def test_excluded_cells_round_trip_and_reach_no_stage(tmp_path, tiny_processed):
    from conftest import make_entry

    from lingshu.data.truth import build_truth
    from lingshu.models.harness import training_data

    split = make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations": ["G1"],
                                            "exclude_perturbations": ["G2"]}, seed=0)
    write_split(split, tmp_path)
    back = read_split(tmp_path)
    pd.testing.assert_frame_equal(back.cells, split.cells, check_dtype=False)
    check_no_leakage(back.cells, "heldout_perturbations", ["G2"])
    entry = make_entry("genetic", split={"kind": "heldout_perturbations",
                                         "test_perturbations": ["G1"],
                                         "exclude_perturbations": ["G2"]})
    assert "G2" not in set(training_data(tiny_processed, back, None, seed=0,
                                         entry=entry).obs["perturbation"])
    assert "G2" not in set(build_truth(tiny_processed, back).obs["perturbation"])
    cells = back.cells.copy()
    cells.loc[cells.index[(cells["perturbation"] == "G2").to_numpy()][0], SPLIT_TRAIN] = True
    with pytest.raises(InputError, match="excluded"):
        check_no_leakage(cells, "heldout_perturbations", ["G2"])


@pytest.mark.parametrize("spec, field, words", [
    ({"test_perturbations": ["G1", "NOPE", "ALSO"]}, "split.test_perturbations",
     ["'NOPE'", "'ALSO'", "2 of 3"]),
    ({"test_perturbations": ["G1"], "exclude_perturbations": ["ZZ"]},
     "split.exclude_perturbations", ["'ZZ'", "remove the key"]),
    ({"test_perturbations": ["G1", "G2"], "exclude_perturbations": ["G2"]},
     "split.test_perturbations", ["both test and excluded", "G2"]),
    ({"test_perturbations": ["G1", "control"]}, "split.test_perturbations", ["control"]),
    ({"test_perturbations": ["G1"], "exclude_perturbations": ["control"]},
     "split.exclude_perturbations", ["control"]),
    ({"test_perturbations": ["G1"], "n_test_perturbations": 1}, "split.n_test_perturbations",
     ["not both"]),
    ({"n_test_perturbations": 3, "exclude_perturbations": ["G2"]}, "split.n_test_perturbations",
     ["excluded"]),
    ({"test_perturbations": ["G1", "G3"], "exclude_perturbations": ["G2", "G4"]},
     "split.test_perturbations", ["every perturbation"]),
])
def test_bad_explicit_lists_are_clear(tiny_processed, spec, field, words):
    spec = {"kind": "heldout_perturbations", **spec}
    with pytest.raises(InputError) as info:
        make_split(tiny_processed.obs, spec, seed=0, where="cfg.yaml: datasets.tiny")
    message = str(info.value)
    assert message.startswith(f"cfg.yaml: datasets.tiny: {field}") and "Fix:" in message
    for word in words:
        assert word in message, (word, message)


def test_bad_list_files_name_the_file(tmp_path, tiny_processed):
    where = "cfg.yaml: datasets.tiny"
    many = tmp_path / "many.csv"
    many.write_text("target_gene\n" + "".join(f"X{i}\n" for i in range(12)) + "G1\n")
    with pytest.raises(InputError) as info:
        make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                        "test_perturbations_file": str(many)}, 0, where)
    message = str(info.value)
    assert str(many) in message and "split.test_perturbations_file" in message
    assert "12 of 13" in message and "'X7'" in message and "'X8'" not in message
    assert "and 4 more" in message and "Fix:" in message
    control = tmp_path / "control.txt"
    control.write_text("G1\ncontrol\n")
    with pytest.raises(InputError, match="control label") as info:
        make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                        "test_perturbations": ["G3"],
                                        "exclude_perturbations_file": str(control)}, 0, where)
    assert str(control) in str(info.value)
    for path, text in [("absent.csv", None), ("empty.csv", "# nothing\n\n"),
                       ("header.csv", "target_gene,n_cells\n")]:
        if text is not None:
            (tmp_path / path).write_text(text)
        with pytest.raises(InputError) as info:
            make_split(tiny_processed.obs, {"kind": "heldout_perturbations",
                                            "test_perturbations_file": str(tmp_path / path)},
                       0, where)
        assert str(tmp_path / path) in str(info.value) and "Fix:" in str(info.value)


def test_list_keys_belong_to_heldout_perturbations(tiny_processed):
    with pytest.raises(InputError, match="split.exclude_perturbations"):
        make_split(tiny_processed.obs, {"kind": "heldout_combinations",
                                        "n_test_combinations": 1,
                                        "exclude_perturbations": ["G1"]}, seed=0)
