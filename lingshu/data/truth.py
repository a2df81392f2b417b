"""The evaluation truth: the held-out cells and the real control cells of their contexts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from lingshu.constants import CONTEXT_COL, PERT_COL, SPLIT_CONTROL_INPUT, SPLIT_TEST
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import read_rows
from lingshu.data.split import Split


def build_truth(adata: ad.AnnData, split: Split) -> ad.AnnData:
    """The evaluation truth: held-out cells plus the test contexts' control input cells.

    adata: the processed data (raw counts; may be backed: only these rows are read).
    Returns log1p(CP10k) float32 CSR with obs ``perturbation``, ``context``,
    ``is_real_control``; the genes are those of the processed data, in its order.
    """
    test = split.rows(SPLIT_TEST, adata.obs_names)
    test_contexts = set(split.cells[CONTEXT_COL].to_numpy()[test])
    ctrl = split.rows(SPLIT_CONTROL_INPUT)
    ctrl = ctrl[np.isin(split.cells[CONTEXT_COL].to_numpy()[ctrl], list(test_contexts))]
    rows = np.concatenate([test, ctrl])
    obs = pd.DataFrame({
        PERT_COL: adata.obs[PERT_COL].astype(str).to_numpy()[rows],
        CONTEXT_COL: adata.obs[CONTEXT_COL].astype(str).to_numpy()[rows],
        "is_real_control": np.r_[np.zeros(test.size, bool), np.ones(ctrl.size, bool)],
    }, index=adata.obs_names[rows])
    truth = ad.AnnData(X=log1p_cp10k(read_rows(adata, rows)), obs=obs,
                       var=pd.DataFrame(index=adata.var_names.copy()))
    made = adata.uns.get("lingshu", {})
    truth.uns["lingshu"] = {"dataset": made.get("dataset", ""), "space": "log1p_cp10k"}
    if "n_cells_no_counts" in made:  # cells preprocessing dropped (the report says how many)
        truth.uns["lingshu"]["n_cells_no_counts"] = int(made["n_cells_no_counts"])
    return truth
