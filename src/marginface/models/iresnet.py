"""IResNet-18/34/50/100/200: the "improved residual" face backbones of the insightface IR design.

Layout (112x112 input): stem conv3x3(64)-BN-PReLU; four stages of IR blocks at 64/128/256/512 channels,
each opening with a stride-2 block; head BN2d - Dropout - Flatten - Linear(512*7*7 -> D) - BatchNorm1d(D)
whose scale is frozen at 1 (insightface sets `features.weight.requires_grad = False`), so the embedding
scale is learnt only through the shift and the linear layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from marginface.errors import ConfigError
from marginface.models.registry import check_dropout, check_embedding_size, check_input, check_input_size, register

# Blocks per stage, as in insightface's arcface_torch.
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the identity or a conv1x1-BN shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone; `forward` maps [N, 3, H, W] normalised images to [N, D] (unnormalised) embeddings."""

    def __init__(
        self,
        depth: int,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: Any = 112,
        freeze_feature_scale: bool = True,
    ) -> None:
        super().__init__()
        name = f"iresnet{depth}"
        if depth not in STAGE_BLOCKS:
            raise ConfigError(f"iresnet: depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")
        embedding_size = check_embedding_size(name, embedding_size)
        dropout = check_dropout(name, dropout)
        # Four stride-2 stages: each side must divide by 16 to give the fixed-size flatten the head needs.
        self.input_size = check_input_size(name, input_size, multiple=16, minimum=16)
        self.embedding_size = embedding_size
        self.config: dict[str, Any] = {
            "name": name,
            "embedding_size": embedding_size,
            "input_size": list(self.input_size),
            "dropout": dropout,
            "freeze_feature_scale": bool(freeze_feature_scale),
        }

        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        stages = []
        for width, blocks in zip(STAGE_WIDTHS, STAGE_BLOCKS[depth], strict=True):
            layers = [IRBlock(in_channels, width, stride=2)]
            layers += [IRBlock(width, width, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        feature_h, feature_w = self.input_size[0] // 16, self.input_size[1] // 16
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * feature_h * feature_w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights()
        if freeze_feature_scale:
            self.features.weight.requires_grad_(False)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.config["name"], x, self.input_size)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _factory(depth: int):
    def build(
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: Any = 112,
        freeze_feature_scale: bool = True,
    ) -> IResNet:
        return IResNet(
            depth,
            embedding_size=embedding_size,
            dropout=dropout,
            input_size=input_size,
            freeze_feature_scale=freeze_feature_scale,
        )

    build.__name__ = build.__qualname__ = f"iresnet{depth}"
    build.__doc__ = f"IResNet-{depth} (blocks per stage {STAGE_BLOCKS[depth]}); 112x112 input by default."
    return register(f"iresnet{depth}")(build)


iresnet18 = _factory(18)
iresnet34 = _factory(34)
iresnet50 = _factory(50)
iresnet100 = _factory(100)
iresnet200 = _factory(200)
