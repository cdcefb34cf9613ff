"""`marginface export`: a trained backbone to ONNX (dynamic batch), checked against torch through onnxruntime."""

from __future__ import annotations

import argparse
import json

from marginface.cli import example_epilog, help_formatter

# On the relative error of each embedding (models/export.py: embedding_parity), whatever the embeddings' scale.
PARITY_TOLERANCE = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a backbone to ONNX with a parity check",
        description=(
            "Export the backbone of a run directory or a marginface model.safetensors to ONNX with a dynamic "
            "batch axis, then run a real batch of face crops through torch and onnxruntime and compare the "
            "embeddings as evaluation uses them, whatever their scale: the largest relative error "
            f"||onnx - torch|| / ||torch|| of one embedding must stay below {PARITY_TOLERANCE:g}."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface export runs/demo --onnx demo.onnx",
            "marginface export runs/demo/model.safetensors --onnx r100.onnx --pairs lfw.bin --json",
        ),
    )
    parser.add_argument("model", metavar="RUN_OR_MODEL", help="run directory or .safetensors")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="file to write")
    parser.add_argument("--pairs", metavar="FILE", help=".bin pair file whose images make the parity batch "
                        "(default: the run's first pair set, else the synthetic easy set)")
    parser.add_argument("--batch", type=int, default=32, help="images in the parity batch (default 32)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from marginface.errors import MarginfaceError
    from marginface.eval import embed_images_separate, load_pairs
    from marginface.eval.loading import OnnxModel, load_model
    from marginface.models.export import embedding_parity, export_onnx

    if not args.onnx.endswith(".onnx"):
        raise ValueError(f"--onnx {args.onnx}: expected a file name ending in .onnx")
    if args.batch < 1:
        raise ValueError(f"--batch={args.batch} is invalid: expected a positive integer")
    if str(args.model).endswith(".onnx"):
        raise ValueError(f"{args.model} is already an ONNX file: export takes a run directory or a .safetensors")
    model = load_model(args.model)
    images = load_pairs(args.pairs or default_pair_file(args.model)).images[: args.batch]
    path = export_onnx(model, args.onnx, opset=args.opset)
    with torch.no_grad():
        reference, _ = embed_images_separate(model, images, batch_size=len(images), flip=False)
        exported, _ = embed_images_separate(OnnxModel(path), images, batch_size=len(images), flip=False)
    parity = embedding_parity(reference, exported)
    relative = parity["max_relative_error"]
    report = {"onnx": str(path), "parity_images": int(len(images)), **parity,
              "tolerance": PARITY_TOLERANCE, "input_size": list(model.input_size), "config": model.config}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {path}: {model.config.get('name')} input {tuple(model.input_size)}, dynamic batch; "
              f"torch vs onnxruntime on {len(images)} real images: max relative error {relative:.2e} "
              f"(normalised |Δ| {parity['max_normalised_difference']:.2e}; raw |Δ| "
              f"{parity['max_abs_difference']:.2e} at mean embedding norm {parity['mean_norm']:.2e})")
    if not relative < PARITY_TOLERANCE:  # `not <` also fails on NaN
        raise MarginfaceError(
            f"ONNX parity check failed: max relative error ||onnx - torch|| / ||torch|| = {relative:.2e} "
            f"(image {parity['worst_image']} of the parity batch) >= {PARITY_TOLERANCE:g}; "
            f"expected the exported graph to reproduce the embeddings ({path} kept for inspection)"
        )
    return 0


def default_pair_file(model_path: str) -> str:
    """The run's first pair set, else the synthetic easy set (from the cache, made if needed)."""
    from pathlib import Path

    run_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        data = yaml.safe_load(config.read_text()).get("data", {})
        if data.get("pairs"):
            first = Path(data["pairs"][0])
            return str(sorted(first.glob("*.bin"))[0] if first.is_dir() else first)
        from marginface.data import synthetic

        return str(synthetic(**data.get("synthetic", {})).pairs["synth_lfw"])
    from marginface.data import synthetic

    return str(synthetic().pairs["synth_lfw"])
