"""Head benchmark as recorded in docs/benchmarks.md: marginface.bench.heads at the issue's sizes, on 2 CPU threads.

    python benchmarks/heads.py                          # B = 128, 512; C = 93,431, 360,232; D = 512; fp32 CPU
    python benchmarks/heads.py --batch-sizes 128 --classes 20000 --rounds 3 --heads arcface curricularface
    python benchmarks/heads.py --memory                 # also peak-RSS growth per variant, one subprocess each
    python benchmarks/heads.py --largest-c 24           # largest C one step trains in 24 GiB, per engine

See marginface.bench.heads for what is timed and how (``marginface bench heads`` runs the same code).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

import marginface as mf
from marginface.bench.heads import (
    DEFAULT_HEADS,
    FLOOR,
    PML,
    check_correctness,
    largest_classes,
    memory_probe,
    print_table,
    run_rounds,
    variant,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes", type=int, nargs="+", default=[93_431, 360_232])
    parser.add_argument("--dim", type=int, default=512)
    # One round's ratio strays by ±5–10 % on a shared 2-core VM: 21 rounds pin the median to about ±0.02, what a
    # 1.1x gate needs (5 rounds gave medians 0.15 apart for one commit; docs/benchmarks.md).
    parser.add_argument("--rounds", type=int, default=21)
    # A neighbour's burst only adds time, so a round may keep each variant's fastest of N passes; on the EPYC VM that
    # did not narrow the spread at B = 128, C = 360k, which is page faulting (docs/benchmarks.md).
    parser.add_argument("--repeats", type=int, default=1, help="passes per round, each variant's fastest kept")
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
            results[name] = largest_classes(name, args.batch_sizes[0], args.dim, args.largest_c, (200_000, 400_000))
            row = results[name]
            print(f"{name}: peak RSS {row['probe_peak_mb'][0]:.0f} MB at C = 200,000 and "
                  f"{row['probe_peak_mb'][1]:.0f} MB at C = 400,000 (B = {args.batch_sizes[0]}, D = {args.dim}): "
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
               "rounds": args.rounds, "repeats": args.repeats, "correctness": errors, "runs": {}}
    for classes in args.classes:
        for batch in args.batch_sizes:
            summary = run_rounds(names, batch, classes, args.dim, args.rounds, repeats=args.repeats)
            if args.memory:
                for name in names:
                    summary[name]["extra_rss_mb"] = memory_probe(name, batch, classes, args.dim)
            results["runs"][f"B={batch},C={classes}"] = summary
            print_table(summary, batch, classes, args.dim, args.rounds, args.memory, repeats=args.repeats)
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
