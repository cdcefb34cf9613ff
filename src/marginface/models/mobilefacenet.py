"""MobileFaceNet (Chen et al., 2018): an inverted-residual face backbone of about 1M parameters.

Layout for 112x112 input, as in the paper's table 1: conv3x3/2 (64) - depthwise conv3x3 (64) - bottleneck
stages (expansion t, channels c, repeats n, first stride s) (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2)
(2,128,2,1) - conv1x1 (512) - global depthwise conv 7x7 (linear) - linear 512 -> D - BatchNorm1d(D). The
paper's last "linear conv1x1" on a 1x1 map is the same map as the Linear layer used here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from marginface.models.registry import check_dropout, check_embedding_size, check_input, check_input_size, register

# (expansion t, output channels c, repeats n, stride of the first repeat s)
BOTTLENECK_STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv (no bias) - BN - optional PReLU; padding keeps 'same' size for odd square kernels at stride 1."""
    padding = kernel_size // 2 if isinstance(kernel_size, int) else 0
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 - depthwise 3x3 (stride) - linear project 1x1; identity when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet; `forward` maps [N, 3, H, W] normalised images to [N, D] (unnormalised) embeddings."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, input_size: Any = 112) -> None:
        super().__init__()
        name = "mobilefacenet"
        embedding_size = check_embedding_size(name, embedding_size)
        dropout = check_dropout(name, dropout)
        # Four stride-2 layers; the global depthwise conv covers the whole final map, whatever its size.
        self.input_size = check_input_size(name, input_size, multiple=16, minimum=16)
        self.embedding_size = embedding_size
        self.config: dict[str, Any] = {
            "name": name,
            "embedding_size": embedding_size,
            "input_size": list(self.input_size),
            "dropout": dropout,
        }

        layers: list[nn.Module] = [conv_bn(3, 64, 3, stride=2), conv_bn(64, 64, 3, groups=64)]
        in_channels = 64
        for expansion, channels, repeats, stride in BOTTLENECK_STAGES:
            for index in range(repeats):
                layers.append(Bottleneck(in_channels, channels, expansion, stride if index == 0 else 1))
                in_channels = channels
        layers.append(conv_bn(in_channels, 512, 1))
        self.body = nn.Sequential(*layers)

        final_map = (self.input_size[0] // 16, self.input_size[1] // 16)
        self.gdconv = conv_bn(512, 512, final_map, groups=512, activation=False)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init over the fan-out of one group: torch's kaiming_normal_ ignores groups, which makes
                # a depthwise filter about sqrt(channels) times too small and the untrained output vanish.
                fan_out = module.out_channels // module.groups * math.prod(module.kernel_size)
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("mobilefacenet", x, self.input_size)
        x = self.gdconv(self.body(x))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


@register("mobilefacenet")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, input_size: Any = 112) -> MobileFaceNet:
    """MobileFaceNet, 112x112 input by default (the paper's 128-d model is `embedding_size=128`)."""
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, input_size=input_size)
