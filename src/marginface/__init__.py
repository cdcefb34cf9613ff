"""marginface: margin-based softmax losses for face recognition in one unified T/N/G formulation."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Sub-packages load on first use so that `marginface --help` and the data tools start fast and a
# user who only evaluates never imports the training stack.
_SUBMODULES = ("margins", "engines", "heads", "models", "data", "eval", "train", "search", "plots", "errors")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"marginface.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'marginface' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
