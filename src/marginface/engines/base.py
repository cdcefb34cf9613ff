"""The engine contract and the margin-loss sequence every engine shares; engines differ only in their class pass.

An engine turns (embeddings, class centres, labels) into the mean loss of a margin. Everything except the pass
over the classes is the same for every engine and lives here (``margin_loss``): full precision, the state update
(once per step, from the batch's target cosines), the margin's row context, its target logit and its row loss.
The pass (``Engine.class_pass``) computes, for every row, the differentiable target cosine and
log Σ_{j≠y} e^{scale·N(c_j)}, and the margin's row statistics — by materialising [B, C] (dense) or streaming
blocks of classes (chunked).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from marginface.errors import ConfigError
from marginface.margins.base import BatchReduce, Margin, RowContext, compute_dtype

NORM_EPS = 1e-12


def inverse_norms(weight: Tensor) -> Tensor:
    """1/‖w_c‖ per class centre: folded into the product instead of normalising a [C, D] copy."""
    # vector_norm is one fused reduction whose backward is a single pass over W (pow + sum would be three)
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS).reciprocal()


def target_cosines(x_hat: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """cos θ_y per row by an indexed B·D dot product (no [B, C] work); 0 where the label is −1 (a target that
    lies in another shard)."""
    elsewhere = labels < 0
    rows = weight[labels.clamp_min(0)]
    cos = (x_hat * rows).sum(1) * inverse_norms(rows)
    return torch.where(elsewhere, torch.zeros_like(cos), cos)


@dataclass
class ClassPass:
    """What a class pass returns: per-row tensors, the first two differentiable."""

    target_cos: Tensor  # cos θ_y [B], carrying the gradient to x̂ and w_y
    negatives_lse: Tensor  # log Σ_{j≠y} e^{scale·N(c_j)} [B], carrying the gradient to x̂, W (and the scale)
    row_stats: dict[str, Tensor]  # the margin's row_reductions, combined over every class (no gradient)
    hard_count: Tensor | None  # negatives above ctx["threshold"] per row, when statistics were asked for
    classes: int | Tensor | None = None  # the classes the pass saw (targets included); None: weight's rows


class Engine:
    """Base of every engine: options (validated from the constructor's signature) and the margin-loss sequence."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        """Engines take their options as constructor keywords, stored under the same names."""

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this engine accepts (its constructor's keyword arguments)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def options(self) -> dict[str, Any]:
        """The constructor arguments that recreate this engine (for configs and reports)."""
        return {name: getattr(self, name) for name in self.option_names()}

    # -- what a head asks of its engine (single-process engines: every class, labels checked here) -----------
    def shard(self, num_classes: int) -> range:
        """The class ids whose centres this process holds: all of them, except in the sharded engine."""
        return range(num_classes)

    def check_labels(self, labels: Tensor, num_classes: int) -> None:
        """Labels outside [0, num_classes) are a ValueError naming them (the sharded engine checks after its
        all-gather, so that every rank raises together)."""
        check_label_range(labels, num_classes)

    # -- hooks of margin_loss for engines whose classes are spread over processes (identities here) ---------
    def combine_targets(self, partial: Tensor) -> Tensor:
        """cos θ_y from this process's part (every row's target is here: the identity)."""
        return partial

    def count_once(self, value: Any) -> Any:
        """A value every process computes alike, whose gradient must reach shared inputs once (the identity)."""
        return value

    def loss(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
        statistics: dict[str, float] | None = None,
    ) -> Tensor:
        """The mean loss of ``margin`` over the batch (fp32 or fp64 whatever the input precision).

        When a ``statistics`` dict is given it is filled with what training reports follow: the fraction of hard
        negatives, the mean per-sample margin and the margin's t, where the margin has them.
        """
        return margin_loss(self, margin, embeddings, weight, labels, batch_reduce, statistics)

    def logits(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
    ) -> Tensor:
        """Scaled margin logits [B, C]: materialised by definition, so every engine computes them densely."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x_hat, weight, labels, norms = full_precision_inputs(margin, embeddings, weight, labels)
            cos = (x_hat @ weight.t()) * inverse_norms(weight)
            margin.update_from_batch(cos.gather(1, labels[:, None])[:, 0], norms, batch_reduce)
            logits, _ = margin.reference(cos, labels, norms=norms, update_state=False)
            return logits

    def pass_rows(self) -> tuple[Tensor | None, Any]:
        """The rows of W this step's class pass sees (None: all of them, in order; labels are then positions
        among them) and the buffer their gradient goes to (Partial FC's ``GradientBuffer``)."""
        return None, None

    def class_pass(
        self,
        margin: Margin,
        x_hat: Tensor,
        weight: Tensor,
        labels: Tensor,
        ctx: RowContext,
        scale: float | Tensor,
        count_hard: bool,
    ) -> ClassPass:
        raise NotImplementedError


def full_precision_inputs(
    margin: Margin, embeddings: Tensor, weight: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(x̂, W, labels, ‖x‖ or None) in fp32 (fp64 stays fp64) whatever the backbone's precision: the margin and
    softmax never run in half precision. Call it with autocast disabled."""
    dtype = torch.promote_types(compute_dtype(embeddings), weight.dtype)
    embeddings, weight = embeddings.to(dtype), weight.to(dtype)
    norms = embeddings.norm(dim=1) if margin.needs_norms else None
    return F.normalize(embeddings, dim=1, eps=NORM_EPS), weight, labels.long(), norms


def margin_loss(
    engine: Engine,
    margin: Margin,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    batch_reduce: BatchReduce | None,
    statistics: dict[str, float] | None,
) -> Tensor:
    """The sequence of margins/base.py, with the engine's class pass in the middle."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x_hat, weight, labels, norms = full_precision_inputs(margin, embeddings, weight, labels)
        with torch.no_grad():
            rows, _ = engine.pass_rows()
            own_labels = labels if rows is None else rows_of(rows, labels)
            detached_target = engine.combine_targets(target_cosines(x_hat, weight, own_labels))
        margin.update_from_batch(detached_target, norms, batch_reduce)
        ctx = margin.prepare(detached_target, engine.count_once(norms))
        scale = margin.row_scale(norms)
        if isinstance(scale, Tensor):
            scale = scale.reshape(-1)
        result = engine.class_pass(margin, x_hat, weight, labels, ctx, scale, statistics is not None)
        ctx["target_cos"] = result.target_cos
        ctx = margin.finish(ctx, {**result.row_stats, "negatives_lse": result.negatives_lse})
        loss = margin.row_loss(ctx["target"] * engine.count_once(scale), result.negatives_lse, ctx).mean()
        if statistics is not None:
            classes = weight.shape[0] if result.classes is None else result.classes
            record_statistics(statistics, margin, ctx, result.hard_count, classes - 1)
        return loss


def record_statistics(
    statistics: dict[str, float], margin: Margin, ctx: RowContext, hard_count: Tensor | None,
    negatives: int | Tensor,
) -> None:
    """Fill ``statistics`` with the hard-negative fraction, the mean margin and t, where the margin has them."""
    with torch.no_grad():
        statistics["target_cos"] = float(ctx["target_cos"].mean())
        if hard_count is not None and "threshold" in ctx:
            statistics["hard_fraction"] = float(hard_count.sum()) / max(1.0, hard_count.numel() * float(negatives))
        if "margin" in ctx:
            statistics["margin_mean"] = float(ctx["margin"].mean())
        t = getattr(margin, "t", None)
        if isinstance(t, Tensor):
            statistics["t"] = float(t.mean())


def count_hard(cos: Tensor, ctx: RowContext, target_index: Tensor) -> Tensor | None:
    """Negatives of a block above the row's threshold (the target column excluded), or None without one."""
    if "threshold" not in ctx:
        return None
    threshold = ctx["threshold"]
    count = (cos > threshold[:, None]).sum(1)
    target_is_hard = (target_index >= 0) & (ctx["target_cos"] > threshold)
    return count - target_is_hard.long()


def rows_of(rows: Tensor, labels: Tensor) -> Tensor:
    """Positions among the kept ``rows`` back to W's row ids (−1 stays −1: the target lies elsewhere)."""
    return torch.where(labels >= 0, rows[labels.clamp_min(0)], labels)


def check_label_range(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), "
            f"got min {int(labels.min())} and max {int(labels.max())}"
        )


def check_int_option(engine: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"engine {engine!r}: option {name}={value!r} is invalid: expected an integer >= {minimum}"
        )
    return value


def check_number_option(engine: str, name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(f"engine {engine!r}: option {name}={value!r} is invalid: expected a number >= {minimum}")
    return float(value)
