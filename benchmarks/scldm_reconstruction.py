"""scLDM's autoencoder on a pipeline run's cells: reconstruction Pearson and stage costs.

    python benchmarks/scldm_reconstruction.py results/sim_genetic [results/papalexi ...]

For each dataset folder of a finished run, loads ``models/scldm/model.npz`` and prints the
mean per-cell Pearson of log1p(CP10k) counts with their decoded negative-binomial mean, for
the held-out truth cells (perturbations or combinations the model never saw, in_test) and for
a sample of training cells, plus the wall time and peak memory of the scLDM jobs from
Snakemake's benchmark files. A diagnostic only: the held-out cells are read here, never by
the model's training or prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from lingshu.data.split import read_split
from lingshu.models.harness import load_model

MAX_CELLS = 2000


def _sample(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(MAX_CELLS, rows.size), replace=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="results/<dataset> folders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for ds in args.datasets:
        model = load_model(str(ds / "models" / "scldm" / "model.npz"))
        adata = ad.read_h5ad(ds / "processed.h5ad")
        split = read_split(ds / "split")
        cells = split.cells.loc[adata.obs_names]
        rng = np.random.default_rng(args.seed)
        out = {}
        for name, col in (("held-out (in_test)", "in_test"), ("training", "in_train")):
            rows = _sample(np.flatnonzero(cells[col].to_numpy()), rng)
            out[name] = (model.reconstruction_pearson(sp.csr_matrix(adata.X[rows])), rows.size)
        costs = []
        for job in ("pretrain_scldm", "fit_scldm", "predict_scldm"):
            path = ds / "benchmarks" / f"{job}.tsv"
            if path.exists():
                row = pd.read_csv(path, sep="\t").iloc[-1]
                costs.append(f"{job} {row['s']:.1f} s, peak {row['max_rss']:.0f} MB")
        print(f"{ds.name}: reconstruction Pearson " + "; ".join(
            f"{k} {v:.4f} ({n} cells)" for k, (v, n) in out.items()))
        if costs:
            print(f"  {'; '.join(costs)}")


if __name__ == "__main__":
    main()
