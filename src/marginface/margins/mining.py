"""Margins that also reshape hard negatives: MV-Softmax, ArcNegFace, CurricularFace and NPCFace.

A negative j is hard when c_j exceeds the *raw* margined target (cos(θ_y + m) or c_y − m, no fallback), as in
every reference implementation; the masks are computed from the cosines before any modification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from marginface.margins.base import (
    GRADIENT_MODES,
    AngularMargin,
    Margin,
    RowContext,
    arc_target,
    check_bool,
    check_choice,
    check_non_negative,
    check_positive,
    check_range,
    cos_plus_margin,
    straight_through,
)
from marginface.margins.registry import register


def hard_mask(cos: Tensor, ctx: RowContext) -> Tensor:
    return cos > ctx["threshold"][:, None]


def hard_indicator(cos: Tensor, ctx: RowContext) -> Tensor:
    """1.0 where a negative is hard (c > the row's threshold), 0.0 elsewhere: ``hard_mask`` as a float block.

    The engines call this on every block, so N and its slope are written as arithmetic on it instead of
    ``torch.where`` on a bool mask: on CPU a where or a bool reduction over a [512, 512] block costs 70–450 µs
    against 10–20 µs for a float pass (docs/benchmarks.md). fl(c − T) > 0 exactly when c > T, so the two agree.
    """
    return (cos - ctx["threshold"][:, None]).clamp_(min=0.0).sign_()


@register
class MVSoftmax(Margin):
    """MV-Softmax (mis-classified vector guided): hard negatives get N = (1 + t)·c + t (adaptive) or c + t (fixed).

    base="am" uses the CosFace target c − m (easy_margin: only where c > 0), base="arc" the ArcFace target with
    its fallback; the hard mask always compares with the raw margined target.
    """

    name = "mv_softmax"
    identity_negatives = False
    t_attribute = "t"

    def __init__(
        self,
        s: float = 32.0,
        m: float = 0.35,
        t: float = 0.2,
        base: str = "am",
        adaptive: bool = True,
        easy_margin: bool = False,
        gradient: str = "exact",
    ) -> None:
        super().__init__(s)
        self.m = check_non_negative("m", m)
        self.t = check_non_negative("t", t)
        self.base = check_choice("base", base, ("am", "arc"))
        self.adaptive = check_bool("adaptive", adaptive)
        self.easy_margin = check_bool("easy_margin", easy_margin)
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        raw = target_cos - self.m if self.base == "am" else cos_plus_margin(target_cos, self.m)
        return {"target_cos": target_cos, "threshold": raw.detach()}

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        if self.base == "arc":
            return arc_target(target_cos, self.m, easy_margin=self.easy_margin, gradient=self.gradient)
        margined = target_cos - self.m
        return torch.where(target_cos > 0, margined, target_cos) if self.easy_margin else margined

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        emphasised = (1.0 + self.t) * cos + self.t if self.adaptive else cos + self.t
        return torch.where(hard_mask(cos, ctx), emphasised, cos)

    def negatives_with_slope(self, cos: Tensor, ctx: RowContext) -> tuple[Tensor, Tensor]:
        """N and dN/dc together (the engines' fast backward); equal to autograd of negative_logits."""
        hard = hard_indicator(cos, ctx)
        if not self.adaptive:  # N = c + t·[hard], slope 1
            return torch.add(cos, hard, alpha=self.t), 1.0
        slope = hard.mul(self.t).add_(1.0)  # 1 + t on hard negatives, 1 elsewhere
        # N = t·[hard] + c·slope, written over the indicator (one [B, n] temporary fewer per block)
        return hard.mul_(self.t).addcmul_(cos, slope), slope


@register
class ArcNegFace(AngularMargin):
    """ArcNegFace: ArcFace target; every negative becomes w_j·(c_j + 1) − 1, w_j = α·exp(−(c_j − T)²/σ) detached."""

    name = "arcnegface"
    identity_negatives = False

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        alpha: float = 1.2,
        sigma: float = 2.0,
        easy_margin: bool = False,
        gradient: str = "exact",
    ) -> None:
        super().__init__(s, m, easy_margin=easy_margin, gradient=gradient)
        self.alpha = check_positive("alpha", alpha)
        self.sigma = check_positive("sigma", sigma)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        # The re-weighting is centred on the (detached) target logit T, which needs only the target cosine.
        center = arc_target(target_cos.detach(), self.m, easy_margin=self.easy_margin, fallback=self.fallback)
        return {"target_cos": target_cos, "reweight_center": center}

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        with torch.no_grad():
            weight = self.reweighting(cos, ctx)
        return weight * (cos + 1.0) - 1.0

    def reweighting(self, cos: Tensor, ctx: RowContext) -> Tensor:
        """w = α·exp(−(c − T)²/σ), treated as a constant (detached) as in the reference."""
        # α·exp(−d²/σ) = exp(log α − d²/σ), all in place on one temporary
        distance = cos - ctx["reweight_center"][:, None]
        return distance.square_().mul_(-1.0 / self.sigma).add_(math.log(self.alpha)).exp_()

    def negatives_with_slope(self, cos: Tensor, ctx: RowContext) -> tuple[Tensor, Tensor]:
        weight = self.reweighting(cos, ctx)
        return torch.addcmul(weight, weight, cos).sub_(1.0), weight


@register
class CurricularFace(AngularMargin):
    """CurricularFace: ArcFace target (with fallback); hard negatives become c_j·(t + c_j).

    t is a buffer (saved in ``state_dict``), initially 0, updated before use from the batch's mean target cosine:
    t ← t_alpha·mean(c_y) + (1 − t_alpha)·t — in training mode only, unless ``update_in_eval=True`` (the
    official code's behaviour, which also moves t during validation). The paper writes the EMA weight as α = 0.99
    on the new batch; the official code uses 0.01, which is the default here (paper: t_alpha=0.99).
    """

    name = "curricularface"
    identity_negatives = False
    t_attribute = "t"

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        t_alpha: float = 0.01,
        gradient: str = "exact",
        update_in_eval: bool = False,
    ) -> None:
        super().__init__(s, m, gradient=gradient)
        self.t_alpha = check_range("t_alpha", t_alpha, 0.0, 1.0)
        self.update_in_eval = check_bool("update_in_eval", update_in_eval)
        self.register_buffer("t", torch.zeros(1))

    @property
    def curricular_t(self) -> float:
        return float(self.t)

    def batch_statistics(self, target_cos: Tensor, norms: Tensor | None = None) -> dict[str, Tensor]:
        return {"target_cos_sum": target_cos.detach().sum(), "count": torch.tensor(float(target_cos.numel()))}

    def update_state(self, stats: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            mean = (stats["target_cos_sum"] / stats["count"].clamp(min=1)).to(self.t)
            self.t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * mean)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        return {"target_cos": target_cos, "threshold": cos_plus_margin(target_cos, self.m).detach()}

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        t = self.t.to(cos.dtype)
        return torch.where(hard_mask(cos, ctx), cos * (t + cos), cos)

    def negatives_with_slope(self, cos: Tensor, ctx: RowContext) -> tuple[Tensor, Tensor]:
        t = self.t.to(cos.dtype)
        hard = hard_indicator(cos, ctx)
        # I(t, c) = 1 + [hard]·(c + t − 1): t + c on hard negatives, 1 elsewhere. N = c·I, and
        # M = dN/dc = I + [hard]·c (2c + t where hard, 1 elsewhere).
        modulation = (cos + (t - 1.0)).mul_(hard).add_(1.0)
        values = cos * modulation
        return values, modulation.addcmul_(hard, cos)


@register
class NPCFace(Margin):
    """NPCFace: the positive margin grows with the mean cosine of the sample's hard negatives.

    m̃ = m0 + m1·mean(c_j over hard j) (m0 when there is none), detached; T = cos(θ_y + m̃) where c_y > 0 and
    c_y otherwise (the reference's easy-margin guard); hard negatives become t·c_j + alpha. A negative is hard
    when c_j > cos(θ_y + mask_margin), raw, target column excluded.
    """

    name = "npcface"
    identity_negatives = False
    t_attribute = "t"
    row_reductions = {"hard_sum": "sum", "hard_count": "sum"}

    def __init__(
        self,
        s: float = 64.0,
        m0: float = 0.4,
        m1: float = 0.2,
        t: float = 1.1,
        alpha: float = 0.2,
        mask_margin: float = 0.5,
        gradient: str = "exact",
    ) -> None:
        super().__init__(s)
        self.m0 = check_non_negative("m0", m0)
        self.m1 = check_non_negative("m1", m1)
        self.t = check_positive("t", t)
        self.alpha = check_non_negative("alpha", alpha)
        self.mask_margin = check_non_negative("mask_margin", mask_margin)
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        return {"target_cos": target_cos, "threshold": cos_plus_margin(target_cos, self.mask_margin).detach()}

    def row_statistics(self, cos: Tensor, target_index: Tensor, ctx: RowContext) -> dict[str, Tensor]:
        with torch.no_grad():
            hard = hard_indicator(cos, ctx)
            hard_count = hard.sum(1)
            hard_sum = hard.mul_(cos).sum(1)
            # The target column is excluded per row (B values) rather than by masking the whole [B, C] block.
            target_in_block = target_index >= 0
            target_cos = ctx["target_cos"]
            target_is_hard = target_in_block & (target_cos > ctx["threshold"])
            hard_sum = hard_sum - torch.where(target_is_hard, target_cos.detach(), 0.0)
            return {"hard_sum": hard_sum, "hard_count": hard_count - target_is_hard.to(cos.dtype)}

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        # With no hard negative the sum is 0, so m̃ falls back to m0 by itself.
        ctx["margin"] = self.m0 + self.m1 * row_stats["hard_sum"] / row_stats["hard_count"].clamp(min=1)
        return super().finish(ctx, row_stats)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        value = torch.where(target_cos > 0, cos_plus_margin(target_cos, ctx["margin"]), target_cos)
        return straight_through(target_cos, value) if self.gradient == "straight_through" else value

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        return torch.where(hard_mask(cos, ctx), self.t * cos + self.alpha, cos)

    def negatives_with_slope(self, cos: Tensor, ctx: RowContext) -> tuple[Tensor, Tensor]:
        hard = hard_indicator(cos, ctx)
        slope = hard.mul(self.t - 1.0).add_(1.0)  # t on hard negatives, 1 elsewhere
        # N = α·[hard] + c·slope, written over the indicator (one [B, n] temporary fewer per block)
        return hard.mul_(self.alpha).addcmul_(cos, slope), slope
