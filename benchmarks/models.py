"""CPU throughput of the backbones: training steps (forward + backward + SGD) or eval forwards, in img/s.

Every variant runs in one process, interleaved round-robin (spec/perf.md §7.0): one warm-up round, then
`--rounds` rounds; each round times every variant once, and the report gives the median img/s (wall), the
images per CPU-second of this process (less sensitive to other jobs on a shared machine; with 2 threads a
fully used box gives 2 CPU-s per wall second) and the median of the per-round ratios to the first variant
(the baseline), which is what to trust on a shared machine. The training step is backbone + a 400-class
linear classifier + cross-entropy + SGD(momentum).

    .venv/bin/python benchmarks/models.py --mode train --threads 2
    .venv/bin/python benchmarks/models.py --mode infer --threads 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import marginface as mf

# name -> (model name, kwargs). The first entry is the baseline of the ratios.
TRAIN_VARIANTS = {
    "small_cnn 56 (calibrated: 128-d)": ("small_cnn", {"embedding_size": 128}),
    "small_cnn 56, NCHW": ("small_cnn", {"embedding_size": 128, "channels_last": False}),
    "small_cnn 56, strides 2,2,1,2,1,2": ("small_cnn", {"embedding_size": 128, "strides": [2, 2, 1, 2, 1, 2]}),
    "small_cnn 112 -> resize 56": ("small_cnn", {"embedding_size": 128, "input_size": 112, "resize_to": 56}),
    "small_cnn 112": ("small_cnn", {"embedding_size": 128, "input_size": 112}),
    "small_cnn 56, 512-d": ("small_cnn", {}),
    "mobilefacenet 112": ("mobilefacenet", {}),
}
INFER_VARIANTS = {
    "small_cnn 56 (128-d)": ("small_cnn", {"embedding_size": 128}),
    "small_cnn 112 -> resize 56 (128-d)": ("small_cnn", {"embedding_size": 128, "input_size": 112, "resize_to": 56}),
    "mobilefacenet": ("mobilefacenet", {}),
    "iresnet18": ("iresnet18", {}),
    "iresnet34": ("iresnet34", {}),
    "iresnet50": ("iresnet50", {}),
    "iresnet100": ("iresnet100", {}),
    "iresnet200": ("iresnet200", {}),
}


@dataclass
class Variant:
    label: str
    model: torch.nn.Module
    step: object
    images: int
    rates: list[float] = field(default_factory=list)
    cpu_rates: list[float] = field(default_factory=list)


def make_train_step(model: torch.nn.Module, batch_size: int, classes: int = 400):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    classifier = torch.nn.Linear(model.embedding_size, classes, bias=False)
    optimizer = torch.optim.SGD([*model.parameters(), *classifier.parameters()], lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(classifier(model(x)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_infer_step(model: torch.nn.Module, batch_size: int):
    x = torch.randn(batch_size, 3, *model.input_size, generator=torch.Generator().manual_seed(0))
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round (>= 5)")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--only", nargs="+", help="substrings: keep the variants whose label contains one")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = TRAIN_VARIANTS if args.mode == "train" else INFER_VARIANTS
    labels = [k for k in table if not args.only or any(s in k for s in args.only)]
    variants = []
    for label in labels:
        name, kwargs = table[label]
        model = mf.models.create(name, **kwargs)
        maker = make_train_step if args.mode == "train" else make_infer_step
        variants.append(Variant(label, model, maker(model, args.batch_size), args.batch_size * args.steps))

    for round_index in range(args.rounds + 1):
        for variant in variants:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                variant.step()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index > 0:  # round 0 is the warm-up
                variant.rates.append(variant.images / wall)
                variant.cpu_rates.append(variant.images / cpu)
        print(f"round {round_index}/{args.rounds} done", file=sys.stderr)

    baseline = variants[0]
    results = []
    for variant in variants:
        ratios = [r / b for r, b in zip(variant.rates, baseline.rates, strict=True)]
        flops = mf.models.count_flops(variant.model)
        results.append(
            {
                "variant": variant.label,
                "img_per_s_median": statistics.median(variant.rates),
                "img_per_s_max": max(variant.rates),
                "img_per_cpu_s_median": statistics.median(variant.cpu_rates),
                "ratio_to_baseline_median": statistics.median(ratios),
                "params": mf.models.count_parameters(variant.model),
                "gmacs": flops.gmacs,
            }
        )
    meta = {
        "mode": args.mode,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "baseline": baseline.label,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(
        f"mode={args.mode} threads={args.threads} batch={args.batch_size} rounds={args.rounds} "
        f"steps/round={args.steps} torch={torch.__version__}"
    )
    print(f"| variant | params | GMACs | img/s (median) | img/s (best) | img per CPU-s | ratio to {baseline.label} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.3f} | {_fmt(r['img_per_s_median'])} | "
            f"{_fmt(r['img_per_s_max'])} | {_fmt(r['img_per_cpu_s_median'])} | {r['ratio_to_baseline_median']:.3g} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
