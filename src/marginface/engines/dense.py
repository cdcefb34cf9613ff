"""The dense engine: one [B, C] cosine matrix, the margin applied on it, cross-entropy by log-sum-exp.

It is the reference of every other engine, and it is also written to be fast: the class centres are never
normalised into a copy (1/‖w_c‖ is folded into a per-column scale of the product), margins that leave the
negatives alone only touch the B target logits, and the margin and softmax always run in fp32 or fp64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from marginface.margins.base import Margin, compute_dtype

BatchReduce = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]

_NORM_EPS = 1e-12


def inverse_norms(weight: Tensor) -> Tensor:
    """1/‖w_c‖ per class centre: folded into the product instead of normalising a [C, D] copy."""
    # vector_norm is one fused reduction whose backward is a single pass over W (pow + sum would be three)
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(_NORM_EPS).reciprocal()


def cosine_matrix(embeddings: Tensor, weight: Tensor) -> Tensor:
    """cos θ between every embedding [B, D] and every class centre [C, D] -> [B, C]."""
    return (F.normalize(embeddings, dim=1, eps=_NORM_EPS) @ weight.t()) * inverse_norms(weight)


class DenseEngine:
    """Materialises the full cosine matrix; computes the loss or the logits for any margin."""

    name = "dense"

    def logits(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
        statistics: dict[str, float] | None = None,
    ) -> Tensor:
        """Scaled margin logits [B, C] (fp32 or fp64, whatever the input precision).

        When a ``statistics`` dict is given it is filled with what training reports want to follow: the
        fraction of hard negatives, the mean per-sample margin and the margin's t, where the margin has them.
        """
        logits, _ = self._full_precision(margin, embeddings, weight, labels, batch_reduce, statistics, False)
        return logits

    def loss(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
        statistics: dict[str, float] | None = None,
    ) -> Tensor:
        """Mean cross-entropy of the margin logits."""
        logits, loss = self._full_precision(margin, embeddings, weight, labels, batch_reduce, statistics, True)
        return loss if loss is not None else F.cross_entropy(logits, labels.long())

    def _full_precision(self, margin, embeddings, weight, labels, batch_reduce, statistics, want_loss):
        """The margin and softmax in fp32 (fp64 stays fp64), outside any autocast region."""
        dtype = torch.promote_types(compute_dtype(embeddings), weight.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._logits(
                margin, embeddings.to(dtype), weight.to(dtype), labels.long(), batch_reduce, statistics, want_loss
            )

    def _logits(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None,
        statistics: dict[str, float] | None,
        want_loss: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(logits, None), or (None, loss) where the loss follows from the row statistics without logits."""
        x_hat = F.normalize(embeddings, dim=1, eps=_NORM_EPS)
        norms = embeddings.norm(dim=1) if margin.needs_norms else None
        inv_norm = inverse_norms(weight)
        product = x_hat @ weight.t()
        # The target cosine by its own B·D dot product: the margin's gradient then never has to flow back
        # through the [B, C] matrix, whose target column is overwritten.
        target_cos = (x_hat * weight[labels]).sum(1) * inv_norm[labels]

        if margin.training or getattr(margin, "update_in_eval", False):
            stats = margin.batch_statistics(target_cos.detach())
            if stats and batch_reduce is not None:
                stats = batch_reduce(stats)
            margin.update_state(stats)
        ctx = margin.prepare(target_cos, norms)
        scale = margin.row_scale(norms)
        index = labels[:, None]

        if margin.identity_negatives and not margin.row_reductions and not isinstance(scale, Tensor):
            # Fast path (NormFace, CosFace, ArcFace, ...): scale folded into the column factor, one B×C pass.
            ctx = margin.finish(ctx, {})
            logits = product * (inv_norm * scale)
            if statistics is not None:
                record_statistics(statistics, margin, ctx, None, None)
            return logits.scatter_(1, index, (ctx["target"] * scale)[:, None]), None

        cos = product * inv_norm
        target_mask = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, index, True)
        row_stats = margin.row_statistics(cos, target_mask, ctx)
        ctx = margin.finish(ctx, row_stats)
        if statistics is not None:
            record_statistics(statistics, margin, ctx, cos, target_mask)
        negatives_lse = row_stats.get("neg_lse")
        if want_loss and margin.identity_negatives and negatives_lse is not None and negatives_lse.requires_grad:
            # The margin already holds log Σ_{j≠y} e^{s·c_j} with its graph (AM-LFS): the cross-entropy of
            # [s·T, s·c_j] is then log(1 + e^{L − s·T}) per row, exactly, with no [B, C] logits at all.
            target_logit = ctx["target"] * scale
            return None, torch.logaddexp(target_logit, negatives_lse).sub(target_logit).mean()
        if margin.identity_negatives:
            logits = cos * scale
        elif hasattr(margin, "negatives_with_slope") and torch.is_grad_enabled():
            logits = ScaledNegatives.apply(cos, margin, ctx, scale)
        else:
            # in place: the margin's fresh output is not needed by its own backward, and a second [B, C]
            # buffer would cost as much in page faults as the multiply itself
            negatives = margin.negative_logits(cos, ctx)
            logits = negatives.mul_(scale) if negatives is not cos else cos * scale
        return logits.scatter_(1, index, ctx["target"][:, None] * scale), None


class ScaledNegatives(torch.autograd.Function):
    """scale·N(c) with the backward from the margin's own elementwise slope dN/dc.

    Autograd through `torch.where(hard, f(c), c)` keeps several [B, C] temporaries and runs as many passes
    backward; the slope is one saved tensor and the backward a single multiply. The head tests check it
    against autograd of the margin's reference forward.
    """

    @staticmethod
    def forward(ctx, cos: Tensor, margin: Margin, row_ctx: dict, scale) -> Tensor:
        with torch.no_grad():
            values, slope = margin.negatives_with_slope(cos, row_ctx)
            values = values.mul_(scale) if values is not cos else cos * scale
            slope = slope.mul_(scale) if isinstance(slope, Tensor) else slope * scale
        ctx.save_for_backward(slope if isinstance(slope, Tensor) else None)
        ctx.constant_slope = None if isinstance(slope, Tensor) else slope
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slope,) = ctx.saved_tensors
        return grad * (slope if slope is not None else ctx.constant_slope), None, None, None


def record_statistics(
    statistics: dict[str, float], margin: Margin, ctx: dict[str, Tensor], cos: Tensor | None, target_mask
) -> None:
    """Fill ``statistics`` with the hard-negative fraction, the mean margin and t, where the margin has them."""
    with torch.no_grad():
        statistics["target_cos"] = float(ctx["target_cos"].mean())
        if cos is not None and "threshold" in ctx:
            hard = (cos > ctx["threshold"][:, None]) & ~target_mask
            statistics["hard_fraction"] = float(hard.sum()) / max(1, hard.numel() - hard.shape[0])
        if "margin" in ctx:
            statistics["margin_mean"] = float(ctx["margin"].mean())
        t = getattr(margin, "t", None)
        if isinstance(t, Tensor):
            statistics["t"] = float(t.mean())
