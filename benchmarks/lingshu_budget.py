"""Lingshu-Cell's quality against its training budget, and its cost against the number of genes.

    # variants of the config's lingshu block on the datasets of a finished pipeline run
    python benchmarks/lingshu_budget.py study --configfile config/config.yaml \\
        --results results --datasets sim_genetic sim_stimulation \\
        --variant x1: --variant x3:pretrain_steps=900 --variant s8:network={"group_size":8} \\
        --out benchmarks/out/budget
    # a rival at a Lingshu-Cell budget's CPU-seconds (any registered model's block)
    python benchmarks/lingshu_budget.py study --model state --results results \\
        --datasets sim_stimulation --variant x6:steps=2400 --out benchmarks/out/state
    # the spread over fine-tuning seeds, from the pipeline run's own pre-training
    python benchmarks/lingshu_budget.py study --configfile config/shared_data.yaml \\
        --results results_shared --datasets papalexi --stages fit,predict --pretrained \\
        --seeds 0 1 2 3 4 --out benchmarks/out/seeds
    # one table and figure from several study runs
    python benchmarks/lingshu_budget.py merge benchmarks/out/*/budget.tsv --out benchmarks/out/all
    # seconds per training and sampling step at 1,000 / 7,000 / 18,080 genes
    python benchmarks/lingshu_budget.py genes --presets small --genes 1000 7000 18080

``study`` runs, per dataset and variant, the pipeline's own commands (``python -m lingshu
pretrain / generate / generation-eval / fit / predict / evaluate``) on the files a pipeline run
left in ``--results`` (processed data, split, features, tokens, truth), each in its own process,
and reads each one's CPU-seconds (user + system, from the OS: the usage line that ends its
log, as the pipeline's cost table does). A variant is ``NAME:KEY=VALUE,...``
applied over the config block of ``--model`` (``lingshu`` unless given; values parsed as YAML;
``NAME:`` alone is the block as configured), each stage run only where the model has it (the
pre-training, unconditional generation). It prints, and writes to ``--out/budget.tsv``:

- held-out bits per masked gene at t = 0.15 / 0.5 / 0.9 after pre-training and after fine-tuning,
  beside the per-gene marginal floor (the diagnostics of every training run);
- generation fidelity of as many unconditional cells as the split has reference cells: MMD,
  cell-type proportion TVD, Pearson of gene means;
- prediction on the held-out conditions: Pearson-delta, DES, MAE (cell-eval, as the pipeline)
  and the paper's average score against the pipeline run's ``control_mean``;
- the CPU-seconds of each stage;

and beside them the pipeline run's own rows for scLDM, STATE and the mean baselines
(``control_mean``, ``perturbation_mean``: their metrics and CPU-seconds from the run's tables
and Snakemake benchmark files), and one figure, ``--out/budget.png``: each quality against
CPU-seconds. ``--stages`` limits what runs (e.g. ``pretrain,generate``); with ``--pretrained``,
a study that does not pre-train fine-tunes from the pipeline run's pre-trained checkpoint
(``<results>/<dataset>/models/<model>/pretrain.pt``).

``--seeds`` runs every variant once per seed (each in ``<variant>/seed<k>``; the seed drives
every stage run, so with ``--pretrained`` each seed fine-tunes the same pre-trained model). The
spread over seeds goes to ``--out/spread.tsv`` (per dataset, variant and metric: seeds, mean,
standard deviation, range, and at how many seeds the variant does better than each of the
pipeline run's rows) and ``--out/spread.png`` (each seed's Pearson-delta, DES, MAE and average
score beside the pipeline run's rows), since one seed's figures on a small dataset can sit on
either side of a baseline's (:func:`spread`).

``genes`` times one training step (64 cells), 3-step guided sampling (256 cells) and one
unconditional unmasking step (256 cells; the mean over an 8-step run: each step is one
forward pass of the backbone plus the head on the genes it unmasks, so its cost hardly depends
on the number of steps) of the network at each preset and number of genes, on random tokens,
in this process, with the network options (the condition path) of ``--configfile``'s lingshu
block; it prints cells/s and the projected wall seconds of that block's budget (its pre-training
and fine-tuning steps of 64 cells, 300 cells generated in its unconditional steps) at
``--threads`` threads.

Nothing here asserts on time or quality; it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from lingshu.io import write_table

ROOT = Path(__file__).resolve().parent.parent
# the pipeline run's rows beside a study's: the rivals at matched CPU-seconds, and the two
# baselines that the VCC scores are scaled against (MAE: control_mean, DES: perturbation_mean)
RIVALS = ("scldm", "state", "control_mean", "perturbation_mean")
CONTROL_RUN = "control_mean"  # the reference of the paper's average score
QUALITY = [("mmd", "MMD", False), ("celltype_tvd", "cell-type TVD", False),
           ("pearson_mean", "gene-mean Pearson", True), ("pearson_delta", "Pearson-delta", True),
           ("des", "DES", True), ("mae", "MAE", False),
           ("average_score", "average score (vs control_mean)", True)]


# ------------------------------------------------------------------------------------------
# study


def run_stage(name: str, argv: list[str], log: Path) -> float:
    """Run ``python -m lingshu <argv>``; return its CPU-seconds, the usage line that ends its
    log (lingshu.usage: the count the pipeline's cost table reads). Raises with the log's tail."""
    from lingshu.usage import read_cpu_seconds

    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "lingshu", *argv], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    cpu = read_cpu_seconds(log)
    if proc.returncode or cpu is None:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{name} failed (log {log}):\n" + "\n".join(tail))
    print(f"  {name}: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
    return cpu


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    over = {}
    for item in filter(None, (p.strip() for p in _split_top(rest))):
        key, _, value = item.partition("=")
        over[key.strip()] = yaml.safe_load(value)
    return name, over


def _split_top(text: str) -> list[str]:
    """Split on commas outside braces/brackets (so ``network={"a":1,"b":2}`` stays whole)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "{[" and 1 or (-1 if ch in "}]" else 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def bits(path: Path) -> dict[str, float]:
    """Last step's held-out bits per masked gene and the marginal floor, per mask rate."""
    if not path.exists():
        return {}
    df = pd.read_csv(path, sep="\t")
    last = df[df["step"] == df["step"].max()]
    out = {}
    for _, r in last.iterrows():
        out[f"bits@{r.mask_rate:g}"] = r.bits_model
        out[f"floor@{r.mask_rate:g}"] = r.bits_marginal
    return out


def prediction_metrics(eval_dir: Path, control: Path | None = None) -> dict[str, float]:
    """Pearson-delta, DES and MAE of an evaluation folder, and with ``control`` (the pipeline
    run's ``eval/control_mean`` folder) the paper's average score against it, as the report
    computes it."""
    from lingshu.evaluate.perturbation import PAPER_METRICS, average_score, read_summary

    metrics = read_summary(eval_dir)["metrics"]
    names = {"pearson_delta": "Pearson-delta", "des": "DES", "mae": "MAE"}
    out = {k: metrics[PAPER_METRICS[v]] for k, v in names.items()
           if np.isfinite(metrics.get(PAPER_METRICS[v], np.nan))}
    if control is not None and (control / "summary.json").exists():
        out["average_score"] = average_score(
            metrics, read_summary(control)["metrics"])["average_score"]
    return out


def study(args) -> None:
    from lingshu.evaluate.generation import REAL_FLOOR
    from lingshu.models.spec import get_spec
    from lingshu.plan import entry_json, model_block, validate_config

    model = args.model
    spec = get_spec(model)
    config = yaml.safe_load(Path(args.configfile).read_text())
    validate_config(config, source=args.configfile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    # the checkpoint a generating model samples from, and the stage that writes it
    gen_after = spec.generates_from if "generate" in stages else None
    seeds = list(dict.fromkeys(args.seeds if args.seeds else [args.seed]))
    rows = []
    for ds in args.datasets:
        res = Path(args.results) / ds
        base = model_block(config, model, ds)
        entry = entry_json(config, ds)
        common = ["--processed", str(res / "processed.h5ad"), "--split", str(res / "split")]
        for text, run_seed in ((t, k) for t in args.variant for k in seeds):
            name, over = parse_variant(text)
            params = {**base, **over}
            work = out / ds / (name if model == "lingshu" else f"{model}-{name}")
            if len(seeds) > 1:
                work = work / f"seed{run_seed}"
            work.mkdir(parents=True, exist_ok=True)
            print(f"{ds} / {model} / {name} / seed {run_seed}: {over}", flush=True)
            row: dict = {"dataset": ds, "model": model, "variant": name, "seed": run_seed,
                         **{k: json.dumps(v) for k, v in over.items()}}
            train_params = spec.training_params(params)
            sampling = spec.sampling_params(params)
            threads = str(args.threads)
            tok = ["--tokens", str(res / "tokens")] if spec.tokens else []
            seed = ["--seed", str(run_seed)]

            def generate(checkpoint: Path) -> None:
                gen_params = {k: v for k, v in sampling.items() if k in spec.generation_keys}
                row["cpu_generate"] = run_stage("generate", [
                    "generate", *common, "--model", model, "--run", model,
                    "--params", json.dumps(train_params), "--sampling", json.dumps(gen_params),
                    "--checkpoint", str(checkpoint), *seed, "--threads", threads,
                    "--out", str(work / "generated.h5ad")], work / "generate.log")
                run_stage("generation-eval", [
                    "generation-eval", *common, "--generated", f"{model}={work / 'generated.h5ad'}",
                    *seed, "--outdir", str(work / "generation")], work / "generation_eval.log")
                g = pd.read_csv(work / "generation" / "table.tsv", sep="\t").set_index("model")
                for k in ("mmd", "celltype_tvd", "pearson_mean"):
                    row[k] = g.loc[model, k]
                    row[f"floor_{k}"] = g.loc[REAL_FLOOR, k]

            if "pretrain" in stages and spec.pretrains:
                row["cpu_pretrain"] = run_stage("pretrain", [
                    "pretrain", *common, "--features", str(res / "features.tsv"),
                    "--model", model, "--params", json.dumps(spec.pretraining_params(params)),
                    "--entry", entry, *seed, "--threads", threads, "--workdir", str(work),
                    *tok, "--out", str(work / "pretrain.pt")], work / "pretrain.log")
            row.update({f"pre_{k}": v for k, v in bits(work / "pretrain_diagnostics.tsv").items()})
            if gen_after == "pretrain":
                generate(work / "pretrain.pt")
            if "fit" in stages:
                init = []
                if spec.pretrains:
                    init = ["--init", str(checkpoint(work, res, model, stages, args.pretrained))]
                row["cpu_fit"] = run_stage("fit", [
                    "fit", *common, "--features", str(res / "features.tsv"), "--model", model,
                    "--params", json.dumps(train_params), "--entry", entry, *seed,
                    "--threads", threads, "--workdir", str(work), *init, *tok,
                    "--out", str(work / "model.npz")], work / "fit.log")
            row.update({f"fit_{k}": v for k, v in bits(work / "finetune_diagnostics.tsv").items()})
            if gen_after == "fit":
                generate(work / "model.npz")
            if "predict" in stages:
                row["cpu_predict"] = run_stage("predict", [
                    "predict", *common, "--model-file", str(work / "model.npz"), "--run",
                    model, "--sampling", json.dumps(sampling), "--entry", entry, *seed,
                    "--threads", threads, "--out", str(work / "prediction.h5ad")],
                    work / "predict.log")
                run_stage("evaluate", [
                    "evaluate", "--truth", str(res / "truth.h5ad"), "--pred",
                    str(work / "prediction.h5ad"), "--outdir", str(work / "eval"),
                    "--threads", "1", *seed], work / "evaluate.log")
                row.update(prediction_metrics(work / "eval", res / "eval" / CONTROL_RUN))
            row["cpu_total"] = sum(row.get(f"cpu_{s}", 0.0) for s in
                                   ("pretrain", "fit", "generate", "predict"))
            rows.append(row)
            write_table(pd.DataFrame(rows), out / "budget.tsv")
            print("  " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                   if isinstance(v, float)), flush=True)
        rows.extend(rivals(Path(args.results) / ds, ds))
    table = pd.DataFrame(rows)
    write_table(table, out / "budget.tsv")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.round(4).to_string(index=False))
    plot(table, out / "budget.png")
    print(f"wrote {out / 'budget.tsv'} and {out / 'budget.png'}")
    if len(seeds) > 1:
        write_spread(table, out)


PREDICTION = [q for q in QUALITY if q[0] in ("pearson_delta", "des", "mae", "average_score")]


def spread(table: pd.DataFrame) -> pd.DataFrame:
    """The spread over seeds of each studied (dataset, model, variant): per prediction metric,
    the number of seeds, mean, standard deviation (ddof 1), min and max, and for each of the
    pipeline run's rows of that dataset (variant ``[<model>]``) at how many seeds the variant
    does better (``better_than``, e.g. ``control_mean 4/5; state 5/5``: strictly lower MAE,
    strictly higher Pearson-delta or DES)."""
    rival = table["variant"].astype(str).str.startswith("[")
    studied, refs = table[~rival], table[rival]
    rows = []
    for (ds, model, variant), sub in studied.groupby(["dataset", "model", "variant"], sort=False):
        for key, _, higher in PREDICTION:
            if key not in sub or sub[key].isna().all():
                continue
            v = sub[key].dropna().to_numpy(dtype=float)
            better = []
            for _, r in refs[refs["dataset"] == ds].dropna(subset=[key]).iterrows():
                wins = int(((v > r[key]) if higher else (v < r[key])).sum())
                better.append(f"{r['model']} {wins}/{len(v)}")
            rows.append({"dataset": ds, "model": model, "variant": variant, "metric": key,
                         "seeds": len(v), "mean": v.mean(),
                         "sd": v.std(ddof=1) if len(v) > 1 else float("nan"),
                         "min": v.min(), "max": v.max(), "better_than": "; ".join(better)})
    return pd.DataFrame(rows, columns=["dataset", "model", "variant", "metric", "seeds", "mean",
                                       "sd", "min", "max", "better_than"])


def write_spread(table: pd.DataFrame, out: Path) -> None:
    """Print the spread over seeds and write ``spread.tsv`` and ``spread.png``."""
    result = spread(table)
    write_table(result, out / "spread.tsv")
    with pd.option_context("display.width", 250, "display.max_columns", 20,
                           "display.max_colwidth", 120):
        print(result.round(4).to_string(index=False))
    plot_spread(table, out / "spread.png")
    print(f"wrote {out / 'spread.tsv'} and {out / 'spread.png'}")


def plot_spread(table: pd.DataFrame, path: Path) -> None:
    """A panel per dataset (rows) and prediction metric (columns), each on its own scale: every
    studied variant's seeds as points with their mean as a bar, the pipeline run's rows as
    labelled dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(table["dataset"]))
    rival = table["variant"].astype(str).str.startswith("[")
    groups = list(dict.fromkeys(zip(table.loc[~rival, "model"], table.loc[~rival, "variant"])))
    colors = dict(zip(groups, plt.cm.tab10.colors))
    ref_colors = dict(zip(RIVALS, ["0.55", "0.3", "tab:red", "tab:purple"]))
    fig, axes = plt.subplots(len(datasets), len(PREDICTION), squeeze=False,
                             figsize=(3.6 * len(PREDICTION), 2.4 * len(datasets)))
    for row, ds in enumerate(datasets):
        sub = table[table["dataset"] == ds]
        for ax, (key, title, higher) in zip(axes[row], PREDICTION):
            ax.set_title(f"{ds}: {title} ({'higher' if higher else 'lower'} is better)",
                         fontsize=7)
            if key not in sub:
                continue
            for j, g in enumerate(groups):
                pts = sub[(sub["model"] == g[0]) & (sub["variant"] == g[1])][key].dropna()
                ax.plot(np.full(len(pts), j), pts, "o", ms=3, color=colors[g], alpha=0.8)
                if len(pts):
                    ax.plot([j - 0.25, j + 0.25], [pts.mean()] * 2, color=colors[g])
            for _, r in sub[rival.loc[sub.index]].dropna(subset=[key]).iterrows():
                ax.axhline(r[key], ls="--", lw=0.8, color=ref_colors.get(r["model"], "0.5"))
                ax.annotate(r["model"], (0.01, r[key]), xycoords=("axes fraction", "data"),
                            fontsize=6, va="bottom", ha="left",
                            color=ref_colors.get(r["model"], "0.5"))
            ax.set_xlim(-0.6, len(groups) - 0.4)
            ax.set_xticks(range(len(groups)), [f"{m} {v}" if m != "lingshu" else v
                                               for m, v in groups], fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkpoint(work: Path, res: Path, model: str, stages: set[str], pretrained: bool) -> Path:
    """The pre-trained checkpoint a fit starts from: the study's own (``work/pretrain.pt``),
    or with ``pretrained`` and no pre-training stage, the pipeline run's."""
    own = work / "pretrain.pt"
    if "pretrain" in stages or not pretrained:
        if "pretrain" not in stages and not own.exists():
            raise SystemExit(f"{own} does not exist: add pretrain to --stages, or pass "
                             f"--pretrained to fine-tune from the pipeline run's checkpoint")
        return own
    path = res / "models" / model / "pretrain.pt"
    if not path.exists():
        raise SystemExit(f"--pretrained: {path} does not exist (the pipeline run in --results "
                         f"has not pre-trained {model}); run the pipeline first or drop "
                         f"--pretrained and add pretrain to --stages")
    return path


def _cpu_of(res: Path, jobs: list[str]) -> float:
    """The CPU-seconds of a pipeline run's jobs, as its report's cost table counts them."""
    from lingshu.report.tables import benchmark_table

    table = benchmark_table([str(res / "benchmarks" / f"{job}.tsv") for job in jobs])
    return float(table["cpu_s"].sum())


def rivals(res: Path, ds: str) -> list[dict]:
    """The rows of scLDM, STATE and the mean baselines from the pipeline run: metrics and
    CPU-seconds (those the run has)."""
    out = []
    gen = res / "generation" / "table.tsv"
    gen_table = pd.read_csv(gen, sep="\t").set_index("model") if gen.exists() else None
    for model in RIVALS:
        if not (res / "eval" / model / "summary.json").exists():
            continue
        row = {"dataset": ds, "model": model, "variant": f"[{model}]",
               **prediction_metrics(res / "eval" / model, res / "eval" / CONTROL_RUN),
               "cpu_total": _cpu_of(res, [f"pretrain_{model}", f"fit_{model}",
                                          f"predict_{model}", f"generate_{model}"])}
        if gen_table is not None and model in gen_table.index:
            for k in ("mmd", "celltype_tvd", "pearson_mean"):
                row[k] = gen_table.loc[model, k]
        out.append(row)
    return out


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(QUALITY), figsize=(3.2 * len(QUALITY), 3.2))
    colors = dict(zip(datasets, plt.cm.tab10.colors))
    marker = {"lingshu": "o", "state": "s", "scldm": "x", "control_mean": "v",
              "perturbation_mean": "D"}
    if "model" not in table:
        table = table.assign(model="lingshu")
    for ax, (key, title, higher) in zip(axes, QUALITY):
        for ds in datasets:
            sub = table[table["dataset"] == ds]
            if key not in sub:
                continue
            studied = sub[~sub["variant"].str.startswith("[")].dropna(subset=[key])
            for i, (_, r) in enumerate(studied.iterrows()):
                ax.plot(r["cpu_total"], r[key], marker.get(r["model"], "^"), color=colors[ds],
                        label=ds if i == 0 else None)
                label = r["variant"] if r["model"] == "lingshu" else f"{r['model']} {r['variant']}"
                ax.annotate(label, (r["cpu_total"], r[key]), fontsize=6)
            # the pipeline run's own rows of the rivals: hollow markers
            for _, r in sub[sub["variant"].str.startswith("[")].dropna(subset=[key]).iterrows():
                ax.plot(r["cpu_total"], r[key], marker.get(r["model"], "^"), color=colors[ds],
                        mfc="none")
                ax.annotate(r["variant"], (r["cpu_total"], r[key]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("CPU-seconds (all stages run)")
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=8)
    for ax in axes:  # the first panel with a studied row carries the legend
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
            break
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------
# genes


def genes(args) -> None:
    import torch

    from lingshu.memory import keep_freed_memory
    from lingshu.models.mddm.diffusion import mask_tokens, masked_loss, sample
    from lingshu.models.mddm.model import DEFAULTS
    from lingshu.models.mddm.network import LingshuNetwork, config_from_preset

    keep_freed_memory()  # as every pipeline job does (lingshu.memory)
    torch.set_num_threads(args.threads)
    # The budget and the network options of the config's lingshu block (the default config's:
    # its condition path included)
    block = {**DEFAULTS, **(yaml.safe_load(Path(args.configfile).read_text())["models"]
                            .get("lingshu") or {})}
    network = dict(block["network"] or {})
    steps = int(block["pretrain_steps"]) + int(block["finetune_steps"])
    n_uncond = int(block["unconditional_steps"])
    print(f"{args.configfile}: network options {network}, {block['pretrain_steps']} + "
          f"{block['finetune_steps']} training steps, {n_uncond} unconditional steps")
    print(f"{'preset':>8} {'genes':>6} {'train cells/s':>13} {'3-step guided cells/s':>21} "
          f"{'uncond. step (s, 256 cells)':>27} {'default budget (s)':>18}")
    for preset in args.presets:
        for g in args.genes:
            net = LingshuNetwork(config_from_preset(preset, g, n_contexts=3, n_perturbations=4,
                                                    **network))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, 4, (64, g), generator=gen)
            cond = {"context": torch.zeros(64, dtype=torch.long),
                    "perturbation": torch.ones(64, dtype=torch.long)}
            times = []
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                noisy, mask, t = mask_tokens(tokens, gen)
                loss = masked_loss(net, noisy, tokens, mask, t, **cond)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i:
                    times.append(time.perf_counter() - start)
            train_cps = 64 / float(np.median(times))
            net.eval()
            c1 = {"context": torch.zeros(1, dtype=torch.long),
                  "perturbation": torch.ones(1, dtype=torch.long)}
            u1 = {"context": torch.zeros(1, dtype=torch.long),
                  "perturbation": torch.zeros(1, dtype=torch.long)}

            def fn(x, c, select=None):
                return net(x, select=select, **{k: v.expand(x.shape[0]) for k, v in c.items()})

            start = time.perf_counter()
            sample(fn, 256, g, 3, gen, cond=c1, uncond=u1, guidance=1.0, select=True)
            guided_cps = 256 / (time.perf_counter() - start)
            start = time.perf_counter()  # 8 of N unmasking steps: a step's cost hardly
            sample(fn, 256, g, 8, gen, cond=c1, select=True)  # depends on N (see docstring)
            uncond_step = (time.perf_counter() - start) / 8
            budget = steps * 64 / train_cps + n_uncond * uncond_step * 300 / 256
            print(f"{preset:>8} {g:>6} {train_cps:>13.0f} {guided_cps:>21.0f} "
                  f"{uncond_step:>27.3f} {budget:>18.0f}", flush=True)


def merge(args) -> None:
    """One table and one figure from several ``study`` outputs (each its own budget.tsv): the
    pipeline run's rival rows once per dataset."""
    tables = [pd.read_csv(Path(t), sep="\t") for t in args.tables]
    table = pd.concat(tables, ignore_index=True)
    # tables of older studies lack the model column: a pipeline row is named "[<model>]"
    rival = table["variant"].str.startswith("[")
    named = table["variant"].str.strip("[]").where(rival, "lingshu")
    table["model"] = table["model"].fillna(named) if "model" in table else named
    key = ["dataset", "model", "variant"] + (["seed"] if "seed" in table else [])
    table = table.drop_duplicates(subset=key, keep="first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "budget.tsv")
    keep = ["dataset", "model", "variant", "cpu_total", "pre_bits@0.15", "pre_floor@0.15",
            *[k for k, _, _ in QUALITY]]
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table[[k for k in keep if k in table]].round(3).to_string(index=False))
    plot(table, out / "budget.png")
    print(f"wrote {out / 'budget.tsv'} and {out / 'budget.png'}")
    studied = table[~table["variant"].astype(str).str.startswith("[")]
    if "seed" in table and studied.groupby(["dataset", "model", "variant"]).size().max() > 1:
        write_spread(table, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("study")
    s.add_argument("--configfile", default="config/config.yaml")
    s.add_argument("--results", default="results")
    s.add_argument("--datasets", nargs="+", required=True)
    s.add_argument("--model", default="lingshu",
                   help="the model whose config block the variants change (scLDM and STATE at "
                        "matched CPU-seconds: --model scldm / state)")
    s.add_argument("--variant", action="append", default=[],
                   help="NAME:KEY=VALUE,... over the model's config block (repeatable)")
    s.add_argument("--stages", default="pretrain,generate,fit,predict")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, nargs="+",
                   help="run every variant at each of these seeds (instead of --seed) and "
                        "write the spread over them (spread.tsv, spread.png)")
    s.add_argument("--pretrained", action="store_true",
                   help="without a pretrain stage, fine-tune from the pipeline run's "
                        "<results>/<dataset>/models/<model>/pretrain.pt")
    s.add_argument("--out", default="benchmarks/out/budget")
    g = sub.add_parser("genes")
    g.add_argument("--configfile", default="config/config.yaml")
    g.add_argument("--presets", nargs="+", default=["small"])
    g.add_argument("--genes", nargs="+", type=int, default=[1000, 7000, 18080])
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("merge", help="one table and figure from several study outputs")
    m.add_argument("tables", nargs="+", help="budget.tsv files written by study")
    m.add_argument("--out", default="benchmarks/out/budget")
    args = parser.parse_args(argv)
    if args.cmd == "study" and not args.variant:
        args.variant = ["default:"]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    {"study": study, "genes": genes, "merge": merge}[args.cmd](args)


if __name__ == "__main__":
    main()
