"""What a comparison trains: one run configuration per (margin, seed), its directory, and the plan's identity.

Every run of a comparison is the base configuration with only the head and `train.seed` changed, so for one
seed every margin sees the same samples in the same order and starts from the same backbone weights (the
trainer seeds the global RNG with `train.seed` before it builds the backbone, and the sampler's order and the
flips are functions of `train.seed` alone). The identity is what a rerun must match to reuse the runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marginface.compare.ijb import DEFAULT_TARGET, IJBSpec, check_ijb
from marginface.compare.spec import MarginSpec, valid_parameters
from marginface.errors import ConfigError
from marginface.train.config import Config, config_from_dict, flatten, switch_margin

PLAN_FILE = "plan.json"
PLAN_FORMAT = "marginface-compare-plan"
# How a run executes, not what it computes: `--parallel` sets the threads per process, so they may differ
# between a first call and its rerun without making the runs different.
EXECUTION_KEYS = ("train.threads",)


@dataclass(frozen=True, eq=False)  # hashed by identity: a key of the outcome tables
class RunPlan:
    """One training run of the comparison."""

    spec: MarginSpec
    seed: int
    config: Config
    directory: Path

    @property
    def name(self) -> str:
        """`cosface:m=0.3 seed 1`, for messages."""
        return f"{self.spec.label} seed {self.seed}"


@dataclass(frozen=True)
class ComparisonPlan:
    """Every run of a comparison, in the order they train: seed by seed, each seed's margins together (an
    interrupted comparison then leaves whole seeds, which the paired statistics can use)."""

    out: Path
    base: Config
    margins: tuple[MarginSpec, ...]
    seeds: tuple[int, ...]
    baseline: MarginSpec
    runs: tuple[RunPlan, ...]
    # what the finished runs are also scored on; not part of the identity: it changes no run's training
    ijb: IJBSpec | None = None

    def identity(self) -> dict[str, Any]:
        """What a rerun into the same directory must match: the base config, the margins and the seeds (not the
        IJB tree: adding or changing it only scores the trained runs again)."""
        return {"config": comparable_config(self.base), "margins": [m.label for m in self.margins],
                "seeds": list(self.seeds)}


def comparable_config(config: Config) -> dict[str, Any]:
    """The config as a nested dict without the execution-only keys."""
    raw = config.to_dict()
    for key in EXECUTION_KEYS:
        section, _, name = key.partition(".")
        raw[section].pop(name, None)
    return raw


def run_config(base: Config, spec: MarginSpec, seed: int) -> Config:
    """The base config with this margin and seed. Parameters that mean the same in every margin (s, gradient,
    easy_margin) carry over from the base head, the ones given in the spec are set, the rest take the margin's
    defaults: the rule of `marginface train --margin`."""
    raw = base.to_dict()
    raw["train"]["seed"] = seed
    if spec.name == "softmax":
        raw["head"] = {**raw["head"], "margin": "softmax", "params": dict(spec.params)}
        return config_from_dict(raw)
    raw["head"] = {**raw["head"], "params": {**raw["head"]["params"], **spec.params}}
    config, _, _ = switch_margin(config_from_dict(raw), spec.name, explicit=set(spec.params))
    return config


def check_margin(spec: MarginSpec, base: Config) -> None:
    """Build the margin (or the softmax head) once, so that a bad parameter name or value stops the comparison
    before any run trains; the message names the item and the parameters it takes."""
    from marginface import heads, margins

    try:
        if spec.name == "softmax":
            heads.create("softmax", num_classes=2, embedding_size=base.model.embedding_size, **spec.params)
        else:
            margins.create(spec.name, **spec.params)
            run_config(base, spec, base.train.seed)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"--margins {spec.label}: {exc} (parameters of {spec.name}: "
                          f"{', '.join(valid_parameters(spec.name)) or 'none'})") from None


def make_plan(out: str | Path, base: Config, margins: list[MarginSpec], seeds: int,
              baseline: str | None = None, ijb: str | Path | None = None,
              ijb_target: str = DEFAULT_TARGET) -> ComparisonPlan:
    """Validate everything a comparison needs and lay out its runs under ``out``/runs/<margin>/seed<k>; with
    ``ijb`` (an IJB tree, `marginface eval --ijb`'s layout) the runs are scored on its ``ijb_target`` too."""
    check_count("--seeds", seeds, "seeds", " (runs use train.seed, train.seed+1, ...)")
    for spec in margins:
        check_margin(spec, base)
    chosen = resolve_baseline(margins, baseline)
    ijb_spec = check_ijb(ijb, ijb_target) if ijb is not None else None  # a bad tree must not wait for training
    out = Path(out)
    seed_values = tuple(base.train.seed + k for k in range(seeds))
    runs = tuple(RunPlan(spec, seed, run_config(base, spec, seed), out / "runs" / spec.directory / f"seed{seed}")
                 for seed in seed_values for spec in margins)
    return ComparisonPlan(out, base, tuple(margins), seed_values, chosen, runs, ijb_spec)


def check_count(option: str, value: object, what: str, note: str = "") -> int:
    """``value`` when it is an integer >= 1 (not a bool), else a ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} {value!r} is invalid: expected a number of {what} >= 1{note}")
    return value


def resolve_baseline(margins: list[MarginSpec], baseline: str | None) -> MarginSpec:
    """The margin differences are measured against: the one named (its label, or its name when that is
    unambiguous), or the first."""
    if baseline is None:
        return margins[0]
    from marginface.compare.spec import parse_margin

    wanted = parse_margin(baseline)
    matches = [m for m in margins if m.label == wanted.label] or (
        [m for m in margins if m.name == wanted.name] if not wanted.params else [])
    if len(matches) != 1:
        raise ConfigError(f"--baseline {baseline!r} is not one of --margins "
                          f"({', '.join(m.label for m in margins)})"
                          + (": several match, give its parameters too" if len(matches) > 1 else ""))
    return matches[0]


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the settings a newer marginface added filled in at their defaults (so a comparison
    written before a new key existed still matches when the key is left at its default)."""
    try:
        return comparable_config(config_from_dict(config))
    except Exception:  # a config this version cannot read is simply compared as stored
        return config


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two identities, one phrase per difference (config keys, margins, seeds)."""
    differences = []
    old_flat, new_flat = flatten(with_defaults(old.get("config", {}))), flatten(new.get("config", {}))
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if old_flat.get(key, "(unset)") != new_flat.get(key, "(unset)"):
            differences.append(f"{key}: {old_flat.get(key, '(unset)')!r} before, {new_flat.get(key, '(unset)')!r} now")
    old_margins, new_margins = set(old.get("margins", [])), set(new.get("margins", []))
    if old_margins != new_margins:
        differences.append(f"margins: {', '.join(sorted(old_margins))} before, {', '.join(sorted(new_margins))} now")
    if old.get("seeds") != new.get("seeds"):
        differences.append(f"seeds: {old.get('seeds')} before, {new.get('seeds')} now")
    return differences


def claim_directory(plan: ComparisonPlan, force: bool = False) -> None:
    """Write ``out``/plan.json, after checking that ``out`` is empty or holds this same comparison (or --force)."""
    from marginface.fileio import atomic_write_text

    out = plan.out
    path = out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: expected a directory for the comparison")
    if path.exists():
        try:
            recorded = json.loads(path.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a comparison plan ({exc}); use another --out, or --force") from None
        differences = identity_differences(recorded, plan.identity())
        if differences and not force:
            raise ConfigError(f"--out {out} holds a different comparison ({'; '.join(differences)}): use another "
                              "--out, or --force to retrain what differs (runs that still match are reused)")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty and holds no comparison ({PLAN_FILE} is missing): use an empty "
                          "or new directory, or --force")
    document = {"format": PLAN_FORMAT, "version": 1, "identity": plan.identity()}
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
