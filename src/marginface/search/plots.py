"""Pictures of a loss search: candidate rewards per epoch, and the sampling distribution over the epochs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from marginface.plots.common import integer_ticks, plt, save_figure

WARMUP_COLOUR = "0.88"  # the shading of the warm-up epochs (fixed initial loss, no distribution update)
MAX_LINES = 12  # search variables drawn one line each; beyond, the picture is a blur
MAX_BANDS = 2  # mean ± σ bands drawn up to this many variables; more overlap into one grey smear


def plot_search(summary: dict, directory: str | os.PathLike) -> list[Path]:
    """rewards.png and distribution.png from search.json's content; returns the paths written."""
    directory = Path(directory)
    return [save_figure(rewards_figure(summary), directory / "rewards.png"),
            save_figure(distribution_figure(summary), directory / "distribution.png")]


def _warmup_epochs(summary: dict) -> int:
    return sum(1 for record in summary["epochs"] if record["warmup"])


def _shade_warmup(axis, start: float, end: float) -> None:
    """A grey band over the warm-up epochs, in the legend: their loss is the fixed initial one."""
    if end > start:
        axis.axvspan(start, end, color=WARMUP_COLOUR, zorder=0, label="warm-up: fixed initial loss, no update")


def rewards_figure(summary: dict) -> Figure:
    """Every candidate's reward (%) per epoch (1-based), the best one's line, warm-up epochs shaded."""
    epochs = summary["epochs"]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    _shade_warmup(axis, 0.5, _warmup_epochs(summary) + 0.5)
    for warmup in (True, False):
        xs = [r["epoch"] + 1 for r in epochs if r["warmup"] == warmup for _ in r["candidates"]]
        ys = [100 * c["reward"] for r in epochs if r["warmup"] == warmup for c in r["candidates"]]
        if xs:
            axis.scatter(xs, ys, s=22, zorder=3, marker="s" if warmup else "o",
                         color="0.45" if warmup else "C0", label="warm-up model" if warmup else "candidates")
    axis.plot([r["epoch"] + 1 for r in epochs], [100 * r["candidates"][r["best"]]["reward"] for r in epochs],
              color="C3", zorder=2, label="best candidate (copied to all)")
    axis.set_xlim(0.5, len(epochs) + 0.5)
    integer_ticks(axis, "x")
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward: mean 10-fold accuracy (%)")
    axis.set_title(f"{summary['method']}: candidate rewards")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small")
    return figure


def _scale(summary: dict) -> float:
    """The s of the searched margin (every candidate records its margin parameters)."""
    for record in summary["epochs"]:
        for candidate in record["candidates"]:
            s = candidate["params"].get("params", {}).get("s")
            if s is not None:
                return float(s)
    return float(summary.get("config", {}).get("head", {}).get("params", {}).get("s", 64.0))


def margin_of_z(z: np.ndarray, s: float) -> np.ndarray:
    """The CosFace margin m of the modulating factor a = −e^z: m = ln(1 − a)/s = ln(1 + e^z)/s (docs/search.md)."""
    return np.logaddexp(0.0, np.asarray(z, dtype=np.float64)) / s


def piece_centres(pieces: int) -> np.ndarray:
    """The centres of the M equal pieces of t(·) on [−1, 1] (AM-LFS)."""
    return -1.0 + (2.0 * np.arange(pieces) + 1.0) / pieces


def _variable_names(summary: dict, dimension: int) -> list[str]:
    if summary["space"] == "global":
        return ["z"]
    if summary["space"] == "local":
        return [f"bin {k} (p in [{k / dimension:.1f}, {(k + 1) / dimension:.1f}))" for k in range(dimension)]
    return [f"{'slope' if k % 2 == 0 else 'intercept'} {k // 2}" for k in range(dimension)]


def distribution_figure(summary: dict) -> Figure:
    """Left: mean ± σ of each search variable over the epochs (0: the initial distribution), the samples drawn
    as dots, warm-up shaded. Right: the same in the margin m users think in — the CosFace-equivalent margin
    ln(1 + e^z)/s for Search-/Random-Softmax, m = c − t(c) at each t piece's centre c for AM-LFS."""
    epochs = summary["epochs"]
    xs = np.array([0] + [r["epoch"] + 1 for r in epochs], dtype=np.float64)
    means = np.array([epochs[0]["distribution_before"]["mean"]] + [r["distribution_after"]["mean"] for r in epochs])
    sigmas = np.array([epochs[0]["distribution_before"]["sigma"]] + [r["distribution_after"]["sigma"] for r in epochs])
    dimension = means.shape[1]
    shown = min(dimension, MAX_LINES)
    names = _variable_names(summary, dimension)
    factor_space = summary["space"] in ("global", "local")
    figure, (raw, margin) = plt.subplots(1, 2, figsize=(12.8, 4.6))
    warmup = _warmup_epochs(summary)
    for axis in (raw, margin):
        _shade_warmup(axis, 0.0, float(warmup))
    for index in range(shown):
        # AM-LFS: a piece's slope and intercept share its colour, told apart by the line style
        colour = f"C{index % 10}" if factor_space else f"C{(index // 2) % 10}"
        style = "-" if factor_space or index % 2 == 0 else "--"
        raw.plot(xs, means[:, index], color=colour, linestyle=style, marker="o", markersize=3, label=names[index])
        if shown <= MAX_BANDS:
            raw.fill_between(xs, means[:, index] - sigmas[:, index], means[:, index] + sigmas[:, index],
                             color=colour, alpha=0.12)
    # the samples of each searched epoch, drawn from the distribution after record["epoch"] epochs
    sampled = [(r["epoch"], c["params"]["x"]) for r in epochs if not r["warmup"] for c in r["candidates"]]
    if sampled:
        raw.scatter([e for e, _ in sampled], [x[0] for _, x in sampled], s=12, color="0.3", zorder=3,
                    label=f"samples of {names[0]}")
    raw.set_xlabel("epochs done (0: initial distribution)")
    spread = "mean ± σ" if shown <= MAX_BANDS else f"mean (σ: {_sigma_text(sigmas[:, :shown])})"
    raw.set_ylabel(("z = ln(−a), " if factor_space else "piece parameter, ") + spread)
    raw.set_title(f"{summary['method']} distribution: "
                  + ("z = ln(−a) of p_m = p / (a·p + 1 − a)" if factor_space else "[slope, intercept] of t pieces"))
    if factor_space:
        _margin_panel_factor(margin, summary, xs, means, sigmas, sampled, names, shown)
    else:
        _margin_panel_pieces(margin, summary, xs, means, sigmas)
    for axis in (raw, margin):
        axis.set_xlim(-0.25, xs[-1] + 0.25)
        integer_ticks(axis, "x")
        axis.grid(alpha=0.3)
    figure.tight_layout()  # before the legends, which go below the panels: inside they hide samples
    for axis in (raw, margin):
        axis.legend(fontsize=7, ncol=3 if shown > 4 else 2, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                    frameon=False)
    return figure


def _sigma_text(sigmas: np.ndarray) -> str:
    """σ in words for a picture without bands: one number where every variable keeps the same σ."""
    if np.allclose(sigmas, sigmas.flat[0]):
        return f"{sigmas.flat[0]:.3g} for every variable"
    return f"{sigmas.min():.3g} to {sigmas.max():.3g}"


def _margin_panel_factor(axis, summary, xs, means, sigmas, sampled, names, shown) -> None:
    """m = ln(1 + e^z)/s of the mean and of mean ± σ (monotone in z, so the band maps to the band)."""
    s = _scale(summary)
    for index in range(shown):
        colour = f"C{index % 10}"
        axis.plot(xs, margin_of_z(means[:, index], s), color=colour, marker="o", markersize=3, label=names[index])
        if shown <= MAX_BANDS:
            axis.fill_between(xs, margin_of_z(means[:, index] - sigmas[:, index], s),
                              margin_of_z(means[:, index] + sigmas[:, index], s), color=colour, alpha=0.12)
    if sampled:
        axis.scatter([e for e, _ in sampled], margin_of_z(np.array([x[0] for _, x in sampled]), s), s=12,
                     color="0.3", zorder=3, label=f"samples of {names[0]}")
    axis.set_xlabel("epochs done (0: initial distribution)")
    axis.set_ylabel("CosFace margin m = ln(1 + e^z) / s" + (" of mean ± σ" if shown <= MAX_BANDS else " of the mean"))
    axis.set_title(f"the same as a CosFace margin m (s = {s:g})")


def _margin_panel_pieces(axis, summary, xs, means, sigmas) -> None:
    """AM-LFS: t(c) = slope·c + intercept, so the shift of the target cosine at a piece's centre c is
    m = c(1 − slope) − intercept (CosFace(m) is slope 1, intercept −m); linear in x, so mean and σ are exact."""
    pieces = int(summary.get("settings", {}).get("pieces") or means.shape[1] // 2)
    centres = piece_centres(pieces)
    for piece, c in enumerate(centres[:MAX_LINES]):
        slope, intercept = 2 * piece, 2 * piece + 1
        mean = c * (1.0 - means[:, slope]) - means[:, intercept]
        sigma = np.sqrt((c * sigmas[:, slope]) ** 2 + sigmas[:, intercept] ** 2)
        colour = f"C{piece % 10}"
        axis.plot(xs, mean, color=colour, marker="o", markersize=3, label=f"piece {piece} (cos θ_y ≈ {c:.2f})")
        if len(centres) <= MAX_BANDS:
            axis.fill_between(xs, mean - sigma, mean + sigma, color=colour, alpha=0.12)
    axis.axhline(0.0, color="black", linestyle=":", linewidth=0.8)
    axis.set_xlabel("epochs done (0: initial distribution)")
    axis.set_ylabel("margin m = c − t(c), mean" + (" ± σ" if len(centres) <= MAX_BANDS else ""))
    axis.set_title("the same as the margin on the target cosine at each piece's centre c")


__all__ = ["distribution_figure", "margin_of_z", "piece_centres", "plot_search", "rewards_figure"]
