"""Atomic writes and full-state checkpoints: a kill at any moment leaves the previous checkpoint intact.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with ``torch.load(...,
weights_only=True)``: no pickle of arbitrary objects is ever executed.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marginface.errors import MarginfaceError
from marginface.fileio import atomic_write_bytes

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{9})\.pt$")


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may touch, as weights_only-loadable values."""
    numpy_state = np.random.get_state()  # noqa: NPY002  (the legacy global generator is what libraries use)
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"],
         numpy_state["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves ``DIR/checkpoints/step_NNNNNNNNN.pt`` atomically and keeps the last ``keep`` of them."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, state: dict[str, Any], step: int) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.directory / f"step_{step:09d}.pt"
        atomic_write_bytes(path, buffer.getvalue())
        # Old checkpoints go only after the new one is in place (the main file first: it is what makes one).
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
            shutil.rmtree(self.head_directory_of(old), ignore_errors=True)
        return path

    def head_directory(self, step: int) -> Path:
        """Where each rank writes the head rows of checkpoint ``step`` (sharded heads)."""
        return self.directory / f"step_{step:09d}.head"

    def head_directory_of(self, checkpoint: Path) -> Path:
        return checkpoint.with_suffix(".head")

    def checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def load_latest(self) -> dict[str, Any]:
        path = self.latest()
        if path is None:
            raise MarginfaceError(
                f"no checkpoint to resume from in {self.directory} (expected files named step_NNNNNNNNN.pt)"
            )
        return load_checkpoint(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a damaged file is a clear error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise MarginfaceError(f"cannot load checkpoint {path}: {exc}") from None
