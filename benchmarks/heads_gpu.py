"""GPU head benchmark (spec/perf.md §7.2, G1/G2): marginface engines beside plain bf16 linear + CE, PML and a floor.

One CUDA GPU. Embeddings arrive in bf16 (a backbone under autocast); every head runs inside bf16 autocast, where
marginface computes the margin and softmax in fp32. Variants run interleaved in one process; reported are the
median time over rounds (CUDA events), the ratio to the bf16 3-GEMM floor and the peak memory over W and its
gradient. ``--largest-c`` doubles C from 1M, then bisects, until one step at B = 512 no longer fits.

    python benchmarks/heads_gpu.py                         # B = 512, 1024; C = 93,431, 1,250,000
    python benchmarks/heads_gpu.py --largest-c --budget-s 150
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from marginface.bench.heads import FLOOR, PML, pml_available
from marginface.bench.heads import make_step as make_bench_step

LINEAR_CE = "bf16 linear + CE"
DEVICE, DTYPE = "cuda", "bfloat16"


def make_step(name: str, batch: int, classes: int, dim: int) -> Callable[[], float]:
    """One forward + backward of ``name`` on the GPU in bf16 autocast: marginface.bench.heads's variants (the
    floor, PML, HEAD@ENGINE) plus plain bf16 linear + cross-entropy, the GPU peer."""
    if name != LINEAR_CE:
        return make_bench_step(name, batch, classes, dim, device=DEVICE, dtype=DTYPE)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, dim, generator=generator).to(DEVICE, torch.bfloat16)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(DEVICE)
    module = torch.nn.Linear(dim, classes, bias=False, device=DEVICE)

    def step() -> float:
        x = x0.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(module(x), labels)
        loss.backward()
        module.weight.grad = None
        return loss.item()

    return step


def timed(step: Callable[[], float]) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1000


def peak_extra_gb(name: str, batch: int, classes: int, dim: int) -> float:
    """Peak memory of one step beyond W and its gradient (fp32), in GB."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = make_step(name, batch, classes, dim)
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - 2 * classes * dim * 4) / 1e9


def fits(name: str, batch: int, classes: int, dim: int) -> bool:
    try:
        make_step(name, batch, classes, dim)()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest(name: str, batch: int, dim: int, deadline: float) -> int:
    low, high = 0, 1_000_000
    while time.time() < deadline and fits(name, batch, high, dim):
        low, high = high, high * 2
    while time.time() < deadline and high - low > max(50_000, low // 20):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(name, batch, middle, dim) else (low, middle)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--classes", type=int, nargs="+", default=[93_431, 1_250_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", nargs="+", default=["arcface", "curricularface", "npcface"])
    parser.add_argument("--largest-c", action="store_true", help="only find the largest C at B = 512 per engine")
    parser.add_argument("--budget-s", type=float, default=150.0, help="time limit of --largest-c, in seconds")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.largest_c:
        deadline = time.time() + args.budget_s
        for engine in ("chunked", "dense"):
            share = time.time() + (deadline - time.time()) / (2 if engine == "chunked" else 1)
            print(f"largest C at B = 512, D = {args.dim}, arcface@{engine}: "
                  f"{largest(f'arcface@{engine}', 512, args.dim, share):,}", flush=True)
        return
    peers = [FLOOR, LINEAR_CE] + ([PML] if pml_available() else [])
    names = peers + [f"{h}@{e}" for e in ("chunked", "dense") for h in args.heads]
    for classes in args.classes:
        for batch in args.batch_sizes:
            steps = {}
            for name in names:
                if fits(name, batch, classes, args.dim):
                    steps[name] = make_step(name, batch, classes, args.dim)
            times: dict[str, list[float]] = {name: [] for name in steps}
            for step in steps.values():
                timed(step)  # warm-up
            for _ in range(args.rounds):
                for name, step in steps.items():
                    times[name].append(timed(step))
            floor = statistics.median(times[FLOOR])
            print(f"\nB = {batch}, C = {classes:,}, D = {args.dim}, median of {args.rounds} rounds")
            print("| variant | time (ms) | / floor | extra memory (GB) |\n|---|---:|---:|---:|")
            for name in names:
                if name not in steps:
                    print(f"| {name} | out of memory | | |")
                    continue
                median = statistics.median(times[name])
                extra = peak_extra_gb(name, batch, classes, args.dim)
                print(f"| {name} | {median * 1000:.2f} | {median / floor:.2f} | {extra:.2f} |", flush=True)
            steps.clear()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
