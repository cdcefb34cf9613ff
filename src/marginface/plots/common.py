"""What every plot shares: a headless matplotlib, atomic PNG writes and integer tick axes."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from marginface.fileio import atomic_output


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write the figure to ``path`` atomically (temporary file and rename), then close it."""
    path = Path(path)
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, dpi=dpi, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def integer_ticks(axis, which: str = "x") -> None:
    """Ticks at whole numbers only (steps, epochs, ranks): a 6-step run must not read "step 2.5".

    On a log axis the ticks are 1, 2, 5, 10, 20, 50, … written as plain integers, not as 2×10⁰."""
    target = axis.xaxis if which == "x" else axis.yaxis
    scale = axis.get_xscale() if which == "x" else axis.get_yscale()
    if scale == "log":
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0f}"))
        target.set_minor_locator(NullLocator())
        target.set_minor_formatter(NullFormatter())
    else:
        target.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


__all__ = ["integer_ticks", "plt", "save_figure"]
