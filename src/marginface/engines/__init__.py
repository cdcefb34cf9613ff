"""Engines produce cosines between embeddings and class centres and reduce them into the loss.

The dense engine materialises the [B, C] matrix and is the reference every other engine is tested against.
"""

from __future__ import annotations

from marginface.engines.dense import DenseEngine, cosine_matrix
from marginface.errors import ConfigError

ENGINES = {"dense": DenseEngine}


def create(name: str) -> DenseEngine:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}: expected one of {', '.join(sorted(ENGINES))}")
    return ENGINES[name]()


__all__ = ["ENGINES", "DenseEngine", "cosine_matrix", "create"]
