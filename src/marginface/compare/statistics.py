"""Means, 95 % intervals and paired differences of verification metrics over seeds and pairs (a two-stage bootstrap).

The method (docs/compare.md): for one pair set with S planned seeds and P pairs, and a NumPy generator
`default_rng(bootstrap_seed)`, each of the R replicates draws, in this order,

1. S seed positions with replacement: ``rng.integers(0, S, size=S)``;
2. for each position, P pair indices with replacement: ``rng.integers(0, P, size=(S, P))``, each row sorted
   (so every resampled pair stays in its fold of the 10-fold protocol).

For every margin and drawn position whose seed's run finished, the metric is recomputed on that seed's scores
of the resampled pairs with the project's scorers (10-fold accuracy: `kfold_accuracy`; TAR@FAR: `tar_at_far`,
floor rule). A replicate's value is the mean over its positions; a paired difference is the mean over the
positions where both margins finished of (margin − baseline) on the same resampled pairs. The interval is the
2.5th and 97.5th percentile of the replicate values (NumPy's default linear interpolation). The estimate is
the mean over finished seeds of the metric on all pairs (what metrics.json reports).

IJB template pairs go through the same bootstrap, draws and sort included, with ``accuracy=False``: TAR@FAR
only (10-fold accuracy is no IJB metric).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from marginface.eval.metrics import kfold_accuracy, tar_at_far
from marginface.eval.verification import supported_fars

DEFAULT_REPLICATES = 1000
DEFAULT_BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def metric_names(levels: Sequence[float], accuracy: bool = True) -> list[str]:
    """`accuracy` (unless ``accuracy`` is False), then `tar@far=1e-03`-style names for the TAR levels."""
    return [*(["accuracy"] if accuracy else []), *(tar_name(far) for far in levels)]


def tar_name(far: float) -> str:
    return f"tar@far={far:.0e}"


def metrics_of(scores: np.ndarray, issame: np.ndarray, levels: Sequence[float], accuracy: bool = True) -> np.ndarray:
    """[accuracy, TAR at each level] of one set of scores: the scorers of metrics.json (eval/verification.py);
    TAR is NaN where a resample holds no genuine or no impostor pair. ``accuracy=False``: the TARs only."""
    values = [kfold_accuracy(np.asarray(scores, dtype=np.float64), issame, folds=min(10, issame.size))["accuracy"]
              ] if accuracy else []
    tars = [np.nan] * len(levels)
    if levels and issame.any() and not issame.all():
        # float32 IJB scores as they are: TAR only compares scores, which float64 would not change
        table = tar_at_far(scores, issame, list(levels))
        tars = [table[far] for far in levels]
    return np.array([*values, *tars], dtype=np.float64)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval, over ``runs`` runs (or seeds, for a difference)."""

    value: float
    low: float
    high: float
    runs: int

    def to_dict(self) -> dict[str, float | int | None]:
        def plain(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {"value": plain(self.value), "low": plain(self.low), "high": plain(self.high), "runs": self.runs}


def interval(replicates: np.ndarray) -> tuple[float, float]:
    """The central 95 % percentile interval of the replicate values that are not NaN."""
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return np.nan, np.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_pair_set(
    scores: Sequence[Sequence[np.ndarray | None]],
    issame: np.ndarray,
    baseline: int = 0,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    accuracy: bool = True,
) -> dict:
    """Statistics of one pair set. ``scores[m][s]``: margin m's per-pair scores for seed s, or None where that
    run did not finish. Returns ``levels``, ``metrics`` (names), and per margin ``estimates`` and
    ``differences`` ({metric: Estimate}; differences against margin ``baseline``), and ``per_seed`` values.
    ``accuracy=False`` (IJB template pairs): TAR@FAR only, by the same draws."""
    issame = np.asarray(issame, dtype=bool)
    margins, seeds, pairs = len(scores), len(scores[0]) if scores else 0, issame.size
    levels = supported_fars(int((~issame).sum()))
    names = metric_names(levels, accuracy)
    finished = np.array([[scores[m][s] is not None for s in range(seeds)] for m in range(margins)], dtype=bool)
    runs = [[None if run is None else np.asarray(run) for run in row] for row in scores]
    full = np.full((margins, seeds, len(names)), np.nan)
    for m in range(margins):
        for s in range(seeds):
            if finished[m, s]:
                full[m, s] = metrics_of(runs[m][s], issame, levels, accuracy)

    rng = np.random.default_rng(seed)
    drawn = np.full((replicates, seeds, margins, len(names)), np.nan)
    for b in range(replicates):
        positions = rng.integers(0, seeds, size=seeds)
        # sorted: every resampled pair stays in its fold of the 10-fold protocol (TAR ignores the order, and
        # gathers by a sorted index run ~3x faster, which on IJB-C's 15.7M pairs more than pays for the sort)
        resamples = np.sort(rng.integers(0, pairs, size=(seeds, pairs)), axis=1)
        for j, s in enumerate(positions):
            index = resamples[j]
            labels = issame[index]  # shared by every margin of this position
            for m in np.flatnonzero(finished[:, s]):
                drawn[b, j, m] = metrics_of(runs[m][s][index], labels, levels, accuracy)

    estimates, differences = [], []
    with warnings.catch_warnings():
        # an all-NaN slice (no finished run among the drawn seeds) is expected: its replicate is left out
        warnings.simplefilter("ignore", RuntimeWarning)
        own = np.nanmean(drawn, axis=1)  # [R, M, K]: mean over the positions whose run finished
        paired = np.nanmean(drawn - drawn[:, :, baseline : baseline + 1, :], axis=1)
        for m in range(margins):
            both = finished[m] & finished[baseline]
            estimates.append({name: Estimate(float(np.nanmean(full[m, :, k])) if finished[m].any() else np.nan,
                                             *interval(own[:, m, k]), int(finished[m].sum()))
                              for k, name in enumerate(names)})
            differences.append({name: Estimate(
                float(np.nanmean(full[m, both, k] - full[baseline, both, k])) if both.any() else np.nan,
                *interval(paired[:, m, k]) if both.any() else (np.nan, np.nan), int(both.sum()))
                for k, name in enumerate(names)})
    return {"levels": list(levels), "metrics": names, "estimates": estimates, "differences": differences,
            "per_seed": full}

