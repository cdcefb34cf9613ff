"""Evaluation pictures: ROC curves on a log FAR axis (several models or sets in one figure), CMC curves for
1:N identification, and genuine/impostor score histograms. Each ``*_figure`` builds a figure; each ``plot_*``
writes it atomically as a PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from marginface.errors import ConfigError
from marginface.eval.metrics import roc_curve
from marginface.plots.common import plt, save_figure

__all__ = [
    "cmc_figure",
    "plot_cmc",
    "plot_roc",
    "plot_score_histogram",
    "roc_figure",
    "score_histogram_figure",
]

MAX_POINTS = 4000  # a 15M-score ROC has millions of corners; the picture needs a few thousand


def _as_roc(name: str, curve: object) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` floats, or ``(scores, labels)`` with boolean/0-1 integer labels (ROC computed here)."""
    if not (isinstance(curve, (tuple, list)) and len(curve) == 2):
        raise ConfigError(f"curve {name!r}: expected (fpr, tpr) or (scores, labels)")
    first, second = (np.asarray(v) for v in curve)
    if second.dtype == np.bool_ or np.issubdtype(second.dtype, np.integer):
        fpr, tpr, _ = roc_curve(first, second)
        return fpr, tpr
    if first.shape != second.shape or first.ndim != 1:
        raise ConfigError(f"curve {name!r}: fpr and tpr must be 1-D arrays of the same length")
    return first.astype(np.float64), second.astype(np.float64)


def _thin(fpr: np.ndarray, tpr: np.ndarray, lowest: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the points with FAR >= ``lowest`` (a log axis cannot show 0), at most MAX_POINTS of them,
    chosen evenly in log FAR; the last point of each chosen bin keeps the curve's upper envelope."""
    keep = fpr >= lowest
    fpr, tpr = fpr[keep], tpr[keep]
    if fpr.size <= MAX_POINTS:
        return fpr, tpr
    edges = np.geomspace(lowest, 1.0, MAX_POINTS)
    last = np.unique(np.searchsorted(fpr, edges, side="right") - 1)
    last = last[last >= 0]
    return fpr[last], tpr[last]


def roc_figure(
    curves: Mapping[str, object],
    *,
    title: str | None = None,
    far_range: tuple[float, float] = (1e-6, 1.0),
    marks: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
):
    """ROC (TAR against FAR on a log axis) of every named curve, in one figure."""
    if not curves:
        raise ConfigError("roc_figure needs at least one curve")
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for name, curve in curves.items():
        fpr, tpr = _as_roc(name, curve)
        fpr, tpr = _thin(fpr, tpr, far_range[0])
        axes.plot(fpr, tpr, label=str(name), linewidth=1.4, drawstyle="steps-post")
    axes.set_xscale("log")
    axes.set_xlim(*far_range)
    axes.set_ylim(0.0, 1.01)
    for x in marks:
        axes.axvline(x, color="0.85", linewidth=0.6, zorder=0)
    axes.set_xlabel("False accept rate (FAR)")
    axes.set_ylabel("True accept rate (TAR)")
    axes.grid(True, which="major", axis="y", color="0.9")
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(title or "ROC")
    return figure


def plot_roc(curves: Mapping[str, object], path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `roc_figure` to ``path`` (PNG, atomic)."""
    return save_figure(roc_figure(curves, **kwargs), path)  # type: ignore[arg-type]


def cmc_figure(curves: Mapping[str, object], *, title: str | None = None, max_rank: int | None = None):
    """CMC (identification rate against rank) of every named ``(ranks, rates)`` curve, in one figure."""
    if not curves:
        raise ConfigError("cmc_figure needs at least one curve")
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for name, curve in curves.items():
        if not (isinstance(curve, (tuple, list)) and len(curve) == 2):
            raise ConfigError(f"curve {name!r}: expected (ranks, rates)")
        ranks, rates = (np.asarray(v, dtype=np.float64) for v in curve)
        if max_rank is not None:
            ranks, rates = ranks[ranks <= max_rank], rates[ranks <= max_rank]
        axes.plot(ranks, rates, marker="o" if ranks.size <= 20 else None, markersize=3, label=str(name))
    axes.set_xscale("log")
    axes.set_xlabel("Rank")
    axes.set_ylabel("Identification rate")
    axes.set_ylim(0.0, 1.01)
    axes.grid(True, color="0.9")
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(title or "CMC")
    return figure


def plot_cmc(curves: Mapping[str, object], path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `cmc_figure` to ``path`` (PNG, atomic)."""
    return save_figure(cmc_figure(curves, **kwargs), path)  # type: ignore[arg-type]


def score_histogram_figure(
    scores: object, labels: object, *, bins: int = 100, title: str | None = None, log: bool = True
):
    """Histograms (densities) of genuine and impostor scores on shared bins; a log count axis by default,
    since IJB-C has 800 impostors per genuine pair."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape or scores.size == 0:
        raise ConfigError("score_histogram_figure needs scores and labels of the same, non-zero length")
    edges = np.linspace(scores.min(), scores.max(), int(bins) + 1)
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for mask, name, colour in ((~labels, "impostor", "tab:red"), (labels, "genuine", "tab:green")):
        if mask.any():
            counts, _ = np.histogram(scores[mask], bins=edges, density=True)
            axes.stairs(counts, edges, label=f"{name} ({int(mask.sum()):,})", color=colour, fill=True, alpha=0.45)
    if log:
        axes.set_yscale("log")
    axes.set_xlabel("Score (cosine similarity)")
    axes.set_ylabel("Density")
    axes.legend(fontsize="small")
    axes.set_title(title or "Genuine and impostor scores")
    return figure


def plot_score_histogram(scores: object, labels: object, path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `score_histogram_figure` to ``path`` (PNG, atomic)."""
    return save_figure(score_histogram_figure(scores, labels, **kwargs), path)  # type: ignore[arg-type]
