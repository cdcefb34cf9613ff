"""What every plot shares: a headless matplotlib and atomic PNG writes."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows

import matplotlib.pyplot as plt

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


__all__ = ["plt", "save_figure"]
