"""`marginface data`: dataset tools (`pack` to RecordIO, `inspect`, `clean` by sub-centres, `synth` if installed)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="pack, inspect or generate face-identity datasets",
        description="Dataset tools: convert image folders to MXNet RecordIO, inspect and verify datasets.",
        epilog=example_epilog("marginface data inspect data/faces_emore --verify"),
        formatter_class=help_formatter(),
    )
    parser.set_defaults(func=None, group_parser=parser)
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    pack = sub.add_parser(
        "pack",
        help="pack an image folder or list file into insightface-layout RecordIO",
        description=(
            "Write OUT_DIR/train.rec, train.idx and property from an image folder (one sub-folder per identity,"
            " labels by sorted folder name), a list file ('path label' per line) or another RecordIO set. "
            "JPEGs are copied as they are; other images are re-encoded as JPEG. Files appear only when complete."
        ),
        epilog=example_epilog(
            "marginface data pack ~/faces/by_identity data/myfaces --workers 8",
            "marginface data pack train_list.txt data/myfaces --flat --json",
        ),
        formatter_class=help_formatter(),
    )
    pack.add_argument("source", metavar="IMAGE_FOLDER", help="image folder, list file or RecordIO set")
    pack.add_argument("out_dir", metavar="OUT_DIR", help="directory to write train.rec/train.idx/property into")
    pack.add_argument("--flat", action="store_true", help="im2rec layout: no header or identity records")
    pack.add_argument("--label-array", action="store_true", help="store face2rec2-style [class, 1.0] labels")
    pack.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU count)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/train.rec")
    pack.add_argument("--skip-bad", action="store_true",
                      help="leave unreadable images out (listed in the summary and OUT_DIR/skipped.txt)")
    pack.add_argument("--size", metavar="SIDE|HxW",
                      help="resize images of another size to this one (default: every image must share one size)")
    pack.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pack.add_argument("--json", action="store_true", help="print the summary as JSON")
    pack.set_defaults(func=run_pack)

    inspect = sub.add_parser(
        "inspect",
        help="describe a dataset; --verify decodes every image and checks labels",
        description=(
            "Print the format, layout, image and identity counts and image size of a RecordIO set, image "
            "folder or list file, or the pair, genuine and impostor counts and image size of a verification "
            "pair set (insightface .bin, read with the safe loader). --verify decodes every record and checks "
            "every label against the class count (exit status 1 if anything is wrong)."
        ),
        epilog=example_epilog("marginface data inspect data/faces_emore/train.rec --verify --json",
                              "marginface data inspect data/faces_emore/lfw.bin"),
        formatter_class=help_formatter(),
    )
    inspect.add_argument("path", metavar="PATH",
                         help="RecordIO directory or .rec, image folder, list file, or .bin pair set")
    inspect.add_argument("--verify", action="store_true", help="decode every image and check every label")
    inspect.add_argument("--json", action="store_true", help="print the result as JSON")
    inspect.add_argument("--no-progress", action="store_true", help="hide the progress bar of --verify")
    inspect.set_defaults(func=run_inspect)

    clean = sub.add_parser(
        "clean",
        help="drop likely label noise from a sub-centre run's training set (Sub-center ArcFace)",
        description=(
            "Embed RUN's training set with its backbone, find each class's dominant sub-centre in its "
            "head.safetensors (the one most of the class's samples are nearest to) and drop the samples farther "
            "than --max-angle degrees from it. Writes OUT/train.rec, train.idx and property (the kept samples, "
            "same labels and class count: train on them with data.train=OUT) and OUT/clean_report.json and "
            "clean_report.txt (dropped samples per class, totals). RUN must have been trained with "
            "head.subcenters=K >= 2."
        ),
        epilog=example_epilog("marginface data clean runs/subcenter --max-angle 75",
                              "marginface train head.margin=arcface data.train=runs/subcenter/cleaned"),
        formatter_class=help_formatter(),
    )
    clean.add_argument("run", metavar="RUN", help="a finished training run trained with head.subcenters >= 2")
    clean.add_argument("--max-angle", type=float, default=75.0,
                       help="degrees from the dominant sub-centre beyond which a sample is dropped (default 75)")
    clean.add_argument("--out", metavar="DIR", help="where to write the kept set and report (default RUN/cleaned)")
    clean.add_argument("--overwrite", action="store_true", help="replace an existing DIR/train.rec")
    clean.add_argument("--batch-size", type=int, default=256, help="images embedded at a time (default 256)")
    clean.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    clean.add_argument("--json", action="store_true", help="print the report as JSON")
    clean.set_defaults(func=run_clean)

    try:
        synth = importlib.import_module("marginface.cli.data_synth")
    except ModuleNotFoundError as exc:
        if exc.name != "marginface.cli.data_synth":
            raise
    else:
        synth.register_synth(sub)


def run_pack(args: argparse.Namespace) -> int:
    from marginface.data.pack import pack_dataset

    summary = pack_dataset(
        args.source,
        args.out_dir,
        flat=args.flat,
        workers=args.workers,
        quality=args.quality,
        label_array=args.label_array,
        overwrite=args.overwrite,
        progress=not args.no_progress and not args.json,
        skip_bad=args.skip_bad,
        size=args.size,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['path']}: {summary['images']:,} images, {summary['classes']:,} identities, "
            f"{summary['layout']} layout ({summary['copied_jpeg']:,} JPEGs copied, "
            f"{summary['reencoded']:,} re-encoded at quality {summary['quality']})"
        )
        if summary["skipped"]:
            print(f"skipped {len(summary['skipped'])} unreadable image(s), listed in "
                  f"{Path(summary['path']) / 'skipped.txt'}:")
            for line in summary["skipped"][:10]:
                print(f"  {line}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from marginface.data.inspect import format_report, inspect_dataset

    progress = args.verify and not args.no_progress and not args.json and sys.stderr.isatty()
    info = inspect_dataset(args.path, verify=args.verify, progress=progress)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0 if info.get("ok", True) else 1


def run_clean(args: argparse.Namespace) -> int:
    from marginface.data.clean import REPORT_JSON, clean_run, format_report
    from marginface.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} is invalid: expected a positive integer")
    summary = clean_run(args.run, max_angle=args.max_angle, out_dir=args.out, overwrite=args.overwrite,
                        progress=not args.no_progress and not args.json, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table = format_report(summary).splitlines()
        shown = table[:12] + (["     ..."] if len(table) > 13 else []) + table[-1:] if len(table) > 13 else table
        print("\n".join(shown))
        print(f"report: {Path(summary['out']) / REPORT_JSON}")
    return 0
