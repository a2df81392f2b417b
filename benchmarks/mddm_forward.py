"""Training throughput of the Lingshu-Cell network: forward + backward cells per second.

    python benchmarks/mddm_forward.py [--repeats 5] [--threads N]

Prints, per preset, the median over ``--repeats`` timed steps (after one warm-up) of one
training step (mask, forward, diffusion loss, backward; no optimiser), cells/s, peak memory and,
on a GPU, the model FLOPs utilisation against the card's dense bf16 peak. Runs "tiny" and
"small" on the CPU, and "paper" (S = 8, 18,080 genes, bf16 autocast) when CUDA is present.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from lingshu.models.mddm.diffusion import diffusion_loss, mask_tokens
from lingshu.models.mddm.network import LingshuNetwork, config_from_preset
from lingshu.tokens import N_EXPR_TOKENS

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per card


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def bench(preset: str, n_genes: int, batch: int, device: torch.device, repeats: int, bf16: bool) -> None:
    torch.manual_seed(0)
    net = LingshuNetwork(config_from_preset(preset, n_genes)).to(device).train()
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, N_EXPR_TOKENS, (batch, n_genes), generator=gen, device=device)

    def step() -> None:
        noisy, mask, t = mask_tokens(tokens, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(noisy)  # (B, G, 281)
        diffusion_loss(logits, tokens, mask, t).backward()
        net.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    cells_per_s = batch / median
    if device.type == "cuda":
        mem = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        mem = f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    line = (
        f"{preset:>6} G={n_genes:>6} S={net.cfg.group_size} L={net.cfg.seq_len:>5} "
        f"params={net.num_parameters() / 1e6:7.2f}M (blocks {net.num_parameters(True) / 1e6:.2f}M) "
        f"batch={batch:>3} {device.type}{' bf16' if bf16 else ''}: "
        f"{median * 1e3:8.1f} ms/step, {cells_per_s:8.1f} cells/s, {mem}"
    )
    peak = peak_flops(device)
    if peak:
        line += f", MFU {cells_per_s * net.estimate_flops_per_cell() / peak:.1%}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--gpu-batch", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench("tiny", 64, 32, cpu, args.repeats, bf16=False)
    bench("small", 1000, 32, cpu, args.repeats, bf16=False)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(gpu)}")
        bench("small", 1000, 256, gpu, args.repeats, bf16=True)
        bench("paper", 18080, args.gpu_batch, gpu, args.repeats, bf16=True)
    else:
        print("no GPU: paper preset (S=8, 18,080 genes) skipped")


if __name__ == "__main__":
    main()
