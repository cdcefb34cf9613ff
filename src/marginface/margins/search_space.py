"""The loss-function-search spaces: Search-Softmax's modulating factor a (global and per-bin) and AM-LFS.

LFS writes every margin loss as a reduction of the softmax probability, p_m = p / (a·p + 1 − a) with a <= 0.
That is exactly a shift of the target logit by −ln(1 − a), so the loss −log p_m is computed as a cross-entropy
on shifted logits (log-sum-exp), never as the log of a probability. a = 1 − e^{s·m} gives CosFace(m).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from marginface.errors import ConfigError
from marginface.margins.base import Margin, RowContext, check_number
from marginface.margins.registry import register


def check_modulating_factor(name: str, value: float) -> float:
    value = check_number(name, value)
    if value > 0:
        raise ConfigError(
            f"parameter {name}={value!r} is invalid: the LFS modulating factor must be <= 0 "
            "(a = 0 is plain softmax; a = 1 − e^(s·m) is CosFace with margin m)"
        )
    return value


def bin_index(values: Tensor, low: float, high: float, bins: int) -> Tensor:
    """Index of the equal-width bin of [low, high] holding each value (the end points fall in the end bins)."""
    position = (values.detach() - low) / (high - low) * bins
    return position.floor().clamp(0, bins - 1).long()


@register
class LFS(Margin):
    """Search-Softmax, global space: L = −log(p / (a·p + 1 − a)), one modulating factor a <= 0.

    Default a = −e^{s/3}: the official code's warm-up factor (a = −1 under its hidden scaling a' = a·e^{s/3}),
    an AM-margin of about 1/3 at s = 32.
    """

    name = "lfs"

    def __init__(self, s: float = 32.0, a: float | None = None) -> None:
        super().__init__(s)
        self.a = check_modulating_factor("a", -math.exp(self.s / 3.0) if a is None else a)

    @property
    def equivalent_margin(self) -> float:
        """The CosFace margin with the same loss: ln(1 − a)/s."""
        return math.log1p(-self.a) / self.s

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return target_cos - self.equivalent_margin


@register
class LFSLocal(Margin):
    """Search-Softmax, local space: one modulating factor per equal-width bin of the plain softmax p of a sample.

    The bin is chosen from p = softmax(s·c)_y (no gradient through the choice: it is piecewise constant).
    """

    name = "lfs_local"

    def __init__(self, s: float = 32.0, a_bins: Sequence[float] | None = None) -> None:
        super().__init__(s)
        if a_bins is None:
            a_bins = [-math.exp(self.s / 3.0)] * 10
        if isinstance(a_bins, (str, bytes)) or not isinstance(a_bins, Sequence) or len(a_bins) == 0:
            raise ConfigError(f"parameter a_bins={a_bins!r} is invalid: expected a non-empty list of numbers <= 0")
        values = [check_modulating_factor(f"a_bins[{i}]", a) for i, a in enumerate(a_bins)]
        # log(1 − a) per bin, in float64 so that huge |a| keep their precision.
        self.register_buffer("a_bins", torch.tensor(values, dtype=torch.float64))

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        target_cos = ctx["target_cos"]
        plain = target_cos.detach() * self.s
        # The engine's log Σ_{j≠y} e^{s·c_j}; detached: it only chooses the bin, which is piecewise constant.
        p = torch.exp(plain - torch.logaddexp(plain, row_stats["negatives_lse"].detach()))
        shift = torch.log1p(-self.a_bins)[bin_index(p, 0.0, 1.0, len(self.a_bins))].to(target_cos.dtype)
        ctx["target"] = target_cos - shift / self.s
        return ctx


@register
class AMLFS(Margin):
    """AM-LFS: L = −log τ(p^t), p^t the softmax with target logit s·t(c_y).

    t(·) is piecewise linear over equal intervals of [−1, 1] (``t_params`` = [[slope, intercept], ...]) and τ(·)
    over equal intervals of [0, 1] (``tau_params``). The loss is realised as a target logit z' with
    softmax(z') = τ(p^t), i.e. z' = log Σ_neg + log τ − log(1 − τ), which is exact in value and gradient.
    Identity pieces (slope 1, intercept 0) give plain softmax; t pieces (1, −m) give CosFace(m).
    """

    name = "am_lfs"

    def __init__(
        self,
        s: float = 64.0,
        t_params: Sequence[Sequence[float]] | None = None,
        tau_params: Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__(s)
        self.register_buffer("t_params", piecewise_table("t_params", t_params))
        self.register_buffer("tau_params", piecewise_table("tau_params", tau_params))

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        target_cos = ctx["target_cos"]
        t_table = self.t_params.to(target_cos.dtype)
        piece = t_table[bin_index(target_cos, -1.0, 1.0, len(t_table))]
        z_t = self.s * (piece[:, 0] * target_cos + piece[:, 1])
        neg_lse = row_stats["negatives_lse"]  # the engine's log Σ_{j≠y} e^{s·c_j}, with its gradient
        log_total = torch.logaddexp(z_t, neg_lse)
        p, q = torch.exp(z_t - log_total), torch.exp(neg_lse - log_total)  # q = 1 − p without cancellation
        tau_table = self.tau_params.to(target_cos.dtype)
        slope, intercept = tau_table[bin_index(p, 0.0, 1.0, len(tau_table))].unbind(1)
        tiny = torch.finfo(target_cos.dtype).tiny
        tau = (slope * p + intercept).clamp(min=tiny)
        one_minus_tau = ((1.0 - slope - intercept) + slope * q).clamp(min=tiny)
        ctx["target"] = (neg_lse + torch.log(tau) - torch.log(one_minus_tau)) / self.s
        return ctx


def piecewise_table(name: str, params: Sequence[Sequence[float]] | None, default_pieces: int = 6) -> Tensor:
    """Validate [[slope, intercept], ...] (or a flat list of pairs) into an [M, 2] float64 tensor."""
    if params is None:
        return torch.tensor([[1.0, 0.0]] * default_pieces, dtype=torch.float64)
    try:
        table = torch.as_tensor(params, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"parameter {name} is invalid: expected a list of [slope, intercept] pairs ({exc})") from None
    if table.dim() == 1 and table.numel() % 2 == 0:
        table = table.reshape(-1, 2)
    if table.dim() != 2 or table.shape[1] != 2 or table.shape[0] == 0:
        raise ConfigError(
            f"parameter {name} has shape {tuple(table.shape)}: expected M >= 1 pairs [slope, intercept]"
        )
    if not torch.isfinite(table).all():
        raise ConfigError(f"parameter {name} is invalid: every slope and intercept must be finite")
    return table
