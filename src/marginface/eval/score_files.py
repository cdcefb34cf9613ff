"""Per-pair cosine scores of a model on its pair sets, kept as `pair_scores.npz` beside a run's model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginface.fileio import atomic_output

SCORES_FILE = "pair_scores.npz"


@dataclass(frozen=True)
class PairScores:
    """One model's scores on one pair set, and the pair labels they go with."""

    name: str
    scores: np.ndarray  # cosine similarity per pair: float64 (IJB template pairs: float32, as evaluate_ijb scores)
    issame: np.ndarray  # bool per pair


def save_pair_scores(path: Path, scores: dict[str, PairScores]) -> None:
    """Write ``scores`` (by pair-set name) to ``path`` atomically, as compressed .npz."""
    arrays = {"names": np.array(sorted(scores))}
    for name, entry in scores.items():
        arrays[f"{name}.scores"], arrays[f"{name}.issame"] = entry.scores, entry.issame
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, **arrays)  # a file object: np.savez would append .npz to a path


def load_pair_scores(run_dir: str | os.PathLike) -> dict[str, PairScores]:
    """The scores saved in ``run_dir``/pair_scores.npz, by pair-set name."""
    path = Path(run_dir) / SCORES_FILE
    with np.load(path, allow_pickle=False) as data:
        return {str(name): PairScores(str(name), data[f"{name}.scores"].astype(np.float64),
                                      data[f"{name}.issame"].astype(bool)) for name in data["names"]}
