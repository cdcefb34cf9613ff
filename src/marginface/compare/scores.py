"""Per-pair cosine scores of a finished run, kept as `pair_scores.npz` beside its model for the pair bootstrap.

The trainer's metrics.json holds the tables, not the scores behind them. The scores are recomputed once from
the run's `model.safetensors` with the one pair scorer (`marginface.eval.evaluate_pairs`, the trainer's final
evaluation), so the full-set accuracy recomputed from them equals metrics.json's: that is checked and recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginface.fileio import atomic_output
from marginface.train.config import Config

SCORES_FILE = "pair_scores.npz"
# metrics.json and the recomputation embed with the same model, batch and flip fusion; they agree to
# rounding at worst (a GPU's kernels may differ between a training process and this one)
ACCURACY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PairScores:
    """One run's scores on one pair set, and the pair labels they go with."""

    name: str
    scores: np.ndarray  # cosine similarity per pair: float64 (IJB template pairs: float32, as evaluate_ijb scores)
    issame: np.ndarray  # bool per pair


def scores_are_current(run_dir: Path) -> bool:
    """Whether the run has scores computed from its present model (a retrained model makes them stale)."""
    scores, model = run_dir / SCORES_FILE, run_dir / "model.safetensors"
    return scores.exists() and model.exists() and os.path.getmtime(scores) >= os.path.getmtime(model)


def scoring_device(config: Config) -> str:
    """Where a run's saved model is scored again: the device its config trained on (`auto`: CUDA when present)."""
    import torch

    use_cuda = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
    return "cuda" if use_cuda else "cpu"


def compute_pair_scores(run_dir: str | os.PathLike, config: Config) -> dict[str, PairScores]:
    """Embed the run's pair sets with its saved model and write `pair_scores.npz`; returns the scores."""
    from marginface.eval import evaluate_pairs, load_pairs
    from marginface.eval.loading import load_model
    from marginface.train.distributed import World
    from marginface.train.trainer import resolve_data

    run_dir = Path(run_dir)
    model = load_model(run_dir, device=scoring_device(config))
    _, pair_paths = resolve_data(config, World(), progress=False)  # the pair files the trainer scored
    result = {}
    for path in pair_paths:
        pair_set = load_pairs(path)
        _, scores = evaluate_pairs(model, pair_set, return_scores=True)
        result[pair_set.name] = PairScores(pair_set.name, np.asarray(scores, dtype=np.float64),
                                           np.asarray(pair_set.issame, dtype=bool))
    save_pair_scores(run_dir / SCORES_FILE, result)
    return result


def save_pair_scores(path: Path, scores: dict[str, PairScores]) -> None:
    arrays = {"names": np.array(sorted(scores))}
    for name, entry in scores.items():
        arrays[f"{name}.scores"], arrays[f"{name}.issame"] = entry.scores, entry.issame
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, **arrays)  # a file object: np.savez would append .npz to a path


def load_pair_scores(run_dir: str | os.PathLike) -> dict[str, PairScores]:
    """The scores `compute_pair_scores` wrote for the run in ``run_dir``."""
    path = Path(run_dir) / SCORES_FILE
    with np.load(path, allow_pickle=False) as data:
        return {str(name): PairScores(str(name), data[f"{name}.scores"].astype(np.float64),
                                      data[f"{name}.issame"].astype(bool)) for name in data["names"]}


def accuracy_mismatches(run_dir: str | os.PathLike, scores: dict[str, PairScores]) -> list[str]:
    """Pair sets whose accuracy from the stored scores differs from metrics.json's (expected: none)."""
    from marginface.eval import verification_table

    recorded = json.loads((Path(run_dir) / "metrics.json").read_text()).get("verification", {})
    mismatches = []
    for name, entry in scores.items():
        table = verification_table(entry.scores, entry.issame, name=name)
        expected = recorded.get(name, {}).get("accuracy")
        if expected is None or abs(table["accuracy"] - expected) > ACCURACY_TOLERANCE:
            mismatches.append(f"{name}: {table['accuracy']} from the scores, {expected} in metrics.json")
    return mismatches
