"""`marginface import-weights`: another toolkit's backbone state dict (.pth) to a marginface model.safetensors."""

from __future__ import annotations

import argparse
import json

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-weights",
        help="turn an arcface_torch backbone .pth into a model.safetensors",
        description=(
            "Read a backbone state dict saved by another toolkit (arcface_torch's backbone.pth: the key names of "
            "marginface's iresnet models) with torch.load(weights_only=True), so a pickle that would run code is "
            "refused; check every key against the architecture (missing, unexpected and mis-shaped keys are "
            "listed by name) and write a model.safetensors that `marginface eval`, `export` and "
            "`train model.init=FILE` take like a run's."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface import-weights backbone.pth --arch iresnet100 --out r100.safetensors",
            "marginface eval r100.safetensors --pairs lfw.bin",
            "marginface train model.name=iresnet100 model.embedding_size=512 model.init=r100.safetensors ...",
        ),
    )
    parser.add_argument("weights", metavar="WEIGHTS", help="state dict file (.pth, or .safetensors)")
    parser.add_argument("--arch", required=True, help="backbone architecture, e.g. iresnet50, iresnet100")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--embedding-size", type=int, help="embedding size (default: read from fc.weight)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marginface.models.weights import import_weights

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: expected a .safetensors file name")
    summary = import_weights(args.weights, args.arch, args.out, embedding_size=args.embedding_size)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.out}: {summary['arch']} ({summary['embedding_size']}-d), {summary['tensors']} tensors "
              f"from {args.weights}")
    return 0
