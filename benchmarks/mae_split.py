"""Where each model's MAE comes from: the genes a held-out condition changes, or the rest.

    python benchmarks/mae_split.py --results results --datasets sim_genetic sim_stimulation

MAE (cell-eval's, the VCC's) is the mean over genes of |predicted mean - true mean| in
log1p(CP10k), per held-out condition. ``control_mean`` predicts every gene at its context's
control level, which is exactly right for the genes a condition leaves alone and wrong by the
whole effect for the genes it changes. This script splits every model's MAE, per condition
and then averaged over conditions, into the ``--top`` share of genes whose true mean moves
most from the context's real control cells (the truth file's) and the rest, and adds:

- a ``[perfect sampler]`` row: what a model that samples as many cells as the truth holds
  from the true distribution pays for its cells' sampling noise alone
  (:func:`lingshu.evaluate.sampler_gene_error`, the data ceiling's MAE; a model that predicts
  means pays none of it);
- ``signed``: the mean of (predicted - true) over genes, a level bias;
- a ``[quantiser round trip]`` row: the MAE of the truth's cells against the same cells'
  counts (from ``processed.h5ad``) quantised to Lingshu-Cell's tokens and mapped back to
  counts (bin centres), what the token vocabulary alone costs a model that samples tokens
  (counts below 100 are exact, so it is tiny where they dominate);
- ``own_context``: the share of a model's predicted cells that lie nearer (Euclidean, in
  log1p(CP10k)) to the mean of their own context's real control cells than to any other
  context's (from ``processed.h5ad``, every context of the dataset): 1 for cells of the right
  cell type; a model that carries one context's cell type into another's combinations pays it
  on every marker gene (the truth's own cells get a row too).

It reads ``results/<dataset>/truth.h5ad`` and every ``results/<dataset>/predictions/*.h5ad``
(or ``--models``), prints one table and writes it to ``--out`` when given. Nothing here is a
test; it measures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from lingshu.constants import CONTROL
from lingshu.data.normalize import dense64, log1p_cp10k
from lingshu.evaluate import sampler_gene_error
from lingshu.io import write_table
from lingshu.tokens import dequantize_tokens, quantize_counts


def _mean_of(adata: ad.AnnData, x: np.ndarray, pert: str, ctx: str) -> np.ndarray:
    rows = ((adata.obs["perturbation"] == pert) & (adata.obs["context"] == ctx)).to_numpy()
    return x[rows].mean(0)


def split_mae(truth: ad.AnnData, pred: ad.AnnData, top: float) -> dict[str, float]:
    """Averages over the prediction's conditions of MAE, MAE on the ``top`` share of most
    changed genes, MAE on the rest and the signed error."""
    t, p = dense64(truth.X), dense64(pred.X)
    out = []
    for (pert, ctx), _ in pred.obs.groupby(["perturbation", "context"], observed=True):
        true = _mean_of(truth, t, pert, ctx)
        ctrl = _mean_of(truth, t, "control", ctx)
        guess = _mean_of(pred, p, pert, ctx)
        change = np.abs(true - ctrl)
        changed = change >= np.quantile(change, 1 - top)
        err = np.abs(guess - true)
        out.append((err.mean(), err[changed].mean(), err[~changed].mean(),
                    (guess - true).mean()))
    return dict(zip(("mae", "mae_changed", "mae_rest", "signed"), np.mean(out, axis=0)))


def control_centroids(processed: ad.AnnData) -> tuple[list[str], np.ndarray]:
    """Every context's mean control cell in log1p(CP10k) of the processed counts."""
    obs = processed.obs
    contexts = sorted(map(str, obs["context"].unique()))
    rows = (obs["perturbation"] == CONTROL).to_numpy()
    x = dense64(log1p_cp10k(processed[rows].X))
    ctx = obs["context"].astype(str).to_numpy()[rows]
    return contexts, np.stack([x[ctx == c].mean(0) for c in contexts])


def own_context_share(cells: ad.AnnData, contexts: list[str], centroids: np.ndarray) -> float:
    """The share of ``cells`` nearest to their own context's centroid, averaged over contexts."""
    x, shares = dense64(cells.X), []
    for ctx, rows in cells.obs.groupby("context", observed=True).indices.items():
        d = ((x[rows, None, :] - centroids[None]) ** 2).sum(-1)
        shares.append(np.mean(np.asarray(contexts)[d.argmin(1)] == str(ctx)))
    return float(np.mean(shares))


def own_noise(truth: ad.AnnData, conditions: pd.DataFrame, top: float) -> dict:
    """What a perfect sampler pays: each gene's expected error of a sample the truth's size
    against the truth (:func:`sampler_gene_error`, as the data ceiling's MAE), split as
    :func:`split_mae` splits a model's, averaged over conditions."""
    t, out = dense64(truth.X), []
    for pert, ctx in conditions.itertuples(index=False):
        rows = np.flatnonzero(((truth.obs["perturbation"] == pert)
                               & (truth.obs["context"] == ctx)).to_numpy())
        change = np.abs(t[rows].mean(0) - _mean_of(truth, t, "control", ctx))
        changed = change >= np.quantile(change, 1 - top)
        err = sampler_gene_error(t[rows])
        out.append((err.mean(), err[changed].mean(), err[~changed].mean()))
    return dict(zip(("mae", "mae_changed", "mae_rest"), np.mean(out, axis=0)))


def quantiser_cost(processed: ad.AnnData, truth: ad.AnnData, conditions: pd.DataFrame,
                   top: float) -> dict:
    """The MAE between each condition's true cells in log1p(CP10k) of their counts and the
    same counts after :func:`quantize_counts` and :func:`dequantize_tokens` (bin centres), split
    as :func:`split_mae` splits a model's, averaged over conditions."""
    t, out = dense64(truth.X), []
    for pert, ctx in conditions.itertuples(index=False):
        rows = ((truth.obs["perturbation"] == pert) & (truth.obs["context"] == ctx)).to_numpy()
        counts = dense64(processed[truth.obs_names[rows]].X).astype(np.int64)
        exact = dense64(log1p_cp10k(counts)).mean(0)
        tokens = dense64(log1p_cp10k(dequantize_tokens(quantize_counts(counts)))).mean(0)
        change = np.abs(t[rows].mean(0) - _mean_of(truth, t, "control", ctx))
        changed = change >= np.quantile(change, 1 - top)
        err = np.abs(tokens - exact)
        out.append((err.mean(), err[changed].mean(), err[~changed].mean(), (tokens - exact).mean()))
    return dict(zip(("mae", "mae_changed", "mae_rest", "signed"), np.mean(out, axis=0)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--models", nargs="*", help="prediction runs (default: every one)")
    parser.add_argument("--top", type=float, default=0.1,
                        help="share of genes counted as changed (default 0.1)")
    parser.add_argument("--out", help="write the table here (TSV)")
    args = parser.parse_args(argv)
    rows = []
    for ds in args.datasets:
        res = Path(args.results) / ds
        truth = ad.read_h5ad(res / "truth.h5ad")
        # backed: only the control cells' rows are read
        processed = ad.read_h5ad(res / "processed.h5ad", backed="r")
        contexts, centroids = control_centroids(processed)
        runs = args.models or sorted(f.stem for f in (res / "predictions").glob("*.h5ad"))
        conditions = None
        for run in runs:
            pred = ad.read_h5ad(res / "predictions" / f"{run}.h5ad")
            if conditions is None:
                conditions = (pred.obs[["perturbation", "context"]].astype(str)
                              .drop_duplicates())
            rows.append({"dataset": ds, "model": run, **split_mae(truth, pred, args.top),
                         "own_context": own_context_share(pred, contexts, centroids)})
        if conditions is not None:
            held = truth[truth.obs["perturbation"] != CONTROL]
            rows.append({"dataset": ds, "model": "[perfect sampler]",
                         **own_noise(truth, conditions, args.top),
                         "own_context": own_context_share(held, contexts, centroids)})
            rows.append({"dataset": ds, "model": "[quantiser round trip]",
                         **quantiser_cost(processed, truth, conditions, args.top)})
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200):
        print(f"MAE on the {args.top:.0%} of genes each condition changes most "
              "(mae_changed) and on the rest (mae_rest)")
        print(table.round(3).to_string(index=False))
    if args.out:
        write_table(table, args.out)


if __name__ == "__main__":
    main()
