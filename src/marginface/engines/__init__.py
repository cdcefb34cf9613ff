"""Engines produce the cosines between embeddings and class centres and reduce them into a margin's loss.

``dense`` materialises the [B, C] matrix (the reference every other engine is tested against); ``chunked``
streams the classes in blocks and never holds [B, C]; ``sharded`` splits the classes over the ranks of a process
group, and with ``partial`` samples them per step (Partial FC). docs/engines.md says which to pick.
"""

from __future__ import annotations

from typing import Any

from marginface.engines.base import ClassPass, Engine, margin_loss
from marginface.engines.chunked import ChunkedEngine
from marginface.engines.dense import DenseEngine, cosine_matrix
from marginface.engines.sharded import PartialEngine, ShardedEngine, shard_range
from marginface.errors import ConfigError

ENGINES: dict[str, type[Engine]] = {
    "dense": DenseEngine, "chunked": ChunkedEngine, "partial": PartialEngine, "sharded": ShardedEngine,
}
# What heads and the trainer use unless told otherwise: the faster one at the sizes users train with
# (docs/benchmarks.md, "heads"); the chunked engine is also the one whose memory does not grow with B·C.
DEFAULT_ENGINE = "chunked"
# The name that means DEFAULT_ENGINE (the config's default, so a config keeps following the measured choice).
AUTO = "auto"


def available() -> list[str]:
    """Every engine name."""
    return sorted(ENGINES)


def option_names(name: str) -> list[str]:
    """The options an engine accepts (its constructor's keyword arguments)."""
    return ENGINES[check_name(name)].option_names()


def check_name(name: Any) -> str:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}: expected one of {', '.join(available())}")
    return name


def create(name: str, **options: Any) -> Engine:
    """The engine ``name`` with ``options``; unknown names and options are a ConfigError listing the valid ones."""
    valid = option_names(name)
    unknown = sorted(options.keys() - set(valid))
    if unknown:
        listing = ", ".join(valid) if valid else "none"
        raise ConfigError(f"engine {name!r} has no option {', '.join(unknown)}: its options are {listing}")
    return ENGINES[name](**options)


def resolve(engine: str | Engine | None, options: dict[str, Any] | None = None) -> Engine:
    """An engine from a name (with options), an engine object, or None (the default engine)."""
    if isinstance(engine, Engine):
        if options:
            raise ConfigError("engine options are given with an engine name, not with an engine object")
        return engine
    if engine is None or engine == AUTO:
        engine = DEFAULT_ENGINE
    if not isinstance(engine, str):
        raise ConfigError(f"engine={engine!r} is invalid: expected an engine name or an Engine object")
    return create(engine, **(options or {}))


__all__ = [
    "AUTO",
    "DEFAULT_ENGINE",
    "ENGINES",
    "ChunkedEngine",
    "ClassPass",
    "DenseEngine",
    "Engine",
    "PartialEngine",
    "ShardedEngine",
    "available",
    "cosine_matrix",
    "create",
    "margin_loss",
    "option_names",
    "resolve",
    "shard_range",
]
