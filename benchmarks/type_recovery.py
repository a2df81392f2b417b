"""Does Lingshu-Cell's generation commit to a cell type, and can it read one off a few genes?

    python benchmarks/type_recovery.py --results results --datasets sim_stimulation sim_genetic

Generated cells whose cell-type shares are off (the generation table's ``celltype_tvd``) can
be cells of the wrong types or cells of no clear type. This script tells them apart and finds
where the second comes from. For each dataset it takes ``--cells`` of the split's reference
cells (real cells no model trained on) and, for each fraction f of ``--fractions``, keeps a
random f of each cell's genes at their real tokens and lets the pre-trained model
(``models/lingshu/pretrain.pt``, or ``--checkpoint``) generate the rest with the pipeline's
sampler (``--steps`` unmasking steps, no guidance). f = 0 is plain unconditional generation.
Each set of cells is labelled by the generation table's classifier (PCA + logistic regression
fitted on training cells, :func:`lingshu.evaluate.fidelity.celltype_classifier`), and the
script prints:

- ``own_type``: the share of cells the classifier gives the cell type of the real cell they
  started from (at f = 0 there is none to keep: the share of the reference's own cell type);
- ``max_prob``: the median of the classifier's highest probability per cell, and
  ``ambiguous``: the share of cells whose highest probability is below 0.6 (real cells: near
  1 and near 0);
- ``naive_bayes``: the accuracy of a naive-Bayes reading of the cell type from the same kept
  genes (each gene's token distribution per cell type, counted on the training cells, genes
  independent given the type): what those genes tell about the type without any gene-gene
  dependency; a model that regenerates a cell of its own type less often than that is
  under-using the genes it was given.

Rows ``real cells`` give the classifier's view of the reference cells themselves. Datasets
with a single cell type are skipped. Nothing here is a test; it measures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from lingshu.constants import CONTEXT_COL, SPLIT_REFERENCE, SPLIT_TRAIN
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.split import read_split
from lingshu.evaluate.fidelity import celltype_classifier
from lingshu.evaluate.generation import MAX_CLASSIFIER_CELLS
from lingshu.io import write_table
from lingshu.models.mddm.diagnostics import marginal_log_probs
from lingshu.models.mddm.diffusion import sample
from lingshu.tokens import dequantize_tokens, quantize_counts

NB_TOKENS = 32  # the naive-Bayes tables merge tokens >= 31 (counts >= 31) into one
AMBIGUOUS = 0.6  # a cell whose highest class probability is below this has no clear type
MAX_NAIVE_BAYES_CELLS = 20_000  # training cells the naive-Bayes tables are counted on (at most)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def _log1p(counts) -> np.ndarray:
    """Dense log1p(CP10k), the classifier's input."""
    return _dense(log1p_cp10k(counts))


def naive_bayes_tables(tokens: np.ndarray, labels: np.ndarray, classes: list[str]):
    """Log prior (K,) and log token probabilities (K, G, NB_TOKENS) per class, from training
    tokens (n, G) with tokens >= NB_TOKENS - 1 merged, add-half smoothed (the diagnostics'
    per-context tables, :func:`~lingshu.models.mddm.diagnostics.marginal_log_probs`, on the
    merged tokens)."""
    labels = np.asarray(labels).astype(str)
    prior = np.log(np.array([np.mean(labels == c) for c in classes]))
    tables = marginal_log_probs([(np.minimum(tokens, NB_TOKENS - 1), labels)], vocab=NB_TOKENS,
                                pseudo=0.5 * NB_TOKENS)  # (c + 0.5) / (n + NB_TOKENS / 2)
    return prior, np.stack([tables[c] for c in classes])


def naive_bayes_predict(prior: np.ndarray, table: np.ndarray, tokens: np.ndarray,
                        kept: np.ndarray) -> np.ndarray:
    """The most probable class index per cell from its kept genes only (tokens, kept: (n, G))."""
    tok = np.minimum(tokens, NB_TOKENS - 1)
    out = np.empty(tok.shape[0], dtype=int)
    for i in range(tok.shape[0]):
        genes = np.flatnonzero(kept[i])
        out[i] = int(np.argmax(prior + table[:, genes, tok[i, genes]].sum(1)))
    return out


def recovery(model_fn, tokens: torch.Tensor, labels: np.ndarray, classifier, nb, fractions,
             steps: int, seed: int) -> pd.DataFrame:
    """One row per fraction: keep a random ``f`` of each cell's genes at ``tokens`` (n, G),
    generate the rest with :func:`~lingshu.models.mddm.diffusion.sample` from ``model_fn``
    (``model_fn(tokens, cond, select=None)``), label the cells with ``classifier`` and score
    them against ``labels`` (the real cells' types); ``nb`` = (prior, table) of
    :func:`naive_bayes_tables` over ``classifier.classes_``."""
    classes = [str(c) for c in classifier.classes_]
    truth = np.array([classes.index(str(c)) for c in labels])
    rows = []
    for f in fractions:
        gen = torch.Generator().manual_seed(seed)
        kept = torch.rand(tokens.shape, generator=gen) < f  # (n, G)
        with torch.no_grad():
            out = sample(model_fn, tokens.shape[0], tokens.shape[1], steps, gen,
                         fixed_tokens=tokens, fixed_mask=kept, select=True)
        prob = classifier.predict_proba(_log1p(dequantize_tokens(out.cpu().numpy())))
        top = prob.max(1)
        if f > 0:
            own = float(np.mean(prob.argmax(1) == truth))
        else:  # nothing kept: the share of the cells' own types among the generated ones
            own = float(np.sum(np.minimum(np.bincount(prob.argmax(1), minlength=len(classes)),
                                          np.bincount(truth, minlength=len(classes))))
                        / len(truth))
        nb_pred = naive_bayes_predict(*nb, tokens.numpy(), kept.numpy())
        rows.append({"cells": f"kept {f:g}", "own_type": own, "max_prob": float(np.median(top)),
                     "ambiguous": float(np.mean(top < AMBIGUOUS)),
                     "naive_bayes": float(np.mean(nb_pred == truth))})
    return pd.DataFrame(rows)


def run_dataset(folder: Path, checkpoint: Path, n_cells: int, fractions, steps: int,
                seed: int) -> pd.DataFrame | None:
    from lingshu.models.mddm.model import LingshuCell

    adata = ad.read_h5ad(folder / "processed.h5ad")
    split = read_split(folder / "split")
    labels = adata.obs[CONTEXT_COL].astype(str).to_numpy()
    train = split.rows(SPLIT_TRAIN, adata.obs_names)
    if len(set(labels[train])) < 2:
        print(f"{folder.name}: one cell type, skipped")
        return None
    rng = np.random.default_rng(seed)
    clf_rows = np.sort(rng.permutation(train)[:MAX_CLASSIFIER_CELLS])
    classifier = celltype_classifier(_log1p(adata.X[clf_rows]), labels[clf_rows], seed)
    classes = [str(c) for c in classifier.classes_]
    nb_rows = train if train.size <= MAX_NAIVE_BAYES_CELLS else np.sort(
        np.random.default_rng(seed + 1).choice(train, MAX_NAIVE_BAYES_CELLS, replace=False))
    nb = naive_bayes_tables(np.asarray(quantize_counts(_dense(adata.X[nb_rows]).astype(np.int64))),
                            labels[nb_rows], classes)
    ref = split.rows(SPLIT_REFERENCE)
    ref = np.sort(rng.choice(ref, size=min(n_cells, ref.size), replace=False))
    tokens = torch.as_tensor(np.asarray(quantize_counts(_dense(adata.X[ref]).astype(np.int64))),
                             dtype=torch.long)
    model = LingshuCell()
    model.load_pretrained(checkpoint)
    if list(model.genes) != list(map(str, adata.var_names)):
        raise SystemExit(f"{checkpoint}: its genes differ from {folder / 'processed.h5ad'}'s")
    net = model.pretrained

    def model_fn(x, _cond, select=None):
        return net(x, select=select)

    start = time.process_time()
    table = recovery(model_fn, tokens, labels[ref], classifier, nb, fractions, steps, seed)
    real_prob = classifier.predict_proba(_log1p(adata.X[ref]))
    real = real_prob.max(1)
    table.loc[len(table)] = {"cells": "real cells", "own_type": float(np.mean(
        classifier.classes_[real_prob.argmax(1)] == labels[ref])),
        "max_prob": float(np.median(real)), "ambiguous": float(np.mean(real < AMBIGUOUS)),
        "naive_bayes": np.nan}
    table.insert(0, "dataset", folder.name)
    print(f"{folder.name}: {len(ref)} reference cells, {steps} steps, "
          f"{time.process_time() - start:.0f} CPU-s")
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--checkpoint", help="a pre-training checkpoint (one dataset only); "
                   "default: <results>/<dataset>/models/lingshu/pretrain.pt")
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--fractions", default="0,0.05,0.1,0.3",
                   help="comma-separated shares of each cell's genes kept at the real tokens")
    p.add_argument("--steps", type=int, default=64, help="unmasking steps (the default "
                   "config's unconditional_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the table here (TSV)")
    args = p.parse_args(argv)
    if args.checkpoint and len(args.datasets) > 1:
        p.error("--checkpoint goes with a single dataset")
    torch.set_num_threads(args.threads)
    fractions = [float(x) for x in args.fractions.split(",")]
    tables = []
    for name in args.datasets:
        folder = Path(args.results) / name
        ckpt = Path(args.checkpoint) if args.checkpoint else folder / "models/lingshu/pretrain.pt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt}: no pre-trained Lingshu-Cell; run the pipeline's "
                             "pretrain rule for this dataset (or pass --checkpoint)")
        table = run_dataset(folder, ckpt, args.cells, fractions, args.steps, args.seed)
        if table is not None:
            tables.append(table)
    if not tables:
        return
    table = pd.concat(tables, ignore_index=True)
    with pd.option_context("display.width", 160):
        print(table.round(3).to_string(index=False))
    if args.out:
        write_table(table, args.out)


if __name__ == "__main__":
    main()
