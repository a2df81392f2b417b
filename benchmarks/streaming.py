"""The streaming data path at paper scale: peak memory and cells/s of every data stage.

    python benchmarks/streaming.py                         # 200,000 cells x 18,080 genes (~25 min)
    python benchmarks/streaming.py --quick                 # 5,000 x 2,000, about a minute
    python benchmarks/streaming.py --cells 50000 --workdir /scratch/bench --json out.json

Simulates a raw h5ad of the VCC H1 shape (default 200,000 cells x 18,080 genes; 300 CRISPRi
targets + 15 % non-targeting controls; negative-binomial counts, dispersion 2, log-normal gene
means and library sizes around ``--library-size`` UMIs, the target knocked down to 10 %), written
block by block as float32 CSR like most public files. Then runs the pipeline's own commands on
it, each in a fresh process, exactly as the Snakemake rules call them:

- ``preprocess`` (QC with a gene filter, so every pass runs: value check, cell statistics, gene
  statistics, writing);
- ``split`` (100 held-out targets, the VCC protocol's size);
- ``tokenize`` (the on-disk count tokens);
- ``features`` (perturbation features: reads the embedding's 5,000-cell subsample);
- the training loader: mini-batches of ``--batch-size`` training cells drawn at random from the
  on-disk tokens, as Lingshu-Cell's training does (median over ``--batches``), against a
  baseline in the same process: the same rows held in memory (loading those rows dominates
  this stage's peak memory);
- ``fit`` of Lingshu-Cell from the tokens (``--fit-steps`` steps of ``--fit-batch`` cells,
  tiny preset): the whole training job's memory with 200,000 cells on disk. Its per-gene
  output head makes (batch x genes x 281) logits, about 0.65 GB at 32 cells x 18,080 genes;
- the other models' jobs, which read the training cells' counts from the processed file on
  demand (``lingshu.data.rows``): ``fit`` of ``perturbation_mean`` and ``linear`` (one
  streaming pass over every training cell: per-condition means of log1p(CP10k)), and scLDM's
  ``pretrain`` (tiny preset, ``--fit-steps`` autoencoder steps of ``--fit-batch`` cells read at
  random from the file; the column sums pass and the held-out reconstruction cells included).
  STATE is left out: its training file is dense log1p(CP10k) (4 bytes x cells x genes: 9 GB
  here), written block by block, and its own loader is upstream's (cell-load).

Per stage: wall time, CPU time, peak RSS of that process (``wait4``), cells/s. The raw,
processed and token sizes on disk are printed too. The work folder is deleted at the end
unless ``--keep``. Nothing here asserts on time or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# The dataset entry (as in a config file, without source and split: main() adds them).
ENTRY = {
    "columns": {"perturbation": "target_gene", "control": "non-targeting", "context": None,
                "context_label": "H1", "batch": "gem_group"},
    "perturbation_type": "genetic", "combo_separator": "+", "genes": None, "layer": None,
    "qc": {"min_counts_per_cell": 500, "min_genes_per_cell": 200, "min_cells_per_gene": 10,
           "max_pct_mito": None},
    "min_cells_per_condition": 10, "drop_small_conditions": True, "perturbation_features": None,
}
SPLIT = {"kind": "heldout_perturbations", "n_test_perturbations": 100,
         "control_test_fraction": 0.5, "reference_fraction": 0.1, "max_reference_cells": 2000}


# ------------------------------------------------------------------------------------ simulate
def simulate_raw(path: Path, n_cells: int, n_genes: int, n_targets: int, library_size: float,
                 seed: int, block: int = 2000) -> None:
    """Write the raw h5ad block by block (never the whole matrix in memory)."""
    import scipy.sparse as sp
    from tqdm import tqdm

    from lingshu.io import atomic_path, write_h5ad_streaming

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    share = rng.lognormal(0.0, 1.8, n_genes)
    share /= share.sum()
    # targets: genes expressed well enough for a knockdown to show
    expressed = np.argsort(share)[::-1][: max(n_targets * 4, n_targets)]
    target_idx = np.sort(rng.choice(expressed, n_targets, replace=False))
    labels = np.array(["non-targeting"] + [genes[i] for i in target_idx], dtype=object)
    is_control = rng.random(n_cells) < 0.15
    which = np.where(is_control, 0, rng.integers(1, n_targets + 1, n_cells))
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels[which]),
                        "gem_group": pd.Categorical(
                            np.array(["g1", "g2", "g3", "g4"])[rng.integers(0, 4, n_cells)])},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=genes)
    knocked = np.r_[-1, target_idx]  # gene knocked down by each label (-1: none)

    def blocks():
        for start in tqdm(range(0, n_cells, block), desc="simulating", unit="block"):
            stop = min(n_cells, start + block)
            lib = library_size * rng.lognormal(0.0, 0.35, stop - start)
            lam = lib[:, None] * share[None, :]
            k = knocked[which[start:stop]]
            rows = np.flatnonzero(k >= 0)
            lam[rows, k[rows]] *= 0.1
            lam *= rng.gamma(2.0, 0.5, size=lam.shape)  # NB with dispersion 2
            yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))

    with atomic_path(path) as tmp:
        write_h5ad_streaming(tmp, obs=obs, var=var, blocks=blocks(), dtype=np.float32,
                             uns={"source": "benchmarks/streaming.py simulation"})


# ------------------------------------------------------------------------------------ loader
def loader_benchmark(tokens: Path, processed: Path, cells: Path, batches: int, batch_size: int,
                     baseline_cells: int, seed: int) -> dict:
    """Median time of a random training batch read from disk, and from memory.

    cells: the split's ``cells.tsv`` (in the split folder)."""
    import anndata as ad
    import torch

    from lingshu.data.tokenstore import TokenStore
    from lingshu.models.mddm.model import token_batch

    backed = ad.read_h5ad(processed, backed="r")
    in_train = pd.read_csv(cells, sep="\t", usecols=["in_train"])["in_train"].to_numpy(bool)
    store = TokenStore.open(tokens, obs_names=backed.obs_names, genes=backed.var_names)
    train = store.subset(np.flatnonzero(in_train))
    gen = torch.Generator().manual_seed(seed)

    def timed(s):
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            batch = token_batch(s, torch.randint(s.n_cells, (batch_size,), generator=gen))
            times.append(time.perf_counter() - start)
        assert batch.shape == (batch_size, s.n_genes)
        return statistics.median(times)

    disk = timed(train)
    rows = np.flatnonzero(in_train)[:baseline_cells]
    disk_same_rows = timed(store.subset(rows))
    rss_disk = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the baseline
    # Baseline: the same kind of draw from rows held in memory (the first baseline_cells).
    memory = TokenStore.from_counts(backed.X[rows])
    in_memory = timed(memory)
    return {"train_cells": int(train.n_cells), "batch_size": batch_size,
            "median_batch_s_disk": disk, "cells_per_s_disk": batch_size / disk,
            "median_batch_s_disk_same_rows": disk_same_rows,
            "median_batch_s_memory": in_memory, "cells_per_s_memory": batch_size / in_memory,
            "disk_over_memory": disk_same_rows / in_memory, "baseline_cells": len(rows),
            "peak_rss_gib_before_baseline": rss_disk}


# ------------------------------------------------------------------------------------ harness
def run_stage(name: str, cmd: list[str], n_cells: int, log_dir: Path) -> dict:
    """Run one stage in a fresh process; its own wall time, CPU time and peak RSS."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}:\n"
                 + log.read_text()[-3000:])
    row = {"stage": name, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
           "peak_rss_gib": usage.ru_maxrss / 2**20, "cells_per_s": n_cells / wall}
    print(f"  {name:<22} {wall:8.1f} s wall {row['cpu_s']:8.1f} s CPU "
          f"{row['peak_rss_gib']:6.2f} GiB peak RSS {row['cells_per_s']:10.0f} cells/s", flush=True)
    return row


def du(path: Path) -> float:
    """Size on disk of a file or folder, GiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=18_080)
    p.add_argument("--targets", type=int, default=300)
    p.add_argument("--library-size", type=float, default=12_000)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--baseline-cells", type=int, default=10_000)
    p.add_argument("--fit-steps", type=int, default=5)
    p.add_argument("--fit-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="5,000 cells x 2,000 genes, 50 targets")
    p.add_argument("--workdir", help="where the files go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--reuse-raw", action="store_true",
                   help="reuse the work folder's raw.h5ad (same --cells/--genes) if present")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--_stage", help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._stage:  # a child process of this script
        kw = json.loads(args._args)
        if args._stage == "simulate":
            simulate_raw(Path(kw.pop("path")), **kw)
        else:
            paths = ("tokens", "processed", "cells")
            result = loader_benchmark(**{k: (Path(v) if k in paths else v) for k, v in kw.items()})
            Path(kw["tokens"]).with_name("loader.json").write_text(json.dumps(result))
        return

    if args.quick:
        args.cells, args.genes, args.targets, args.fit_steps = 5_000, 2_000, 50, 3
        args.baseline_cells = 2_000
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lingshu_streaming_"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    raw, processed, tokens = work / "raw.h5ad", work / "processed.h5ad", work / "tokens"
    split_dir = work / "split"
    cells = split_dir / "cells.tsv"
    features, features_used = work / "features.tsv", work / "features_used.tsv"
    split = dict(SPLIT, n_test_perturbations=min(100, args.targets // 3))
    from lingshu.config import DatasetEntry

    # what the rules pass: the whole entry as JSON, the dataset's name included
    entry = DatasetEntry.parse("bench", dict(ENTRY, source={"path": str(raw)}, split=split),
                               source="benchmarks/streaming.py").to_json()
    py, me = sys.executable, str(Path(__file__).resolve())
    lingshu = [py, "-m", "lingshu"]
    data = ["--processed", str(processed), "--split", str(split_dir)]
    print(f"streaming benchmark: {args.cells:,} cells x {args.genes:,} genes, "
          f"{args.targets} targets, in {work}\nmachine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)

    rows = []
    if args.reuse_raw and raw.is_file():
        print(f"  simulate   reusing {raw}")
    else:
        rows.append(run_stage("simulate", [py, me, "--_stage", "simulate", "--_args", json.dumps(
            {"path": str(raw), "n_cells": args.cells, "n_genes": args.genes,
             "n_targets": args.targets, "library_size": args.library_size, "seed": args.seed})],
            args.cells, logs))
    rows.append(run_stage("preprocess", lingshu + [
        "preprocess", "--raw", str(raw), "--entry", entry, "--out", str(processed)],
        args.cells, logs))
    rows.append(run_stage("split", lingshu + [
        "split", "--processed", str(processed), "--entry", entry, "--seed", str(args.seed),
        "--out", str(split_dir)], args.cells, logs))
    rows.append(run_stage("tokenize", lingshu + [
        "tokenize", "--processed", str(processed), "--out", str(tokens)], args.cells, logs))
    rows.append(run_stage("features", lingshu + [
        "features", *data, "--entry", entry, "--seed", str(args.seed),
        "--out", str(features), "--out-used", str(features_used)], args.cells, logs))
    rows.append(run_stage("loader", [py, me, "--_stage", "loader", "--_args", json.dumps(
        {"tokens": str(tokens), "processed": str(processed), "cells": str(cells),
         "batches": args.batches, "batch_size": args.batch_size,
         "baseline_cells": args.baseline_cells, "seed": args.seed})], args.cells, logs))
    loader = json.loads((work / "loader.json").read_text())
    params = {"preset": "tiny", "finetune_steps": args.fit_steps, "batch_size": args.fit_batch,
              "warmup_steps": 1, "checkpoint_every": 1000, "device": "cpu"}
    rows.append(run_stage("fit", lingshu + [
        "fit", *data, "--features", str(features), "--model", "lingshu", "--params",
        json.dumps(params), "--entry", entry, "--seed", str(args.seed), "--threads",
        "2", "--workdir", str(work / "model"), "--tokens", str(tokens), "--out",
        str(work / "model" / "model.npz")], args.cells, logs))
    for model in ("perturbation_mean", "linear"):
        rows.append(run_stage(f"fit {model}", lingshu + [
            "fit", *data, "--features", str(features), "--model", model, "--entry",
            entry, "--seed", str(args.seed), "--threads", "2", "--out",
            str(work / model / "model.npz")], args.cells, logs))
    scldm = {"preset": "tiny", "ae_steps": args.fit_steps, "ae_batch_size": args.fit_batch,
             "warmup_steps": 1, "checkpoint_every": 1000, "device": "cpu"}
    rows.append(run_stage("pretrain scldm", lingshu + [
        "pretrain", *data, "--features", str(features), "--model", "scldm", "--params",
        json.dumps(scldm), "--entry", entry, "--seed", str(args.seed), "--threads",
        "2", "--workdir", str(work / "scldm"), "--out", str(work / "scldm" / "pretrain.pt")],
        args.cells, logs))
    fit_log = (logs / "fit.log").read_text()
    fit_rate = [ln for ln in fit_log.splitlines() if "fine-tuned" in ln]

    import h5py

    with h5py.File(processed, "r") as f:
        n_kept, nnz = f["X"].attrs["shape"][0], f["X"]["data"].shape[0]
        n_genes_kept = f["X"].attrs["shape"][1]
    sizes = {"raw_gib": du(raw), "processed_gib": du(processed), "tokens_gib": du(tokens)}
    print(f"\nprocessed: {n_kept:,} cells x {n_genes_kept:,} genes, {nnz:,} nonzeros "
          f"({nnz / (n_kept * n_genes_kept):.1%} of entries, {nnz / n_kept:,.0f} genes per cell)")
    print("on disk: " + ", ".join(f"{k[:-4]} {v:.2f} GiB" for k, v in sizes.items()))
    print(f"loader: {loader['train_cells']:,} training cells; batches of {loader['batch_size']}: "
          f"median {loader['median_batch_s_disk'] * 1e3:.1f} ms read from disk "
          f"({loader['cells_per_s_disk']:,.0f} cells/s; peak RSS "
          f"{loader['peak_rss_gib_before_baseline']:.2f} GiB before the baseline loads its rows); "
          f"on the first {loader['baseline_cells']:,} "
          f"cells {loader['median_batch_s_disk_same_rows'] * 1e3:.1f} ms from disk vs "
          f"{loader['median_batch_s_memory'] * 1e3:.1f} ms in memory "
          f"(ratio {loader['disk_over_memory']:.2f})")
    if fit_rate:
        print("fit: " + fit_rate[-1].split(": ", 1)[-1])
    peak = max(rows, key=lambda r: r["peak_rss_gib"])
    print(f"largest peak RSS: {peak['peak_rss_gib']:.2f} GiB ({peak['stage']})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cells": args.cells, "genes": args.genes, "stages": rows, "loader": loader,
             "sizes": sizes, "nnz": int(nnz), "processed_cells": int(n_kept)}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
