"""The comparison's bootstrap against closed forms and an independent re-implementation of docs/compare.md."""

from __future__ import annotations

import numpy as np
import pytest

from marginface.compare.statistics import bootstrap_pair_set
from marginface.eval.metrics import kfold_accuracy, tar_at_far

PAIRS = 200  # 100 impostors: TAR@FAR=1e-1 is supported (far · impostors >= 10), lower levels are not


def pair_set(rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(PAIRS) % 2 == 0)


def noisy_scores(rng: np.random.Generator, issame: np.ndarray, separation: float) -> np.ndarray:
    return np.clip(np.where(issame, separation, -separation) + rng.normal(0, 0.5, issame.size), -1, 1)


def reference_bootstrap(scores, issame, baseline, replicates, seed, far=0.1):
    """docs/compare.md's method, written here from the text: seed positions, then sorted pair draws per
    position; the metric per finished run; means over positions; 2.5/97.5 percentiles."""
    rng = np.random.default_rng(seed)
    margins, seeds = len(scores), len(scores[0])

    def metric(values, labels):
        accuracy = kfold_accuracy(values, labels, folds=10)["accuracy"]
        return np.array([accuracy, tar_at_far(values, labels, [far])[far]])

    own = [[] for _ in range(margins)]
    paired = [[] for _ in range(margins)]
    for _ in range(replicates):
        positions = rng.integers(0, seeds, size=seeds)
        draws = np.sort(rng.integers(0, issame.size, size=(seeds, issame.size)), axis=1)
        values = {}
        for j, s in enumerate(positions):
            for m in range(margins):
                if scores[m][s] is not None:
                    values[m, j] = metric(scores[m][s][draws[j]], issame[draws[j]])
        for m in range(margins):
            mine = [values[m, j] for j in range(seeds) if (m, j) in values]
            if mine:
                own[m].append(np.mean(mine, axis=0))
            both = [values[m, j] - values[baseline, j] for j in range(seeds)
                    if (m, j) in values and (baseline, j) in values]
            if both:
                paired[m].append(np.mean(both, axis=0))
    return ([np.percentile(np.array(o), [2.5, 97.5], axis=0) for o in own],
            [np.percentile(np.array(p), [2.5, 97.5], axis=0) for p in paired])


def test_intervals_equal_an_independent_implementation_of_the_documented_method():
    rng = np.random.default_rng(5)
    issame = pair_set(rng)
    scores = [[noisy_scores(rng, issame, 0.3 + 0.1 * m) for _ in range(3)] for m in range(3)]
    scores[2][1] = None  # a failed run: its seed is left out of that margin's statistics
    result = bootstrap_pair_set(scores, issame, baseline=0, replicates=60, seed=11)
    assert result["levels"] == [0.1] and result["metrics"] == ["accuracy", "tar@far=1e-01"]
    own, paired = reference_bootstrap(scores, issame, baseline=0, replicates=60, seed=11)
    for m in range(3):
        for k, name in enumerate(result["metrics"]):
            estimate, difference = result["estimates"][m][name], result["differences"][m][name]
            assert (estimate.low, estimate.high) == pytest.approx(tuple(own[m][:, k]), abs=1e-12)
            assert (difference.low, difference.high) == pytest.approx(tuple(paired[m][:, k]), abs=1e-12)
    # the estimate: the mean over finished seeds of the full-set metric
    expected = np.mean([kfold_accuracy(s, issame)["accuracy"] for s in scores[2] if s is not None])
    assert result["estimates"][2]["accuracy"].value == pytest.approx(expected, abs=1e-12)
    assert result["estimates"][2]["accuracy"].runs == 2 and result["differences"][2]["accuracy"].runs == 2


def test_identical_runs_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    issame = pair_set(rng)
    runs = [noisy_scores(rng, issame, 0.4) for _ in range(3)]
    result = bootstrap_pair_set([runs, [r.copy() for r in runs]], issame, replicates=50)
    for name in result["metrics"]:
        difference = result["differences"][1][name]
        assert (difference.value, difference.low, difference.high) == (0.0, 0.0, 0.0)
        assert result["estimates"][0][name] == result["estimates"][1][name]
    assert result["estimates"][0]["accuracy"].low < result["estimates"][0]["accuracy"].high


def test_a_perfect_margin_has_a_point_interval_and_a_known_difference():
    rng = np.random.default_rng(1)
    issame = pair_set(rng)
    chance = [np.zeros(PAIRS) for _ in range(2)]  # every score tied: 50 % accuracy and TAR 0 at any cut
    perfect = [np.where(issame, 0.9, -0.9) for _ in range(2)]
    result = bootstrap_pair_set([chance, perfect], issame, replicates=40)
    best = result["estimates"][1]["accuracy"]
    assert (best.value, best.low, best.high) == (1.0, 1.0, 1.0)
    tar = result["estimates"][1]["tar@far=1e-01"]
    assert (tar.value, tar.low, tar.high) == (1.0, 1.0, 1.0)
    assert result["estimates"][0]["tar@far=1e-01"].high == 0.0
    assert result["differences"][1]["tar@far=1e-01"].low == 1.0


def test_a_margin_without_finished_runs_has_no_numbers():
    rng = np.random.default_rng(2)
    issame = pair_set(rng)
    result = bootstrap_pair_set([[noisy_scores(rng, issame, 0.4)], [None]], issame, replicates=10)
    entry = result["estimates"][1]["accuracy"]
    assert entry.runs == 0 and np.isnan(entry.value) and np.isnan(entry.low)
    assert entry.to_dict() == {"value": None, "low": None, "high": None, "runs": 0}
