"""Name -> constructor registry for the backbones, and the argument checks every backbone shares."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from marginface.errors import ConfigError

# Modules whose import registers model families; loaded on first lookup so that importing the registry
# alone stays cheap and no family module has to import the package __init__.
_FAMILY_MODULES = ("marginface.models.iresnet", "marginface.models.mobilefacenet", "marginface.models.small")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make `create(name, ...)` call the decorated constructor."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ConfigError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def available() -> list[str]:
    """Names accepted by `create`, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def create(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Build the backbone `name` with an `embedding_size`-d output.

    The returned module carries `model.config` (a dict such that `create(**model.config)` rebuilds the same
    architecture) and `model.input_size` (H, W). Build on the meta device with `with torch.device("meta"):`
    to inspect a large model without allocating it.
    """
    _load_families()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(sorted(_REGISTRY))}")
    builder = _REGISTRY[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "embedding_size"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: embedding_size, {', '.join(accepted)}"
        )
    return builder(embedding_size=embedding_size, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Shared argument checks: each raises ConfigError naming the parameter and what is allowed.


def check_embedding_size(model: str, embedding_size: Any) -> int:
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ConfigError(f"{model}: embedding_size must be a positive integer, got {embedding_size!r}")
    return embedding_size


def check_dropout(model: str, dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not math.isfinite(dropout):
        raise ConfigError(f"{model}: dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{model}: dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def parse_size(model: str, parameter: str, size: Any) -> tuple[int, int]:
    """Accept an int (square) or a pair of positive ints; return (H, W)."""
    if isinstance(size, int) and not isinstance(size, bool):
        pair: Sequence[Any] = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = size
    else:
        raise ConfigError(f"{model}: {parameter} must be an int or an (H, W) pair, got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ConfigError(f"{model}: {parameter} must hold positive integers, got {size!r}")
    return int(pair[0]), int(pair[1])


def check_input_size(model: str, input_size: Any, multiple: int, minimum: int) -> tuple[int, int]:
    """Parse `input_size` and require both sides to be multiples of `multiple` and at least `minimum`."""
    height, width = parse_size(model, "input_size", input_size)
    for side in (height, width):
        if side % multiple or side < minimum:
            raise ConfigError(
                f"{model}: input_size {height}x{width} is not supported; each side must be a multiple of "
                f"{multiple} and at least {minimum} (the default is 112x112)"
            )
    return height, width


def check_input(model: str, x: torch.Tensor, input_size: tuple[int, int]) -> None:
    """Fail with the expected shape, rather than with a matrix-size error from deep inside the network."""
    if torch.jit.is_tracing():
        return  # the TorchScript ONNX exporter traces with the right shape; a Python check would only warn
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != tuple(input_size):
        raise ValueError(
            f"{model}: expected images of shape [N, 3, {input_size[0]}, {input_size[1]}], got {list(x.shape)}"
        )
