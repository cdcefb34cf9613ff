"""Margins that adapt per sample or per batch: AdaFace, AdaCos, ElasticFace (Arc, Cos) and MagFace.

Each is a T (and for AdaFace an N) of the unified form plus declared state; docs/margins.md has the formulas,
the defaults and where the papers and the official code differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from marginface.errors import ConfigError
from marginface.margins.base import (
    COS_EPS,
    FRESH,
    BlockScratch,
    Margin,
    RowContext,
    arc_target,
    check_bool,
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
    check_range,
)
from marginface.margins.registry import register

# AdaFace's own ε: cosines are clamped to ±(1 − ε), the margined angle to [ε, π − ε], and σ + ε divides.
ADAFACE_EPS = 1e-3
# AdaFace clips the feature norm to this range before its statistics (the official "for stability").
ADAFACE_NORM_RANGE = (0.001, 100.0)


@register
class AdaFace(Margin):
    """AdaFace: the margin follows the feature norm, a proxy of image quality.

    ẑ = clip(h·(‖x‖ − μ)/(σ + ε), −1, 1) with ‖x‖ clipped to [0.001, 100] and detached; μ, σ are EMAs of the
    batch mean and (unbiased) std of the norms (initially 20 and 100, weight ``t_alpha`` on the new batch,
    updated before use, in training only unless ``update_in_eval``). With c clamped to ±(1 − ε):

        T = cos(clip(θ_y − m·ẑ, ε, π − ε)) − (m + m·ẑ),   N = clamp(c, −1 + ε, 1 − ε)

    ẑ = −1 is ArcFace(m), ẑ = 0 CosFace(m).
    """

    name = "adaface"
    needs_norms = True
    identity_negatives = False

    def __init__(
        self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, update_in_eval: bool = False
    ) -> None:
        super().__init__(s)
        self.m = check_non_negative("m", m)
        self.h = check_non_negative("h", h)
        self.t_alpha = check_range("t_alpha", t_alpha, 0.0, 1.0)
        self.update_in_eval = check_bool("update_in_eval", update_in_eval)
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def batch_statistics(self, target_cos: Tensor, norms: Tensor | None = None) -> dict[str, Tensor]:
        if norms is None:  # called on cosines alone (the engines always give the norms): nothing to update
            return {}
        # sums of (‖x‖ − μ_old): every rank shifts by the same μ, so the sums all-reduce, and the variance from
        # them loses no precision to the mean's magnitude
        shifted = norms.to(torch.float64).clamp(*ADAFACE_NORM_RANGE) - self.batch_mean.to(torch.float64)
        return {"norm_shifted_sum": shifted.sum(), "norm_shifted_square_sum": shifted.square().sum(),
                "count": torch.tensor(float(shifted.numel()), dtype=torch.float64)}

    def update_state(self, stats: Mapping[str, Tensor]) -> None:
        if not stats:
            return
        with torch.no_grad():
            count = stats["count"].double()
            total, squares = stats["norm_shifted_sum"].double(), stats["norm_shifted_square_sum"].double()
            mean = self.batch_mean.double() + total / count.clamp(min=1)
            self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * mean.to(self.batch_mean))
            if float(count) > 1:  # one sample has no std (torch.std gives NaN): keep the running one
                variance = ((squares - total * total / count) / (count - 1)).clamp(min=0)
                self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * variance.sqrt().to(self.batch_std))

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        if norms is None:  # without norms (a bare call on cosines) ẑ = 0: the CosFace point of AdaFace
            return {"target_cos": target_cos, "norm_scaler": torch.zeros_like(target_cos)}
        safe = norms.detach().clamp(*ADAFACE_NORM_RANGE)
        mean, std = self.batch_mean.to(safe.dtype), self.batch_std.to(safe.dtype)
        scaler = ((safe - mean) / (std + ADAFACE_EPS) * self.h).clamp(-1.0, 1.0)
        return {"target_cos": target_cos, "norm_scaler": scaler, "norms": norms}

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        scaler = ctx["norm_scaler"].to(target_cos.dtype)
        theta = torch.acos(target_cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        angle = (theta - self.m * scaler).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return torch.cos(angle) - (self.m + self.m * scaler)

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        return cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor]:
        low, high = -1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS
        # clamp's derivative is 1 on the closed interval (as autograd's), 0 outside; comparisons written into
        # float buffers (a bool block and its conversion cost several float passes on CPU)
        inside = torch.ge(cos, low, out=scratch.buffer(cos, 0))
        slope = inside.mul_(torch.le(cos, high, out=scratch.buffer(cos, 1)))
        return torch.clamp(cos, low, high, out=scratch.output(cos)), slope


@register
class AdaCos(Margin):
    """AdaCos: NormFace with an adaptive scale and no margin.

    s starts at √2·log(C − 1). In training (``fixed=False``) it is re-estimated before use from the batch:

        s ← log(B_avg) / cos(min(π/4, θ_med)),   B_avg = (1/B)·Σ_i Σ_{j≠y_i} e^{s_old·c_ij}

    θ_med the median target angle (the lower middle of an even count, as torch.median). s is a buffer (in
    ``state_dict``); B_avg needs every class, so the engines run a statistics-only pass first.
    """

    name = "adacos"
    state_reductions = {"negatives_lse": "logsumexp"}

    def __init__(self, fixed: bool = False) -> None:
        super().__init__(1.0)
        self.fixed = check_bool("fixed", fixed)
        del self.s  # the scale is state here, not a parameter
        # NaN until the class count is known (the head sets it at creation, an engine at its first step)
        self.register_buffer("s", torch.tensor(float("nan")))

    def set_num_classes(self, num_classes: int) -> None:
        if bool(torch.isnan(self.s)):
            if num_classes < 3:
                raise ConfigError(f"margin 'adacos' needs at least 3 classes (s = √2·log(C − 1)), got {num_classes}")
            self.s.fill_(math.sqrt(2.0) * math.log(num_classes - 1))

    def needs_state_pass(self) -> bool:
        return not self.fixed and super().needs_state_pass()

    def state_row_statistics(self, cos: Tensor, target_index: Tensor, target_cos: Tensor) -> dict[str, Tensor]:
        logits = cos * float(self.s)
        inside = target_index >= 0
        index = torch.where(inside, target_index, 0)[:, None]
        current = logits.gather(1, index)
        logits.scatter_(1, index, torch.where(inside[:, None], float("-inf"), current))
        return {"negatives_lse": logits.logsumexp(dim=1)}

    def batch_statistics(
        self, target_cos: Tensor, norms: Tensor | None = None, state_rows: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        if self.fixed or state_rows is None:
            return {}
        theta = torch.acos(target_cos.to(torch.float64).clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
        # across data-parallel ranks (sums only) θ_med is the mean of the ranks' medians; the sharded engine
        # sees the gathered batch, so there it is the exact global median
        return {"exp_sum": state_rows["negatives_lse"].to(torch.float64).exp().sum(),
                "count": torch.tensor(float(theta.numel()), dtype=torch.float64),
                "median_sum": theta.median(), "median_parts": torch.tensor(1.0, dtype=torch.float64)}

    def update_state(self, stats: Mapping[str, Tensor]) -> None:
        if not stats:
            return
        with torch.no_grad():
            average = stats["exp_sum"].double() / stats["count"].double().clamp(min=1)
            median = stats["median_sum"].double() / stats["median_parts"].double()
            self.s.copy_(torch.log(average) / torch.cos(median.clamp(max=math.pi / 4)))

    def row_scale(self, norms: Tensor | None) -> float:
        return float(self.s)


class ElasticMargin(Margin):
    """ElasticFace's shared part: a per-sample margin m_i ~ N(m, std²) drawn every training step.

    The draws come from the margin's own generator, whose state is the buffer ``generator_state`` (in
    ``state_dict`` and so in checkpoints: a resumed run draws what the uninterrupted one would). ``seed`` None:
    seeded by the head from the global generator (the trainer seeds that with the training seed); a bare margin
    starts from seed 0. ``plus``: the sorted draws are assigned by target cosine — ``plus_order="paper"`` gives
    the largest margin to the sample with the smallest cos θ_y (the hardest), ``"code"`` reproduces the official
    code's indexing (sorted draws taken at the argsort permutation of the descending cosines rather than at its
    inverse). In eval mode, and with std = 0, the margin is m itself (ArcFace / CosFace exactly).
    """

    uses_generator = True

    def __init__(
        self, s: float, m: float, std: float, plus: bool, plus_order: str, seed: int | None
    ) -> None:
        super().__init__(s)
        self.m = check_non_negative("m", m)
        self.std = check_non_negative("std", std)
        self.plus = check_bool("plus", plus)
        self.plus_order = check_choice("plus_order", plus_order, ("paper", "code"))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"parameter seed={seed!r} is invalid: expected an integer >= 0 or null")
        self.seed = seed
        self.register_buffer("generator_state", torch.Generator().manual_seed(seed or 0).get_state())

    def seed_generator(self, seed: int) -> None:
        if self.seed is None:  # an explicit seed wins
            self.generator_state.copy_(torch.Generator().manual_seed(seed).get_state())

    def draw(self, count: int) -> Tensor:
        """``count`` draws of N(m, std²) in float64, advancing the generator state."""
        generator = torch.Generator()
        generator.set_state(self.generator_state.cpu())
        values = torch.normal(self.m, self.std, (count,), generator=generator, dtype=torch.float64)
        self.generator_state.copy_(generator.get_state())
        return values

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        ctx: RowContext = {"target_cos": target_cos}
        if self.training and self.std > 0:
            margins = self.draw(target_cos.shape[0])
            if self.plus:
                margins = assign_by_cosine(margins, target_cos.detach().to(torch.float64).cpu(), self.plus_order)
            ctx["margin"] = margins.to(device=target_cos.device, dtype=target_cos.dtype)
        return ctx

    def row_margin(self, ctx: RowContext) -> float | Tensor:
        return ctx.get("margin", self.m)


def assign_by_cosine(margins: Tensor, target_cos: Tensor, order: str) -> Tensor:
    """ElasticFace+: the draws sorted and handed out by target cosine (stable sorts: ties keep row order)."""
    ascending = margins.sort(stable=True).values
    by_cosine = target_cos.sort(descending=True, stable=True).indices  # easiest (largest cos θ_y) first
    if order == "code":
        return ascending[by_cosine]
    # the k-th largest cosine gets the k-th smallest margin: the hardest sample the largest
    return torch.empty_like(ascending).scatter_(0, by_cosine, ascending)


@register
class ElasticFaceArc(ElasticMargin):
    """ElasticFace-Arc: T = cos(θ_y + m_i), m_i ~ N(m, std²) per sample and step (see ``ElasticMargin``).

    No fallback, as the official code (θ + m_i past π is not guarded); ``fallback=True`` adds insightface's
    th/mm rule with each row's own m_i.
    """

    name = "elasticface_arc"

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.05,
        plus: bool = False,
        plus_order: str = "paper",
        fallback: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(s, m, std, plus, plus_order, seed)
        self.fallback = check_bool("fallback", fallback)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return arc_target(target_cos, self.row_margin(ctx), fallback=self.fallback)


@register
class ElasticFaceCos(ElasticMargin):
    """ElasticFace-Cos: T = c_y − m_i, m_i ~ N(m, std²) per sample and step (see ``ElasticMargin``)."""

    name = "elasticface_cos"

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.35,
        std: float = 0.05,
        plus: bool = False,
        plus_order: str = "paper",
        seed: int | None = None,
    ) -> None:
        super().__init__(s, m, std, plus, plus_order, seed)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return target_cos - self.row_margin(ctx)


@register
class MagFace(Margin):
    """MagFace: an ArcFace margin that grows with the feature magnitude, and a regulariser on the magnitude.

    a = clamp(‖x‖, l_a, u_a), m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a), T = cos(θ_y + m(a)) (where
    c_y > 0 with ``easy_margin``, else insightface's th/mm fallback with m(a)); per-sample loss
    CE + λ_g·g(a), g(a) = a/u_a² + 1/a, so the head's loss is CE + λ_g·mean(g). Neither m(a) nor g(a) is
    detached: both carry gradient to the feature norm (that is how MagFace learns quality-aware magnitudes).
    """

    name = "magface"
    needs_norms = True

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 20.0,
        easy_margin: bool = True,
    ) -> None:
        super().__init__(s)
        self.l_a = check_positive("l_a", l_a)
        self.u_a = check_number("u_a", u_a)
        if not self.l_a < self.u_a:
            raise ConfigError(f"parameter l_a={l_a!r} is invalid: expected l_a < u_a (u_a={u_a!r})")
        self.l_m = check_non_negative("l_m", l_m)
        self.u_m = check_number("u_m", u_m)
        if self.l_m > self.u_m:
            raise ConfigError(f"parameter l_m={l_m!r} is invalid: expected l_m <= u_m (u_m={u_m!r})")
        self.lambda_g = check_non_negative("lambda_g", lambda_g)
        self.easy_margin = check_bool("easy_margin", easy_margin)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        magnitude = norms.clamp(self.l_a, self.u_a)
        margin = self.l_m + (self.u_m - self.l_m) / (self.u_a - self.l_a) * (magnitude - self.l_a)
        return {"target_cos": target_cos, "magnitude": magnitude, "margin": margin, "norms": norms}

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return arc_target(target_cos, ctx["margin"].to(target_cos.dtype), easy_margin=self.easy_margin)

    def row_loss(self, target_logit: Tensor, negatives_lse: Tensor, ctx: RowContext) -> Tensor:
        magnitude = ctx["magnitude"].to(target_logit.dtype)
        regulariser = magnitude / self.u_a**2 + 1.0 / magnitude
        return super().row_loss(target_logit, negatives_lse, ctx) + self.lambda_g * regulariser
