"""`marginface compare`: parse, validate the margins and the config, call `marginface.compare.compare`."""

from __future__ import annotations

import argparse
import json

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train several margins over several seeds and compare them with confidence intervals",
        description=(
            "Train every listed head under the same config and budget for each seed (for one seed every margin "
            "sees the same samples in the same order and starts from the same backbone), score the configured "
            "pair sets (and IJB-B/C with --ijb), and write DIR/compare.json and DIR/report.md: mean accuracy and "
            "TAR@FAR per margin with "
            "95 % bootstrap intervals (over seeds, then pairs) and the paired difference to a baseline, with "
            "plots. Each run is an ordinary run directory, DIR/runs/<margin>/seed<k>. Rerunning the same "
            "command reuses finished runs and resumes interrupted ones. Method: docs/compare.md."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface compare --margins arcface cosface:m=0.35 curricularface --seeds 3 --out runs/tournament",
            "marginface compare --margins softmax arcface 'npcface:m0=0.4,m1=0.2' --seeds 5 --parallel 2 "
            "--out runs/t2 train.max_steps=300",
            "marginface compare --config configs/compare_synthetic.yaml --margins arcface cosface --seeds 3 "
            "--baseline cosface --out runs/hard --json",
            "marginface compare --margins arcface cosface --seeds 3 --ijb /data/IJB_release/IJBC --ijb-target IJBC "
            "--out runs/tournament",
        ),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every run, e.g. train.max_steps=200")
    parser.add_argument("--margins", nargs="+", required=True, metavar="NAME[:k=v,...]",
                        help="the heads to compare, with parameters: arcface cosface:m=0.3 'npcface:m0=0.4,m1=0.2'")
    parser.add_argument("--seeds", type=int, required=True, metavar="N",
                        help="seeds per margin: train.seed, train.seed+1, ... (>= 1)")
    parser.add_argument("--config", help="YAML config file shared by every run (keys as in configs/*.yaml)")
    parser.add_argument("--out", default="runs/compare", help="comparison directory (default runs/compare)")
    parser.add_argument("--baseline", metavar="NAME", help="margin the paired differences are taken against "
                        "(default: the first of --margins)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="train N runs at once, as `marginface train` subprocesses sharing the cores "
                        "(train.threads = cores // N unless set); default 1, in this process")
    parser.add_argument("--force", action="store_true",
                        help="use an --out that holds a different comparison: runs that differ are retrained")
    parser.add_argument("--ijb", metavar="ROOT", help="also score every run on this IJB tree (loose_crop/ and meta/, "
                        "as `marginface eval --ijb` reads it): TAR@FAR with intervals; adding it to a finished "
                        "comparison scores the runs without training them again")
    parser.add_argument("--ijb-target", choices=("IJBB", "IJBC"), default=None,
                        help="which IJB protocol of --ijb ROOT (default IJBC)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="R",
                        help="bootstrap replicates per pair set (default 1000)")
    parser.add_argument("--ijb-bootstrap", type=int, default=None, metavar="R",
                        help="bootstrap replicates of the IJB statistics (default: --bootstrap's); each redraws "
                        "every template pair of every seed, so real IJB-C wants fewer")
    parser.add_argument("--bootstrap-seed", type=int, default=None, metavar="SEED",
                        help="seed of the bootstrap's generator (default 0): the same seed, the same intervals")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (run lines still shown)")
    parser.add_argument("--json", action="store_true", help="print compare.json as the only output on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marginface.cli.train import check_device
    from marginface.compare import compare, make_plan, parse_margins
    from marginface.compare.ijb import DEFAULT_TARGET
    from marginface.compare.statistics import DEFAULT_BOOTSTRAP_SEED, DEFAULT_REPLICATES
    from marginface.errors import ConfigError
    from marginface.train import load_config

    if args.ijb_target is not None and args.ijb is None:
        raise ConfigError(f"--ijb-target {args.ijb_target} needs --ijb ROOT (the IJB tree to score)")
    items, overrides = split_overrides(args.margins)
    margins = parse_margins(items)  # before the config: a bad name is the first thing to hear about
    config = load_config(args.config, [*overrides, *args.overrides])
    plan = make_plan(args.out, config, margins, args.seeds, baseline=args.baseline, ijb=args.ijb,
                     ijb_target=args.ijb_target or DEFAULT_TARGET)
    check_device(config.train.device, "train.device of the comparison's config")
    summary = compare(plan, parallel=args.parallel, force=args.force, progress=not args.no_progress,
                      replicates=DEFAULT_REPLICATES if args.bootstrap is None else args.bootstrap,
                      bootstrap_seed=DEFAULT_BOOTSTRAP_SEED if args.bootstrap_seed is None else args.bootstrap_seed,
                      ijb_replicates=args.ijb_bootstrap)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for name, table in summary["pair_sets"].items():
        print(f"{name}:")
        print_margins(table["margins"], "accuracy", "accuracy ", summary["baseline"])
    print_ijb(summary)
    counts = summary["counts"]
    print(f"{counts['finished']} of {counts['planned']} runs finished, {counts['failed']} failed; "
          f"report: {plan.out / 'report.md'}")
    return 0


def print_ijb(summary: dict) -> None:
    """TAR at the smallest FAR the IJB pairs support, per margin, with the difference to the baseline."""
    ijb = summary["ijb"]
    if not isinstance(ijb, dict) or not ijb["metrics"]:
        return
    metric, far = ijb["metrics"][0], ijb["levels"][0]
    print(f"{ijb['title']} (TAR@FAR={far:g}):")
    print_margins(ijb["margins"], metric, "", summary["baseline"])


def print_margins(margins: dict, metric: str, prefix: str, baseline: str) -> None:
    """One line per margin: ``metric`` with its interval, and its paired difference to ``baseline``."""
    for label, entry in margins.items():
        value, diff = entry["estimates"][metric], entry["differences"][metric]
        if value["value"] is None:
            print(f"  {label}: no finished run")
            continue
        line = f"  {label}: {prefix}{format_interval(value)} %"
        if label != baseline and diff["value"] is not None:
            line += f", vs {baseline} {format_interval(diff, signed=True)} points"
        print(line)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """`--margins arcface cosface train.max_steps=3`: argparse hands the trailing override to --margins. A
    margin item has its `:` before any `=`, so an item with `=` and no `:` before it is an override."""
    margins, overrides = [], []
    for item in items:
        key = item.partition("=")[0]
        (overrides if "=" in item and ":" not in key else margins).append(item)
    return margins, overrides


def format_interval(entry: dict, signed: bool = False) -> str:
    from marginface.compare.report import cell

    return cell(entry, signed=signed)
