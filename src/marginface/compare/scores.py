"""Per-pair cosine scores of a finished run, kept as `pair_scores.npz` beside its model for the pair bootstrap.

The trainer writes them from its final evaluation (`marginface.eval.score_files`); a run without them (an
older run, or one whose last step was not evaluated) has them recomputed once from its `model.safetensors` with
the same pair scorer (`marginface.eval.evaluate_pairs`). Either way the full-set accuracy recomputed from them
equals metrics.json's: that is checked and recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from marginface.eval.score_files import SCORES_FILE, PairScores, load_pair_scores, save_pair_scores
from marginface.train.config import Config

__all__ = ["SCORES_FILE", "PairScores", "compute_pair_scores", "load_pair_scores", "save_pair_scores",
           "scores_are_current", "accuracy_mismatches"]
# metrics.json and the recomputation embed with the same model, batch and flip fusion; they agree to
# rounding at worst (a GPU's kernels may differ between a training process and this one)
ACCURACY_TOLERANCE = 1e-9


def scores_are_current(run_dir: Path) -> bool:
    """Whether the run has scores computed from its present model (a retrained model makes them stale)."""
    scores, model = run_dir / SCORES_FILE, run_dir / "model.safetensors"
    return scores.exists() and model.exists() and os.path.getmtime(scores) >= os.path.getmtime(model)


def scoring_device(config: Config) -> str:
    """Where a run's saved model is scored again: the device its config trained on (`auto`: CUDA when present)."""
    from marginface.train.distributed import wants_cuda

    return "cuda" if wants_cuda(config.train.device) else "cpu"


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
