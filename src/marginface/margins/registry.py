"""The margin registry: `create(name, **params)` and `available()`, with errors that name what is allowed."""

from __future__ import annotations

import inspect
from typing import Any

from marginface.errors import ConfigError

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a margin creatable by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise RuntimeError(f"margin class {cls.__name__} needs a unique name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered margin, sorted."""
    return sorted(_REGISTRY)


def normalise_name(name: str) -> str:
    """Registry key of a user-written margin name: case and `-`/`_` do not matter (`MV-Softmax` = `mv_softmax`)."""
    return name.strip().lower().replace("-", "_")


def margin_class(name: str) -> type:
    """The margin class registered as ``name`` (case- and `-`/`_`-insensitive)."""
    key = normalise_name(name) if isinstance(name, str) else None
    if key not in _REGISTRY:
        raise ConfigError(f"unknown margin {name!r}: expected one of {', '.join(available())}")
    return _REGISTRY[key]


def parameters(name: str) -> dict[str, Any]:
    """The parameters of a margin and their defaults (``inspect.Parameter.empty`` for required ones)."""
    signature = inspect.signature(margin_class(name).__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}


def create(name: str, **params: Any):
    """Create the margin ``name`` with ``params``; an unknown name or parameter is a ConfigError naming it."""
    cls = margin_class(name)
    allowed = parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"margin {name!r} has no parameter {', '.join(unknown)}: "
            f"its parameters are {', '.join(allowed) or '(none)'}"
        )
    return cls(**params)
