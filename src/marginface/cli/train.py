"""`marginface train`: parse, validate the configuration, call `marginface.train.train`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a backbone with a margin head",
        description=(
            "Train a face-recognition backbone with a margin-based softmax head. With no arguments it trains a "
            "small CNN with CurricularFace on the built-in synthetic identities (generated on first use) and "
            "reports 10-fold accuracy on the synthetic pair sets. Runs on one CPU, one GPU, or many processes "
            "through `torchrun --nproc_per_node=N -m marginface train ...`."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface train                                   # the demo, a few minutes on 2 CPU cores",
            "marginface train --config configs/curricularface_ms1mv2_r100.yaml data.train=/data/ms1mv2",
            "marginface train --margin npcface --max-steps 500 --out runs/npc optimizer.lr=0.05",
            "marginface train --resume runs/npc                  # continue after an interruption",
            "torchrun --nproc_per_node=2 -m marginface train --device cpu train.batch_size=64",
            "marginface train --margin-from runs/search/search.json   # retrain with the loss a search found",
        ),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    parser.add_argument("--config", help="YAML config file (keys as in configs/*.yaml)")
    parser.add_argument("--out", help="run directory (default runs/<margin>-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    parser.add_argument("--margin", help="margin head: s (and gradient, easy_margin) carry over, and the "
                        "head.params set on this command line; the rest take its defaults (printed)")
    parser.add_argument("--margin-from", metavar="SEARCH_JSON",
                        help="train with the loss a `marginface search` found (its search.json, or its directory)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or status lines (train.log is still written)")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marginface.train import load_config, train
    from marginface.train.config import config_from_dict, switch_margin
    from marginface.train.trainer import load_run_config

    if args.resume and (args.config or args.margin):
        raise ValueError("--resume continues a run with its saved config: --config and --margin cannot change it")
    margin_from = getattr(args, "margin_from", None)
    if margin_from and (args.resume or args.margin):
        raise ValueError("--margin-from sets the margin from a search: it cannot be combined with --margin or --resume")
    overrides = list(args.overrides)
    for option, key in (("max_steps", "train.max_steps"), ("checkpoint_every", "train.checkpoint_every"),
                        ("device", "train.device")):
        value = getattr(args, option)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        config = config_from_dict(load_run_config(args.resume).to_dict(), overrides)
        run_dir = args.resume
    else:
        config = load_config(args.config, overrides)
        if args.margin:
            explicit = {o.split("=", 1)[0].removeprefix("head.params.") for o in overrides
                        if o.startswith("head.params.")}
            config, carried, defaults = switch_margin(config, args.margin, explicit)
            print(f"--margin {config.head.margin}: carried over {listing(carried) or 'nothing'}; "
                  f"its defaults for the rest ({listing(defaults) or 'none'})", file=sys.stderr)
        if margin_from:
            from marginface.search import load_found_margin

            found = load_found_margin(margin_from)
            raw = config.to_dict()
            raw["head"] = {**raw["head"], "margin": found["margin"], "params": found["params"]}
            config = config_from_dict(raw)
        run_dir = args.out or f"runs/{config.head.margin}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_device(config.train.device, device_source(args))
    metrics = train(config, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun the summary is rank 0's to print
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for name, result in metrics["verification"].items():
            print(f"{name}: accuracy {100 * result['accuracy']:.2f} ± {100 * result['std']:.2f} %")
        print(f"run directory: {run_dir} (model.safetensors, metrics.json, report.md)")
    return 0


def listing(params: dict[str, Any]) -> str:
    """`k=v, k=v` for a message."""
    return ", ".join(f"{key}={value}" for key, value in params.items())


def device_source(args: argparse.Namespace) -> str:
    """Where train.device came from, for a message: the flag, an override, the resumed run or the config file."""
    if args.device is not None:
        return f"--device {args.device}"
    given = [o for o in args.overrides if o.startswith("train.device=")]
    if given:
        return f"the override {given[-1]}"
    if args.resume:
        return f"{args.resume}/config.yaml (train: device:)"
    if args.config:
        return f"{args.config} (train: device:)"
    return "the default train.device"


def check_device(device: str, source: str) -> None:
    """Refuse a CUDA request on a machine without CUDA before anything is built, naming who asked."""
    import torch

    from marginface.errors import ConfigError

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{source} asks for CUDA, but torch sees no CUDA device (is this the CPU build?); "
            "pass --device cpu (or --device auto) to train here"
        )
