"""`small_cnn`: a six-layer conv-BN-PReLU network that trains at hundreds of images per second on 2 CPU cores.

It is the spec's calibration model (formats.md Part C): convolutions of 32-64-64-128-128-128 channels, four
of them stride 2, then Flatten - Linear - BatchNorm1d to the embedding. It is meant for 56x56 input; with
`input_size=112, resize_to=56` it accepts the stored 112x112 crops and shrinks them itself (bilinear), so the
exported model takes the same input as every other backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import ConfigError
from marginface.models.registry import check_dropout, check_embedding_size, check_input, parse_size, register

DEFAULT_CHANNELS = (32, 64, 64, 128, 128, 128)
# Striding early keeps the cost low: at 56x56 the maps are 28-14-7-7-4-4 (14.4M MACs per image). Putting
# the third stride later (2,2,1,2,1,2) costs 24.7M MACs and trains about 1.3x slower on 2 CPU cores.
DEFAULT_STRIDES = (2, 2, 2, 1, 2, 1)


def _check_layers(channels: Any, strides: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def as_ints(parameter: str, values: Any, allowed: str, ok) -> tuple[int, ...]:
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise ConfigError(f"small_cnn: {parameter} must be a non-empty list of integers, got {values!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and ok(v) for v in values):
            raise ConfigError(f"small_cnn: every entry of {parameter} must be {allowed}, got {values!r}")
        return tuple(int(v) for v in values)

    channels = as_ints("channels", channels, "a positive integer", lambda v: v > 0)
    strides = as_ints("strides", strides, "1 or 2", lambda v: v in (1, 2))
    if len(channels) != len(strides):
        raise ConfigError(
            f"small_cnn: channels ({len(channels)} entries) and strides ({len(strides)} entries) "
            "must have the same length"
        )
    return channels, strides


class SmallCNN(nn.Module):
    """conv3x3-BN-PReLU stack, then Dropout - Flatten - Linear - BatchNorm1d; [N, 3, H, W] -> [N, D]."""

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: Any = 56,
        resize_to: Any = None,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        strides: Sequence[int] = DEFAULT_STRIDES,
        dropout: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        name = "small_cnn"
        embedding_size = check_embedding_size(name, embedding_size)
        dropout = check_dropout(name, dropout)
        channels, strides = _check_layers(channels, strides)
        self.input_size = parse_size(name, "input_size", input_size)
        self.resize_to = None if resize_to is None else parse_size(name, "resize_to", resize_to)
        work_size = self.resize_to or self.input_size
        # Below 16 pixels a side, four stride-2 layers leave a map of 1 pixel: nothing left to learn from.
        if min(work_size) < 16:
            which = "resize_to" if self.resize_to else "input_size"
            raise ConfigError(
                f"small_cnn: {which} {work_size[0]}x{work_size[1]} is not supported; each side "
                "must be at least 16 (56 is the calibrated size)"
            )
        self.embedding_size = embedding_size
        self.config: dict[str, Any] = {
            "name": name,
            "embedding_size": embedding_size,
            "input_size": list(self.input_size),
            "resize_to": None if self.resize_to is None else list(self.resize_to),
            "channels": list(channels),
            "strides": list(strides),
            "dropout": dropout,
            "channels_last": bool(channels_last),
        }
        self.channels_last = bool(channels_last)

        layers: list[nn.Module] = []
        in_channels, (height, width) = 3, work_size
        for out_channels, stride in zip(channels, strides, strict=True):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.PReLU(out_channels),
            ]
            in_channels = out_channels
            # Output side of a 3x3 conv with padding 1: floor((side - 1) / stride) + 1.
            height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * height * width, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("small_cnn", x, self.input_size)
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        if self.channels_last:
            # oneDNN runs these thin convolutions (and PReLU's backward) about 1.25x faster in NHWC on CPU;
            # converting the input is enough, the weights may stay in the default layout.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.dropout(self.body(x))
        return self.features(self.fc(torch.flatten(x, 1)))


@register("small_cnn")
def small_cnn(
    embedding_size: int = 512,
    input_size: Any = 56,
    resize_to: Any = None,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    strides: Sequence[int] = DEFAULT_STRIDES,
    dropout: float = 0.0,
    channels_last: bool = True,
) -> SmallCNN:
    """The fast CPU network; the spec's calibrated setting is `embedding_size=128` at 56x56."""
    return SmallCNN(
        embedding_size=embedding_size,
        input_size=input_size,
        resize_to=resize_to,
        channels=channels,
        strides=strides,
        dropout=dropout,
        channels_last=channels_last,
    )


class LinearEmbedder(nn.Module):
    """One linear map of the pixels to the embedding: no batch statistics, no randomness.

    A baseline and a check: with it, N ranks × batch B train exactly like one process × batch N·B, which no
    network with batch normalisation does (its statistics are per rank).
    """

    def __init__(self, embedding_size: int = 512, input_size: Any = 56) -> None:
        super().__init__()
        name = "linear"
        self.embedding_size = check_embedding_size(name, embedding_size)
        self.input_size = parse_size(name, "input_size", input_size)
        self.config: dict[str, Any] = {"name": name, "embedding_size": self.embedding_size,
                                       "input_size": list(self.input_size)}
        self.fc = nn.Linear(3 * self.input_size[0] * self.input_size[1], self.embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("linear", x, self.input_size)
        return self.fc(torch.flatten(x, 1))


@register("linear")
def linear(embedding_size: int = 512, input_size: Any = 56) -> LinearEmbedder:
    """A linear map of the pixels (a baseline; trains identically on any number of ranks)."""
    return LinearEmbedder(embedding_size=embedding_size, input_size=input_size)
