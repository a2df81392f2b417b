"""Throughput of the Lingshu-Cell network: training steps and sampling, cells per second.

    python benchmarks/throughput.py                      # tiny, small on CPU; small, paper, paper_s32 on CUDA
    python benchmarks/throughput.py --quick              # tiny only, a few seconds (smoke test)
    python benchmarks/throughput.py --presets paper_s32 --batch 32 --sample-cells 64 --json out.json

Per preset, on simulated count tokens (negative binomial counts, ~85 % zeros, drawn with the
gene means of :mod:`lingshu.data.simulate` and quantised by :func:`lingshu.tokens.quantize_counts`):

- training: median over ``--repeats`` timed optimiser steps (after ``--warmup`` steps) of one full
  step as :func:`lingshu.models.training.train` does it for Lingshu-Cell: mask, forward (bf16
  autocast on CUDA) with the per-gene head on the masked genes only (``masked_loss``, as
  pre-training and fine-tuning ask; ``--full-head``: every gene's logits, the loss on the
  masked ones), diffusion loss, backward, grad-norm clip 1.0, AdamW (decay on matrices only),
  EMA update. Cells/s, model TFLOP/s (``estimate_flops_per_cell``, which counts the head over
  every gene) and MFU against ``--peak-tflops`` (default 989, dense bf16 of an H100/H200, on
  CUDA; on the CPU only when given); ``--profile N`` prints the N costliest operators of 3
  more steps;
- sampling with :func:`lingshu.models.mddm.diffusion.sample` on ``--sample-cells`` cells:
  3 steps with classifier-free guidance w = 2 (two forward passes per step; genetic perturbation)
  on the conditional network, and 256 unguided steps (unconditional generation) on an
  unconditional network of the same preset, computing the per-gene head only for the genes
  each step unmasks (``select``), and once more with the head over every gene as the baseline
  (the speed-up of the selective head is printed);
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (training and sampling apart), the
  process's peak RSS on the CPU (cumulative over the presets run so far);
- parameters: all, and the transformer blocks only.

Ratios against baselines measured in the same process: training cells/s relative to the first
preset, and the cost of one guided step relative to one unguided step. That ratio is 2 network
passes against 1 plus the sampler's own work: each of the 3 guided steps draws about a third of
the genes from softmax(logits), an unguided step 1/256 of them, so with a small network (CPU
presets) it lies well above 2. Nothing here asserts on time.

On a busy CPU, torch's default thread count can be many times slower than ``--threads 1``
(the script says so when the load average is high).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

from lingshu.data.simulate import SimulationParams, _draw_gene_means
from lingshu.stats import sample_negative_binomial
from lingshu.models.mddm.diffusion import diffusion_loss, mask_tokens, masked_loss, sample
from lingshu.models.mddm.network import PRESETS, LingshuNetwork, config_from_preset
from lingshu.models.training import EMA, param_groups
from lingshu.tokens import quantize_counts

PAPER_GENES = 18_080
N_CONTEXTS, N_PERTURBATIONS = 4, 65  # perturbation 0 = unknown, 1 = control
CONTROL = 1


# ---------------------------------------------------------------------------------------------
# data


def simulated_tokens(n_cells: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Tokens (n_cells, n_genes) int64 of NB counts with the simulator's gene means and
    dispersions and a log-normal library size per cell; also the fraction of zero counts."""
    p = SimulationParams(n_genes=n_genes, n_cells=n_cells, seed=seed)
    rng = np.random.default_rng(seed)
    log_mean, theta = _draw_gene_means(p, rng)  # (G,), (G,)
    size_factor = rng.lognormal(0.0, p.library_size_log_sd, n_cells)  # (C,)
    means = (np.exp(log_mean)[None, :] * size_factor[:, None]).astype(np.float32)  # (C, G)
    counts = sample_negative_binomial(means, theta, rng)  # (C, G) int32
    return quantize_counts(counts), float((counts == 0).mean())


# ---------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def conditions(n: int, n_genes: int, gen: torch.Generator, device: torch.device, control: bool = False) -> dict:
    """Condition tensors of ``n`` cells: a context, a perturbation (or the control) and its target gene."""
    context = torch.randint(0, N_CONTEXTS, (n,), generator=gen, device=device)  # (n,)
    if control:
        pert = torch.full((n,), CONTROL, dtype=torch.long, device=device)
        target = torch.full((n, 1), -1, dtype=torch.long, device=device)  # no target gene
    else:
        pert = torch.randint(CONTROL + 1, N_PERTURBATIONS, (n,), generator=gen, device=device)
        target = torch.randint(0, n_genes, (n, 1), generator=gen, device=device)  # (n, 1)
    return {"context": context, "perturbation": pert, "target_genes": target}


# ---------------------------------------------------------------------------------------------
# one preset


def profile_steps(step, device: torch.device, preset: str, rows: int) -> None:
    """Print the ``rows`` operators that take most of 3 profiled training steps (device time
    on CUDA, CPU time on the CPU): where a step's time goes, for the next optimisation."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"  {preset}: profile of 3 training steps, by {key}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def bench_preset(preset: str, n_genes: int, batch: int, sample_cells: int, args, device: torch.device) -> dict:
    bf16 = device.type == "cuda" and not args.no_bf16
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens_np, zero_fraction = simulated_tokens(max(256, batch), n_genes)
    pool = torch.from_numpy(tokens_np).to(device)  # (C, G) long

    cfg = config_from_preset(preset, n_genes, n_contexts=N_CONTEXTS, n_perturbations=N_PERTURBATIONS)
    net = LingshuNetwork(cfg).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(net, 0.1), lr=2e-4, betas=(0.9, 0.95))
    ema = EMA(net, 0.999)
    fwd = torch.compile(net) if args.compile else net
    compile_note = "on" if args.compile else "off"

    def forward(*a, **kw):  # late binding: falls back to eager when compilation fails
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fwd(*a, **kw)

    def train_step() -> None:
        idx = torch.randint(0, pool.shape[0], (batch,), generator=gen, device=device)
        tokens = pool[idx]  # (B, G)
        cond = conditions(batch, n_genes, gen, device, control=False)
        optimizer.zero_grad(set_to_none=True)
        noisy, mask, t = mask_tokens(tokens, gen)
        if args.full_head:  # every gene's logits (B, G, 281), the loss on the masked ones
            logits = forward(noisy, **cond)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = diffusion_loss(logits, tokens, mask, t)
        else:  # as pre-training and fine-tuning do: the masked genes' logits only
            loss = masked_loss(forward, noisy, tokens, mask, t, **cond)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        ema.update(net)

    # -- training
    reset_peak_memory(device)
    try:
        train_step()
    except Exception as err:  # torch.compile is best effort here: report and go on eagerly
        if not args.compile:
            raise
        compile_note = f"failed ({type(err).__name__}), eager"
        print(f"  {preset}: torch.compile failed, running eagerly: {str(err).splitlines()[0][:200]}", flush=True)
        fwd = net
        train_step()
    for _ in range(args.warmup - 1):
        train_step()
    train_times = [timed(train_step, device) for _ in range(args.repeats)]
    if args.profile:
        profile_steps(train_step, device, preset, args.profile)
    train_s = statistics.median(train_times)
    train_mem = peak_memory_gib(device)
    flops_per_cell = net.estimate_flops_per_cell()  # forward + backward
    cells_per_s = batch / train_s
    tflops = cells_per_s * flops_per_cell / 1e12
    peak = args.peak_tflops
    mfu = tflops / peak if peak else None
    print(f"  {preset}: training {train_s * 1e3:.1f} ms/step ({batch} cells), {cells_per_s:.1f} cells/s", flush=True)

    # -- guided sampling (conditional network, genetic perturbation: 3 steps, w = 2)
    optimizer = ema = None  # free memory (the closures above are done)
    net.eval()
    reset_peak_memory(device)
    cond = conditions(sample_cells, n_genes, gen, device, control=False)
    uncond = {**cond, "perturbation": torch.full_like(cond["perturbation"], CONTROL),
              "target_genes": torch.full_like(cond["target_genes"], -1)}

    def guided() -> None:
        sample(lambda x, c: forward(x, **c), sample_cells, n_genes, args.guided_steps, gen,
               cond=cond, uncond=uncond, guidance=args.guidance)

    guided()  # warm-up
    guided_s = statistics.median(timed(guided, device) for _ in range(args.repeats))
    guided_mem = peak_memory_gib(device)
    print(f"  {preset}: guided sampling {guided_s:.2f} s ({args.guided_steps} steps, {sample_cells} cells)", flush=True)

    # -- unguided sampling (unconditional network of the same preset: 256 steps)
    params_all, params_blocks = net.num_parameters(), net.num_parameters(blocks_only=True)
    seq_len = cfg.seq_len
    net = fwd = pool = None
    unet = LingshuNetwork(config_from_preset(preset, n_genes)).to(device).eval()
    fwd = torch.compile(unet) if compile_note == "on" else unet
    reset_peak_memory(device)

    def unguided(steps: int, select: bool = True) -> None:
        sample(lambda x, c, select=None: forward(x, select=select), sample_cells, n_genes, steps,
               gen, select=select)

    unguided(2)  # warm-up
    unguided_times = [timed(lambda: unguided(args.uncond_steps), device) for _ in range(args.sample_repeats)]
    unguided_s = statistics.median(unguided_times)
    unguided_mem = peak_memory_gib(device)
    print(f"  {preset}: unguided sampling {unguided_s:.2f} s ({args.uncond_steps} steps, {sample_cells} cells)",
          flush=True)
    # Baseline in the same process: the per-gene head over every gene at every step.
    full_head_s = statistics.median(timed(lambda: unguided(args.uncond_steps, select=False), device)
                                    for _ in range(args.sample_repeats))
    print(f"  {preset}: unguided sampling, full head {full_head_s:.2f} s "
          f"(selective head x{full_head_s / unguided_s:.2f} faster)", flush=True)
    unet = fwd = None
    reset_peak_memory(device)

    guided_step = guided_s / args.guided_steps  # seconds per step for all sample cells
    unguided_step = unguided_s / args.uncond_steps
    fwd_flops = flops_per_cell / 3  # the estimate counts forward + backward as 3x forward
    return {
        "preset": preset, "n_genes": n_genes, "group_size": cfg.group_size, "seq_len": seq_len,
        "params": params_all, "params_blocks": params_blocks, "zero_fraction": zero_fraction,
        "bf16": bf16, "compile": compile_note,
        "train": {
            "batch": batch, "warmup": args.warmup, "repeats": args.repeats,
            "seconds_per_step_median": train_s, "seconds_per_step_all": train_times,
            "cells_per_s": cells_per_s, "flops_per_cell": flops_per_cell, "tflops": tflops,
            "peak_tflops": peak, "mfu": mfu, "peak_memory_gib": train_mem,
        },
        "sample": {
            "cells": sample_cells,
            "guided": {"steps": args.guided_steps, "guidance": args.guidance, "seconds_median": guided_s,
                       "cells_per_s": sample_cells / guided_s, "seconds_per_step": guided_step,
                       "tflops": sample_cells * 2 * args.guided_steps * fwd_flops / guided_s / 1e12,
                       "peak_memory_gib": guided_mem},
            "unguided": {"steps": args.uncond_steps, "seconds_median": unguided_s, "seconds_all": unguided_times,
                         "cells_per_s": sample_cells / unguided_s, "seconds_per_step": unguided_step,
                         "tflops": sample_cells * args.uncond_steps * fwd_flops / unguided_s / 1e12,
                         "peak_memory_gib": unguided_mem, "full_head_seconds_median": full_head_s,
                         "selective_head_speedup": full_head_s / unguided_s},
            "guided_over_unguided_per_step": guided_step / unguided_step,
        },
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (cumulative)",
    }


# ---------------------------------------------------------------------------------------------
# report


def print_tables(results: list[dict], device: torch.device) -> None:
    base = results[0]
    mem = "GPU GiB" if device.type == "cuda" else "RSS GiB"
    print()
    print("training (full optimiser step; median of timed steps)")
    head = (f"{'preset':<10} {'genes':>6} {'S':>3} {'tokens':>6} {'params':>8} {'blocks':>8} {'batch':>5} "
            f"{'ms/step':>9} {'cells/s':>9} {'x ' + base['preset']:>8} {'TFLOP/s':>8} {'MFU':>6} {mem:>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        t = r["train"]
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
        print(f"{r['preset']:<10} {r['n_genes']:>6} {r['group_size']:>3} {r['seq_len']:>6} "
              f"{r['params'] / 1e6:>7.2f}M {r['params_blocks'] / 1e6:>7.2f}M {t['batch']:>5} "
              f"{t['seconds_per_step_median'] * 1e3:>9.1f} {t['cells_per_s']:>9.1f} "
              f"{t['cells_per_s'] / base['train']['cells_per_s']:>8.3f} {t['tflops']:>8.3f} {mfu:>6} "
              f"{t['peak_memory_gib']:>8.2f}")
    print()
    g0, u0 = results[0]["sample"]["guided"], results[0]["sample"]["unguided"]
    print(f"sampling (guided: {g0['steps']} steps, w={g0['guidance']:g}, 2 passes/step, conditional network; "
          f"unguided: {u0['steps']} steps, unconditional network)")
    head = (f"{'preset':<10} {'cells':>5} {'guided s':>9} {'cells/s':>9} {'unguided s':>10} {'cells/s':>9} "
            f"{'ms/step g':>10} {'ms/step u':>10} {'g/u step':>9} {mem + ' g':>10} {mem + ' u':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["sample"]
        g, u = s["guided"], s["unguided"]
        print(f"{r['preset']:<10} {s['cells']:>5} {g['seconds_median']:>9.3f} {g['cells_per_s']:>9.2f} "
              f"{u['seconds_median']:>10.2f} {u['cells_per_s']:>9.3f} {g['seconds_per_step'] * 1e3:>10.1f} "
              f"{u['seconds_per_step'] * 1e3:>10.1f} {s['guided_over_unguided_per_step']:>9.2f} "
              f"{g['peak_memory_gib']:>10.2f} {u['peak_memory_gib']:>10.2f}")
    if device.type != "cuda":
        print("\nCPU memory is the process's peak RSS so far (it never goes down: later presets include earlier ones).")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=None,
                        help="default: tiny small on CPU, small paper paper_s32 on CUDA")
    parser.add_argument("--genes", type=int, default=None,
                        help=f"genes per cell (default: 1,000 for tiny/small, {PAPER_GENES:,} for paper presets)")
    parser.add_argument("--batch", type=int, default=None,
                        help="training cells per step (default: 64 on CPU; on CUDA 32 for paper presets, "
                             "256 otherwise)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps and guided runs (default 5)")
    parser.add_argument("--sample-cells", type=int, default=None,
                        help="cells per sampling run (default: 16 on CPU, 64 on CUDA); cells/s scale with it")
    parser.add_argument("--guided-steps", type=int, default=3, help="steps of guided sampling (default 3)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance w (default 2)")
    parser.add_argument("--uncond-steps", type=int, default=256, help="steps of unguided sampling (default 256)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed unguided runs (default 1)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s in TFLOP/s for MFU (default 989 on CUDA: H100/H200 dense bf16; none on CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="try torch.compile (falls back to eager on failure)")
    parser.add_argument("--full-head", action="store_true",
                        help="train with every gene's logits (the loss on the masked ones) rather "
                             "than the masked genes' only, as training does")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile 3 training steps per preset and print the ROWS costliest "
                             "operators (torch.profiler)")
    parser.add_argument("--quick", action="store_true", help="tiny preset only, small sizes: a few seconds")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    if args.quick:
        args.presets = args.presets or ["tiny"]
        args.genes = args.genes or 256
        args.batch = args.batch or 16
        args.sample_cells = args.sample_cells or 4
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    presets = args.presets or (["small", "paper", "paper_s32"] if cuda else ["tiny", "small"])
    if args.peak_tflops is None and cuda:
        args.peak_tflops = 989.0
    args.warmup = max(args.warmup, 1)
    if min(args.repeats, args.sample_repeats, args.guided_steps, args.uncond_steps) < 1:
        parser.error("--repeats, --sample-repeats, --guided-steps and --uncond-steps must be >= 1")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {device.type}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {torch.get_num_threads()} CPU threads")
          + (f", load average {load[0]:.2f} on {os.cpu_count()} CPUs" if load else "")
          + f", bf16 autocast {'on' if cuda and not args.no_bf16 else 'off'}, compile {'on' if args.compile else 'off'}"
          + (f", MFU against {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ", no MFU (give --peak-tflops)"),
          flush=True)
    if not cuda and load and torch.get_num_threads() > 1 and load[0] > (os.cpu_count() or 1) - 0.5:
        # measured on 2 busy cores: 2 threads ran the small preset 6-17x slower than 1 thread
        print(f"note: the CPUs are busy (load {load[0]:.1f}); {torch.get_num_threads()} threads contend with "
              "the other work and can be many times slower: compare with --threads 1", flush=True)

    results = []
    for preset in presets:
        paper = preset.startswith("paper")
        n_genes = args.genes or (PAPER_GENES if paper else 1000)
        batch = args.batch or ((32 if paper else 256) if cuda else 64)
        sample_cells = args.sample_cells or (64 if cuda else 16)
        print(f"{preset}: {n_genes} genes, batch {batch}, {sample_cells} sampling cells ...", flush=True)
        results.append(bench_preset(preset, n_genes, batch, sample_cells, args, device))
    print(f"\nsimulated tokens: {results[0]['zero_fraction']:.1%} zero counts")
    print_tables(results, device)

    if args.json:
        meta = {"torch": torch.__version__, "device": device.type,
                "device_name": (torch.cuda.get_device_name(device) if cuda
                                else platform.processor() or platform.machine()),
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": load,
                "peak_tflops": args.peak_tflops, "baseline_preset": results[0]["preset"]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "presets": results}, f, indent=2, default=float)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
