"""The dense engine: one [B, C] cosine matrix through autograd; the reference every other engine is tested against.

Its class pass materialises cos = (x̂ Wᵀ)·diag(1/‖w_c‖) (the centres are never normalised into a copy), applies
the margin's N with the backward of its own elementwise slope, and takes log Σ_{j≠y} e^{scale·N} with the target
column masked. Memory: a few [B, C] matrices in fp32, on top of W and its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marginface.engines.base import (
    NORM_EPS,
    BatchReduce,
    ClassPass,
    Engine,
    class_cosines,
    count_hard,
    inverse_norms,
    target_cosines,
)
from marginface.margins.base import Margin, RowContext

__all__ = ["BatchReduce", "DenseEngine", "ScaledNegatives", "cosine_matrix", "inverse_norms"]


def cosine_matrix(embeddings: Tensor, weight: Tensor, subcenters: int = 1) -> Tensor:
    """cos θ between every embedding [B, D] and every class [C·K, D] -> [B, C] (max over K sub-centres)."""
    return class_cosines(F.normalize(embeddings, dim=1, eps=NORM_EPS), weight, subcenters)


class DenseEngine(Engine):
    """Materialises the full cosine matrix: the reference, and the right choice for small class counts."""

    name = "dense"

    def class_pass(
        self,
        margin: Margin,
        x_hat: Tensor,
        weight: Tensor,
        labels: Tensor,
        ctx: RowContext,
        scale: float | Tensor,
        count_hard_negatives: bool,
        subcenters: int = 1,
    ) -> ClassPass:
        target_cos = target_cosines(x_hat, weight, labels, subcenters)
        cos = class_cosines(x_hat, weight, subcenters)  # max over sub-centres: autograd routes to the chosen one
        with torch.no_grad():
            row_stats = margin.row_statistics(cos, labels, ctx)
            hard = count_hard(cos, ctx, labels) if count_hard_negatives else None
        row_scale = scale[:, None] if isinstance(scale, Tensor) else scale
        if margin.identity_negatives:
            logits = cos * row_scale
        elif torch.is_grad_enabled():
            logits = ScaledNegatives.apply(cos, margin, ctx, row_scale)
        else:
            values, _ = margin.negatives_with_slope(cos, ctx)
            logits = values * row_scale
        # in place: the target column must not count as a negative, and a masked copy would be another [B, C]
        negatives_lse = logits.scatter_(1, labels[:, None], float("-inf")).logsumexp(dim=1)
        return ClassPass(target_cos, negatives_lse, row_stats, hard)


class ScaledNegatives(torch.autograd.Function):
    """scale·N(c) with the backward from the margin's own elementwise slope dN/dc.

    Autograd through `torch.where(hard, f(c), c)` keeps several [B, C] temporaries and runs as many passes
    backward; the slope is one saved tensor and the backward a single multiply. A per-row scale tensor (the
    feature norm of SphereFace) also gets its gradient, Σ_j grad_ij·N_ij.
    """

    @staticmethod
    def forward(ctx, cos: Tensor, margin: Margin, row_ctx: dict, scale) -> Tensor:
        with torch.no_grad():
            values, slope = margin.negatives_with_slope(cos, row_ctx)
            scaled = values * scale
            slope = slope * scale
        ctx.scale_is_tensor = isinstance(scale, Tensor)
        ctx.save_for_backward(
            slope if isinstance(slope, Tensor) else None, values if ctx.scale_is_tensor else None
        )
        ctx.constant_slope = None if isinstance(slope, Tensor) else slope
        return scaled

    @staticmethod
    def backward(ctx, grad: Tensor):
        slope, values = ctx.saved_tensors
        grad_cos = grad * (slope if slope is not None else ctx.constant_slope)
        grad_scale = (grad * values).sum(1, keepdim=True) if ctx.scale_is_tensor else None
        return grad_cos, None, None, grad_scale
