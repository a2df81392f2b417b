"""Export of a frozen split, for models run outside this pipeline (``snakemake export``).

Per dataset, ``results/<dataset>/export/`` receives what a model may see, and nothing else:

- ``train_counts.h5ad``: the training cells' raw counts (obs ``perturbation``, ``context``,
  ``batch``);
- ``heldout_conditions.tsv``: the held-out conditions (``context``, ``perturbation``, and
  ``n_cells``, the number of cells to predict);
- ``control_input.h5ad``: the control cells of each held-out context that models predict from
  (raw counts);
- ``features.tsv``: the perturbation features every model gets (from training cells only);
- ``manifest.json``: the sha256 of each of these files and of the split files, the dataset,
  the split's seed and the format a prediction must have to be scored (a ``kind: external``
  model entry, :mod:`lingshu.models.external`).

Held-out truth cells and cells of excluded perturbations are never written; reference cells
only where they are control inputs (a control input that trains may be drawn into the
reference), as every model in the pipeline gets them. Every file is written atomically, the
manifest last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from lingshu.constants import (
    BATCH_COL,
    CONTEXT_COL,
    PERT_COL,
    SPLIT_CONTROL_INPUT,
    SPLIT_TEST,
    SPLIT_TRAIN,
)
from lingshu.data.rows import as_count_rows, rows_on_demand
from lingshu.data.split import CELLS_FILE, CONDITIONS_FILE, Split, read_split
from lingshu.io import atomic_path, sha256_file, write_h5ad_streaming, write_json, write_table

TRAIN_FILE = "train_counts.h5ad"
CONTROL_FILE = "control_input.h5ad"
CONDITIONS_OUT = "heldout_conditions.tsv"
FEATURES_FILE = "features.tsv"
MANIFEST = "manifest.json"
EXPORT_FILES = (TRAIN_FILE, CONTROL_FILE, CONDITIONS_OUT, FEATURES_FILE)


def _write_counts(adata: ad.AnnData, rows: np.ndarray, path: Path, dataset: str,
                  role: str) -> None:
    """The raw counts of ``rows`` with their labels, streamed block by block."""
    cols = [c for c in (PERT_COL, CONTEXT_COL, BATCH_COL) if c in adata.obs]
    obs = adata.obs.iloc[rows][cols].astype(str)
    obs.index = adata.obs_names[rows].astype(str)
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    counts = as_count_rows(rows_on_demand(adata, rows))
    with atomic_path(path) as tmp:
        write_h5ad_streaming(tmp, obs, var, (block for _, block in counts.blocks()),
                             uns={"lingshu": {"dataset": dataset, "role": role,
                                              "values": "counts"}},
                             dtype=counts.dtype)


def prediction_format(genes: pd.Index, conditions: pd.DataFrame) -> dict:
    """What a prediction file must hold to be scored (the manifest's ``prediction_format``)."""
    return {
        "file": "an h5ad (AnnData) file; a `kind: external` entry under `models` points at it",
        "genes": [str(g) for g in genes],
        "genes_rule": "every one of these genes as var_names (the processed data's order; any "
                      "order is accepted, extra genes are dropped)",
        "obs_columns": {PERT_COL: "the held-out condition's perturbation label",
                        CONTEXT_COL: "its context label"},
        "cells": f"for each row of {CONDITIONS_OUT}, exactly n_cells predicted cells "
                 f"({int(conditions['n_cells'].sum())} in all) and no other condition; "
                 "control cells are dropped (the evaluation adds the real ones)",
        "values": {"counts": "raw integer counts (declare `values: counts`; normalised to "
                             "log1p(CP10k) by the pipeline)",
                   "log1p_cp10k": "log1p(counts / library size * 10,000) (declare "
                                  "`values: log1p_cp10k`)"},
        "finite_non_negative": True,
        "config_entry": {"kind": "external", "path": "preds/{dataset}.h5ad",
                         "values": "counts | log1p_cp10k", "note": "optional line for the report"},
    }


def export_split(adata: ad.AnnData, split: Split, split_dir: str | Path, features: str | Path,
                 dataset: str, seed: int, outdir: str | Path) -> dict:
    """Write the export folder of one dataset (see the module); return the manifest.

    adata: the processed data (raw counts; may be backed: only the exported rows are read).
    split_dir: the split folder (its files are hashed into the manifest).
    seed: the split's seed (recorded).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    train = split.rows(SPLIT_TRAIN, adata.obs_names)
    conditions = split.test_conditions()
    contexts = split.cells[CONTEXT_COL].to_numpy()
    control = split.rows(SPLIT_CONTROL_INPUT)
    control = control[np.isin(contexts[control], conditions[CONTEXT_COL].astype(str).unique())]
    held_out = split.cells[SPLIT_TEST].to_numpy()
    if held_out[train].any() or held_out[control].any():  # make_split forbids it; never export
        raise ValueError("export: held-out truth cells among the exported cells")

    _write_counts(adata, train, out / TRAIN_FILE, dataset, "train")
    _write_counts(adata, control, out / CONTROL_FILE, dataset, "control_input")
    write_table(conditions[[CONTEXT_COL, PERT_COL, "n_cells"]], out / CONDITIONS_OUT)
    with atomic_path(out / FEATURES_FILE) as tmp:
        shutil.copyfile(features, tmp)

    split_dir = Path(split_dir)
    manifest = {
        "dataset": dataset,
        "seed": int(seed),
        "files": {
            TRAIN_FILE: {"sha256": sha256_file(out / TRAIN_FILE), "n_cells": int(train.size),
                         "what": "raw counts of the training cells (obs perturbation, "
                                 "context, batch)"},
            CONTROL_FILE: {"sha256": sha256_file(out / CONTROL_FILE),
                           "n_cells": int(control.size),
                           "what": "raw counts of the control cells of each held-out context: "
                                   "what models predict from"},
            CONDITIONS_OUT: {"sha256": sha256_file(out / CONDITIONS_OUT),
                             "n_conditions": int(len(conditions)),
                             "what": "the held-out conditions: context, perturbation, n_cells "
                                     "to predict"},
            FEATURES_FILE: {"sha256": sha256_file(out / FEATURES_FILE),
                            "what": "the perturbation features every model gets (from "
                                    "training cells only)"},
        },
        "split": {name: sha256_file(split_dir / name) for name in (CELLS_FILE, CONDITIONS_FILE)},
        "prediction_format": prediction_format(adata.var_names, conditions),
    }
    write_json(manifest, out / MANIFEST)
    return manifest


def export_job(processed: str, split_dir: str, features: str, dataset: str, seed: int,
               outdir: str) -> None:
    """The ``export_dataset`` rule: one dataset's export folder."""
    adata = ad.read_h5ad(processed, backed="r")
    export_split(adata, read_split(split_dir), split_dir, features, dataset, seed, outdir)
