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
    FRESH,
    GRADIENT_MODES,
    AngularMargin,
    BlockScratch,
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


def hard_indicator(cos: Tensor, ctx: RowContext, out: Tensor | None = None) -> Tensor:
    """1.0 where a negative is hard (c > the row's threshold), 0.0 elsewhere: ``hard_mask`` as a float block
    (written into ``out`` where given).

    The engines call this on every block, so N and its slope are written as arithmetic on it instead of
    ``torch.where`` on a bool mask: on CPU a where or a bool reduction over a [512, 1024] block costs 150–1000 µs
    against ~40 µs for the comparison written straight into a float buffer (docs/benchmarks.md).
    """
    return torch.gt(cos, ctx["threshold"][:, None], out=torch.empty_like(cos) if out is None else out)


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

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor | float]:
        """N and dN/dc together (the engines' fast backward); equal to autograd of negative_logits."""
        hard = hard_indicator(cos, ctx, out=scratch.buffer(cos, 0))
        if not self.adaptive:  # N = c + t·[hard], slope 1
            return torch.add(cos, hard, alpha=self.t, out=scratch.output(cos)), 1.0
        emphasis = hard.mul_(self.t)  # t on hard negatives, 0 elsewhere
        slope = torch.add(emphasis, 1.0, out=scratch.buffer(cos, 1))  # 1 + t on hard negatives, 1 elsewhere
        return torch.addcmul(emphasis, cos, slope, out=scratch.output(cos)), slope  # N = t·[hard] + c·slope


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

    def reweighting(self, cos: Tensor, ctx: RowContext, out: Tensor | None = None) -> Tensor:
        """w = α·exp(−(c − T)²/σ), treated as a constant (detached) as in the reference (into ``out``)."""
        # α·exp(−d²/σ) = exp(log α − d²/σ), in place on one temporary: three passes (sub, addcmul, exp)
        distance = torch.sub(cos, ctx["reweight_center"][:, None], out=out)
        log_alpha = cos.new_full((), math.log(self.alpha))
        return torch.addcmul(log_alpha, distance, distance, value=-1.0 / self.sigma, out=distance).exp_()

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor]:
        weight = self.reweighting(cos, ctx, out=scratch.buffer(cos, 0))
        return torch.addcmul(weight, weight, cos, out=scratch.output(cos)).sub_(1.0), weight


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

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor]:
        t = self.t.to(cos.dtype)
        hard = hard_indicator(cos, ctx, out=scratch.buffer(cos, 0))
        # I(t, c) = 1 + [hard]·(c + t − 1): t + c on hard negatives, 1 elsewhere. N = c·I, and
        # M = dN/dc = I + [hard]·c (2c + t where hard, 1 elsewhere); M before N, which may overwrite c.
        shifted = torch.add(cos, t - 1.0, out=scratch.buffer(cos, 1))
        modulation = torch.addcmul(cos.new_ones(()), hard, shifted, out=shifted)
        slope = torch.addcmul(modulation, hard, cos, out=hard)
        return torch.mul(cos, modulation, out=scratch.output(cos)), slope


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

    def row_statistics(
        self, cos: Tensor, target_index: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> dict[str, Tensor]:
        # Sums over every column, the target's included: it lies in exactly one block of one shard, so ``finish``
        # takes it out once per row (B values) instead of every block testing for it.
        with torch.no_grad():
            hard = hard_indicator(cos, ctx, out=scratch.buffer(cos, 0))
            hard_count = hard.sum(1)
            return {"hard_sum": hard.mul_(cos).sum(1), "hard_count": hard_count}

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        target_cos = ctx["target_cos"].detach()
        target_is_hard = (target_cos > ctx["threshold"]).to(target_cos.dtype)
        hard_sum = row_stats["hard_sum"] - target_is_hard * target_cos
        hard_count = row_stats["hard_count"] - target_is_hard
        # With no hard negative the sum is 0, so m̃ falls back to m0 by itself.
        ctx["margin"] = self.m0 + self.m1 * hard_sum / hard_count.clamp(min=1)
        return super().finish(ctx, row_stats)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        value = torch.where(target_cos > 0, cos_plus_margin(target_cos, ctx["margin"]), target_cos)
        return straight_through(target_cos, value) if self.gradient == "straight_through" else value

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        return torch.where(hard_mask(cos, ctx), self.t * cos + self.alpha, cos)

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor]:
        hard = hard_indicator(cos, ctx, out=scratch.buffer(cos, 0))
        # t on hard negatives, 1 elsewhere: 1 + (t − 1)·[hard] in one pass
        slope = torch.add(cos.new_ones(()), hard, alpha=self.t - 1.0, out=scratch.buffer(cos, 1))
        return torch.addcmul(hard.mul_(self.alpha), cos, slope, out=scratch.output(cos)), slope  # α·[hard] + c·slope
