"""`marginface data synth`: write the built-in synthetic face-identity set (RecordIO, pair `.bin`s, IJB tree)."""

from __future__ import annotations

import argparse
import json
import sys

from marginface.cli import example_epilog, help_formatter


def register_synth(data_subparsers: argparse._SubParsersAction) -> None:
    """Add the `synth` sub-command to the `marginface data` group."""
    parser = data_subparsers.add_parser(
        "synth",
        help="generate the built-in synthetic face-identity set",
        description=(
            "Render procedural 112x112 face identities (sibling families for hard negatives, nuisance scaled by "
            "--difficulty) and write them in the real formats: OUT_DIR/train.rec, train.idx and property; four "
            "verification pair sets synth_lfw/synth_cfp_fp/synth_agedb/synth_hard.bin from identities disjoint "
            "from training; and an IJB-C-style tree synth_ijb/ (loose crops, exact 5 points, templates). The "
            "output depends only on the options. An existing set with the same options is reused."
        ),
        epilog=example_epilog(
            "marginface data synth data/synth --identities 400 --images-per-id 20 --difficulty 0.6 --seed 0",
            "marginface data synth /tmp/tiny --identities 20 --images-per-id 5 --pairs-per-set 60 --no-ijb --json",
        ),
        formatter_class=help_formatter(),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (new or empty)")
    parser.add_argument("--identities", type=int, default=400, help="training identities (default 400)")
    parser.add_argument("--images-per-id", type=int, default=20, help="training images per identity (default 20)")
    parser.add_argument("--difficulty", type=float, default=0.6,
                        help="nuisance strength in [0, 1]: pose, expression, light, occluders, noise (default 0.6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--pairs-per-set", type=int, default=600,
                        help="pairs in each verification set, a multiple of 20; 0 for none (default 600)")
    parser.add_argument("--eval-identities", type=int, default=200,
                        help="identities the pair sets draw on, disjoint from training (default 200)")
    parser.add_argument("--ijb", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the IJB-style tree synth_ijb/ (default: yes)")
    parser.add_argument("--ijb-identities", type=int, default=24, help="subjects of the IJB-style tree (default 24)")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="regenerate even if OUT_DIR holds this set already")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marginface.data.synth import synthetic

    result = synthetic(
        identities=args.identities,
        images_per_id=args.images_per_id,
        difficulty=args.difficulty,
        seed=args.seed,
        pairs_per_set=args.pairs_per_set,
        ijb=args.ijb,
        root=args.out_dir,
        workers=args.workers,
        progress=not (args.no_progress or args.json) and sys.stderr.isatty(),
        eval_identities=args.eval_identities,
        ijb_identities=args.ijb_identities,
        force=args.force,
    )
    stats = result.manifest.get("stats", {})
    summary = {
        "root": str(result.root),
        "generated": result.generated,
        "classes": result.num_classes,
        "images": result.num_images,
        "pairs": {name: str(path) for name, path in result.pairs.items()},
        "ijb": str(result.ijb) if result.ijb else None,
        "params": result.params,
        "seconds": stats.get("seconds"),
        "images_per_s": stats.get("images_per_s"),
        "workers": stats.get("workers"),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    verb = "wrote" if result.generated else "reused (already complete)"
    print(f"{verb} {result.root}: {result.num_classes} identities, {result.num_images} training images")
    for name, path in result.pairs.items():
        print(f"  {name}: {path}")
    if result.ijb:
        print(f"  IJB-style tree: {result.ijb}")
    if result.generated and stats:
        print(f"  {stats['images']} images in {stats['seconds']:.1f} s ({stats['images_per_s']:.0f} img/s, "
              f"{stats['workers']} workers)")
    return 0
