"""The margin contract: a margin turns cosines into scaled logits through its T (target), N (negatives) and state.

Every engine (dense, chunked, sharded) drives a margin through the same five steps, so a margin written once
runs everywhere:

1. ``batch_statistics(target_cos)`` -> sums over the batch; the engine all-reduces them across data-parallel
   ranks, then ``update_state(stats)`` moves the margin's state (CurricularFace's t) in training mode only.
2. ``prepare(target_cos, norms)`` -> a per-row context (the mask threshold, ...) that needs only the target.
3. ``row_statistics(cos_block, target_mask, ctx)`` -> per-row reductions over one block of classes, combined
   across blocks and shards with the reduction named in ``row_reductions`` ("sum", "max" or "logsumexp").
4. ``finish(ctx, row_stats)`` -> completes the context with the unscaled target logit ``ctx["target"]`` = T(c_y).
5. ``negative_logits(cos_block, ctx)`` -> the unscaled N for a block (target columns are overwritten after).

``forward(cos, labels)`` is the dense reference composition of those steps on a full row.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from marginface.errors import ConfigError

RowContext = dict[str, Tensor]

# Distance kept from cos = ±1 before sqrt(1 - c²) or acos: their derivatives are infinite at ±1 exactly.
COS_EPS = 1e-7
GRADIENT_MODES = ("exact", "straight_through")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """fp16/bf16 inputs are computed in fp32; fp32 and fp64 keep their precision."""
    return torch.promote_types(tensor.dtype, torch.float32)


def clamp_cos(cos: Tensor) -> Tensor:
    return cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)


def sin_of(cos: Tensor) -> Tensor:
    """sin θ from a cosine already kept away from ±1; (1-c)(1+c) loses less precision than 1-c² near ±1."""
    return torch.sqrt((1.0 - cos) * (1.0 + cos))


def cos_plus_margin(cos: Tensor, margin: float | Tensor) -> Tensor:
    """cos(θ + m) = c·cos m − sin θ·sin m, with c clamped away from ±1 so the gradient stays finite."""
    c = clamp_cos(cos)
    if isinstance(margin, Tensor):
        return c * torch.cos(margin) - sin_of(c) * torch.sin(margin)
    return c * math.cos(margin) - sin_of(c) * math.sin(margin)


def arc_target(
    cos: Tensor, m: float, *, easy_margin: bool = False, fallback: bool = True, gradient: str = "exact"
) -> Tensor:
    """ArcFace's T(c) = cos(θ + m) with the insightface guards.

    fallback (th/mm): where θ + m would pass π (c <= cos(π − m)), use c − m·sin m so that T keeps decreasing.
    easy_margin: apply the margin only where c > 0 (takes precedence over the fallback).
    gradient="straight_through": the forward value as above, the backward of the identity (arcface_torch).
    """
    margined = cos_plus_margin(cos, m)
    if easy_margin:
        value = torch.where(cos > 0, margined, cos)
    elif fallback:
        value = torch.where(cos > math.cos(math.pi - m), margined, cos - m * math.sin(m))
    else:
        value = margined
    return straight_through(cos, value) if gradient == "straight_through" else value


def straight_through(cos: Tensor, value: Tensor) -> Tensor:
    """Forward ``value``, backward as if the margin were the identity (dT/dc = 1)."""
    return cos + (value - cos).detach()


class Margin(nn.Module):
    """Base class of every margin: T, N, state and per-row statistics, in the unified form."""

    name: ClassVar[str] = ""
    # True when N(c) = c for every negative: engines then skip materialising N and only replace the targets.
    identity_negatives: ClassVar[bool] = True
    needs_norms: ClassVar[bool] = False
    row_reductions: ClassVar[Mapping[str, str]] = {}
    # The attribute that plays "t" in the hard-negative modulation (for plots); None when there is none.
    t_attribute: ClassVar[str | None] = None

    def __init__(self, s: float = 64.0) -> None:
        super().__init__()
        self.s = check_positive("s", s)

    # -- the five steps ---------------------------------------------------------------------------------
    def batch_statistics(self, target_cos: Tensor) -> dict[str, Tensor]:
        return {}

    def update_state(self, stats: Mapping[str, Tensor]) -> None:
        return None

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        return {"target_cos": target_cos}

    def row_statistics(self, cos: Tensor, target_mask: Tensor, ctx: RowContext) -> dict[str, Tensor]:
        return {}

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        ctx["target"] = self.target_logit(ctx["target_cos"], ctx)
        return ctx

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return target_cos

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        return cos

    def row_scale(self, norms: Tensor | None) -> float | Tensor:
        """The logit scale: s, or a per-row [B, 1] tensor for margins whose scale is the feature norm."""
        return self.s

    # -- dense reference --------------------------------------------------------------------------------
    def forward(self, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """Scaled logits [B, C] from cosines [B, C] and labels [B] (the dense reference of every engine)."""
        cos = check_cos_labels(cos, labels).to(compute_dtype(cos))
        if norms is not None:
            norms = norms.to(cos.dtype).reshape(-1)
        elif self.needs_norms:
            raise ConfigError(
                f"margin {self.name!r} needs the feature norms: call it as margin(cos, labels, norms=...)"
            )
        labels = labels.long()
        target_cos = cos.gather(1, labels[:, None]).squeeze(1)
        if self.training or getattr(self, "update_in_eval", False):
            self.update_state(self.batch_statistics(target_cos.detach()))
        target_mask = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], True)
        ctx = self.prepare(target_cos, norms)
        ctx = self.finish(ctx, self.row_statistics(cos, target_mask, ctx))
        negatives = cos if self.identity_negatives else self.negative_logits(cos, ctx)
        logits = torch.where(target_mask, ctx["target"][:, None], negatives)
        return logits * self.row_scale(norms)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that recreate this margin (for configs, reports and plots).

        Every margin stores each constructor argument under the argument's own name, so this is the inverse of
        ``create(name, **params)``.
        """
        params = inspect.signature(type(self).__init__).parameters
        return {name: _plain(getattr(self, name)) for name in params if name != "self"}


_REDUCERS = {
    "sum": lambda stacked: stacked.sum(0),
    "max": lambda stacked: stacked.amax(0),
    "logsumexp": lambda stacked: stacked.logsumexp(0),
}


def combine_row_statistics(
    parts: list[Mapping[str, Tensor]], reductions: Mapping[str, str]
) -> dict[str, Tensor]:
    """Combine the per-block row statistics of a margin with the reduction each one declares."""
    return {key: _REDUCERS[kind](torch.stack([part[key] for part in parts])) for key, kind in reductions.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class AngularMargin(Margin):
    """Margins whose target logit is ArcFace's cos(θ + m) with insightface's guards (see ``arc_target``)."""

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        fallback: bool = True,
        gradient: str = "exact",
    ) -> None:
        super().__init__(s)
        self.m = check_non_negative("m", m)
        self.easy_margin = check_bool("easy_margin", easy_margin)
        self.fallback = check_bool("fallback", fallback)
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return arc_target(
            target_cos, self.m, easy_margin=self.easy_margin, fallback=self.fallback, gradient=self.gradient
        )


# -- validation helpers (every message names the parameter and what is allowed) ------------------------------
def check_positive(name: str, value: Any) -> float:
    value = check_number(name, value)
    if not value > 0:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected a number > 0")
    return value


def check_non_negative(name: str, value: Any) -> float:
    value = check_number(name, value)
    if not value >= 0:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected a number >= 0")
    return value


def check_range(name: str, value: Any, low: float, high: float) -> float:
    value = check_number(name, value)
    if not low <= value <= high:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected a number in [{low}, {high}]")
    return value


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected a finite number")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected true or false")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected one of {', '.join(choices)}")
    return value


def check_cos_labels(cos: Tensor, labels: Tensor) -> Tensor:
    if cos.dim() != 2:
        raise ValueError(f"cos must be a [batch, classes] matrix, got shape {tuple(cos.shape)}")
    if labels.shape != (cos.shape[0],):
        raise ValueError(f"labels must have shape [{cos.shape[0]}] to match cos, got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cos.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {cos.shape[1] - 1}] (the number of classes in cos), "
            f"got min {int(labels.min())} and max {int(labels.max())}"
        )
    return cos
