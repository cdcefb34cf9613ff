"""Face-recognition backbones (IResNet family, MobileFaceNet, a small CPU network) behind a name registry.

`create(name, embedding_size=512, **kwargs)` builds one; every model maps normalised RGB images
((x / 255 - 0.5) / 0.5, [N, 3, H, W]) to unnormalised [N, D] embeddings and carries `model.config` (enough
to rebuild it with `create(**model.config)`) and `model.input_size` (H, W).
"""

from __future__ import annotations

from torch import nn

from marginface.models.export import export_onnx
from marginface.models.flops import FlopCount, LayerCount, count_flops
from marginface.models.iresnet import IResNet
from marginface.models.mobilefacenet import MobileFaceNet
from marginface.models.registry import available, create, register
from marginface.models.small import SmallCNN


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all of them, or only those with `requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "FlopCount",
    "IResNet",
    "LayerCount",
    "MobileFaceNet",
    "SmallCNN",
    "available",
    "count_flops",
    "count_parameters",
    "create",
    "export_onnx",
    "register",
]
