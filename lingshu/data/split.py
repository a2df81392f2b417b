"""Held-out splits: which cells train the models, which are the truth, which are the input.

Two protocols (SPEC 2.3):

- ``heldout_perturbations`` (genetic): the test perturbations are never seen in training, in
  any context. A fraction of each context's control cells is kept out of training and handed
  to the models as the prediction input (the real controls of the evaluation). The test
  perturbations are listed (``test_perturbations`` and/or ``test_perturbations_file``, e.g. the
  Virtual Cell Challenge's official 100 test targets) or drawn; perturbations named in
  ``exclude_perturbations`` / ``exclude_perturbations_file`` (e.g. the challenge's 50 validation
  targets) are neither trained on nor tested: their cells have no role at all.
- ``heldout_combinations`` (stimulation): chosen context x perturbation pairs are held out
  while the perturbation is seen in other contexts and the context's control cells are seen
  in training; by default those same control cells are the prediction input. The pairs are
  listed, drawn at random, or drawn per test context (the cytokine protocol: each test donor
  holds out some of its perturbations and trains on the others).

Both protocols also keep a seeded random ``reference_fraction`` of the training cells (at most
``max_reference_cells``) out of all training: the real cells that generated cells are compared
with (SPEC 2.2). They are drawn uniformly from every cell that would otherwise train, control
inputs that train included, so that the reference has the training cells' composition and a
sample of real training cells differs from it by sampling noise only (a reference without those
controls differed in cell-type shares: 0.117 TVD on ``sim_stimulation``, 0.077 now at 300
cells). A control input drawn into the reference stays a control input: it is a real cell
handed to the models at prediction, and no model trains on it.

The split is written as two tables: ``cells.tsv`` (one row per cell, four boolean roles) and
``conditions.tsv`` (one row per context x perturbation with its role and cell count; an
excluded perturbation's conditions have the role ``excluded``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lingshu.constants import (
    CONTEXT_COL,
    CONTROL,
    PERT_COL,
    SPLIT_CONTROL_INPUT,
    SPLIT_REFERENCE,
    SPLIT_TEST,
    SPLIT_TRAIN,
)
from lingshu.errors import InputError, input_error


@dataclass(frozen=True)
class Split:
    """A split of one dataset.

    cells: indexed by obs_name; columns context, perturbation, in_train, in_test, in_control_input,
        in_reference.
    conditions: one row per (context, perturbation): n_cells, role in {train, test, control,
        excluded}.
    """

    cells: pd.DataFrame
    conditions: pd.DataFrame

    def test_conditions(self) -> pd.DataFrame:
        """The held-out (context, perturbation) pairs with their number of truth cells."""
        test = self.conditions[self.conditions["role"] == "test"]
        return test[[CONTEXT_COL, PERT_COL, "n_cells"]].reset_index(drop=True)

    def rows(self, column: str, obs_names: pd.Index | None = None) -> np.ndarray:
        """Row numbers of the cells whose role ``column`` (``in_train``, ...) is True.

        obs_names: the processed data's cell names, checked against the split's so that a
        split of other data is never applied by position.
        """
        if obs_names is not None and not pd.Index(obs_names).equals(pd.Index(self.cells.index)):
            raise ValueError("the split does not match the processed data (cell names differ); "
                             "re-run the split rule after preprocessing")
        return np.flatnonzero(self.cells[column].to_numpy())

    def reference_rows(self) -> np.ndarray:
        """Row numbers of the reference cells (the real side of generation fidelity)."""
        return self.rows(SPLIT_REFERENCE)


def make_split(obs: pd.DataFrame, spec: dict, seed: int, where: str = "config") -> Split:
    """Split cells of a processed dataset.

    obs: the processed obs with canonical ``perturbation`` and ``context`` columns.
    spec: the dataset entry's ``split`` block (see workflow/schemas/config.schema.yaml).
    where: named in error messages (e.g. ``config.yaml: datasets.kang.split``).
    """
    kind = spec["kind"]
    rng = np.random.default_rng(seed)
    perts = obs[PERT_COL].astype(str)
    contexts = obs[CONTEXT_COL].astype(str)
    is_control = (perts == CONTROL).to_numpy()
    excluded: list[str] = []

    if kind == "heldout_perturbations":
        excluded = _excluded_perturbations(perts, spec, where)
        test_mask = _heldout_perturbation_mask(perts, spec, rng, where, excluded)
        default_frac = 0.5
    elif kind == "heldout_combinations":
        given = [k for k in _PERTURBATION_LIST_KEYS if k != "test_perturbations" and spec.get(k)]
        if given:
            raise input_error(where, f"split.{given[0]}",
                              "only the heldout_perturbations protocol takes this key",
                              "use kind: heldout_perturbations, or remove the key")
        test_mask = _heldout_combination_mask(perts, contexts, spec, rng, where)
        default_frac = 0.0
    else:
        raise input_error(where, "split.kind", f"unknown split kind {kind!r}",
                          "use heldout_perturbations or heldout_combinations")

    test_contexts = set(contexts[test_mask])
    control_frac = float(spec.get("control_test_fraction", default_frac))
    in_control_input = np.zeros(len(obs), dtype=bool)
    held_controls = np.zeros(len(obs), dtype=bool)
    for ctx in sorted(test_contexts):
        idx = np.flatnonzero(is_control & (contexts == ctx).to_numpy())
        if idx.size == 0:
            raise input_error(where, "split", f"test context {ctx!r} has no control cells",
                              "hold out conditions only in contexts that have control cells")
        if control_frac > 0:
            # Controls handed to models are kept out of training (SPEC 5, Papalexi protocol).
            n_held = max(1, int(round(control_frac * idx.size)))
            chosen = rng.choice(idx, size=n_held, replace=False)
            held_controls[chosen] = True
            in_control_input[chosen] = True
        else:
            in_control_input[idx] = True

    in_test = test_mask
    in_excluded = perts.isin(excluded).to_numpy()
    in_train = ~in_test & ~held_controls & ~in_excluded
    in_reference = _reference_mask(in_train, spec, rng, where)
    in_train &= ~in_reference
    cells = pd.DataFrame(
        {
            CONTEXT_COL: contexts.to_numpy(),
            PERT_COL: perts.to_numpy(),
            SPLIT_TRAIN: in_train,
            SPLIT_TEST: in_test,
            SPLIT_CONTROL_INPUT: in_control_input,
            SPLIT_REFERENCE: in_reference,
        },
        index=pd.Index(obs.index.astype(str), name="cell"),
    )
    conditions = _condition_table(cells, excluded)
    check_no_leakage(cells, kind, excluded)
    return Split(cells=cells, conditions=conditions)


DEFAULT_REFERENCE_FRACTION = 0.1
DEFAULT_MAX_REFERENCE_CELLS = 1000


def _reference_mask(eligible: np.ndarray, spec: dict, rng, where: str) -> np.ndarray:
    """A seeded uniform draw of ``reference_fraction`` of the eligible cells (at most
    ``max_reference_cells``): real cells of training conditions that no model trains on."""
    frac = float(spec.get("reference_fraction", DEFAULT_REFERENCE_FRACTION))
    cap = int(spec.get("max_reference_cells", DEFAULT_MAX_REFERENCE_CELLS))
    if not 0 <= frac < 1:
        raise input_error(where, "split.reference_fraction", f"{frac} is outside [0, 1)",
                          "use e.g. 0.1, or 0 for no generation-fidelity reference")
    idx = np.flatnonzero(eligible)
    n = min(int(round(frac * idx.size)), cap)
    mask = np.zeros(eligible.size, dtype=bool)
    if n > 0:
        mask[rng.choice(idx, size=n, replace=False)] = True
    return mask


_PERTURBATION_LIST_KEYS = ("test_perturbations", "test_perturbations_file",
                           "exclude_perturbations", "exclude_perturbations_file")
# Columns of a CSV/TSV perturbation list that hold the labels, in order of preference (the
# Virtual Cell Challenge's pert_counts_*.csv files have ``target_gene``).
LABEL_COLUMNS = ("target_gene", "perturbation")
MAX_LISTED = 8  # missing labels an error message names


def read_perturbation_list(path: str | Path, where: str = "config",
                           field: str = "split.test_perturbations_file") -> list[str]:
    """The perturbation labels of a list file, in file order, without duplicates.

    Either one label per line (blank lines and ``#`` comments skipped), or a CSV/TSV table with
    a header whose ``target_gene`` or ``perturbation`` column (else its first column) holds the
    labels. A first line with a comma or tab, or one that is exactly a known column name, is
    read as a header. A relative path is relative to the working directory.
    """
    file = Path(path)
    named = f"{where}: {field} ({path})"
    if not file.is_file():
        raise input_error(named, "file", f"not found (looked in {file.resolve().parent})",
                          "place the file there, or give its path (relative paths are "
                          "relative to the directory Snakemake runs in)")
    lines = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise input_error(named, "file", "holds no perturbation labels",
                          "list one label per line, or a CSV with a target_gene column")
    first = lines[0]
    delimiter = "\t" if "\t" in first else ","
    header = next(csv.reader([first], delimiter=delimiter))
    if len(header) > 1 or header[0].strip() in LABEL_COLUMNS:
        columns = [c.strip() for c in header]
        column = next((c for c in LABEL_COLUMNS if c in columns), columns[0])
        at = columns.index(column)
        labels = [row[at].strip() if at < len(row) else ""
                  for row in csv.reader(lines[1:], delimiter=delimiter)]
        if not all(labels):
            raise input_error(named, column, "some rows have no label in this column",
                              "fill every row's label, or remove the empty rows")
    else:
        labels = [line.strip().strip('"').strip("'") for line in lines]
    if not labels:
        raise input_error(named, "file", "has a header but no labels",
                          "list the perturbations below the header")
    return list(dict.fromkeys(labels))


def _listed_perturbations(perts: pd.Series, spec: dict, key: str, where: str) -> list[str]:
    """The labels under ``key`` (a list) and ``key + '_file'`` (a file), checked against the
    data: every label must be a perturbation present in it, and none the control."""
    present = set(perts) - {CONTROL}
    labels: list[str] = []
    for field in (key, f"{key}_file"):
        value = spec.get(field)
        if not value:
            continue
        if field == key:
            listed, named = [str(p) for p in value], f"split.{field}"
            fix_source = "the list"
        else:
            listed = read_perturbation_list(value, where, f"split.{field}")
            named, fix_source = f"split.{field} ({value})", f"the file {value}"
        if CONTROL in listed:
            raise input_error(where, named, f"names the control label {CONTROL!r}",
                              f"remove the control label from {fix_source}: control cells "
                              "are never held out or excluded")
        missing = [p for p in listed if p not in present]
        if missing:
            shown = ", ".join(map(repr, missing[:MAX_LISTED]))
            more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            example = sorted(present)[:MAX_LISTED]
            data_hint = ("; the data holds no cells of them (e.g. the Virtual Cell Challenge's "
                         "adata_Training.h5ad holds the training targets only)"
                         if key == "test_perturbations" else "")
            extra = (", or remove the key if the data holds none of these cells"
                     if key == "exclude_perturbations" else "")
            raise input_error(where, named,
                              f"{len(missing)} of {len(listed)} labels are not among the "
                              f"dataset's {len(present)} perturbations: {shown}{more} "
                              f"(present e.g. {example}){data_hint}",
                              "use labels exactly as in the data's perturbation column, and a "
                              f"source file that holds cells of every listed perturbation{extra}")
        labels += listed
    return sorted(set(labels))


def _excluded_perturbations(perts: pd.Series, spec: dict, where: str) -> list[str]:
    return _listed_perturbations(perts, spec, "exclude_perturbations", where)


def _heldout_perturbation_mask(perts: pd.Series, spec: dict, rng, where: str,
                               excluded: list[str] | None = None) -> np.ndarray:
    excluded = excluded or []
    available = sorted(set(perts) - {CONTROL} - set(excluded))
    explicit = [k for k in ("test_perturbations", "test_perturbations_file") if spec.get(k)]
    if explicit and spec.get("n_test_perturbations"):
        raise input_error(where, "split.n_test_perturbations",
                          f"given together with split.{explicit[0]}",
                          "either list the test perturbations or have n_test_perturbations "
                          "drawn, not both")
    if explicit:
        test = _listed_perturbations(perts, spec, "test_perturbations", where)
        both = sorted(set(test) & set(excluded))
        if both:
            raise input_error(where, f"split.{explicit[0]}",
                              f"{len(both)} perturbations are both test and excluded: "
                              f"{both[:MAX_LISTED]}",
                              "a perturbation is either held out for testing or excluded; "
                              "remove it from one of the lists")
    elif spec.get("n_test_perturbations"):
        n = int(spec["n_test_perturbations"])
        if n >= len(available):
            raise input_error(where, "split.n_test_perturbations",
                              f"{n} requested but only {len(available)} perturbations exist"
                              + (" besides the excluded ones" if excluded else ""),
                              "hold out fewer perturbations so that some remain for training")
        test = sorted(rng.choice(available, size=n, replace=False).tolist())
    else:
        raise input_error(where, "split", "no test perturbations given",
                          "set split.test_perturbations (a list), split.test_perturbations_file "
                          "or split.n_test_perturbations")
    if len(test) >= len(available):
        raise input_error(where, "split.test_perturbations", "every perturbation is held out"
                          + (" or excluded" if excluded else ""),
                          "keep at least one perturbation for training")
    return perts.isin(test).to_numpy()


def _heldout_combination_mask(perts: pd.Series, contexts: pd.Series, spec: dict, rng,
                              where: str) -> np.ndarray:
    pairs = pd.DataFrame({"c": contexts.to_numpy(), "p": perts.to_numpy()})
    present = set(map(tuple, pairs.drop_duplicates().to_numpy()))
    if spec.get("test_combinations"):
        combos = [(c["context"], c["perturbation"]) for c in spec["test_combinations"]]
        missing = [c for c in combos if c not in present]
        if missing:
            raise input_error(where, "split.test_combinations",
                              f"{missing} not present in the data",
                              "name context and perturbation labels exactly as in the data")
    elif spec.get("n_test_combinations"):
        candidates = sorted(c for c in present if c[1] != CONTROL)
        n = int(spec["n_test_combinations"])
        order = rng.permutation(len(candidates))
        combos = []
        for i in order:
            # Keep each chosen perturbation seen in at least one other context.
            trial = combos + [candidates[i]]
            if _every_pert_still_seen(trial, present):
                combos = trial
            if len(combos) == n:
                break
        if len(combos) < n:
            raise input_error(where, "split.n_test_combinations",
                              f"only {len(combos)} combinations can be held out while every "
                              "perturbation stays seen in some context",
                              "hold out fewer combinations")
    elif spec.get("test_contexts") or spec.get("n_test_contexts"):
        combos = _per_context_combinations(pairs, present, spec, rng, where)
    else:
        raise input_error(where, "split", "no test combinations given",
                          "set split.test_combinations (context/perturbation pairs), "
                          "split.n_test_combinations, or split.test_contexts (or "
                          "n_test_contexts) with n_test_perturbations_per_context")
    if any(p == CONTROL for _, p in combos):
        raise input_error(where, "split.test_combinations", "a control condition is held out",
                          "hold out perturbed conditions only")
    if not _every_pert_still_seen(combos, present):
        raise input_error(where, "split.test_combinations",
                          "some held-out perturbation is held out in every context",
                          "leave each perturbation seen in at least one context, or use "
                          "kind: heldout_perturbations")
    combo_index = pd.MultiIndex.from_tuples(combos)
    return pd.MultiIndex.from_arrays([pairs["c"], pairs["p"]]).isin(combo_index)


def _per_context_combinations(pairs: pd.DataFrame, present: set, spec: dict, rng,
                              where: str) -> list[tuple[str, str]]:
    """The cytokine protocol (SPEC 1.5, 2.3): in each test context (a donor or cell type), a
    seeded draw of ``n_test_perturbations_per_context`` of its perturbations is held out; the
    context's other perturbations, its controls and every other context train."""
    with_perts = sorted({c for c, p in present if p != CONTROL})
    if spec.get("test_contexts"):
        test_contexts = list(dict.fromkeys(map(str, spec["test_contexts"])))
        unknown = [c for c in test_contexts if c not in with_perts]
        if unknown:
            raise input_error(where, "split.test_contexts",
                              f"{unknown} are not contexts with perturbed cells "
                              f"(e.g. {with_perts[:8]})",
                              "name contexts exactly as in the data's context column")
    else:
        n = int(spec["n_test_contexts"])
        if n >= len(with_perts):
            raise input_error(where, "split.n_test_contexts",
                              f"{n} requested but only {len(with_perts)} contexts have "
                              "perturbed cells", "hold out fewer contexts")
        test_contexts = sorted(rng.choice(with_perts, size=n, replace=False).tolist())
    k = spec.get("n_test_perturbations_per_context")
    if not k:
        raise input_error(where, "split.n_test_perturbations_per_context", "not set",
                          "say how many perturbations each test context holds out")
    combos = []
    for ctx in test_contexts:
        perts = sorted(p for c, p in present if c == ctx and p != CONTROL)
        if int(k) >= len(perts):
            raise input_error(where, "split.n_test_perturbations_per_context",
                              f"{k} requested but context {ctx!r} has {len(perts)} "
                              "perturbations", "leave at least one seen in each test context")
        combos += [(ctx, p) for p in sorted(rng.choice(perts, size=int(k), replace=False))]
    return combos


def _every_pert_still_seen(combos, present) -> bool:
    held = set(combos)
    for _, p in held:
        if not any(q == p and (c, q) not in held for c, q in present):
            return False
    return True


def _condition_table(cells: pd.DataFrame, excluded=()) -> pd.DataFrame:
    grouped = cells.groupby([CONTEXT_COL, PERT_COL], sort=True)
    table = grouped.agg(n_cells=(SPLIT_TRAIN, "size"), n_train=(SPLIT_TRAIN, "sum"),
                        n_test=(SPLIT_TEST, "sum"),
                        n_control_input=(SPLIT_CONTROL_INPUT, "sum")).reset_index()
    role = np.where(table[PERT_COL] == CONTROL, "control",
                    np.where(table["n_test"] > 0, "test",
                             np.where(table[PERT_COL].isin(list(excluded)), "excluded",
                                      "train")))
    table["role"] = role
    table.loc[table["role"] == "test", "n_cells"] = table["n_test"]
    return table[[CONTEXT_COL, PERT_COL, "role", "n_cells", "n_train", "n_test",
                  "n_control_input"]]


def check_no_leakage(cells: pd.DataFrame, kind: str, excluded=()) -> None:
    """Raise if any held-out information reaches training.

    - no cell is both training and truth;
    - no held-out (context, perturbation) pair has a training cell;
    - for held-out perturbations, no cell of a test perturbation trains, in any context;
    - control input cells kept out of training stay out;
    - cells of ``excluded`` perturbations have no role at all.

    Cells with no role (excluded perturbations) are otherwise allowed.
    """
    both = cells[SPLIT_TRAIN] & cells[SPLIT_TEST]
    if both.any():
        raise InputError(f"split leakage: {int(both.sum())} cells are both training and test")
    if SPLIT_REFERENCE in cells:
        ref = cells[SPLIT_REFERENCE] & (cells[SPLIT_TRAIN] | cells[SPLIT_TEST])
        if ref.any():
            raise InputError(f"split leakage: {int(ref.sum())} generation-reference cells also "
                             "train or are test truth")
    test_pairs = set(map(tuple, cells.loc[cells[SPLIT_TEST], [CONTEXT_COL, PERT_COL]]
                         .drop_duplicates().to_numpy()))
    train_pairs = set(map(tuple, cells.loc[cells[SPLIT_TRAIN], [CONTEXT_COL, PERT_COL]]
                          .drop_duplicates().to_numpy()))
    if test_pairs & train_pairs:
        raise InputError(f"split leakage: held-out conditions in training: "
                         f"{sorted(test_pairs & train_pairs)[:5]}")
    if kind == "heldout_perturbations":
        test_perts = {p for _, p in test_pairs}
        seen = set(cells.loc[cells[SPLIT_TRAIN], PERT_COL])
        if test_perts & seen:
            raise InputError(f"split leakage: held-out perturbations in training: "
                             f"{sorted(test_perts & seen)[:5]}")
    if (cells[SPLIT_TEST] & (cells[PERT_COL] == CONTROL)).any():
        raise InputError("split error: control cells marked as test truth")
    if len(excluded):
        roles = [c for c in (SPLIT_TRAIN, SPLIT_TEST, SPLIT_CONTROL_INPUT, SPLIT_REFERENCE)
                 if c in cells]
        used = cells[PERT_COL].isin(list(excluded)) & cells[roles].any(axis=1)
        if used.any():
            raise InputError(f"split leakage: {int(used.sum())} cells of excluded "
                             "perturbations have a role (train, test, control input or "
                             "reference)")


CELLS_FILE, CONDITIONS_FILE = "cells.tsv", "conditions.tsv"


def read_split(folder: str | Path) -> Split:
    """Read the split folder written by :func:`write_split` (``cells.tsv``, ``conditions.tsv``)."""
    from lingshu.io import read_table

    folder = Path(folder)
    for name in (CELLS_FILE, CONDITIONS_FILE):
        if not (folder / name).is_file():
            raise input_error(folder, name, "missing from the split folder",
                              "run the split rule (or pass the folder it wrote)")
    cells = read_table(folder / CELLS_FILE).set_index("cell")
    if SPLIT_REFERENCE not in cells:  # a split written before generation references existed
        cells[SPLIT_REFERENCE] = False
    for col in (SPLIT_TRAIN, SPLIT_TEST, SPLIT_CONTROL_INPUT, SPLIT_REFERENCE):
        cells[col] = cells[col].astype(bool)
    cells[CONTEXT_COL] = cells[CONTEXT_COL].astype(str)
    cells[PERT_COL] = cells[PERT_COL].astype(str)
    conditions = read_table(folder / CONDITIONS_FILE)
    conditions[CONTEXT_COL] = conditions[CONTEXT_COL].astype(str)
    conditions[PERT_COL] = conditions[PERT_COL].astype(str)
    return Split(cells=cells, conditions=conditions)


def write_split(split: Split, folder: str | Path) -> None:
    """Write both tables into ``folder``, each atomically."""
    from lingshu.io import write_table

    folder = Path(folder)
    write_table(split.cells.reset_index(), folder / CELLS_FILE)
    write_table(split.conditions, folder / CONDITIONS_FILE)
