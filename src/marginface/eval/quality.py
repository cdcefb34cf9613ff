"""Face-quality scores: each image's raw embedding norm (MagFace's quality), written as a `set,image,norm` CSV."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from marginface.errors import ConfigError
from marginface.fileio import atomic_write_text

__all__ = ["QUALITY_HEADER", "check_quality_path", "write_quality_scores"]

QUALITY_HEADER = ("set", "image", "norm")


def check_quality_path(path: str | os.PathLike, option: str = "--quality-scores") -> Path:
    """``path`` as a Path if a CSV can be written there: its directory exists and it is not a directory itself.

    Called before any model runs, so that a mistyped path fails at once rather than after the embedding;
    the writer does not create directories (a typo would otherwise leave a file in a surprising place)."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"{option} {path}: directory {directory} does not exist (create it or choose another path)")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory, expected a CSV file name")
    return path


def write_quality_scores(path: str | os.PathLike,
                         entries: Iterable[tuple[str, Sequence[object], np.ndarray]],
                         option: str = "--quality-scores") -> Path:
    """Write one row per image, ``set,image,norm``, for each ``(set name, image names or indices, norms)`` of
    ``entries`` in the order given, atomically (a crash leaves the old file or none). Norms are written with
    9 significant digits, which round-trip float32."""
    path = check_quality_path(path, option)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(QUALITY_HEADER)
    for name, images, norms in entries:
        norms = np.asarray(norms).reshape(-1)
        if len(images) != norms.size:
            raise ConfigError(f"quality scores of {name}: {len(images)} images but {norms.size} norms")
        writer.writerows((name, image, f"{value:.9g}") for image, value in zip(images, norms.tolist(), strict=True))
    atomic_write_text(path, buffer.getvalue())
    return path
