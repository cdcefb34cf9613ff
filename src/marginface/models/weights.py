"""Backbone weights in and out: marginface's `model.safetensors`, and state dicts from other toolkits (`.pth`).

A `.pth` is read with `torch.load(weights_only=True)`: tensors and plain containers only, so a pickle that
would run code is refused, never executed. arcface_torch saves `backbone.state_dict()` with the same key names
as `models.iresnet*`; DDP's `module.` prefix and the usual wrappers (`state_dict_backbone`, `state_dict`,
`model`) are unwrapped.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginface.errors import ConfigError, DataFormatError

SAFETENSORS_METADATA_KEY = "marginface_model"
# Keys under which training scripts nest the backbone's state dict (arcface_torch's checkpoint_gpu_N.pt uses
# the first).
WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
LISTED = 12  # names shown per kind of mismatch; the count says how many more


def save_backbone(backbone: nn.Module, path: str | os.PathLike) -> None:
    """The deployable artifact: backbone weights in safetensors, with the config that rebuilds the network."""
    from safetensors.torch import save as save_safetensors

    from marginface.fileio import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    metadata = {SAFETENSORS_METADATA_KEY: json.dumps(getattr(backbone, "config", {})), "format": "pt"}
    atomic_write_bytes(Path(path), save_safetensors(tensors, metadata=metadata))


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors by name, the marginface model config if the file carries one) from a `.safetensors` or `.pth`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFormatError(
            f"{path}: refused to load: it is not a plain state dict of tensors (torch.load with weights_only=True "
            f"stopped at: {first}); nothing in it was run"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: cannot read a PyTorch state dict ({exc}); expected a .pth from torch.save") \
            from None
    return _unwrap(loaded, path), None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DataFormatError(f"{path}: cannot read safetensors ({exc})") from None
    config = json.loads(metadata[SAFETENSORS_METADATA_KEY]) if SAFETENSORS_METADATA_KEY in metadata else None
    return tensors, config


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what torch.load returned, with a DDP `module.` prefix removed."""
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise DataFormatError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(loaded).__name__}")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise DataFormatError(f"{path}: expected a state dict of tensors; {', '.join(not_tensors[:LISTED])} "
                              "are not tensors (a full training checkpoint? pass the backbone's state dict)")
    if all(str(k).startswith("module.") for k in loaded):
        loaded = {str(k)[len("module."):]: v for k, v in loaded.items()}
    return {str(k): v for k, v in loaded.items()}


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ConfigError listing every missing, unexpected and mis-shaped key, by name.

    BatchNorm's `num_batches_tracked` may be absent (older torch and some exporters drop it): it does not
    change the network's output.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{label} ({len(names)}): {', '.join(names[:LISTED])}" + (" ..." if len(names) > LISTED else "")
                for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if names]
    if problems:
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise ConfigError(f"{source} does not fit {name}: " + "; ".join(problems))


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Load the weights at `path` into `model` after checking every key; returns the number of tensors."""
    state, config = read_state_dict(path)
    name = getattr(model, "config", {}).get("name")
    if config is not None and name is not None and config.get("name") != name:
        raise ConfigError(f"{path} holds a {config.get('name')} backbone, but the model is {name}")
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=False)
    return len(state)


def import_weights(path: str | os.PathLike, arch: str, out: str | os.PathLike,
                   embedding_size: int | None = None, **model_kwargs: Any) -> dict[str, Any]:
    """Write `out` (model.safetensors form) from another toolkit's state dict for backbone `arch`.

    The embedding size is read from `fc.weight` unless given; the output loads in `marginface eval` and
    `export` and as `model.init` like a run's model.safetensors.
    """
    from marginface import models

    state, _ = read_state_dict(path)
    if embedding_size is None:
        if "fc.weight" not in state:
            raise ConfigError(f"{path} has no fc.weight to read the embedding size from: pass --embedding-size")
        embedding_size = int(state["fc.weight"].shape[0])
    model = models.create(arch, embedding_size=embedding_size, **model_kwargs)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=False)
    save_backbone(model, out)
    return {"arch": arch, "embedding_size": embedding_size, "tensors": len(state), "out": str(out),
            "config": dict(getattr(model, "config", {}))}
