"""Pictures of a loss search: candidate rewards per epoch, and the sampling distribution over the epochs."""

from __future__ import annotations

import os
from pathlib import Path

from marginface.plots.common import plt, save_figure


def plot_search(summary: dict, directory: str | os.PathLike) -> list[Path]:
    """rewards.png and distribution.png from search.json's content; returns the paths written."""
    directory = Path(directory)
    epochs = summary["epochs"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for record in epochs:
        rewards = [100 * c["reward"] for c in record["candidates"]]
        axis.scatter([record["epoch"] + 1] * len(rewards), rewards, s=14, color="0.6" if record["warmup"] else "C0")
    axis.plot([r["epoch"] + 1 for r in epochs], [100 * r["candidates"][r["best"]]["reward"] for r in epochs],
              color="C3", label="best candidate (copied to all)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward: mean 10-fold accuracy (%)")
    axis.set_title(f"{summary['method']}: candidate rewards (grey: warm-up)")
    axis.legend(loc="lower right")
    paths = [save_figure(figure, directory / "rewards.png")]

    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [0] + [r["epoch"] + 1 for r in epochs]
    means = [epochs[0]["distribution_before"]["mean"]] + [r["distribution_after"]["mean"] for r in epochs]
    sigmas = [epochs[0]["distribution_before"]["sigma"]] + [r["distribution_after"]["sigma"] for r in epochs]
    for index in range(min(len(means[0]), 12)):
        mean = [m[index] for m in means]
        sigma = [s[index] for s in sigmas]
        axis.plot(xs, mean, label=f"x{index}" if len(means[0]) > 1 else "mean")
        axis.fill_between(xs, [m - s for m, s in zip(mean, sigma, strict=True)],
                          [m + s for m, s in zip(mean, sigma, strict=True)], alpha=0.15)
    for record in epochs:
        if not record["warmup"]:
            for candidate in record["candidates"]:
                # drawn from the distribution after record["epoch"] epochs
                axis.scatter(record["epoch"], candidate["params"]["x"][0], s=8, color="0.4")
    axis.set_xlabel("epoch (0: initial)")
    axis.set_ylabel("search variable (mean ± σ; dots: samples of x0)")
    label = "z = ln(−a)" if summary["space"] in ("global", "local") else "[slope, intercept] of t pieces"
    axis.set_title(f"{summary['method']} distribution: {label}")
    if len(means[0]) > 1:
        axis.legend(fontsize=7, ncol=2)
    paths.append(save_figure(figure, directory / "distribution.png"))
    return paths
