"""`marginface search`: parse and validate the options, call `marginface.search.run_search` (or `resume_search`)."""

from __future__ import annotations

import argparse
import json

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search the margin loss (Search-Softmax, Random-Softmax, AM-LFS)",
        description=(
            "Loss-function search. Each epoch, K candidate models sample a loss from the search distribution, "
            "train one epoch from the same state and are scored by 10-fold verification accuracy (the reward); "
            "the distribution takes a REINFORCE step (Search-Softmax, AM-LFS; Random-Softmax only samples) and "
            "the best candidate's full state is copied to every candidate. Writes OUT/search.json, plots and "
            "the final model. --mode sequential trains the candidates in turn in one process; --mode ranks "
            "trains one candidate per torchrun rank (gloo on CPU, NCCL on GPU). Training options come from "
            "--config and key=value overrides as for `marginface train`."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface search --method search_softmax --candidates 4 --epochs 6 --steps-per-epoch 40 --out runs/s",
            "marginface search --method am_lfs --candidates 4 --epochs 6 --out runs/am --reward-pairs data/lfw.bin",
            "torchrun --nproc_per_node=4 -m marginface search --mode ranks --candidates 4 --out runs/r --device cpu",
            "marginface search --resume runs/s                  # continue after an interruption",
            "marginface train --margin-from runs/s/search.json  # retrain with the loss found",
        ),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    parser.add_argument("--method", help="search_softmax (default), random_softmax or am_lfs")
    parser.add_argument("--candidates", type=int, metavar="K", help="candidate models per epoch (default 4, >= 2)")
    parser.add_argument("--epochs", type=int, metavar="E", help="epochs, warm-up included (default 6)")
    parser.add_argument("--steps-per-epoch", type=int, metavar="N",
                        help="optimiser steps per search epoch (default one pass over the training set)")
    parser.add_argument("--out", help="output directory (default runs/search-<method>-<time>)")
    parser.add_argument("--config", help="YAML training config (keys as in configs/*.yaml)")
    parser.add_argument("--space", help="Search-/Random-Softmax space: global (one a, default) or local (a per bin)")
    parser.add_argument("--warmup-epochs", type=int, metavar="W", help="epochs with the fixed initial loss (default 1)")
    parser.add_argument("--mode", help="sequential (default) or ranks (one torchrun rank per candidate)")
    parser.add_argument("--resume", metavar="DIR", help="continue the search in DIR from its last finished epoch")
    parser.add_argument("--seed", type=int,
                        help="seed of the samples and of training (default the config's train.seed)")
    parser.add_argument("--sigma", type=float, help="σ of the search distribution (default 1 on z = ln(−a); "
                        "sqrt(0.2) for AM-LFS)")
    parser.add_argument("--initial-margin", type=float, metavar="M",
                        help="Search-/Random-Softmax: start the distribution at a = 1 − e^(s·M), i.e. CosFace(M) "
                        "(default a = −e^(s/3), M ≈ 1/3); the warm-up trains with it")
    parser.add_argument("--learn-sigma", action="store_true", help="learn σ too (log σ by REINFORCE)")
    parser.add_argument("--policy-lr", type=float, help="Adam learning rate of the distribution (default 0.1; "
                        "0.05 for AM-LFS)")
    parser.add_argument("--normalisation", help="per-epoch reward normalisation: std (default), range or none")
    parser.add_argument("--reward-pairs", nargs="+", metavar="PATH",
                        help=".bin pair sets (or directories of them) scoring the candidates "
                        "(default the config's data.pairs: the synthetic pair sets)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print search.json's summary as JSON")
    parser.set_defaults(func=run)


SETTING_OPTIONS = ("method", "candidates", "epochs", "steps_per_epoch", "space", "warmup_epochs", "mode", "seed",
                   "sigma", "policy_lr", "normalisation", "reward_pairs", "initial_margin")


def run(args: argparse.Namespace) -> int:
    import time

    from marginface.search import SearchSettings, resume_search, run_search
    from marginface.train import load_config

    if args.resume:
        given = [f"--{name.replace('_', '-')}" for name in SETTING_OPTIONS if getattr(args, name) is not None]
        if args.config or args.overrides or args.learn_sigma or given:
            raise ValueError("--resume continues a search with its saved settings and config: "
                             f"{', '.join(given + (['--config'] if args.config else []) + args.overrides) or 'options'}"
                             " cannot change it")
        summary = resume_search(args.resume, progress=not args.no_progress)
        out = args.resume
    else:
        settings = SearchSettings(**{name: getattr(args, name) for name in SETTING_OPTIONS
                                     if getattr(args, name) is not None}, learn_sigma=args.learn_sigma)
        settings.validate()  # before the config and data: bad options fail first
        overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
        config = load_config(args.config, overrides)
        out = args.out or f"runs/search-{settings.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = run_search(settings, config, out, progress=not args.no_progress)
    if "model" not in summary:  # ranks mode: only the main rank reports
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("epochs", "config")}, indent=2))
    else:
        best = summary["best"]
        print(f"found: {best['margin']} {json.dumps(best['params'])}")
        if "equivalent_margin" in best:
            print(f"  equivalent margin: {best['equivalent_margin']}")
        print(f"final model reward {100 * summary['final_reward']:.2f} %; output: {out} (search.json, plots/, "
              "model.safetensors)")
    return 0
