"""`marginface eval`: score a model on verification pair sets and on IJB-B/IJB-C."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from marginface.cli import example_epilog, help_formatter
from marginface.fileio import json_plain


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model on pair sets (10-fold) and IJB-B/C",
        description=(
            "Score MODEL — a training run directory, a model.safetensors written by marginface, or an .onnx file — "
            "on verification pair sets (insightface .bin, 10-fold protocol) and on IJB-B/IJB-C (1:1 TAR@FAR, 1:N). "
            "Prints the insightface-style table and writes the results as JSON. An existing results file of the "
            "same model is updated: pair sets and IJB targets scored now replace their old entries, the rest are "
            "kept."
        ),
        formatter_class=help_formatter(),
        epilog=example_epilog(
            "marginface eval runs/demo                                   # the run's own pair sets",
            "marginface eval runs/demo/model.safetensors --pairs /data/faces_emore --json",
            "marginface eval model.onnx --pairs lfw.bin cfp_fp.bin --plot plots/",
            "marginface eval runs/demo --ijb /data/IJB_release/IJBC --target IJBC",
            "marginface eval runs/magface --quality-scores runs/magface/quality.csv   # MagFace: norm = quality",
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="run directory, .safetensors or .onnx")
    parser.add_argument("--pairs", nargs="+", metavar="FILE_OR_DIR", help=".bin pair files or directories of them")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse the embeddings of each image and its mirror (default on)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward (default: the trainer's, 64)")
    parser.add_argument("--device", default="cpu", help="torch device for .safetensors models (default cpu)")
    parser.add_argument("--ijb", metavar="ROOT", help="IJB tree with loose_crop/ and meta/")
    parser.add_argument("--target", choices=("IJBB", "IJBC"), default="IJBC")
    parser.add_argument("--plot", metavar="DIR", help="write ROC, score histograms (and CMC for IJB) into DIR")
    parser.add_argument("--quality-scores", metavar="FILE",
                        help="write each image's raw embedding norm (MagFace's quality score; the image as given, "
                             "not its flip) as a CSV: set,image,norm — image is the index in a .bin, the file name "
                             "for IJB; FILE's directory must exist")
    parser.add_argument("--output", metavar="FILE",
                        help="JSON results file (default: MODEL_DIR/eval.json for a run directory)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of the table (and no progress bars)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marginface.eval.loading import load_model

    if args.batch_size is None:
        from marginface.eval.verification import DEFAULT_BATCH_SIZE

        args.batch_size = DEFAULT_BATCH_SIZE
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} is invalid: expected a positive integer")
    if not os.path.exists(args.model):
        # Checked first: a missing model is the real problem, not the pair sets it would have implied.
        raise FileNotFoundError(f"model path {args.model} does not exist: expected a run directory, "
                                ".safetensors or .onnx file")
    if args.quality_scores:
        from marginface.eval.quality import check_quality_path

        check_quality_path(args.quality_scores, "--quality-scores")  # before the slow part, like every input
    pair_paths = resolve_pairs(args)
    if not pair_paths and not args.ijb:
        raise ValueError("nothing to score: give --pairs FILE_OR_DIR and/or --ijb ROOT")
    # Read every input before the (slow) model runs, so that a bad file fails at once.
    from marginface.eval import evaluate_pairs, load_pairs

    pair_sets = [load_pairs(path) for path in pair_paths]
    output = args.output or (os.path.join(args.model, "eval.json") if os.path.isdir(args.model) else None)
    previous = read_previous_results(Path(output), args.model) if output else None
    model = load_model(args.model, device=args.device)
    progress = not args.no_progress and not args.json
    results: dict = {"model": str(args.model), "verification": {}}
    scores_for_plots = {}
    quality = []  # (set, image ids, norms): from the forward pass that scores the set, not a second one
    for pair_set in pair_sets:
        result, scores, norms = evaluate_pairs(model, pair_set, args.batch_size, args.flip, return_scores=True,
                                               progress=progress, return_norms=True)
        results["verification"][pair_set.name] = json_plain(result)
        scores_for_plots[pair_set.name] = (scores, pair_set.issame)
        quality.append((pair_set.name, range(len(norms)), norms))
    if args.ijb:
        from marginface.eval import evaluate_ijb

        ijb = evaluate_ijb(model, args.ijb, args.target, flip=args.flip, batch_size=args.batch_size,
                           return_scores=bool(args.plot), return_norms=bool(args.quality_scores),
                           progress=progress)
        if args.plot:
            scores_for_plots[args.target] = (ijb.pop("scores"), ijb.pop("labels"))
        if args.quality_scores:
            quality.append((args.target, ijb.pop("image_names"), ijb.pop("norms")))
        results["ijb"] = {args.target: json_plain(ijb)}
    if args.plot:
        results["plots"] = write_plots(Path(args.plot), scores_for_plots, results)
    if args.quality_scores:
        from marginface.eval.quality import write_quality_scores

        write_quality_scores(args.quality_scores, quality, "--quality-scores")
    if output:
        from marginface.fileio import atomic_write_text

        document = merge_results(previous, results)
        atomic_write_text(output, json.dumps(json_plain(document), indent=2) + "\n")
        results["output"] = output
    if args.quality_scores:
        # added after the results file is written: where this call put its CSV is not a result of the model
        results["quality_scores"] = str(args.quality_scores)
    if args.json:
        print(json.dumps(json_plain(results), indent=2))
    else:
        print_table(results)
    return 0


def _model_file(model: str | os.PathLike) -> Path:
    """The weights file a MODEL argument names (a run directory stands for its model.safetensors)."""
    path = Path(model)
    return (path / "model.safetensors" if path.is_dir() else path).resolve()


def read_previous_results(output: Path, model: str) -> dict | None:
    """The results already in `output` that this run should add to: those of the same model, written after its
    weights. None when there are none, or when they belong to another model or to older weights of this one
    (then they are replaced, and stderr says so). Read before the model runs, so that a damaged file stops
    the command at once."""
    if not output.exists():
        return None
    try:
        previous = json.loads(output.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{output}: cannot add results to it, it is not JSON ({exc}); expected an eval results "
                         "file (move it away or give another --output)") from None
    if not isinstance(previous, dict):
        raise ValueError(f"{output}: cannot add results to it: it holds a JSON {type(previous).__name__}, "
                         "expected an object (move it away or give another --output)")
    for field in ("verification", "ijb"):
        if not isinstance(previous.get(field, {}), dict):
            raise ValueError(f"{output}: field {field!r} is a {type(previous[field]).__name__}, expected an object "
                             "of results by name (move the file away or give another --output)")
    stored_model = previous.get("model")
    weights = _model_file(model)
    if not isinstance(stored_model, str) or _model_file(stored_model) != weights:
        print(f"marginface eval: replacing {output}: it holds the results of {stored_model!r}, not of {model}",
              file=sys.stderr)
        return None
    if weights.exists() and output.stat().st_mtime < weights.stat().st_mtime:
        print(f"marginface eval: replacing {output}: it is older than {weights} (results of earlier weights)",
              file=sys.stderr)
        return None
    return previous


def merge_results(previous: dict | None, results: dict) -> dict:
    """`results` added to `previous`: pair sets and IJB targets scored now replace theirs, others are kept."""
    if previous is None:
        return results
    merged = {**previous, "model": results["model"]}
    for field in ("verification", "ijb"):
        merged[field] = {**previous.get(field, {}), **results.get(field, {})}
    if not merged["ijb"]:
        merged.pop("ijb")
    if "plots" in results:
        merged["plots"] = list(dict.fromkeys([*previous.get("plots", []), *results["plots"]]))
    return merged


def resolve_pairs(args: argparse.Namespace) -> list[str]:
    """--pairs as given; for a run directory without --pairs, the pair sets the run was validated on."""
    if args.pairs:
        from marginface.eval.pairs import pair_files

        return pair_files(args.pairs, option="--pairs")
    metrics = Path(args.model) / "metrics.json"
    config = Path(args.model) / "config.yaml"
    if args.ijb or not (os.path.isdir(args.model) and metrics.exists() and config.exists()):
        return []
    import yaml

    configured = yaml.safe_load(config.read_text()).get("data", {})
    if configured.get("pairs"):
        return list(configured["pairs"])
    from marginface.data import synthetic

    built = synthetic(**configured.get("synthetic", {}))  # from the cache when the run made it here
    return [str(built.pairs[name]) for name in sorted(built.pairs)]


def write_plots(directory: Path, scores: dict, results: dict) -> list[str]:
    from marginface.plots.eval_plots import plot_cmc, plot_roc, plot_score_histogram

    written = []
    curves = {name: (s, labels) for name, (s, labels) in scores.items() if 0 < labels.sum() < labels.size}
    if curves:
        written.append(str(plot_roc(curves, directory / "roc.png")))
    for name, (s, labels) in scores.items():
        threshold, label = ijb_threshold(s, labels) if name in results.get("ijb", {}) else (None, None)
        written.append(str(plot_score_histogram(s, labels, directory / f"scores_{name}.png", title=name,
                                                threshold=threshold, threshold_label=label)))
    for target, ijb in results.get("ijb", {}).items():
        galleries = ijb.get("identification", {})
        cmc_curves = {g: r["cmc"] for g, r in galleries.items() if g != "mean" and "cmc" in r}
        if cmc_curves:
            written.append(str(plot_cmc(cmc_curves, directory / f"cmc_{target}.png")))
    return written


def ijb_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float | None, str | None]:
    """IJB is read at a FAR, not at the accuracy threshold: the threshold of the smallest reported level
    (1e-4 when the impostors support it), so the histogram shows the operating point of the table."""
    from marginface.eval.metrics import threshold_at_far
    from marginface.eval.verification import supported_fars

    impostor = scores[~labels.astype(bool)]
    levels = [far for far in supported_fars(impostor.size) if far >= 1e-4] or list(supported_fars(impostor.size))
    if not levels:
        return None, None
    far = min(levels)
    return threshold_at_far(impostor, far), f"threshold at FAR={far:g}"


def print_table(results: dict) -> None:
    for name, r in results["verification"].items():
        tar = r.get("tar_at_far", {})
        tar_text = "  ".join(f"TAR@FAR={far}: {100 * value:.2f}" for far, value in tar.items())
        print(f"[{name}] XNorm: {r['xnorm']:.4f}  Accuracy-Flip: {r['accuracy']:.5f}+-{r['std']:.5f}  {tar_text}")
    for target, ijb in results.get("ijb", {}).items():
        tars = {**{f"{far}*": v for far, v in ijb.get("tar_at_far_few_impostors", {}).items()},
                **ijb.get("tar_at_far", {})}
        print(f"[{target}] {ijb.get('mode', '')} TAR@FAR: " + "  ".join(
            f"{far}: {100 * value:.2f}" for far, value in tars.items()) + f"  AUC: {100 * ijb.get('auc', 0):.2f}"
            + ("  (*: fewer than 10 impostor pairs at that FAR)" if "tar_at_far_few_impostors" in ijb else ""))
        for gallery, r in ijb.get("identification", {}).items():
            ranks = "  ".join(f"{k}: {100 * r[k]:.2f}" for k in ("rank1", "rank5", "rank10") if k in r)
            tpir = "  ".join(f"TPIR@FPIR={k}: {100 * v:.2f}" for k, v in r.get("tpir_at_fpir", {}).items())
            print(f"[{target} {gallery}] {ranks}  {tpir}")
    if "output" in results:
        print(f"results: {results['output']}")
    if "quality_scores" in results:
        print(f"quality scores: {results['quality_scores']}")


