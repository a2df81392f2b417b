"""Time and sanity-check scLDM at a preset on the default pipeline's simulated genetic screen.

    python benchmarks/scldm_small.py                       # preset small, 1 torch thread
    python benchmarks/scldm_small.py --threads 2 --set flow_steps=1000 --set guidance=1.0

The data are the ``sim_genetic`` entry of ``config/config.yaml`` (1,000 genes, 12 knockdowns
in 3 cell types, 4 targets held out -> 12 test conditions), simulated with
:mod:`lingshu.data.simulate` at ``--cells`` cells and cached under ``--cache``. The script runs
the pipeline's order (pretrain on training + control input cells, fit on training cells,
predict every test condition) and prints the seconds of each stage, the reconstruction Pearson
on cells the autoencoder never saw, and, per test condition, the Pearson of the predicted and
the true change from the context's control mean (log1p CP10k pseudobulks; the linear
baseline's, a ridge on the shared perturbation features, beside it for scale).
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from lingshu.config import DatasetEntry
from lingshu.data.preprocess import preprocess
from lingshu.data.simulate import params_from_dict, simulate_dataset
from lingshu.data.split import make_split
from lingshu.data.features import compute_features
from lingshu.data.truth import build_truth
from lingshu.models.baselines.model import LinearModel
from lingshu.models.harness import predict_conditions, training_data
from lingshu.models.scldm.model import ScLDM

SIM = {"n_genes": 1000, "n_knockdowns": 12, "n_stimulations": 0, "gene_mean_median": 0.2,
       "grn_weight_median": 0.6, "grn_mean_out_degree": 30, "regulator_strength_log_sd": 0.6}
ENTRY = {"columns": {"perturbation": "perturbation", "control": "control",
                     "context": "cell_type", "batch": "donor"},
         "perturbation_type": "genetic"}


def dataset_entry(cells: int) -> DatasetEntry:
    return DatasetEntry.parse("sim_genetic", {
        **ENTRY, "source": {"simulate": {**SIM, "n_cells": cells, "seed": 0}},
        "split": {"kind": "heldout_perturbations", "n_test_perturbations": 4}})


def load_data(cells: int, cache: Path) -> ad.AnnData:
    path = cache / f"sim_genetic_{cells}.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    raw = simulate_dataset(params_from_dict({**SIM, "n_cells": cells, "seed": 0}))
    adata = preprocess(raw, dataset_entry(cells), "simulated")
    cache.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return adata


def delta_pearson(pred: ad.AnnData, truth: ad.AnnData) -> dict[str, float]:
    """Pearson of predicted vs true (condition mean - context control mean), per condition."""
    out = {}
    real_ctrl = truth.obs["is_real_control"].to_numpy()  # predictions hold predicted cells only
    for (ctx, pert), _ in truth.obs[~real_ctrl].groupby(["context", "perturbation"],
                                                         observed=True):
        ctrl = truth.X[real_ctrl & (truth.obs["context"] == ctx).to_numpy()].mean(axis=0)
        sel = ((truth.obs["context"] == ctx) & (truth.obs["perturbation"] == pert)).to_numpy()
        psel = ((pred.obs["context"] == ctx) & (pred.obs["perturbation"] == pert)).to_numpy()
        t = np.asarray(truth.X[sel].mean(axis=0) - ctrl).ravel()
        p = np.asarray(pred.X[psel].mean(axis=0) - ctrl).ravel()
        out[f"{ctx}/{pert}"] = float(np.corrcoef(t, p)[0, 1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--cells", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "scldm_bench")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a model parameter, e.g. flow_steps=800")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear baseline")
    ap.add_argument("--guidance", type=float, nargs="*", default=[],
                    help="also sample with these guidance scales (no retraining)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}

    adata = load_data(args.cells, args.cache)
    entry = dataset_entry(args.cells)
    split = make_split(adata.obs, entry.split, seed=0)
    features = compute_features(adata, split, entry, n_components=16, seed=0)
    truth = build_truth(adata, split)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = training_data(adata, split, features, seed=0, entry=entry, workdir=tmp,
                            include_control_input=True)
        data = training_data(adata, split, features, seed=0, entry=entry, workdir=tmp)
        print(f"data: {adata.n_vars} genes; pretrain on {pre.counts.shape[0]} cells, fit on "
              f"{data.counts.shape[0]}; {len(split.test_conditions())} test conditions, "
              f"{int(split.test_conditions()['n_cells'].sum())} cells to predict; "
              f"load average {os.getloadavg()[0]:.1f}")
        model = ScLDM(preset=args.preset, **overrides)
        t0 = time.perf_counter()
        model.pretrain(pre, work / "pretrain.pt")
        t1 = time.perf_counter()
        model.fit(data, init=work / "pretrain.pt")
        t2 = time.perf_counter()
        pred = predict_conditions(model, adata, split, seed=0, progress=False)
        t3 = time.perf_counter()
    print(f"autoencoder {t1 - t0:.1f} s, latent flow {t2 - t1:.1f} s (fit total "
          f"{t2 - t1:.1f} s incl. encoding), sampling {t3 - t2:.1f} s")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in model.meta.items()})
    ours = delta_pearson(pred, truth)
    base = {}
    if not args.no_linear:
        linear = LinearModel()
        linear.fit(data)
        base = delta_pearson(predict_conditions(linear, adata, split, seed=0,
                                                progress=False), truth)
    for key, value in ours.items():
        print(f"  {key:24s} pearson_delta scldm {value:+.3f}  linear {base.get(key, np.nan):+.3f}")
    print(f"mean pearson_delta scldm {np.mean(list(ours.values())):+.3f}  linear "
          f"{np.mean(list(base.values())) if base else np.nan:+.3f}")
    for w in args.guidance:
        model.set_sampling({"guidance": w})
        t0 = time.perf_counter()
        other = predict_conditions(model, adata, split, seed=0, progress=False)
        print(f"guidance {w}: mean pearson_delta scldm "
              f"{np.mean(list(delta_pearson(other, truth).values())):+.3f} "
              f"(sampling {time.perf_counter() - t0:.1f} s)")
    x = np.asarray(pred.X.todense() if hasattr(pred.X, "todense") else pred.X)
    real = truth.X[~truth.obs["is_real_control"].to_numpy()]
    real = real.toarray() if hasattr(real, "toarray") else real
    print(f"fraction of zeros: predicted {np.mean(x == 0):.3f}, true {np.mean(real == 0):.3f}; "
          f"mean log1p: predicted {x.mean():.4f}, true {real.mean():.4f}")


if __name__ == "__main__":
    main()
