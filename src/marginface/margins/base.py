"""The margin contract: a margin turns cosines into scaled logits through its T (target), N (negatives), G and state.

Every engine (dense, chunked, later sharded) drives a margin through the same steps, so a margin written once
runs everywhere; ``engines.base.margin_loss`` is that sequence, shared by every engine:

0. ``set_num_classes(C)``: the classifier's (global) class count, before anything else (AdaCos's initial s).
1. ``update_from_batch``: ``batch_statistics(target_cos, norms)`` -> sums over the batch (detached), all-reduced across
   ranks, then ``update_state(stats)`` moves the margin's state (CurricularFace's t) once per step, in training
   mode only (or always, where ``update_in_eval`` is set). A margin whose update needs a reduction over the
   classes (AdaCos's Σ_{j≠y} e^{s·c_j} with the old s) declares it in ``state_reductions``: the engine then runs a
   statistics-only pass first (``state_row_statistics`` per block, no gradient, combined like ``row_reductions``
   and across shards) and hands the result to ``batch_statistics(..., state_rows=...)``.
2. ``prepare(target_cos, norms)`` -> the row context N and T may use (the hard-negative threshold, a per-row
   margin, ...). It sees the *detached* target cosine, so everything N reads from the context is a constant of
   the step; the feature norms it gets are *not* detached (AdaFace detaches them itself; MagFace's margin and
   regulariser differentiate through them).
3. One pass over the classes, block by block (any blocking, any order):
   ``row_statistics(cos_block, target_index, ctx, scratch)`` -> per-row reductions without gradient, combined
   across blocks and shards with the reduction named in ``row_reductions`` ("sum", "max" or "logsumexp");
   ``negatives_with_slope(cos_block, ctx, scratch)`` -> N and dN/dc for the block (the engine's backward);
   and the engine's own ``negatives_lse`` = log Σ_{j≠y} e^{scale·N(c_j)}, which *does* carry gradient.
   ``scratch`` (a ``BlockScratch``) says where a block's temporaries go: buffers reused from block to block and
   N written over the block, when a streaming engine lends them; fresh tensors otherwise.
4. ``finish(ctx, row_stats)`` -> the unscaled target logit ``ctx["target"]`` = T(c_y); ``row_stats`` holds the
   margin's reductions and ``"negatives_lse"``, so a margin may define its target from the partition function
   (AM-LFS) and the gradient flows through it on every engine.
5. ``row_loss(target_logit, negatives_lse, ctx)`` -> the per-sample loss, −G·log(e^{z_y} / (e^{z_y} + e^{L})):
   plain cross-entropy unless a margin re-weights samples (G), adds a per-sample term (MagFace's regulariser
   λ_g·g(‖x‖)) or defines its loss otherwise.

Steps 2, 4 and 5 run outside every engine's autograd Function, in plain autograd: whatever T and the row loss
compute from the context (a margin of the feature norm, a regulariser) differentiates back into the embeddings
on every engine without the engine knowing.

``forward(cos, labels)`` is the dense reference composition of those steps on a full row; it returns logits
(T and N, scaled), and ``reference_loss`` adds step 5.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from marginface.errors import ConfigError
from marginface.fileio import json_plain

RowContext = dict[str, Tensor]
# All-reduces a margin's batch statistics across data-parallel ranks (set by the trainer).
BatchReduce = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]

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
    cos: Tensor, m: float | Tensor, *, easy_margin: bool = False, fallback: bool = True, gradient: str = "exact"
) -> Tensor:
    """ArcFace's T(c) = cos(θ + m) with the insightface guards; ``m`` a number or one margin per row.

    fallback (th/mm): where θ + m would pass π (c <= cos(π − m)), use c − m·sin m so that T keeps decreasing.
    easy_margin: apply the margin only where c > 0 (takes precedence over the fallback).
    gradient="straight_through": the forward value as above, the backward of the identity (arcface_torch).
    """
    margined = cos_plus_margin(cos, m)
    if easy_margin:
        value = torch.where(cos > 0, margined, cos)
    elif fallback and isinstance(m, Tensor):
        value = torch.where(cos > torch.cos(math.pi - m), margined, cos - m * torch.sin(m))
    elif fallback:
        value = torch.where(cos > math.cos(math.pi - m), margined, cos - m * math.sin(m))
    else:
        value = margined
    return straight_through(cos, value) if gradient == "straight_through" else value


def straight_through(cos: Tensor, value: Tensor) -> Tensor:
    """Forward ``value``, backward as if the margin were the identity (dT/dc = 1)."""
    return cos + (value - cos).detach()


class BlockScratch:
    """Where a margin's per-block temporaries go: fresh tensors (``FRESH``, the default) or memory an engine lends.

    A streaming engine lends one per pass (``BlockScratch(lent=True)``): ``buffer(like, slot)`` then returns the
    same memory for a slot from block to block, and ``output(cos)`` is the block itself, so that N is written
    over cosines the engine no longer reads. On CPU a fresh [B, n] temporary costs 2–8 passes over it (its pages
    come zeroed from the kernel) and a reused one none; with the pass cuts beside it, NPCFace went from 1.14x
    to 1.07x the ArcFace head at B = 512 (docs/benchmarks.md). A buffer holds until the next request for its
    slot, so a margin may return one as its slope (the engine uses it before the next block) but never as N
    (which the engine may keep).
    Whatever ``output`` returns may be ``cos`` itself: read everything you need from ``cos`` before writing it.
    """

    def __init__(self, lent: bool = False) -> None:
        self.lent = lent
        self._held: dict[object, Tensor] = {}

    def buffer(self, like: Tensor, slot: object, shape: tuple[int, ...] | None = None) -> Tensor:
        """An uninitialised tensor of ``like``'s dtype and device (and shape, unless ``shape``), for ``slot``."""
        size = tuple(like.shape if shape is None else shape)
        if not self.lent:
            return like.new_empty(size)
        numel = math.prod(size)
        held = self._held.get(slot)
        if held is None or held.numel() < numel or held.dtype != like.dtype or held.device != like.device:
            held = self._held[slot] = like.new_empty(numel)  # grows to the largest block, then is reused
        return held[:numel].view(size)

    def output(self, cos: Tensor) -> Tensor | None:
        """Where N goes, as an ``out=`` argument: over ``cos`` when the engine lends it, a fresh tensor (None)."""
        return cos if self.lent else None


FRESH = BlockScratch()


class Margin(nn.Module):
    """Base class of every margin: T, N, G, state and per-row statistics, in the unified form."""

    name: ClassVar[str] = ""
    # True when N(c) = c for every negative: engines then skip N and only replace the targets.
    identity_negatives: ClassVar[bool] = True
    needs_norms: ClassVar[bool] = False
    row_reductions: ClassVar[Mapping[str, str]] = {}
    # The attribute that plays "t" in the hard-negative modulation (for plots); None when there is none.
    t_attribute: ClassVar[str | None] = None
    # Stateful margins whose reference code also moves the state in eval mode set this (CurricularFace).
    update_in_eval: bool = False
    # Per-row reductions over the classes that ``batch_statistics`` needs (a statistics-only pass before the state
    # update; AdaCos). Same kinds as ``row_reductions``.
    state_reductions: ClassVar[Mapping[str, str]] = {}
    # Margins drawing random numbers from their own generator (ElasticFace): a head seeds it from the global one.
    uses_generator: ClassVar[bool] = False

    def __init__(self, s: float = 64.0) -> None:
        super().__init__()
        self.s = check_positive("s", s)

    # -- the steps --------------------------------------------------------------------------------------
    def set_num_classes(self, num_classes: int) -> None:
        """The classifier's class count (every engine and the dense reference call this first; most ignore it)."""
        return None

    def seed_generator(self, seed: int) -> None:
        """Seed the margin's own generator (margins with ``uses_generator``; a head calls it at creation)."""
        return None

    def needs_state_pass(self) -> bool:
        """Whether this step's state update needs the statistics-only pass over the classes."""
        return bool(self.state_reductions) and (self.training or self.update_in_eval)

    def state_row_statistics(self, cos: Tensor, target_index: Tensor, target_cos: Tensor) -> dict[str, Tensor]:
        """Per-row reductions (``state_reductions``) over one block of classes, with the state *before* the update."""
        return {}

    def batch_statistics(self, target_cos: Tensor, norms: Tensor | None = None) -> dict[str, Tensor]:
        """Sums over the batch (detached inputs) that ``update_state`` needs; all-reduced across ranks."""
        return {}

    def update_state(self, stats: Mapping[str, Tensor]) -> None:
        return None

    def update_from_batch(
        self,
        target_cos: Tensor,
        norms: Tensor | None = None,
        batch_reduce: BatchReduce | None = None,
        state_rows: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Step 1, the one state update of every engine and of ``reference``: once per step, from the
        (all-reduced) batch statistics, in training mode (or always, where ``update_in_eval`` is set).
        ``state_rows``: the statistics-only pass's reductions, for margins that declare ``state_reductions``."""
        if not (self.training or self.update_in_eval):
            return
        extra = {"state_rows": state_rows} if self.state_reductions else {}
        stats = self.batch_statistics(target_cos.detach(), None if norms is None else norms.detach(), **extra)
        if stats and batch_reduce is not None:
            stats = batch_reduce(stats)
        self.update_state(stats)

    def prepare(self, target_cos: Tensor, norms: Tensor | None = None) -> RowContext:
        return {"target_cos": target_cos}

    def row_statistics(
        self, cos: Tensor, target_index: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> dict[str, Tensor]:
        """Per-row reductions over one block of classes, without gradient (``cos`` is read, never written).

        ``target_index`` [B] is the column of each row's target inside this block, −1 where it lies elsewhere.
        """
        return {}

    def finish(self, ctx: RowContext, row_stats: Mapping[str, Tensor]) -> RowContext:
        ctx["target"] = self.target_logit(ctx["target_cos"], ctx)
        return ctx

    def target_logit(self, target_cos: Tensor, ctx: RowContext) -> Tensor:
        return target_cos

    def negative_logits(self, cos: Tensor, ctx: RowContext) -> Tensor:
        return cos

    def negatives_with_slope(
        self, cos: Tensor, ctx: RowContext, scratch: BlockScratch = FRESH
    ) -> tuple[Tensor, Tensor | float]:
        """N(c) and dN/dc for a block (no graph): the engines' backward is one multiply by the slope.

        The identity has slope 1; this default differentiates ``negative_logits`` elementwise, and the mining
        margins override it with their closed form (tested equal to this autograd slope), putting their
        temporaries in ``scratch`` and N in ``scratch.output(cos)``.
        """
        if self.identity_negatives:
            return cos, 1.0
        with torch.enable_grad():
            leaf = cos.detach().requires_grad_(True)
            values = self.negative_logits(leaf, ctx)
            (slope,) = torch.autograd.grad(values.sum(), leaf)
        return values.detach(), slope

    def row_scale(self, norms: Tensor | None) -> float | Tensor:
        """The logit scale: s, or a per-row [B, 1] tensor for margins whose scale is the feature norm."""
        return self.s

    def row_loss(self, target_logit: Tensor, negatives_lse: Tensor, ctx: RowContext) -> Tensor:
        """Per-sample loss from the scaled target logit and log Σ_{j≠y} e^{scale·N_j} (G = 1: cross-entropy)."""
        return torch.logaddexp(target_logit, negatives_lse) - target_logit

    # -- dense reference --------------------------------------------------------------------------------
    def forward(self, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """Scaled logits [B, C] from cosines [B, C] and labels [B] (the dense reference of every engine)."""
        logits, _ = self.reference(cos, labels, norms)
        return logits

    def reference_loss(self, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """The mean loss of the unified form on a full cosine matrix: the reference every engine equals."""
        _, loss = self.reference(cos, labels, norms)
        return loss

    def reference(
        self, cos: Tensor, labels: Tensor, norms: Tensor | None = None, update_state: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(logits [B, C], mean loss) on a full cosine matrix; ``update_state=False`` when the caller did it."""
        cos = check_cos_labels(cos, labels).to(compute_dtype(cos))
        if norms is not None:
            norms = norms.to(cos.dtype).reshape(-1)
        elif self.needs_norms:
            raise ConfigError(
                f"margin {self.name!r} needs the feature norms: call it as margin(cos, labels, norms=...)"
            )
        labels = labels.long()
        self.set_num_classes(cos.shape[1])
        target_cos = cos.gather(1, labels[:, None]).squeeze(1)
        if update_state:
            state_rows = None
            if self.needs_state_pass():
                with torch.no_grad():
                    state_rows = self.state_row_statistics(cos.detach(), labels, target_cos.detach())
            self.update_from_batch(target_cos, norms, state_rows=state_rows)
        target_mask = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], True)
        ctx = self.prepare(target_cos.detach(), norms)
        ctx["target_cos"] = target_cos
        with torch.no_grad():
            row_stats = self.row_statistics(cos, labels, ctx)
        negatives = cos if self.identity_negatives else self.negative_logits(cos, ctx)
        scale = self.row_scale(norms)
        negatives_lse = (negatives * scale).masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
        ctx = self.finish(ctx, {**row_stats, "negatives_lse": negatives_lse})
        target_scale = scale[:, 0] if isinstance(scale, Tensor) else scale
        loss = self.row_loss(ctx["target"] * target_scale, negatives_lse, ctx).mean()
        logits = torch.where(target_mask, ctx["target"][:, None], negatives) * scale
        return logits, loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that recreate this margin (for configs, reports and plots).

        Every margin stores each constructor argument under the argument's own name, so this is the inverse of
        ``create(name, **params)``.
        """
        params = inspect.signature(type(self).__init__).parameters
        return {name: json_plain(getattr(self, name)) for name in params if name != "self"}


# How two partial row statistics combine (blocks of one pass, or shards across ranks).
PAIRWISE_REDUCERS = {"sum": torch.add, "max": torch.maximum, "logsumexp": torch.logaddexp}


def combine_row_statistics(
    parts: list[Mapping[str, Tensor]], reductions: Mapping[str, str]
) -> dict[str, Tensor]:
    """Combine the per-block row statistics of a margin with the reduction each one declares."""
    combined: dict[str, Tensor] = {}
    for part in parts:
        for key, kind in reductions.items():
            combined[key] = part[key] if key not in combined else PAIRWISE_REDUCERS[kind](combined[key], part[key])
    return combined


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
