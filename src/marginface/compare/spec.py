"""`--margins` items: `name` or `name:key=value,...`, parsed and validated before any training starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from marginface.errors import ConfigError


@dataclass(frozen=True)
class MarginSpec:
    """One competitor of a comparison: a head name (canonical) and the parameters given for it."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the report names it: `cosface:m=0.3` (the canonical name, parameters in the order given)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{key}={format_value(value)}" for key, value in self.params.items())

    @property
    def directory(self) -> str:
        """Its folder under DIR/runs: the label with `:` (awkward on some file systems) replaced by `-`."""
        return self.label.replace(":", "-")


def format_value(value: Any) -> str:
    """A parameter value as a user writes it: 0.3, true, arc."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_value(text: str) -> Any:
    """A YAML scalar, with YAML 1.1's `5e-4` (read as a string) taken as the number every user means."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_margin(item: str) -> MarginSpec:
    """`npcface:m0=0.4,m1=0.2` -> MarginSpec('npcface', {'m0': 0.4, 'm1': 0.2}); the name is normalised
    (`ArcFace`, `mv-softmax` are accepted), unknown names are a ConfigError listing the valid ones."""
    from marginface import heads

    name, _, rest = item.partition(":")
    try:
        canonical = heads.canonical_name(name)
    except ConfigError:
        raise ConfigError(f"--margins {item!r}: unknown margin {name.strip()!r}; expected one of "
                          f"{', '.join(heads.available())}") from None
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"--margins {item!r}: expected NAME:key=value,key=value, got {part!r}")
        if key.strip() in params:
            raise ConfigError(f"--margins {item!r}: parameter {key.strip()} is given twice")
        params[key.strip()] = parse_value(value)
    return MarginSpec(canonical, params)


def parse_margins(items: list[str]) -> list[MarginSpec]:
    """Every `--margins` item parsed; the same competitor twice is an error (its runs would collide)."""
    if not items:
        raise ConfigError("--margins needs at least one margin, e.g. --margins arcface cosface:m=0.35")
    specs = [parse_margin(item) for item in items]
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"--margins lists {repeated[0]} more than once")
    return specs


def valid_parameters(name: str) -> list[str]:
    """The parameter names head `name` takes, for messages."""
    from marginface import margins

    return ["bias"] if name == "softmax" else list(margins.parameters(name))
