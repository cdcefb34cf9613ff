"""Evaluation pictures: ROC, CMC and genuine/impostor score histograms (``*_figure`` builds, ``plot_*`` writes)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from marginface.errors import ConfigError
from marginface.eval.metrics import DEFAULT_FARS, kfold_accuracy, roc_curve
from marginface.eval.verification import MIN_IMPOSTORS_PER_LEVEL
from marginface.plots.common import integer_ticks, plt, save_figure

__all__ = [
    "cmc_figure",
    "plot_cmc",
    "plot_roc",
    "plot_score_histogram",
    "roc_figure",
    "score_histogram_figure",
    "smallest_supported_far",
]

MAX_POINTS = 4000  # a 15M-score ROC has millions of corners; the picture needs a few thousand
LINEAR_RANKS = 20  # CMC ranks up to this read best on a linear axis; beyond, a log axis
LINESTYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D")
FEW_DECADES = 2.5  # a FAR axis shorter than this many decades gets ticks at 1, 2 and 5 of each
LOG_SCALE_SCORES = 10_000  # a class of this many scores has tails worth a log density axis


def _as_roc(name: str, curve: object) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """``(fpr, tpr, impostors, counted)`` from ``(fpr, tpr)`` floats or ``(scores, labels)`` with boolean/0-1
    integer labels (ROC computed here). For an ``(fpr, tpr)`` curve (``counted`` False) the impostor count is read
    off its smallest non-zero FAR, k/N >= 1/N: never more impostors than there were, so the FAR axis is never
    extended past what they support."""
    if not (isinstance(curve, (tuple, list)) and len(curve) == 2):
        raise ConfigError(f"curve {name!r}: expected (fpr, tpr) or (scores, labels)")
    first, second = (np.asarray(v) for v in curve)
    if second.dtype == np.bool_ or np.issubdtype(second.dtype, np.integer):
        fpr, tpr, _ = roc_curve(first, second)
        return fpr, tpr, int((~second.astype(bool)).sum()), True
    if first.shape != second.shape or first.ndim != 1:
        raise ConfigError(f"curve {name!r}: fpr and tpr must be 1-D arrays of the same length")
    positive = first[first > 0]
    impostors = int(round(1.0 / positive.min())) if positive.size else 1
    return first.astype(np.float64), second.astype(np.float64), impostors, False


def smallest_supported_far(impostors: int) -> float:
    """The lowest FAR at which ``impostors`` impostor pairs support a TAR: far · impostors >= 10 (the rule of
    eval/verification.py), capped at 1."""
    return min(1.0, MIN_IMPOSTORS_PER_LEVEL / max(int(impostors), 1))


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


def _tar_at(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """The curve's TAR at ``far`` read as a step function (the last corner at or left of it)."""
    index = int(np.searchsorted(fpr, far, side="right")) - 1
    return float(tpr[max(index, 0)])


def roc_figure(
    curves: Mapping[str, object],
    *,
    title: str | None = None,
    far_range: tuple[float, float] | None = None,
    marks: Sequence[float] = DEFAULT_FARS,
) -> Figure:
    """ROC (TAR against FAR on a log axis) of every named curve, in one figure.

    By default the FAR axis starts at the smallest FAR the pair count supports (10 impostors below it, as the
    tables use) for the curve with the most impostor pairs, and each curve stops at its own supported FAR;
    ``far_range`` sets the axis and the cut instead. Every curve runs from the left edge (its step value there),
    so a perfect one (TAR = 1 everywhere) is a visible line under the frame's top, not a point at FAR = 1."""
    if not curves:
        raise ConfigError("roc_figure needs at least one curve")
    parsed = {str(name): _as_roc(str(name), curve) for name, curve in curves.items()}
    explicit_range = far_range is not None
    if far_range is None:
        far_range = (min(smallest_supported_far(n) for _, _, n, _ in parsed.values()), 1.0)
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    lowest_tar = 1.0
    handles = []  # (line, legend text): the line keeps the curve's name as its label
    for index, (name, (fpr, tpr, impostors, counted)) in enumerate(parsed.items()):
        lowest = far_range[0] if explicit_range else max(far_range[0], smallest_supported_far(impostors))
        shown_f, shown_t = _thin(fpr, tpr, lowest)
        # a line style per curve: two good models both at TAR = 1 over a stretch must not hide one another
        style = dict(linewidth=1.4, linestyle=LINESTYLES[index % len(LINESTYLES)])
        (line,) = axes.plot(shown_f, shown_t, label=name, drawstyle="steps-post", **style)
        handles.append((line, f"{name} ({'' if counted else '≥ '}{impostors:,} impostor pairs)"))
        value = _tar_at(fpr, tpr, lowest)
        lowest_tar = min([lowest_tar, value, *shown_t.tolist()])
        if shown_f.size == 0 or shown_f[0] > lowest:
            # the step from the cut to the first corner: without it a perfect ROC is the single point (1, 1)
            first = shown_f[0] if shown_f.size else far_range[1]
            axes.plot([lowest, first], [value, value], color=line.get_color(), label=f"_{name} from the cut",
                      **style)
    axes.set_xscale("log")
    axes.set_xlim(*far_range)
    if math.log10(far_range[1] / far_range[0]) < FEW_DECADES:
        # a short log axis has one or two powers of ten: label 0.2, 0.5 too, written plainly
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    # good models live in TAR 0.9-1: from the tenth below the lowest TAR drawn (never above 0.9); headroom
    # over 1, since a TAR of 1 drawn on the frame's top edge is invisible
    bottom = min(0.9, math.floor(10 * lowest_tar) / 10) if lowest_tar >= 0.5 else 0.0
    axes.set_ylim(bottom, 1.0 + 0.05 * (1.0 - bottom))
    for x in marks:
        if far_range[0] <= x <= far_range[1]:
            axes.axvline(x, color="0.85", linewidth=0.6, zorder=0)
    axes.set_xlabel("False accept rate (FAR, log scale)")
    axes.set_ylabel("True accept rate (TAR)")
    axes.grid(True, which="major", axis="y", color="0.9")
    axes.legend([h for h, _ in handles], [text for _, text in handles], loc="best", fontsize="small",
                title=None if explicit_range else "each drawn from FAR = 10 / impostor pairs",
                title_fontsize="x-small")
    axes.set_title(title or "ROC")
    return figure


def plot_roc(curves: Mapping[str, object], path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `roc_figure` to ``path`` (PNG, atomic)."""
    return save_figure(roc_figure(curves, **kwargs), path)  # type: ignore[arg-type]


def cmc_figure(curves: Mapping[str, object], *, title: str | None = None, max_rank: int | None = None) -> Figure:
    """CMC (identification rate against rank) of every named ``(ranks, rates)`` curve, in one figure; ranks
    on a linear axis up to LINEAR_RANKS, on a log axis beyond, with whole-number ticks either way."""
    if not curves:
        raise ConfigError("cmc_figure needs at least one curve")
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    highest = 1.0
    for index, (name, curve) in enumerate(curves.items()):
        if not (isinstance(curve, (tuple, list)) and len(curve) == 2):
            raise ConfigError(f"curve {name!r}: expected (ranks, rates)")
        ranks, rates = (np.asarray(v, dtype=np.float64) for v in curve)
        if max_rank is not None:
            ranks, rates = ranks[ranks <= max_rank], rates[ranks <= max_rank]
        if ranks.size:
            highest = max(highest, float(ranks.max()))
        # galleries that reach 1 at the same rank share a line: a style and a marker each keep both in view
        axes.plot(ranks, rates, marker=MARKERS[index % len(MARKERS)] if ranks.size <= 20 else None, markersize=4,
                  markerfacecolor="none", linestyle=LINESTYLES[index % len(LINESTYLES)], label=str(name))
    if highest > LINEAR_RANKS:
        axes.set_xscale("log")
    else:
        axes.set_xlim(0.5, highest + 0.5)
    integer_ticks(axes, "x")
    axes.set_xlabel("Rank" + (" (log scale)" if highest > LINEAR_RANKS else ""))
    axes.set_ylabel("Identification rate (share of mated probes)")
    axes.set_ylim(0.0, 1.04)  # headroom: a rate of 1 on the frame's top edge is invisible
    axes.grid(True, color="0.9")
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(title or "CMC")
    return figure


def plot_cmc(curves: Mapping[str, object], path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `cmc_figure` to ``path`` (PNG, atomic)."""
    return save_figure(cmc_figure(curves, **kwargs), path)  # type: ignore[arg-type]


def histogram_bins(smaller_class: int, bins: int = 100) -> int:
    """At most ``bins``, and about 2·√n for the smaller class of n scores (at least 10): 100 bins over 20 scores
    is a comb of one-score spikes."""
    return int(min(bins, max(10, round(2 * math.sqrt(max(smaller_class, 1))))))


def score_histogram_figure(
    scores: object,
    labels: object,
    *,
    bins: int = 100,
    title: str | None = None,
    log: bool | None = None,
    threshold: float | None = None,
    threshold_label: str | None = None,
) -> Figure:
    """Histograms (densities) of genuine and impostor scores on shared bins, with the decision threshold.

    ``bins`` is an upper bound (see `histogram_bins`). ``log``: a log density axis; by default only from
    LOG_SCALE_SCORES scores of a class on, where the tails that decide TAR at low FAR hold enough scores to
    read (IJB-C: 800 impostors per genuine pair). ``threshold`` (a cosine): by default the 10-fold accuracy
    threshold of the scores, the ``threshold_cosine`` of the eval table."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape or scores.size == 0:
        raise ConfigError("score_histogram_figure needs scores and labels of the same, non-zero length")
    genuine, impostor = int(labels.sum()), int((~labels).sum())
    low, high = float(scores.min()), float(scores.max())
    if high - low < 1e-6:  # every score equal: give the single bin a width
        low, high = low - 5e-4, high + 5e-4
    edges = np.linspace(low, high, histogram_bins(min(genuine, impostor) or max(genuine, impostor), bins) + 1)
    if log is None:
        log = max(genuine, impostor) >= LOG_SCALE_SCORES
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    heights = []
    for mask, name, colour in ((~labels, "impostor", "tab:red"), (labels, "genuine", "tab:green")):
        if mask.any():
            counts, _ = np.histogram(scores[mask], bins=edges, density=True)
            heights.append(counts)
            axes.stairs(counts, edges, label=f"{name} ({int(mask.sum()):,})", color=colour, fill=True, alpha=0.45)
    if threshold is None and genuine and impostor and scores.size >= 2:
        threshold = kfold_accuracy(scores, labels, folds=min(10, scores.size))["threshold_cosine"]
        threshold_label = threshold_label or "10-fold accuracy threshold"
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1.2,
                     label=f"{threshold_label or 'threshold'}: {threshold:.3f}")
    every = np.concatenate(heights)
    top = float(every.max())
    if log:
        axes.set_yscale("log")
        # from the lowest bar that holds a score to just above the highest: not decades of empty axis
        axes.set_ylim(0.5 * float(every[every > 0].min()), 20.0 * top)  # the decade on top holds the legend
    else:
        axes.set_ylim(0.0, 1.4 * top)  # room for the legend above the highest bar
    axes.set_xlabel("Score (cosine similarity)")
    axes.set_ylabel("Density (share of the class per unit score" + (", log scale)" if log else ")"))
    axes.legend(fontsize="small", loc="upper left")
    axes.set_title(title or "Genuine and impostor scores")
    return figure


def plot_score_histogram(scores: object, labels: object, path: str | os.PathLike, **kwargs: object) -> Path:
    """Write `score_histogram_figure` to ``path`` (PNG, atomic)."""
    return save_figure(score_histogram_figure(scores, labels, **kwargs), path)  # type: ignore[arg-type]
