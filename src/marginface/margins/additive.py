"""Margins that change only the target logit: NormFace, CosFace, ArcFace, the combined margin and SphereFace."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginface.errors import ConfigError
from marginface.margins.base import (
    GRADIENT_MODES,
    AngularMargin,
    Margin,
    RowContext,
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
    clamp_cos,
    straight_through,
)
from marginface.margins.registry import register


@register
class NormFace(Margin):
    """T(c) = c, N(c) = c on normalised features and weights, times the scale s."""

    name = "normface"

    def __init__(self, s: float = 64.0) -> None:
        super().__init__(s)


@register
class CosFace(Margin):
    """CosFace / AM-Softmax: T(c) = c − m."""

    name = "cosface"

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__(s)
        self.m = check_non_negative("m", m)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return target_cos - self.m


@register
class ArcFace(AngularMargin):
    """ArcFace: T(c) = cos(θ + m).

    fallback=True is insightface's th/mm rule (T = c − m·sin m once θ + m would pass π, keeping T monotone).
    gradient="exact" differentiates T; "straight_through" keeps the forward value and passes the gradient of
    the identity, as arcface_torch does (with fallback=False it reproduces arcface_torch exactly).
    """

    name = "arcface"  # AngularMargin's constructor and target are exactly ArcFace's


@register
class Combined(Margin):
    """insightface's combined margin T(c) = cos(m1·θ + m2) − m3, the general form (MXNet's, not arcface_torch's).

    Like the MXNet original it has no fallback: with m1·θ + m2 > π the target logit rises again.
    (1, m, 0) is ArcFace without fallback, (1, 0, m) is CosFace.
    """

    name = "combined"

    def __init__(
        self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2, gradient: str = "exact"
    ) -> None:
        super().__init__(s)
        self.m1 = check_positive("m1", m1)
        self.m2 = check_non_negative("m2", m2)
        self.m3 = check_non_negative("m3", m3)
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        theta = torch.acos(clamp_cos(target_cos))
        value = torch.cos(self.m1 * theta + self.m2) - self.m3
        return straight_through(target_cos, value) if self.gradient == "straight_through" else value


@register
class SphereFace(Margin):
    """SphereFace (A-Softmax): multiplicative angular margin on unnormalised features, with caffe's λ annealing.

    ψ(θ) = (−1)^k·cos(mθ) − 2k on θ ∈ [kπ/m, (k+1)π/m]; in training the target logit is (λ·c + ψ)/(1 + λ),
    λ = max(lambda_min, base·(1 + gamma·iteration)^(−power)), the iteration counter incremented before use.
    Logits are scaled by the feature norm ‖x‖, so the margin must be called with ``norms=``.
    """

    name = "sphereface"
    needs_norms = True

    def __init__(
        self,
        m: float = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__(s=1.0)
        self.m = check_number("m", m)
        if self.m < 1:
            raise ConfigError(f"parameter m={m!r} is invalid: expected a number >= 1 (SphereFace multiplies θ)")
        self.base = check_non_negative("base", base)
        self.gamma = check_non_negative("gamma", gamma)
        self.power = check_non_negative("power", power)
        self.lambda_min = check_non_negative("lambda_min", lambda_min)
        # The caffe layer's iteration counter: state that must survive a checkpoint.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def current_lambda(self) -> float:
        annealed = self.base * (1.0 + self.gamma * float(self.iteration)) ** (-self.power)
        return max(self.lambda_min, annealed)

    def update_state(self, stats) -> None:
        self.iteration += 1

    def psi(self, cos: Tensor) -> Tensor:
        """ψ(θ), monotone decreasing on [0, π] from 1 to 1 − 2m."""
        c = clamp_cos(cos)
        theta = torch.acos(c.detach())
        k = torch.floor(self.m * theta / math.pi).clamp(max=math.ceil(self.m) - 1)
        if float(self.m).is_integer():
            cos_m_theta = chebyshev(c, int(self.m))  # a polynomial in c: exact and smooth, no acos in the graph
        else:
            cos_m_theta = torch.cos(self.m * torch.acos(c))
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * cos_m_theta - 2.0 * k

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        lam = self.current_lambda
        return (lam * target_cos + self.psi(target_cos)) / (1.0 + lam)

    def row_scale(self, norms: Tensor | None) -> Tensor:
        assert norms is not None  # forward() checks needs_norms with a clear message
        return norms[:, None]


def chebyshev(c: Tensor, degree: int) -> Tensor:
    """cos(n·θ) as the Chebyshev polynomial T_n(cos θ)."""
    previous, current = torch.ones_like(c), c
    if degree == 0:
        return previous
    for _ in range(degree - 1):
        previous, current = current, 2.0 * c * current - previous
    return current
