"""Head benchmark: forward + backward of marginface heads on each engine beside PML and a 3-GEMM floor.

Variants are ``HEAD@ENGINE`` (e.g. ``arcface@chunked``), pytorch-metric-learning's ArcFaceLoss and the floor (the
three GEMMs any head must do: logits, dX, dW, and nothing else). All run interleaved, round-robin, in one process
(absolute times on a shared 2-core machine drift by 2x, ratios measured in the same round do not). Reported: the
median over rounds of each variant's time divided by the floor's, by PML's and by ArcFace's on the same engine
(the mining heads' gate), and the best time. Before timing, every head's fp32 loss and gradients on each engine
are checked against a float64 reference.

    python benchmarks/heads.py                          # B = 128, 512; C = 93,431, 360,232; D = 512; fp32 CPU
    python benchmarks/heads.py --batch-sizes 128 --classes 20000 --rounds 3 --heads arcface curricularface
    python benchmarks/heads.py --memory                 # also peak-RSS growth per variant, one subprocess each
    python benchmarks/heads.py --largest-c 24           # largest C one step trains in 24 GiB, per engine
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import marginface as mf

FLOOR, PML = "3-GEMM floor", "PML ArcFaceLoss"
DEFAULT_HEADS = ["arcface", "cosface", "combined", "mv_softmax", "arcnegface", "curricularface", "npcface"]


def variant(head: str, engine: str) -> str:
    return f"{head}@{engine}"


def make_step(name: str, batch: int, classes: int, dim: int, seed: int = 0) -> Callable[[], float]:
    """A closure running one forward + backward of variant ``name``; returns the loss (forces completion)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if name == FLOOR:
        weight = torch.randn(classes, dim, generator=generator) * 0.01
        upstream = torch.randn(batch, classes, generator=generator)

        def floor() -> float:
            logits = embeddings @ weight.t()  # forward
            grad_x = upstream @ weight  # backward, input
            grad_w = upstream.t() @ embeddings  # backward, weight
            return float(logits[0, 0] + grad_x[0, 0] + grad_w[0, 0])

        return floor
    if name == PML:
        from pytorch_metric_learning.losses import ArcFaceLoss

        module = ArcFaceLoss(classes, dim, margin=math.degrees(0.5), scale=64)
    else:
        head, _, engine = name.partition("@")
        module = mf.heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None)
    module.train()

    def step() -> float:
        for parameter in module.parameters():
            parameter.grad = None
        x = embeddings.clone().requires_grad_(True)
        loss = module(x, labels)
        loss.backward()
        return loss.detach().item()

    return step


def check_correctness(names: list[str], classes: int = 4000, dim: int = 512, batch: int = 64) -> dict[str, float]:
    """Relative error of each head's fp32 loss and gradients against the same head in float64."""
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    errors = {}
    for name in names:
        head, _, engine = name.partition("@")
        head64 = mf.heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None).double().eval()
        head32 = mf.heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None).eval()
        head32.load_state_dict({k: v.float() for k, v in head64.state_dict().items()})
        results = []
        for head, x in ((head64, embeddings.clone()), (head32, embeddings.float())):
            x.requires_grad_(True)
            loss = head(x, labels)
            loss.backward()
            results.append((loss.double(), x.grad.double(), head.weight.grad.double()))
        pairs = zip(results[1], results[0], strict=True)
        worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in pairs)
        errors[name] = worst
        if not worst < 1e-4:
            raise SystemExit(f"correctness gate failed: {name} fp32 vs float64 relative error {worst:.2e} >= 1e-4")
    return errors


def run_rounds(names: list[str], batch: int, classes: int, dim: int, rounds: int) -> dict[str, dict[str, float]]:
    steps = {name: make_step(name, batch, classes, dim) for name in names}
    for step in steps.values():  # warm-up round: allocator, oneDNN kernels, lazy imports
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    def ratio(name: str, reference: str) -> float | None:
        if reference not in times:
            return None
        return statistics.median(t / r for t, r in zip(times[name], times[reference], strict=True))

    summary = {}
    for name in names:
        engine = name.partition("@")[2]
        summary[name] = {
            "ratio_to_floor": ratio(name, FLOOR),
            "ratio_to_pml": ratio(name, PML),
            "ratio_to_arcface": ratio(name, variant("arcface", engine)) if engine else None,
            "best_seconds": min(times[name]),
        }
    return summary


def memory_probe(name: str, batch: int, classes: int, dim: int) -> float:
    """Peak RSS growth (MB) of two steps of ``name`` in a fresh interpreter, over its inputs and parameters."""
    code = (
        "import resource, sys; sys.argv=['x']; import benchmarks.heads as h;"
        f"step = h.make_step({name!r}, {batch}, {classes}, {dim});"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; step(); step();"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def peak_rss_mb(name: str, batch: int, classes: int, dim: int) -> float:
    """Peak RSS (MB) of a fresh interpreter that builds ``name`` and trains two steps: everything a run holds."""
    code = (
        "import resource, sys; sys.argv=['x']; import benchmarks.heads as h;"
        f"step = h.make_step({name!r}, {batch}, {classes}, {dim}); step(); step();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def largest_classes(name: str, batch: int, dim: int, budget_gib: float, probes: tuple[int, int]) -> dict:
    """The largest C whose step fits ``budget_gib``: peak RSS is linear in C, fitted on two measured class counts."""
    small, large = probes
    low, high = peak_rss_mb(name, batch, small, dim), peak_rss_mb(name, batch, large, dim)
    per_class = (high - low) / (large - small)
    fixed = low - per_class * small
    estimate = int((budget_gib * 1024 - fixed) / per_class)
    return {"probe_classes": list(probes), "probe_peak_mb": [low, high], "mb_per_1k_classes": per_class * 1000,
            "largest_classes": estimate}


def print_table(summary: dict[str, dict[str, float]], batch: int, classes: int, dim: int, rounds: int,
                memory: bool) -> None:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    print(f"\nB = {batch}, C = {classes:,}, D = {dim}, fp32, forward + backward, median of {rounds} interleaved rounds")
    memory_column = " extra RSS (MB) |" if memory else ""
    print("| variant | time / floor | time / PML ArcFaceLoss | time / ArcFace (same engine) | best (s) |"
          + memory_column)
    print(f"|---|---:|---:|---:|---:|{'---:|' if memory else ''}")
    for name, row in summary.items():
        extra = f" {row['extra_rss_mb']:.0f} |" if memory else ""
        print(f"| {name} | {cell(row['ratio_to_floor'])} | {cell(row['ratio_to_pml'])} | "
              f"{cell(row['ratio_to_arcface'])} | {row['best_seconds']:.3f} |{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes", type=int, nargs="+", default=[93_431, 360_232])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", nargs="+", default=DEFAULT_HEADS)
    parser.add_argument("--engines", nargs="+", default=mf.engines.available())
    parser.add_argument("--no-pml", action="store_true", help="leave out pytorch-metric-learning's ArcFaceLoss")
    parser.add_argument("--memory", action="store_true", help="also measure peak-RSS growth per variant")
    parser.add_argument("--largest-c", type=float, metavar="GIB",
                        help="only estimate the largest C that trains one step (B = the first batch size) in GIB")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.largest_c:
        results = {}
        for engine in args.engines:
            name = variant("arcface", engine)
            results[name] = largest_classes(name, args.batch_sizes[0], args.dim, args.largest_c, (50_000, 200_000))
            row = results[name]
            print(f"{name}: peak RSS {row['probe_peak_mb'][0]:.0f} MB at C = 50,000 and "
                  f"{row['probe_peak_mb'][1]:.0f} MB at C = 200,000 (B = {args.batch_sizes[0]}, D = {args.dim}): "
                  f"{row['mb_per_1k_classes']:.1f} MB per 1k classes -> largest C in {args.largest_c:g} GiB "
                  f"~ {row['largest_classes']:,}")
        if args.json:
            with open(args.json, "w") as stream:
                json.dump(results, stream, indent=2)
        return
    heads = [variant(h, e) for e in args.engines for h in args.heads if h != "softmax"]
    names = [FLOOR, *([] if args.no_pml else [PML]), *heads]
    errors = check_correctness(heads)
    print("correctness gate (fp32 vs float64, worst relative error of loss and both gradients): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dim": args.dim,
               "rounds": args.rounds, "correctness": errors, "runs": {}}
    for classes in args.classes:
        for batch in args.batch_sizes:
            summary = run_rounds(names, batch, classes, args.dim, args.rounds)
            if args.memory:
                for name in names:
                    summary[name]["extra_rss_mb"] = memory_probe(name, batch, classes, args.dim)
            results["runs"][f"B={batch},C={classes}"] = summary
            print_table(summary, batch, classes, args.dim, args.rounds, args.memory)
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
