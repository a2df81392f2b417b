"""Is Lingshu-Cell calibrated where it has most data? Its control cells against the real ones.

    python benchmarks/calibration.py --results results --datasets sim_genetic sim_stimulation

For each dataset and context, the fitted model (``results/<dataset>/models/lingshu/model.npz``)
samples ``--cells`` cells of the *control* condition (its own sampler with the model's default
sampling settings, or ``--sampling``'s, e.g. a config's ``stratified: true``; guidance has no
effect, since the condition is the one guided against), and
the script compares them with every real control cell of that context in ``processed.h5ad``
(most of them training cells: this is the condition the model saw most):

- library size (total counts per cell): median and coefficient of variation, real vs sampled;
- MAE of the gene means in log1p(CP10k) (cell-eval's MAE, on one condition), beside the MAE of
  a resample of as many real control cells (with replacement): what sampling noise alone costs;
- the signed error of those means on the genes in the lowest half, the 50-90% band and the
  top 10% of real mean expression.

A model whose cells had the real cells' distribution would score the resample's MAE and no
signed error. Every held-out condition is sampled by the same network, so an error here is one
it starts from. Nothing here is a test; it measures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from lingshu.constants import CONTROL
from lingshu.data.normalize import dense64, log1p_cp10k
from lingshu.io import write_table
from lingshu.models.harness import load_model
from lingshu.models.mddm.model import draw_library, log_library_of_counts

TIERS = (("low half", 0.0, 0.5), ("50-90%", 0.5, 0.9), ("top 10%", 0.9, 1.0))


def sample_control_counts(model, context: str, n_cells: int, seed: int,
                          controls=None) -> np.ndarray:
    """(n_cells, n_genes) raw counts of the control condition of ``context``, drawn by the
    model's own sampler and settings (guidance off: the condition is the one guided against).
    ``controls``: raw counts of real control cells, whose library sizes a network with
    ``library_size`` is given (drawn as prediction draws them)."""
    cond = model.condition_tensors(context, CONTROL)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    library = None
    if model.net_cfg.library_size:
        if controls is None:
            raise ValueError("calibration: this model takes library sizes; pass `controls`")
        library = draw_library(log_library_of_counts(controls), n_cells,
                               np.random.default_rng(seed))
    return model.sample_counts(cond, cond, n_cells, gen, guidance=0.0,
                               library=library).astype(np.float64)


def compare(real: np.ndarray, fake: np.ndarray, rng: np.random.Generator) -> dict:
    """The figures of the module docstring for real and sampled raw counts (cells x genes)."""
    real_log, fake_log = dense64(log1p_cp10k(real)), dense64(log1p_cp10k(fake))
    resample = real_log[rng.integers(0, real.shape[0], fake.shape[0])]
    level = real_log.mean(0)
    error = fake_log.mean(0) - level
    lib_real, lib_fake = real.sum(1), fake.sum(1)
    row = {"real_cells": real.shape[0], "sampled_cells": fake.shape[0],
           "library_median_real": float(np.median(lib_real)),
           "library_median_sampled": float(np.median(lib_fake)),
           "library_cv_real": float(lib_real.std() / lib_real.mean()),
           "library_cv_sampled": float(lib_fake.std() / lib_fake.mean()),
           "mae": float(np.abs(error).mean()),
           "mae_resample": float(np.abs(resample.mean(0) - level).mean())}
    for name, lo, hi in TIERS:
        a, b = np.quantile(level, [lo, hi])
        genes = (level >= a) & (level <= b) if lo == 0.0 else (level > a) & (level <= b)
        row[f"signed {name}"] = float(error[genes].mean())
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--cells", type=int, default=600, help="sampled cells per context (600)")
    parser.add_argument("--contexts", type=int, default=None,
                        help="at most this many contexts per dataset (sorted; default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling", default="{}",
                        help='the model\'s sampling settings as JSON, as a run gives them, e.g. '
                             '\'{"stratified": true}\' (default: the model\'s defaults)')
    parser.add_argument("--out", help="also write the table here (TSV)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for ds in args.datasets:
        res = Path(args.results) / ds
        processed = ad.read_h5ad(res / "processed.h5ad", backed="r")
        model = load_model(str(res / "models" / "lingshu" / "model.npz"),
                           sampling=json.loads(args.sampling))
        obs = processed.obs
        contexts = sorted(map(str, obs["context"].unique()))[:args.contexts]
        for i, ctx in enumerate(contexts):
            rows_ctx = ((obs["perturbation"] == CONTROL) & (obs["context"].astype(str) == ctx)).to_numpy()
            if not rows_ctx.any() or ctx not in model.contexts:
                continue
            real = dense64(processed[np.flatnonzero(rows_ctx)].X)
            fake = sample_control_counts(model, ctx, args.cells, args.seed + i, real)
            rows.append({"dataset": ds, "context": ctx,
                         **compare(real, fake, np.random.default_rng([args.seed, i]))})
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print("Lingshu-Cell's sampled control cells against the real ones (log1p(CP10k) means; "
              "signed: sampled - real)")
        print(table.round(3).to_string(index=False))
    if args.out:
        write_table(table, args.out)


if __name__ == "__main__":
    main()
