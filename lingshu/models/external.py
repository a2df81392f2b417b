"""Predictions made outside this pipeline ("bring your own predictions", a ``kind: external``
entry under ``models``): checked against the truth and the split, then written in the format
of :func:`lingshu.models.harness.predict_conditions`, so that they are evaluated and reported
like any model's.

The user's file is read, never modified. It must hold, for every held-out condition (context x
perturbation of the truth's non-control cells), exactly as many cells as the truth has, labelled
by ``obs['perturbation']`` and ``obs['context']``, with every gene of the processed data
(extra genes are dropped; any order). ``values`` says what X holds: raw integer ``counts``
(normalised here to log1p(CP10k)) or ``log1p_cp10k``. Control cells it carries are dropped
(the evaluation adds the real ones). The output records ``external: true``, the source path
and its sha256 in ``uns['lingshu']``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL, TARGET_SUM
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import Split, read_split
from lingshu.errors import InputError, input_error
from lingshu.io import sha256_file, write_h5ad

log = logging.getLogger(__name__)

VALUES = ("counts", "log1p_cp10k")
MAX_SHOWN = 5  # examples an error message names
# log1p(CP10k) is at most log1p(10,000) (one gene holding all of a cell's counts).
LOG1P_MAX = float(np.log1p(TARGET_SUM))
# Integer values declared log1p(CP10k) above this are raw counts beyond doubt.
COUNTS_MIN_MAX = 50
CONDITIONS = "heldout_conditions.tsv"  # the export's table of held-out conditions
FORMAT_HINT = ("see the export's manifest.json (`snakemake export`) for the genes, the obs "
               "columns and the held-out conditions")


def _examples(items: list, n: int = MAX_SHOWN) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _condition(context: str, perturbation: str) -> str:
    return f"context {context!r} x perturbation {perturbation!r}"


def _check_obs(pred: ad.AnnData, label: str) -> pd.DataFrame:
    for col in (PERT_COL, CONTEXT_COL):
        if col not in pred.obs.columns:
            raise input_error(label, f"obs['{col}']",
                              f"column missing (obs has {list(map(str, pred.obs.columns))[:10]})",
                              f"label each predicted cell's condition in obs['{PERT_COL}'] and "
                              f"obs['{CONTEXT_COL}'], as in the export's {CONDITIONS}")
    obs = pred.obs[[CONTEXT_COL, PERT_COL]].astype(str)
    if obs.isin(["nan", "None", ""]).to_numpy().any():
        raise input_error(label, f"obs['{PERT_COL}'] / obs['{CONTEXT_COL}']",
                          "some cells have no label", "label every predicted cell")
    return obs


def _gene_columns(pred: ad.AnnData, genes: pd.Index, label: str) -> np.ndarray:
    """Column of each truth gene in the prediction (extra genes of the prediction dropped)."""
    names = pd.Index(pred.var_names.astype(str))
    if names.has_duplicates:
        dup = names[names.duplicated()].unique().tolist()
        raise input_error(label, "var_names", f"{len(dup)} gene names repeat: "
                          f"{_examples(dup)}", "give each gene one column")
    missing = [g for g in genes if g not in names]
    if missing:
        raise input_error(label, "var_names",
                          f"{len(missing)} of the truth's {len(genes)} genes are missing: "
                          f"{_examples(missing)}",
                          f"predict every gene of the processed data (any order; extra genes "
                          f"are dropped): {FORMAT_HINT}")
    return names.get_indexer(genes)


def expected_conditions(truth: ad.AnnData, split: Split, truth_label: str) -> pd.Series:
    """(context, perturbation) -> number of cells to predict: the truth's held-out cells,
    which must be the split's test conditions (else the truth is stale)."""
    obs = truth.obs[[CONTEXT_COL, PERT_COL]].astype(str)
    obs = obs[obs[PERT_COL] != CONTROL]
    counts = obs.groupby([CONTEXT_COL, PERT_COL], sort=True).size()
    test = split.test_conditions()
    planned = pd.Series(test["n_cells"].astype(int).to_numpy(),
                        index=pd.MultiIndex.from_frame(test[[CONTEXT_COL, PERT_COL]].astype(str)))
    if not counts.sort_index().equals(planned.sort_index()):
        raise input_error(truth_label, "obs", "the held-out cells differ from the split's test "
                          "conditions", "re-run the truth rule after the split (delete the "
                          "truth file; Snakemake writes it again)")
    return counts


def _check_conditions(obs: pd.DataFrame, expected: pd.Series, label: str) -> None:
    found = obs.groupby([CONTEXT_COL, PERT_COL], sort=True).size()
    missing = [k for k in expected.index if k not in found.index]
    if missing:
        raise input_error(label, "obs",
                          f"{len(missing)} of the {len(expected)} held-out conditions have no "
                          f"predicted cells: {_examples([_condition(*k) for k in missing])}",
                          f"predict every held-out condition of the export's {CONDITIONS} "
                          f"(`snakemake export`), with its n_cells cells")
    extra = [k for k in found.index if k not in expected.index]
    if extra:
        raise input_error(label, "obs",
                          f"{len(extra)} condition(s) are not held out: "
                          f"{_examples([_condition(*k) for k in extra])}",
                          "predict the held-out conditions only (a condition the models train "
                          "on, or one the data does not hold, cannot be scored)")
    wrong = [(k, int(found[k]), int(n)) for k, n in expected.items() if found[k] != n]
    if wrong:
        (ctx, pert), got, want = wrong[0]
        more = f" ({len(wrong) - 1} more conditions differ)" if len(wrong) > 1 else ""
        raise input_error(label, "obs",
                          f"{_condition(ctx, pert)}: found {got} predicted cells, expected "
                          f"{want} (the truth's number of held-out cells){more}",
                          f"predict exactly n_cells cells for each condition of the export's "
                          f"{CONDITIONS}")


def _check_values(x: sp.csr_matrix, values: str, label: str, obs: pd.DataFrame) -> None:
    data = x.data

    def first(mask: np.ndarray) -> str:
        row = int(np.searchsorted(x.indptr, np.flatnonzero(mask)[0], side="right") - 1)
        return (f"the first in cell {str(obs.index[row])!r}, "
                f"{_condition(obs[CONTEXT_COL].iloc[row], obs[PERT_COL].iloc[row])}")

    bad = ~np.isfinite(data)
    if bad.any():
        raise input_error(label, "X", f"{int(bad.sum())} values are NaN or infinite "
                          f"({first(bad)})", "write finite values only")
    if data.size and data.min() < 0:
        raise input_error(label, "X", f"{int((data < 0).sum())} values are negative (min "
                          f"{float(data.min()):.4g}, {first(data < 0)})",
                          "write counts or log1p(CP10k), both non-negative")
    if not data.size:
        return
    nonzero = data[data != 0]
    integers = bool(np.all(nonzero == np.round(nonzero)))
    top = float(data.max())
    if values == "counts" and not integers:
        fraction = nonzero[nonzero != np.round(nonzero)]
        looks = ("they look like log1p(CP10k)" if top <= LOG1P_MAX * 1.01
                 else "they look like normalised values, not counts")
        raise input_error(label, "X",
                          f"declared `values: counts`, but holds non-integer values (found max "
                          f"{top:.4g}, e.g. {float(fraction[0]):.4g}): {looks}",
                          "set `values: log1p_cp10k` in the config's entry if they are "
                          "log1p(CP10k), or write raw integer counts")
    if values == "log1p_cp10k":
        if integers and top > COUNTS_MIN_MAX:
            raise input_error(label, "X",
                              f"declared `values: log1p_cp10k`, but holds integers only (found "
                              f"max {top:.4g}): they look like raw counts",
                              "set `values: counts` in the config's entry (the pipeline "
                              "normalises counts to log1p(CP10k)), or write log1p(CP10k)")
        if top > LOG1P_MAX * 1.01:
            raise input_error(label, "X",
                              f"declared `values: log1p_cp10k`, but values reach {top:.4g}, "
                              f"above log1p(10,000) = {LOG1P_MAX:.2f}, the most log1p(CP10k) "
                              f"holds: they look like another normalisation (e.g. log1p CPM) "
                              f"or unnormalised values",
                              "write log1p(counts / library size * 10,000), or raw counts with "
                              "`values: counts`")
        if integers:
            raise input_error(label, "X",
                              f"declared `values: log1p_cp10k`, but holds integers only (found "
                              f"max {top:.4g}): log1p(CP10k) is almost never a whole number; "
                              f"they look like raw counts",
                              "set `values: counts` in the config's entry, or write "
                              "log1p(CP10k)")


def convert_prediction(pred: ad.AnnData, truth: ad.AnnData, split: Split, values: str,
                       label: str, truth_label: str = "truth") -> ad.AnnData:
    """Check an external prediction and return it in the pipeline's prediction format.

    pred: the user's AnnData (not modified). truth, split: the dataset's evaluation truth and
    split. values: ``counts`` or ``log1p_cp10k``. label: names the file in error messages.
    Returns log1p(CP10k) float32 CSR in the truth's gene order, the predicted cells of the
    held-out conditions in the file's order (its control cells dropped), obs ``perturbation``
    and ``context``.
    """
    if values not in VALUES:
        raise input_error(label, "values", f"{values!r} is not one of {list(VALUES)}",
                          "set `values: counts` or `values: log1p_cp10k` in the config's entry")
    if pred.X is None:
        raise input_error(label, "X", "empty (no expression matrix)",
                          "store the predicted expression in X")
    obs = _check_obs(pred, label)
    genes = pd.Index(truth.var_names.astype(str))
    columns = _gene_columns(pred, genes, label)
    keep = (obs[PERT_COL] != CONTROL).to_numpy()
    if not keep.all():
        log.info("%s: dropped %d control cells (the evaluation uses the real ones)", label,
                 int((~keep).sum()))
    obs = obs[keep]
    _check_conditions(obs, expected_conditions(truth, split, truth_label), label)
    rows = np.flatnonzero(keep)
    x = pred.X[rows][:, columns] if len(rows) else pred.X[:0][:, columns]
    x = sp.csr_matrix(x, dtype=np.float64)
    x.eliminate_zeros()
    _check_values(x, values, label, obs)
    x = log1p_cp10k(x) if values == "counts" else x
    out = pd.DataFrame({PERT_COL: obs[PERT_COL].to_numpy(), CONTEXT_COL: obs[CONTEXT_COL].to_numpy()},
                       index=[f"pred_{i}" for i in range(len(obs))])
    return ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=out,
                      var=pd.DataFrame(index=genes))


def external_prediction_job(source: str, values: str, truth: str, split_dir: str, run: str,
                            note: str, out: str) -> None:
    """The ``external_prediction`` rule: the user's prediction file ``source`` -> ``out``."""
    path = Path(source)
    label = f"{source} (models.{run}.path)"
    if not path.is_file():
        raise input_error(label, "file", "does not exist" if not path.exists() else
                          "is not a file", "put the prediction file there, or correct `path:`")
    digest = sha256_file(path)
    try:
        pred = ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise InputError(f"{label}: file: cannot be read as an h5ad ({type(err).__name__}: "
                         f"{err}). Fix: write the predictions with anndata's write_h5ad") from err
    converted = convert_prediction(pred, ad.read_h5ad(truth), read_split(split_dir), values,
                                   label, truth_label=truth)
    converted.uns["lingshu"] = {
        "model": run, "run": run, "sampling": json.dumps({}), "space": "log1p_cp10k",
        "external": True, "source": str(source), "source_sha256": digest,
        "values": values, "note": note or ""}
    write_h5ad(converted, out)
    log.info("%s: %d predicted cells of %d conditions from %s (sha256 %s)", run,
             converted.n_obs, len(converted.obs[[CONTEXT_COL, PERT_COL]].drop_duplicates()), source,
             digest)
