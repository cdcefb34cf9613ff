"""What every plot shares: a headless matplotlib and atomic PNG writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows

import matplotlib.pyplot as plt


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write the figure to ``path`` through a temporary file and a rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, dpi=dpi, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    return path


__all__ = ["plt", "save_figure"]
