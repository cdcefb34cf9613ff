"""Head benchmark: forward + backward of every marginface head beside pytorch-metric-learning and a 3-GEMM floor.

All variants run interleaved, round-robin, in one process (absolute times on a shared 2-core machine drift by 2×,
ratios measured in the same round do not). Reported: the median over rounds of each variant's time divided by
the floor's time in that round, the same against pytorch-metric-learning's ArcFaceLoss, and the best time.
Before timing, every head's fp32 loss and gradients are checked against a float64 reference.

    python benchmarks/heads.py                          # B = 128 and 512, C = 93,431, D = 512, fp32 CPU
    python benchmarks/heads.py --batch-sizes 128 --classes 20000 --rounds 3 --heads arcface curricularface
    python benchmarks/heads.py --memory                 # also peak-RSS growth per variant, one subprocess each
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
        module = mf.heads.create(name, num_classes=classes, embedding_size=dim)
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
        head64 = mf.heads.create(name, num_classes=classes, embedding_size=dim).double().eval()
        head32 = mf.heads.create(name, num_classes=classes, embedding_size=dim).eval()
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
    summary = {}
    for name in names:
        to_floor = [t / f for t, f in zip(times[name], times[FLOOR], strict=True)]
        to_pml = [t / p for t, p in zip(times[name], times[PML], strict=True)]
        summary[name] = {
            "ratio_to_floor": statistics.median(to_floor),
            "ratio_to_pml": statistics.median(to_pml),
            "best_seconds": min(times[name]),
        }
    return summary


def memory_probe(name: str, batch: int, classes: int, dim: int) -> float:
    """Peak RSS growth (MB) of one step of ``name`` in a fresh interpreter."""
    code = (
        "import resource, sys; sys.argv=['x']; import benchmarks.heads as h;"
        f"step = h.make_step({name!r}, {batch}, {classes}, {dim});"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; step(); step();"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes", type=int, default=93_431)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", nargs="+", default=mf.heads.available())
    parser.add_argument("--memory", action="store_true", help="also measure peak-RSS growth per variant")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    names = [FLOOR, PML, *args.heads]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    errors = check_correctness([n for n in args.heads if n != "softmax"])
    print("correctness gate (fp32 vs float64, worst relative error of loss and both gradients): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "classes": args.classes,
               "dim": args.dim, "rounds": args.rounds, "correctness": errors, "batches": {}}
    for batch in args.batch_sizes:
        summary = run_rounds(names, batch, args.classes, args.dim, args.rounds)
        if args.memory:
            for name in names:
                summary[name]["extra_rss_mb"] = memory_probe(name, batch, args.classes, args.dim)
        results["batches"][str(batch)] = summary
        print(f"\nB = {batch}, C = {args.classes:,}, D = {args.dim}, fp32, forward + backward, "
              f"median of {args.rounds} interleaved rounds")
        memory_column = " extra RSS (MB) |" if args.memory else ""
        print(f"| head | time / floor | time / PML ArcFaceLoss | best (s) |{memory_column}")
        print(f"|---|---:|---:|---:|{'---:|' if args.memory else ''}")
        for name, row in summary.items():
            memory = f" {row['extra_rss_mb']:.0f} |" if args.memory else ""
            print(f"| {name} | {row['ratio_to_floor']:.2f} | {row['ratio_to_pml']:.2f} | "
                  f"{row['best_seconds']:.3f} |{memory}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
