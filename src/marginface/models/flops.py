"""Count multiply-accumulates (MACs) and FLOPs of a model from one forward pass with forward hooks.

Counted per image (a batch of one), from the shapes each layer sees:

| layer | MACs | FLOPs |
|---|---|---|
| Conv1d/2d/3d | output elements x (in_channels / groups) x kernel volume | 2 x MACs, + output elements if bias |
| Linear | output elements x in_features | 2 x MACs, + output elements if bias |
| BatchNorm1d/2d/3d | 0 | 2 per element (the inference form y = a*x + b) |
| PReLU | 0 | 1 per element (the multiply on the negative side; the comparison is not counted) |

Everything else (residual additions, pooling, resizing, dropout, reshapes) counts zero. `macs` alone is the
figure face-recognition papers usually quote as "FLOPs" (e.g. 6.3G for IResNet-50).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from marginface.errors import ConfigError
from marginface.models.registry import parse_size

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LayerCount:
    """The count of one hooked layer for one image."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    macs: int
    flops: int


@dataclass(frozen=True)
class FlopCount:
    """Per-image totals and the per-layer breakdown (in execution order)."""

    input_size: tuple[int, int]
    macs: int
    flops: int
    layers: tuple[LayerCount, ...]

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _layer_count(module: nn.Module, output: torch.Tensor) -> tuple[int, int]:
    out_elements = math.prod(output.shape[1:])  # per image: drop the batch axis
    if isinstance(module, _CONV):
        kernel_volume = math.prod(module.kernel_size)
        macs = out_elements * (module.in_channels // module.groups) * kernel_volume
        return macs, 2 * macs + (out_elements if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        macs = out_elements * module.in_features
        return macs, 2 * macs + (out_elements if module.bias is not None else 0)
    if isinstance(module, _NORM):
        return 0, 2 * out_elements
    if isinstance(module, nn.PReLU):
        return 0, out_elements
    return 0, 0


def count_flops(model: nn.Module, input_size: Any = None, in_channels: int = 3) -> FlopCount:
    """Run one image of `input_size` (default: `model.input_size`) through `model` and count its layers.

    The model runs in eval mode under `torch.no_grad()` on its own device and dtype (the meta device works,
    so a large model can be counted without allocating it); its training flag is restored afterwards.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise ConfigError("count_flops: the model has no `input_size`; pass input_size=(H, W)")
    height, width = parse_size(type(model).__name__, "input_size", input_size)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32

    records: list[LayerCount] = []
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                macs, flops = _layer_count(module, output)
                records.append(LayerCount(name, type(module).__name__, tuple(output.shape[1:]), macs, flops))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _CONV + _NORM + (nn.Linear, nn.PReLU)):
            handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, height, width, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return FlopCount(
        input_size=(height, width),
        macs=sum(r.macs for r in records),
        flops=sum(r.flops for r in records),
        layers=tuple(records),
    )
