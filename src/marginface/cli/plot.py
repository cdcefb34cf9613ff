"""`marginface plot`: pictures of margins (and, with the evaluation tools, of results)."""

from __future__ import annotations

import argparse
import json

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw margins and results",
        description="Draw pictures of margins and results.",
        formatter_class=help_formatter(),
        epilog=example_epilog("marginface plot margins arcface curricularface npcface --out margins.png"),
    )
    parser.set_defaults(func=None, group_parser=parser)
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    margins = kinds.add_parser(
        "margins",
        help="target logit T(θ), hard-negative modulation N at several t, and dN/dcos θ",
        description=(
            "Draw, for each margin, the target logit T(θ_y), the negative logit N(θ_j) of a hard negative at "
            "several t (like the CurricularFace paper's Figures 1-2) and the gradient coefficient dN/dcos θ_j "
            "(CurricularFace: M = 2cos θ_j + t). Each curve is computed by running the margin itself."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface plot margins arcface cosface curricularface npcface --out margins.png",
            "marginface plot margins arcface:m=0.3 'mv_softmax:t=0.3,base=arc' --out mv.png --json",
        ),
    )
    margins.add_argument("names", nargs="+", metavar="NAME[:key=value,...]", help="margins to draw, with parameters")
    margins.add_argument("--out", required=True, help="PNG file to write")
    margins.add_argument(
        "--target-angle", type=float, default=60.0, metavar="DEGREES",
        help="θ_y of the sample whose negatives are drawn (default 60)",
    )
    margins.add_argument("--json", action="store_true", help="print what was written as JSON")
    margins.set_defaults(func=run_margins)


def run_margins(args: argparse.Namespace) -> int:
    from marginface.plots.margins import parse_margin_spec, plot_margins

    if not 0.0 < args.target_angle < 180.0:
        raise ValueError(f"--target-angle={args.target_angle} is invalid: expected degrees in (0, 180)")
    chosen = [parse_margin_spec(name) for name in args.names]
    path = plot_margins(chosen, args.out, target_angle_degrees=args.target_angle)
    if args.json:
        print(json.dumps({"out": str(path), "margins": [{"name": m.name, **m.hyperparameters()} for m in chosen]}))
    else:
        print(f"wrote {path} ({', '.join(m.name for m in chosen)})")
    return 0
