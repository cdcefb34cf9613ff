"""Training configuration: typed sections, validated on load, overridable by `key=value`, saved with each run.

An unknown key, a wrong type or an impossible value is a ConfigError that names the key and what is allowed.
The defaults are the built-in demo: CurricularFace on the synthetic identities, small CNN, 2 CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from marginface.errors import ConfigError


@dataclass
class SyntheticConfig:
    identities: int = 400
    images_per_id: int = 20
    difficulty: float = 0.6
    seed: int = 0
    pairs_per_set: int = 600
    ijb: bool = False  # training needs only the pair sets; `marginface data synth` writes the IJB tree


@dataclass
class DataConfig:
    train: str | None = None  # .rec directory/file, image folder or list file; None: the synthetic identities
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    pairs: list[str] | None = None  # .bin files or directories of them; None: the synthetic pair sets
    image_size: int | None = 56  # network input side; None keeps the stored size (112)
    num_workers: int = 1  # on 2 cores: one decoding worker beside the training process
    flip: bool = True
    bad_records: str = "fail"  # a damaged record stops training (fail) or is left out and listed (skip)
    max_bad_fraction: float = 0.001  # skip still stops once more than this share of the set is damaged


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    embedding_size: int = 128
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # backbone weights to start from (a model.safetensors, or `import-weights` output)


@dataclass
class HeadConfig:
    margin: str = "curricularface"
    params: dict[str, Any] = field(default_factory=lambda: {"s": 30.0, "m": 0.3})
    engine: str = "auto"  # auto: engines.DEFAULT_ENGINE for margin heads (softmax is its own linear layer)
    engine_params: dict[str, Any] = field(default_factory=dict)
    subcenters: int = 1  # K centres per class (Sub-center ArcFace); K > 1 makes `marginface data clean` possible


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | poly | constant
    warmup_steps: int = 100
    milestones: list[float] = field(default_factory=list)  # in epochs, for "step"
    gamma: float = 0.1
    power: float = 2.0
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    epochs: float = 4.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 128  # per process
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for the backbone; the head is always fp32)
    grad_clip: float | None = None
    accumulation: int = 1
    max_nonfinite: int = 20  # consecutive skipped steps before aborting
    log_every: int = 20
    eval_every: int = 100  # steps; 0: only at the end
    checkpoint_every: int = 100  # steps; 0: only at the end
    keep_checkpoints: int = 3
    threads: int | None = None  # torch intra-op threads per process; None: torch's default


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "optimizer.name": ("sgd", "adamw"),
    "schedule.name": ("cosine", "step", "poly", "constant"),
    "data.bad_records": ("fail", "skip"),
}
POSITIVE = {
    "train.batch_size", "train.accumulation", "train.max_nonfinite", "train.log_every", "train.keep_checkpoints",
    "optimizer.lr", "model.embedding_size", "data.synthetic.identities", "data.synthetic.images_per_id",
    "data.synthetic.pairs_per_set", "train.epochs", "train.max_steps", "data.image_size", "train.threads",
    "train.grad_clip",
}
NON_NEGATIVE = {
    "train.eval_every", "train.checkpoint_every", "schedule.warmup_steps", "optimizer.weight_decay",
    "optimizer.momentum", "data.num_workers", "schedule.gamma", "schedule.power", "schedule.min_lr_ratio",
    "data.synthetic.difficulty", "data.max_bad_fraction",
}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides (dotted keys, YAML values); validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from nested dicts, after ``key=value`` overrides (YAML values)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"override {item!r} is invalid: expected key=value, e.g. train.max_steps=100")
        seed_open_mapping(raw, key.strip())
        set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    config = build(Config, raw, prefix="")
    validate(config)
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    from marginface.fileio import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


def seed_open_mapping(raw: dict[str, Any], key: str) -> None:
    """Before `head.params.m=0.2` sets one entry of a free-form mapping the file left out, copy in the mapping
    the run would otherwise have (its default), so the override changes m and keeps s."""
    cls: Any = Config
    node = raw
    for part in key.split(".")[:-1]:
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return  # an unknown key: `build` names it
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return
            cls = hint
            continue
        if part not in node and typing.get_origin(hint) is dict:
            node[part] = copy.deepcopy(getattr(cls(), part))
        return


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Recursively turn a mapping into the dataclass ``cls``, checking keys and types."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}: {where} allows {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, prefix=f"{key}.")
        else:
            values[name] = coerce(key, value, hint)
    return cls(**values)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] + (" or null" if type(None) in options else ""))
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 5e-4 (no dot) as a string; accept what any user means by it
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def validate(config: Config) -> None:
    """Value checks beyond types; each names the key and what is allowed."""
    flat = flatten(config.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r} is invalid: expected one of {', '.join(choices)}")
    for key in POSITIVE:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"{key}={flat[key]!r} is invalid: expected a value > 0")
    for key in NON_NEGATIVE:
        if flat[key] is not None and not flat[key] >= 0:
            raise ConfigError(f"{key}={flat[key]!r} is invalid: expected a value >= 0")
    if not 0 <= config.optimizer.momentum < 1:
        raise ConfigError(f"optimizer.momentum={config.optimizer.momentum} is invalid: expected a value in [0, 1)")
    if len(config.optimizer.betas) != 2 or not all(0 <= b < 1 for b in config.optimizer.betas):
        raise ConfigError(f"optimizer.betas={config.optimizer.betas} is invalid: expected two values in [0, 1)")
    if config.model.init is not None and not Path(config.model.init).is_file():
        raise ConfigError(f"model.init={config.model.init!r}: no such file; expected a model.safetensors (a run's, "
                          "or `marginface import-weights` output) or a .pth state dict")
    if not 0 <= config.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={config.data.max_bad_fraction} is invalid: expected [0, 1]")
    if not 0 <= config.data.synthetic.difficulty <= 1:
        raise ConfigError(f"data.synthetic.difficulty={config.data.synthetic.difficulty} is invalid: expected [0, 1]")
    if config.schedule.name == "step" and not config.schedule.milestones:
        raise ConfigError(
            "schedule.milestones is empty: the step schedule needs epochs at which to decay, e.g. [10, 18]"
        )
    if config.schedule.milestones != sorted(config.schedule.milestones):
        raise ConfigError(f"schedule.milestones={config.schedule.milestones} is invalid: expected increasing epochs")
    # The margin and model names and parameters are checked by their own registries (same error style).
    from marginface import engines, heads, models

    try:
        config.head.margin = heads.canonical_name(config.head.margin)  # MV-Softmax, ArcFace, mv_softmax: one name
    except ConfigError:
        raise ConfigError(
            f"head.margin={config.head.margin!r} is invalid: expected one of {', '.join(heads.available())}"
        ) from None
    if config.head.engine not in (engines.AUTO, *engines.available()):
        raise ConfigError(
            f"head.engine={config.head.engine!r} is invalid: expected one of "
            f"{', '.join([engines.AUTO, *engines.available()])}"
        )
    subcenters = config.head.subcenters
    if not subcenters >= 1:
        raise ConfigError(f"head.subcenters={subcenters!r} is invalid: expected an integer >= 1 (centres per class; "
                          "1 is a plain classifier)")
    if subcenters > 1 and config.head.margin == "softmax":
        raise ConfigError(f"head.subcenters={subcenters} needs a margin head: head.margin=softmax is a plain linear "
                          "layer (pick a margin, e.g. head.margin=arcface, or set head.subcenters=1)")
    engine_name = engines.DEFAULT_ENGINE if config.head.engine == engines.AUTO else config.head.engine
    unknown = sorted(config.head.engine_params.keys() - set(engines.option_names(engine_name)))
    if unknown:
        valid = ", ".join(engines.option_names(engine_name)) or "none"
        raise ConfigError(
            f"head.engine_params has {', '.join(unknown)}, which engine {engine_name!r} does not take: "
            f"its options are {valid}"
        )
    if config.model.name not in models.available():
        raise ConfigError(
            f"model.name={config.model.name!r} is invalid: expected one of {', '.join(models.available())}"
        )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("params", "kwargs"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Margin parameters that mean the same in every margin that has them. The others share names but not meaning
# (m is an angle in ArcFace, a cosine offset in CosFace, a multiplier in SphereFace), so they are not carried.
SHARED_MARGIN_PARAMETERS = ("s", "gradient", "easy_margin")


def switch_margin(config: Config, name: str, explicit: set[str] = frozenset()) -> tuple[Config, dict, dict]:
    """`config` with head `name`: carry the parameters that mean the same (and those in `explicit`, set by the
    user for this run), take `name`'s defaults for the rest. Returns (config, carried, defaults)."""
    from marginface import heads, margins

    name = heads.canonical_name(name)  # unknown: a ConfigError listing every head, softmax too
    accepted = margins.parameters(name) if name != "softmax" else {}
    params = config.head.params
    carried = {k: v for k, v in params.items()
               if k in accepted and (k in SHARED_MARGIN_PARAMETERS or k in explicit)}
    unknown = sorted(k for k in explicit if k not in accepted)
    if unknown:
        raise ConfigError(
            f"head.params.{unknown[0]} was given, but margin {name!r} has no parameter {unknown[0]}: its "
            f"parameters are {', '.join(accepted) or '(none)'}"
        )
    defaults = {k: v for k, v in accepted.items() if k not in carried and v is not inspect.Parameter.empty}
    raw = config.to_dict()
    raw["head"] = {**raw["head"], "margin": name, "params": carried}
    return config_from_dict(raw), carried, defaults
