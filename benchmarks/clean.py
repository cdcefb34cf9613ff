"""Sub-centre cleaning end to end: inject label noise into the synthetic set, train Sub-center ArcFace, clean.

The set is the tournament's (configs/compare_synthetic.yaml: 400 identities × 20 images), with a fraction of
its labels moved to another class at random; a K = 3 sub-centre ArcFace run trains on it with the config's
network and schedule, and `marginface data clean` (marginface.data.clean.clean_run) drops the samples farther
than each angle from their class's dominant sub-centre. Precision: the share of dropped samples that were
flipped; recall: the share of flipped samples that were dropped.

    python benchmarks/clean.py --out runs/clean-bench                      # 15 % noise, 8 epochs, K = 3
    python benchmarks/clean.py --out DIR --noise 0.3 --epochs 4 --angles 60 75 90
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import marginface as mf
from marginface.data import open_dataset
from marginface.data.clean import clean_run
from marginface.data.recordio.dataset import write_identity_dataset
from marginface.train import load_config, train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "compare_synthetic.yaml"


def noisy_set(base, noise: float, seed: int, out: Path) -> np.ndarray:
    """Write the config's synthetic training set with ``noise`` of its labels moved to another class into
    ``out``; returns the flipped mask in the order written."""
    source = open_dataset(str(mf.data.synthetic(**vars(base.data.synthetic)).train), train=False)
    classes = source.num_classes
    rng = np.random.default_rng(seed)
    labels = np.asarray(source.labels).copy()
    flipped = rng.random(len(labels)) < noise
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    order = np.argsort(labels, kind="stable")
    write_identity_dataset(out, ((int(labels[i]), source.read_bytes(int(i))[0]) for i in order), classes,
                           image_size=source.stored_size)
    return flipped[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--subcenters", type=int, default=3)
    parser.add_argument("--angles", type=float, nargs="+", default=[60.0, 70.0, 75.0, 80.0, 90.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    base = load_config(args.config, [])
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / "noisy_set"
    flipped_path = args.out / "flipped.npy"
    if not flipped_path.exists():
        np.save(flipped_path, noisy_set(base, args.noise, args.seed, data_dir))
    flipped = np.load(flipped_path)
    run_dir = args.out / "run"
    if not (run_dir / "model.safetensors").exists():
        config = load_config(args.config, [f"data.train={data_dir}", "head.margin=arcface",
                                           f"head.subcenters={args.subcenters}", f"train.epochs={args.epochs}",
                                           f"train.seed={args.seed}"])
        train(config, run_dir, progress=False)
    trained = time.perf_counter()
    rows = []
    for angle in args.angles:
        summary = clean_run(run_dir, max_angle=angle, out_dir=args.out / f"cleaned-{angle:g}", overwrite=True,
                            progress=False)
        dropped = np.zeros(len(flipped), dtype=bool)
        dropped[[d["index"] for d in summary["dropped_samples"]]] = True
        caught = int((dropped & flipped).sum())
        rows.append({"max_angle": angle, "dropped": int(dropped.sum()), "caught": caught,
                     "precision": caught / max(int(dropped.sum()), 1), "recall": caught / max(int(flipped.sum()), 1)})
    result = {"noise": args.noise, "flipped": int(flipped.sum()), "samples": len(flipped), "epochs": args.epochs,
              "subcenters": args.subcenters, "rows": rows, "train_minutes": (trained - start) / 60,
              "minutes": (time.perf_counter() - start) / 60}
    (args.out / "clean_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(flipped)} samples, {int(flipped.sum())} flipped ({100 * args.noise:g} %), K = {args.subcenters}, "
          f"{args.epochs:g} epochs; trained in {result['train_minutes']:.1f} min\n")
    print("| max angle | dropped | flipped among them | precision | recall |\n|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['max_angle']:g}° | {row['dropped']} | {row['caught']} | {row['precision']:.3f} | "
              f"{row['recall']:.3f} |")


if __name__ == "__main__":
    main()
