"""Pictures of a comparison: ROC per pair set, accuracy and paired differences with intervals, loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from marginface.eval.metrics import roc_curve
from marginface.plots.common import integer_ticks, plt, save_figure
from marginface.plots.eval_plots import LINESTYLES, MARKERS, roc_figure


def mean_roc(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The vertical average of the runs' ROCs on one pair set: at every FAR k/N (N impostor pairs) the mean over
    runs of each run's TAR there (its staircase read at that FAR)."""
    impostors = int((~runs[0][1]).sum())
    grid = np.arange(impostors + 1) / impostors
    tprs = []
    for scores, issame in runs:
        fpr, tpr, _ = roc_curve(scores, issame, drop_intermediate=False)
        tprs.append(tpr[np.searchsorted(fpr, grid, side="right") - 1])
    return grid, np.mean(tprs, axis=0)


def comparison_roc_figure(pair_set: str, curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> Figure:
    """ROC of every margin on ``pair_set``; each curve the vertical average over that margin's finished seeds."""
    averaged = {f"{label}, mean of {len(runs)} seed{'s' if len(runs) != 1 else ''}": mean_roc(runs)
                for label, runs in curves.items() if runs}
    return roc_figure(averaged, title=f"ROC on {pair_set} (mean over seeds)")


def interval_bars(axis, x: Sequence[float], low: Sequence[float], high: Sequence[float], **style) -> None:
    """Each interval [low, high] as a bar of its own at x, whatever the estimate beside it: a percentile interval
    need not contain the mean (few replicates, skewed draws), and errorbar's offsets from a point cannot be
    negative."""
    middle = [(a + b) / 2 for a, b in zip(low, high, strict=True)]
    half = [(b - a) / 2 for a, b in zip(low, high, strict=True)]
    axis.errorbar(x, middle, yerr=half, fmt="none", **style)


def interval_figure(summary: dict, kind: str) -> Figure | None:
    """Accuracy (``kind="estimates"``) or its paired difference to the baseline (``"differences"``) of every
    margin on every pair set, in percentage points, with 95 % bootstrap intervals as error bars."""
    pair_sets = list(summary["pair_sets"])
    margins = summary["margins"]
    if not pair_sets or not margins:
        return None
    # the legend sits right of the axes: inside, it hides the error bars of some pair set
    figure, axis = plt.subplots(figsize=(max(6.4, 1.6 * len(pair_sets) + 2) + 2.4, 4.2))
    width = 0.8 / len(margins)
    for i, label in enumerate(margins):
        if kind == "differences" and label == summary["baseline"]:
            continue  # zero by construction; its colour stays its own in both pictures
        x, y, low, high = [], [], [], []
        for p, name in enumerate(pair_sets):
            entry = summary["pair_sets"][name]["margins"][label][kind]["accuracy"]
            if entry["value"] is None:
                continue
            x.append(p - 0.4 + width * (i + 0.5))
            y.append(100 * entry["value"])
            low.append(100 * (entry["low"] if entry["low"] is not None else entry["value"]))
            high.append(100 * (entry["high"] if entry["high"] is not None else entry["value"]))
        interval_bars(axis, x, low, high, capsize=3, color=f"C{i % 10}")
        axis.plot(x, y, MARKERS[i % len(MARKERS)], markersize=5, label=label, color=f"C{i % 10}")
    axis.set_xticks(range(len(pair_sets)), pair_sets)
    axis.set_xlim(-0.5, len(pair_sets) - 0.5)
    baseline = summary["baseline"]
    if kind == "differences":
        axis.axhline(0.0, color="0.4", linewidth=0.8)
        axis.set_ylabel(f"accuracy − {baseline} (percentage points)")
        axis.set_title(f"paired difference to {baseline}, 95 % bootstrap intervals")
    else:
        axis.set_ylabel("10-fold accuracy (%)")
        axis.set_title("accuracy, mean over seeds, 95 % bootstrap intervals")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    return figure


def loss_figure(histories: Mapping[str, Sequence[Sequence[dict]]]) -> Figure | None:
    """Training loss against the step: every seed of a margin thin, their mean (over the steps all logged) bold."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for i, (label, runs) in enumerate(histories.items()):
        curves = [[(r["step"], r["train/loss"]) for r in history if "train/loss" in r] for history in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        colour = f"C{i % 10}"
        for curve in curves:
            axis.plot(*zip(*curve, strict=True), color=colour, linewidth=0.6, alpha=0.35)
        common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        mean = [np.mean([dict(c)[step] for c in curves]) for step in common]
        axis.plot(common, mean, color=colour, linewidth=1.8, linestyle=LINESTYLES[i % len(LINESTYLES)],
                  marker="o" if len(common) <= 30 else None, markersize=3, label=f"{label} ({len(curves)} seeds)")
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set(title="training loss (thin: each seed, bold: mean)", xlabel="step (optimiser steps)",
             ylabel="loss (nats per sample)")
    integer_ticks(axis, "x")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return figure


def write_plots(summary: dict, curves: Mapping[str, Mapping[str, list]], histories: Mapping[str, list],
                directory: Path) -> list[tuple[str, Path]]:
    """Every picture of the comparison under ``directory``; returns (title, path) in report order."""
    written = []
    for kind, title in (("estimates", "accuracy"), ("differences", "paired difference to the baseline")):
        figure = interval_figure(summary, kind) if kind == "estimates" or len(summary["margins"]) > 1 else None
        if figure is not None:
            stem = "accuracy" if kind == "estimates" else "difference"
            written.append((title, save_figure(figure, directory / f"{stem}.png")))
    for name, per_margin in curves.items():
        if any(per_margin.values()):
            written.append((f"ROC on {name}",
                            save_figure(comparison_roc_figure(name, per_margin), directory / f"roc_{name}.png")))
    figure = loss_figure(histories)
    if figure is not None:
        written.append(("training loss", save_figure(figure, directory / "loss.png")))
    return written
