"""A run directory as it stood at an earlier checkpoint: what the resume tests start from."""

from __future__ import annotations

import shutil
from pathlib import Path


def back_to_step(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as it stood after the checkpoint of ``step`` (later checkpoints and outputs removed)."""
    shutil.copytree(run, copy)
    for path in (copy / "checkpoints").iterdir():
        if int(path.name[5:14]) > step:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("model.safetensors", "head.safetensors", "metrics.json", "report.md"):
        (copy / name).unlink(missing_ok=True)
    return copy
