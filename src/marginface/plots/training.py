"""Training-report pictures: one figure per logged quantity of a run's history, y labelled with its unit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from marginface.plots.common import integer_ticks, plt

__all__ = ["PANELS", "Panel", "accuracy_figure", "feature_norm_figure", "history_figures", "panel_figure"]

# Below this many points each one is marked: a 1- or 2-point history is otherwise a dot-less, invisible line.
MARKED_POINTS = 30


class Panel(NamedTuple):
    key: str  # file name stem: plots/<key>.png
    title: str
    ylabel: str  # with its unit: the reader of a report has no code to look it up in
    value: Callable[[dict[str, Any]], float | None]


def _scaled(key: str, factor: float) -> Callable[[dict[str, Any]], float | None]:
    def value(record: dict[str, Any]) -> float | None:
        raw = record.get(key)
        return None if raw is None else factor * raw

    return value


PANELS = (
    Panel("loss", "training loss", "loss (nats per sample)", _scaled("train/loss", 1.0)),
    Panel("lr", "learning rate", "learning rate (dimensionless)", _scaled("train/lr", 1.0)),
    # the margins log these under shared keys, so the titles name every margin that logs one
    Panel("t", "t (CurricularFace: EMA of cos θ_y; MV-Softmax, NPCFace: fixed)", "t (cosine units)",
          _scaled("margin/t", 1.0)),
    Panel("hard_fraction", "fraction of hard negatives", "hard negatives (% of negatives)",
          _scaled("margin/hard_fraction", 100.0)),
    Panel("margin_mean", "batch mean of the per-sample margin (NPCFace m̃, MagFace m(a), ElasticFace draws)",
          "m (radians; cosine units for ElasticFace-Cos)", _scaled("margin/margin_mean", 1.0)),
)


def _step_axis(axis) -> None:
    axis.set_xlabel("step (optimiser steps)")
    integer_ticks(axis, "x")
    axis.grid(alpha=0.3)


def panel_figure(panel: Panel, history: Sequence[dict[str, Any]]) -> Figure | None:
    """The figure of one panel's quantity against the step, or None when the history never logged it."""
    points = [(r["step"], panel.value(r)) for r in history if panel.value(r) is not None]
    if not points:
        return None
    steps, values = [p[0] for p in points], [p[1] for p in points]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(steps, values, marker="o" if len(points) <= MARKED_POINTS else None, markersize=3.5)
    axis.set(title=panel.title, ylabel=panel.ylabel)
    _step_axis(axis)
    return figure


def accuracy_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """10-fold verification accuracy (%) of every pair set against the step, or None when none was evaluated."""
    keys = sorted({k for r in history for k in r if k.startswith("verification/") and k.endswith("/accuracy")})
    if not keys:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        points = [(r["step"], 100 * r[key]) for r in history if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key.split("/")[1])
    axis.set(title="10-fold verification accuracy", ylabel="accuracy (%)")
    _step_axis(axis)
    axis.legend(fontsize="small")
    return figure


def feature_norm_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """Mean feature norm ‖x‖ ± its standard deviation over the batch against the step (MagFace, AdaFace log them:
    the norm is their quality signal), or None when the history has no norms."""
    points = [(r["step"], r["margin/norm_mean"], r.get("margin/norm_std")) for r in history
              if r.get("margin/norm_mean") is not None]
    if not points:
        return None
    steps = [p[0] for p in points]
    means = [p[1] for p in points]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(steps, means, marker="o" if len(points) <= MARKED_POINTS else None, markersize=3.5, label="mean")
    spread = [(s, m, d) for s, m, d in points if d is not None]
    if spread:
        axis.fill_between([p[0] for p in spread], [m - d for _, m, d in spread], [m + d for _, m, d in spread],
                          alpha=0.25, linewidth=0, label="± 1 std over the batch")
        axis.legend(fontsize="small")
    axis.set(title="feature norm ‖x‖", ylabel="‖x‖ (L2 norm, embedding units)")
    _step_axis(axis)
    return figure


def history_figures(history: Sequence[dict[str, Any]]) -> list[tuple[str, str, Figure]]:
    """``(key, title, figure)`` for every panel the history has data for, then the accuracy figure."""
    figures = []
    for panel in PANELS:
        figure = panel_figure(panel, history)
        if figure is not None:
            figures.append((panel.key, panel.title, figure))
    figure = feature_norm_figure(history)
    if figure is not None:
        figures.append(("feature_norm", "feature norm", figure))
    figure = accuracy_figure(history)
    if figure is not None:
        figures.append(("accuracy", "verification accuracy", figure))
    return figures
