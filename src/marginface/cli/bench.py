"""`marginface bench`: measure the heads (the code of benchmarks/heads.py) and the data path on your own hardware."""

from __future__ import annotations

import argparse
import json
import os

from marginface.cli import example_epilog, help_formatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the heads (margin x engine) and the data path on this machine",
        description="Benchmarks to run on your own hardware before picking an engine and a batch size.",
        formatter_class=help_formatter(),
        epilog=example_epilog("marginface bench heads --margins arcface curricularface --classes 93431"),
    )
    parser.set_defaults(func=None, group_parser=parser)
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    heads = kinds.add_parser(
        "heads",
        help="forward + backward of each margin on each engine, beside the 3-GEMM floor",
        description=(
            "Run one training step (forward + backward) of each margin on each engine, interleaved round-robin "
            "with the three GEMMs any head must do (the floor) and pytorch-metric-learning's ArcFaceLoss when it "
            "is installed. Prints the time per step, its ratio to the floor and to ArcFace on the same engine, "
            "and the peak memory of each variant (measured in a fresh process each). Every head's fp32 loss "
            "and gradients are first checked against float64."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface bench heads --margins arcface npcface --engines dense chunked --batch-size 128",
            "marginface bench heads --classes 360232 --batch-size 512 --device cuda --dtype bfloat16 --json",
        ),
    )
    heads.add_argument("--margins", nargs="+", default=["arcface", "curricularface"], metavar="NAME",
                       help="margins to time (default: arcface curricularface)")
    heads.add_argument("--engines", nargs="+", default=None, metavar="NAME", help="engines (default: all)")
    heads.add_argument("--batch-size", type=int, default=128, help="rows per step (default 128)")
    heads.add_argument("--classes", type=int, default=93_431, help="number of classes (default 93,431)")
    heads.add_argument("--embedding-size", type=int, default=512, help="D (default 512)")
    heads.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="precision of the embeddings; bf16/fp16 run the head under autocast (default float32)")
    heads.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    heads.add_argument(
        "--rounds", type=int, default=3,
        help="interleaved timing rounds (default 3: a quick look; to decide a 10%% difference use 15-25, "
             "as the quartiles of the ratio to ArcFace show)",
    )
    heads.add_argument("--repeats", type=int, default=1,
                       help="passes per round; each variant's fastest counts (default 1)")
    heads.add_argument("--no-memory", action="store_true", help="skip the per-variant memory measurement")
    heads.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    heads.set_defaults(func=run_heads)
    data = kinds.add_parser(
        "data",
        help="decode throughput of a training set: items per core and loader images/s per worker count",
        description=(
            "Read, decode, flip and normalise random items of a training set (RecordIO, image folder or list "
            "file; default: the built-in synthetic identities) in this process, one thread, then through the "
            "trainer's DataLoader with each worker count. Compare the images/s with what your training step "
            "consumes (batch / step time) to choose data.num_workers."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog("marginface bench data /data/ms1m-retinaface-t1 --image-size 112 --workers 0 2 4",
                              "marginface bench data --json"),
    )
    data.add_argument("path", nargs="?", default=None, metavar="PATH",
                      help="training set (default: the built-in synthetic identities, generated on first use)")
    data.add_argument("--image-size", type=int, default=None, help="resize to this side (default: stored size)")
    data.add_argument("--items", type=int, default=1000, help="items per single-core round (default 1000)")
    data.add_argument("--rounds", type=int, default=3, help="single-core rounds, median reported (default 3)")
    data.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                      help="loader worker counts to try (default 0, 1, 2, 4, ... up to the cores)")
    data.add_argument("--batch-size", type=int, default=128, help="loader batch (default 128)")
    data.add_argument("--batches", type=int, default=20, help="batches timed per worker count (default 20)")
    data.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    data.set_defaults(func=run_data)


def run_heads(args: argparse.Namespace) -> int:
    import torch

    from marginface import engines, heads
    from marginface.bench import heads as bench
    from marginface.errors import ConfigError
    from marginface.margins.registry import margin_class

    for option in ("batch_size", "classes", "embedding_size", "rounds", "repeats"):
        value = getattr(args, option)
        if value < (2 if option == "classes" else 1):
            raise ConfigError(f"--{option.replace('_', '-')}={value} is invalid: expected a positive integer"
                              + (" >= 2" if option == "classes" else ""))
    names = [margin_class(n).name for n in args.margins]  # an unknown name is a ConfigError listing them all
    engine_names = args.engines or engines.available()
    for name in engine_names:
        engines.check_name(name)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a torch device (expected e.g. cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    variants = [bench.variant(m, e) for e in engine_names for m in names]
    if "arcface" not in names:  # the mining heads' ratio is to ArcFace on the same engine
        variants += [bench.variant("arcface", e) for e in engine_names]
    peers = [bench.FLOOR] + ([bench.PML] if bench.pml_available() else [])
    errors = bench.check_correctness(variants)
    summary = bench.run_rounds(peers + variants, args.batch_size, args.classes, args.embedding_size,
                               args.rounds, device=args.device, dtype=args.dtype, repeats=args.repeats)
    if not args.no_memory:
        for name in summary:
            summary[name]["extra_rss_mb"] = bench.memory_probe(
                name, args.batch_size, args.classes, args.embedding_size, device=args.device, dtype=args.dtype
            )
    if args.json:
        print(json.dumps({"correctness": errors, "batch_size": args.batch_size, "classes": args.classes,
                          "embedding_size": args.embedding_size, "dtype": args.dtype, "device": args.device,
                          "heads_available": heads.available(), "results": summary}, indent=2))
        return 0
    print("correctness (fp32 vs float64, worst relative error): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    bench.print_table(summary, args.batch_size, args.classes, args.embedding_size, args.rounds,
                      not args.no_memory, dtype=args.dtype, repeats=args.repeats)
    return 0


def run_data(args: argparse.Namespace) -> int:
    import dataclasses

    from marginface.bench import data as bench
    from marginface.data.dataset import open_dataset
    from marginface.errors import ConfigError

    for option in ("items", "rounds", "batch_size", "batches"):
        value = getattr(args, option)
        if value < 1:
            raise ConfigError(f"--{option.replace('_', '-')}={value} is invalid: expected a positive integer")
    if args.image_size is not None and args.image_size < 8:
        raise ConfigError(f"--image-size={args.image_size} is invalid: expected a side of at least 8 pixels")
    if args.workers and min(args.workers) < 0:
        raise ConfigError(f"--workers {' '.join(map(str, args.workers))} is invalid: expected counts >= 0")
    path = args.path
    if path is None:
        from marginface.data import synthetic

        path = str(synthetic(ijb=False, progress=True).train)
    elif not os.path.exists(path):
        raise ConfigError(f"{path}: no such training set (expected a RecordIO directory or .rec, an image folder "
                          "or a list file)")
    dataset = open_dataset(path, image_size=args.image_size)
    item = bench.item_rate(dataset, args.items, args.rounds)
    loaders = [bench.loader_rate(dataset, n, args.batch_size, args.batches) for n in bench.worker_counts(args.workers)]
    height, width = dataset[0][0].shape[-2:]
    size = f"{len(dataset):,} images, {width}x{height} to the network"
    if args.json:
        print(json.dumps({"path": path, "images": len(dataset), "item": dataclasses.asdict(item),
                          "loader": [dataclasses.asdict(r) for r in loaders]}, indent=2))
        return 0
    print(bench.format_table(path, size, item, loaders))
    return 0
