"""Sharded classifier figures: bytes on the wire (computed), step time and memory on gloo CPU ranks, Partial FC's cost.

    python benchmarks/sharded.py wire                                   # the formula's table, C × N
    python benchmarks/sharded.py steps --ranks 2 4 --classes 93431 1000000
    python benchmarks/sharded.py sampling --classes 257000 1250000 --rates 0.1 0.2 0.3 --batch-size 1024

`steps` launches N gloo processes per variant: the sharded head (each rank C/N centres, the gathered batch) and
the replicated head (every rank all C centres on the chunked engine, the C×D gradient all-reduced as DDP does),
each with SGD + momentum, ArcFace, B rows per rank. It reports the median step time over rounds (the variants
alternate) and each rank's peak RSS against the prediction W + grad + momentum + working set + the process's
RSS before the head existed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import marginface as mf
from marginface.engines.chunked import DEFAULT_KEEP_MB
from marginface.engines.sampling import sample_classes

FP32 = 4


# -- bytes on the wire ---------------------------------------------------------------------------------------
def wire_bytes(classes: int, ranks: int, batch: int, dim: int) -> dict[str, float]:
    """Bytes each rank sends per step for the head (ring collectives; the backbone's DDP traffic is the same
    for both and left out).

    replicated: all-reduce of the C×D fp32 gradient, 2(N−1)/N·C·D·4.
    sharded: all-gather of X and labels, (N−1)·B·(D·4 + 8); all-reduce of cos θ_y, 2(N−1)/N·N·B·4; the max and
    the sum all-reduces (float64, 1 + 2 values per row for ArcFace's log-sum-exp and class count),
    2(N−1)/N·N·B·3·8; reduce-scatter of dX, (N−1)·B·D·4.
    """
    ring = 2 * (ranks - 1) / ranks
    replicated = ring * classes * dim * FP32
    rows = ranks * batch
    sharded = ((ranks - 1) * batch * (dim * FP32 + 8) + ring * rows * FP32 + ring * rows * 3 * 8
               + (ranks - 1) * batch * dim * FP32)
    return {"replicated": replicated, "sharded": sharded}


def print_wire(batch: int, dim: int) -> None:
    print(f"bytes sent per rank per step for the head, B = {batch} per rank, D = {dim}, fp32")
    print("| classes | ranks | replicated (DDP all-reduce of dW) | sharded (gather X + 3 row all-reduces + "
          "reduce-scatter dX) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for classes in (93_431, 2_000_000, 10_000_000):
        for ranks in (8, 64):
            figures = wire_bytes(classes, ranks, batch, dim)
            print(f"| {classes:,} | {ranks} | {human(figures['replicated'])} | {human(figures['sharded'])} | "
                  f"{figures['replicated'] / figures['sharded']:,.0f}× |")


def human(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


# -- step time and memory on gloo ranks ----------------------------------------------------------------------
def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_worker(rank: int, world: int, port: int, variant: str, classes: int, batch: int, dim: int, steps: int,
                threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        before = current_rss_mb()
        engine = "sharded" if variant == "sharded" else "chunked"
        torch.manual_seed(0)
        head = mf.heads.create("arcface", num_classes=classes, embedding_size=dim, engine=engine)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)
        labels = torch.randint(0, classes, (batch,), generator=generator)
        embeddings = torch.randn(batch, dim, generator=generator)
        times = []
        for step in range(steps + 1):  # the first step is warm-up (and allocates momentum)
            dist.barrier()
            start = time.perf_counter()
            x = embeddings.clone().requires_grad_(True)
            head(x, labels).backward()
            if variant == "replicated":
                dist.all_reduce(head.weight.grad)
                head.weight.grad.div_(world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            dist.barrier()
            if step:
                times.append(time.perf_counter() - start)
        rows = len(head.class_range)
        gathered = batch * (world if variant == "sharded" else 1)
        keep = min(DEFAULT_KEEP_MB, gathered * rows * FP32 / 2**20)
        chunk = head.engine.block_classes(gathered)
        working = (2 * gathered * dim * FP32 + 3 * gathered * chunk * FP32) / 2**20 + keep
        predicted = before + 3 * rows * dim * FP32 / 2**20 + working
        torch.save({"times": times, "peak_mb": rss_mb(), "predicted_mb": predicted, "rows": rows,
                    "before_mb": before}, Path(out) / f"{variant}{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_variant(variant: str, ranks: int, classes: int, batch: int, dim: int, steps: int) -> list[dict]:
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = max(1, (os.cpu_count() or 2) // ranks)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(step_worker, nprocs=ranks, start_method="spawn",
                           args=(ranks, port, variant, classes, batch, dim, steps, threads, out))
        return [torch.load(Path(out) / f"{variant}{rank}.pt") for rank in range(ranks)]


def fits(variant: str, ranks: int, classes: int, dim: int, budget_gib: float) -> bool:
    rows = classes if variant == "replicated" else -(-classes // ranks)
    return ranks * (3 * rows * dim * FP32 + 0.5 * 2**30) < budget_gib * 2**30


def print_steps(args: argparse.Namespace) -> None:
    print(f"head step (fwd + bwd + SGD momentum), ArcFace, B = {args.batch_size} per rank, D = {args.dim}, fp32, "
          f"gloo, {os.cpu_count()} cores shared by the ranks; median of {args.rounds} rounds × {args.steps} steps")
    print("| classes | ranks | replicated s/step | sharded s/step | speed-up | sharded peak RSS / predicted per rank "
          "(MB) | replicated peak RSS / predicted (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for classes in args.classes:
        for ranks in args.ranks:
            results: dict[str, list[list[dict]]] = {"replicated": [], "sharded": []}
            for _ in range(args.rounds):
                for variant in results:
                    if fits(variant, ranks, classes, args.dim, args.memory_gib):
                        results[variant].append(run_variant(variant, ranks, classes, args.batch_size, args.dim,
                                                            args.steps))
            cells = {}
            for variant, rounds in results.items():
                if not rounds:
                    cells[variant] = (None, "does not fit")
                    continue
                step = statistics.median(t for per_rank in rounds for t in per_rank[0]["times"])
                peak = max(r["peak_mb"] for per_rank in rounds for r in per_rank)
                predicted = max(r["predicted_mb"] for per_rank in rounds for r in per_rank)
                cells[variant] = (step, f"{peak:,.0f} / {predicted:,.0f}")
            rep, shard = cells["replicated"], cells["sharded"]
            speed = f"{rep[0] / shard[0]:.2f}×" if rep[0] and shard[0] else "–"
            rep_time = f"{rep[0]:.3f}" if rep[0] else "–"
            shard_time = f"{shard[0]:.3f}" if shard[0] else "–"
            print(f"| {classes:,} | {ranks} | {rep_time} | {shard_time} | {speed} | {shard[1]} | {rep[1]} |",
                  flush=True)


# -- Partial FC's sampling cost (spec/perf.md C3) ------------------------------------------------------------
def print_sampling(args: argparse.Namespace) -> None:
    """Partial FC's overhead: one step of the ``partial`` engine (draw, blockwise gather of the kept rows, their
    gradient into the reused [C, D] buffer) against the chunked engine on an already gathered W_kept."""
    torch.set_num_threads(os.cpu_count() or 2)
    batch, dim = args.batch_size, args.dim
    print(f"Partial FC on one process, ArcFace, B = {batch}, D = {dim}, fp32; median of {args.steps} steps")
    print("| C_local | r | kept | partial step s | chunked on W_kept s | sampling s (difference) | draw s | share | "
          "SGD dense s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for classes in args.classes:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(classes, dim, generator=generator).mul_(0.01).requires_grad_(True)
        momentum = torch.zeros_like(weight)
        labels = torch.randint(0, classes, (batch,), generator=generator)
        embeddings = torch.randn(batch, dim, generator=generator)
        margin = mf.margins.create("arcface")
        for rate in args.rates:
            partial, chunked = mf.engines.create("partial", sample_rate=rate), mf.engines.create("chunked")
            times: dict[str, list[float]] = {"partial": [], "kept": [], "draw": [], "sgd": []}
            kept = 0
            for step in range(args.steps + 1):
                start = time.perf_counter()
                sample = sample_classes(labels, classes, rate)
                draw = time.perf_counter() - start
                kept = len(sample.index)
                leaf = weight.detach()[sample.index].requires_grad_(True)
                start = time.perf_counter()
                chunked.loss(margin, embeddings.clone().requires_grad_(True), leaf, sample.labels).backward()
                on_kept = time.perf_counter() - start
                weight.grad = None
                start = time.perf_counter()
                partial.loss(margin, embeddings.clone().requires_grad_(True), weight, labels).backward()
                step_time = time.perf_counter() - start
                with torch.no_grad():
                    start = time.perf_counter()
                    momentum.mul_(0.9).add_(weight.grad)
                    weight.sub_(momentum, alpha=1e-6)
                    sgd = time.perf_counter() - start
                weight.grad = None
                if step:
                    for key, value in zip(times, (step_time, on_kept, draw, sgd), strict=True):
                        times[key].append(value)
            median = {key: statistics.median(values) for key, values in times.items()}
            extra = median["partial"] - median["kept"]
            print(f"| {classes:,} | {rate} | {kept:,} | {median['partial']:.3f} | {median['kept']:.3f} | "
                  f"{extra:.4f} | {median['draw']:.4f} | {100 * extra / median['partial']:.1f} % | "
                  f"{median['sgd']:.3f} |", flush=True)
        del weight, momentum


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["wire", "steps", "sampling"])
    parser.add_argument("--classes", type=int, nargs="+", default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--batch-size", type=int, default=None, help="rows per rank (default 128; sampling 1024)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-gib", type=float, default=22.0, help="skip variants predicted not to fit")
    args = parser.parse_args(argv)
    if args.what == "wire":
        print_wire(args.batch_size or 128, args.dim)
    elif args.what == "steps":
        args.classes = args.classes or [93_431, 1_000_000]
        args.batch_size = args.batch_size or 128
        print_steps(args)
    else:
        args.classes = args.classes or [257_000, 1_250_000]
        args.batch_size = args.batch_size or 1024
        print_sampling(args)


if __name__ == "__main__":
    sys.exit(main())
