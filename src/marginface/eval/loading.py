"""Load what `marginface eval` scores: a run directory, a `model.safetensors` with its config, or an ONNX file.

Nothing here imports the training stack: a run directory is read through its `model.safetensors`, whose
metadata (`marginface_model`) is the JSON that `marginface.models.create(**config)` rebuilds the network from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from marginface.errors import ConfigError, MarginfaceError


class OnnxModel(nn.Module):
    """An ONNX backbone run by onnxruntime behind the nn.Module call the evaluators use."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise MarginfaceError("scoring an .onnx file needs onnxruntime: pip install 'marginface[onnx]'") from None
        self.path = Path(path)
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise MarginfaceError(f"cannot load ONNX model {self.path}: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise MarginfaceError(f"{self.path}: expected one input [N, 3, H, W], found {[i.shape for i in inputs]}")
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:]
        metadata = self.session.get_modelmeta().custom_metadata_map
        if not isinstance(height, int) and "input_size" in metadata:
            height, width = json.loads(metadata["input_size"])
        self.input_size = (int(height), int(width)) if isinstance(height, int) else None
        self.config = json.loads(metadata["marginface_config"]) if "marginface_config" in metadata else {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        (output,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})
        return torch.from_numpy(output)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A run directory, a `.safetensors` backbone with its config, or an `.onnx` file -> a module in eval mode."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.exists():
            raise FileNotFoundError(f"{path} is not a training run: {candidate.name} is missing (has it finished?)")
        path = candidate
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (expected a run directory, .safetensors or .onnx)")
    if path.suffix == ".onnx":
        return OnnxModel(path).eval()
    if path.suffix != ".safetensors":
        raise ConfigError(f"model {path}: expected a run directory, a .safetensors or an .onnx file")
    return load_safetensors_backbone(path).to(device).eval()


def load_safetensors_backbone(path: Path) -> nn.Module:
    """The backbone a marginface `.safetensors` describes (its metadata), with its weights checked key by key."""
    from marginface import models
    from marginface.models.weights import SAFETENSORS_METADATA_KEY, check_state_dict, read_state_dict

    state, config = read_state_dict(path)
    if config is None:
        raise MarginfaceError(
            f"{path} has no '{SAFETENSORS_METADATA_KEY}' metadata: it was not written by marginface, so the "
            "network it belongs to is unknown (weights from another toolkit: `marginface import-weights`)"
        )
    model = models.create(**config)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=False)
    return model
