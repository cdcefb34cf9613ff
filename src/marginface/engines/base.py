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
from marginface.margins.base import (
    FRESH,
    BatchReduce,
    BlockScratch,
    Margin,
    RowContext,
    combine_row_statistics,
    compute_dtype,
)
from marginface.margins.mining import hard_indicator

NORM_EPS = 1e-12


def inverse_norms(weight: Tensor) -> Tensor:
    """1/‖w_c‖ per class centre: folded into the product instead of normalising a [C, D] copy."""
    # vector_norm is one fused reduction whose backward is a single pass over W (pow + sum would be three)
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS).reciprocal()


def target_cosines(x_hat: Tensor, weight: Tensor, labels: Tensor, subcenters: int = 1) -> Tensor:
    """cos θ_y per row by an indexed B·D dot product (no [B, C] work); 0 where the label is −1 (a target that
    lies in another shard). With K sub-centres (rows y·K … y·K + K − 1) the nearest one's: max_k."""
    elsewhere = labels < 0
    if subcenters == 1:
        rows = weight[labels.clamp_min(0)]
        cos = (x_hat * rows).sum(1) * inverse_norms(rows)
    else:
        index = labels.clamp_min(0)[:, None] * subcenters + torch.arange(subcenters, device=labels.device)
        rows = weight[index]  # [B, K, D]
        cos = ((x_hat[:, None, :] * rows).sum(2) * inverse_norms(rows.flatten(0, 1)).view_as(index)).amax(1)
    return torch.where(elsewhere, torch.zeros_like(cos), cos)


def class_cosines(x_hat: Tensor, centres: Tensor, subcenters: int = 1) -> Tensor:
    """cos θ_j [B, n] of n classes (their n·K centre rows): x̂Wᵀ scaled per column, then max over sub-centres."""
    cos = (x_hat @ centres.t()) * inverse_norms(centres)
    if subcenters == 1:
        return cos
    return cos.view(cos.shape[0], -1, subcenters).max(dim=2).values


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

    def total_classes(self, weight: Tensor, subcenters: int = 1) -> int:
        """The classifier's class count (every class on one process: W's rows over K sub-centres)."""
        return weight.shape[0] // subcenters

    def combine_state_rows(self, stats: dict[str, Tensor], reductions: dict[str, str]) -> dict[str, Tensor]:
        """The statistics-only pass's reductions from this process's classes to all of them (the identity)."""
        return stats

    def block_classes(self, batch: int) -> int | None:
        """Classes per block of the statistics-only pass (None: all at once)."""
        return None

    def state_pass(
        self, margin: Margin, x_hat: Tensor, weight: Tensor, labels: Tensor, target_cos: Tensor, subcenters: int = 1
    ) -> dict[str, Tensor]:
        """The margin's ``state_reductions`` over every class this step sees, with the state before its update.

        A separate pass without gradient (one GEMM per block, nothing kept), in the engine's blocking: it runs
        only for margins whose state update reads the classes (AdaCos), and only when the state moves.
        """
        rows, _ = self.pass_rows()
        classes = weight.shape[0] // subcenters if rows is None else rows.shape[0]
        block = self.block_classes(x_hat.shape[0]) or max(1, classes)
        parts = []
        with torch.no_grad():
            for start in range(0, classes, block):
                stop = min(start + block, classes)
                cos = class_cosines(x_hat, class_block(weight, rows, start, stop, subcenters), subcenters)
                target_index = block_target_index(labels, start, stop)
                parts.append(margin.state_row_statistics(cos, target_index, target_cos))
        reductions = dict(margin.state_reductions)
        return self.combine_state_rows(combine_row_statistics(parts, reductions), reductions)

    def loss(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
        statistics: dict[str, float] | None = None,
        subcenters: int = 1,
    ) -> Tensor:
        """The mean loss of ``margin`` over the batch (fp32 or fp64 whatever the input precision).

        When a ``statistics`` dict is given it is filled with what training reports follow: the fraction of hard
        negatives, the mean per-sample margin and the margin's t, where the margin has them. ``subcenters`` K:
        W holds K rows per class (j·K + k) and a class's cosine is the largest of its K.
        """
        return margin_loss(self, margin, embeddings, weight, labels, batch_reduce, statistics, subcenters)

    def logits(
        self,
        margin: Margin,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        batch_reduce: BatchReduce | None = None,
        subcenters: int = 1,
    ) -> Tensor:
        """Scaled margin logits [B, C]: materialised by definition, so every engine computes them densely."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x_hat, weight, labels, norms = full_precision_inputs(margin, embeddings, weight, labels)
            cos = class_cosines(x_hat, weight, subcenters)
            margin.set_num_classes(cos.shape[1])
            target_cos = cos.gather(1, labels[:, None])[:, 0]
            state_rows = None
            if margin.needs_state_pass():
                with torch.no_grad():
                    state_rows = margin.state_row_statistics(cos, labels, target_cos)
            margin.update_from_batch(target_cos, norms, batch_reduce, state_rows)
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
        subcenters: int = 1,
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
    subcenters: int = 1,
) -> Tensor:
    """The sequence of margins/base.py, with the engine's class pass in the middle."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x_hat, weight, labels, norms = full_precision_inputs(margin, embeddings, weight, labels)
        margin.set_num_classes(engine.total_classes(weight, subcenters))
        with torch.no_grad():
            rows, _ = engine.pass_rows()
            own_labels = labels if rows is None else rows_of(rows, labels)
            detached_target = engine.combine_targets(target_cosines(x_hat, weight, own_labels, subcenters))
            state_rows = None
            if margin.needs_state_pass():
                state_rows = engine.state_pass(margin, x_hat, weight, labels, detached_target, subcenters)
        margin.update_from_batch(detached_target, norms, batch_reduce, state_rows)
        ctx = margin.prepare(detached_target, engine.count_once(norms))
        scale = margin.row_scale(norms)
        if isinstance(scale, Tensor):
            scale = scale.reshape(-1)
        result = engine.class_pass(margin, x_hat, weight, labels, ctx, scale, statistics is not None, subcenters)
        ctx["target_cos"] = result.target_cos
        ctx = margin.finish(ctx, {**result.row_stats, "negatives_lse": result.negatives_lse})
        loss = margin.row_loss(ctx["target"] * engine.count_once(scale), result.negatives_lse, ctx).mean()
        if statistics is not None:
            classes = weight.shape[0] // subcenters if result.classes is None else result.classes
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
        if "norms" in ctx:  # margins that read the feature norm (AdaFace, MagFace): its mean and spread
            norms = ctx["norms"].detach()
            statistics["norm_mean"] = float(norms.mean())
            statistics["norm_std"] = float(norms.std()) if norms.numel() > 1 else 0.0
        t = getattr(margin, "t", None)
        if isinstance(t, Tensor):
            statistics["t"] = float(t.mean())


def count_hard(
    cos: Tensor, ctx: RowContext, target_index: Tensor, scratch: BlockScratch = FRESH
) -> Tensor | None:
    """Negatives of a block above the row's threshold (the target column excluded), or None without one."""
    if "threshold" not in ctx:
        return None
    threshold = ctx["threshold"]
    # the margins' float indicator rather than (c > T).sum(): a bool reduction is ~5x slower on CPU
    count = hard_indicator(cos, ctx, out=scratch.buffer(cos, 0)).sum(1).long()
    target_is_hard = (target_index >= 0) & (ctx["target_cos"] > threshold)
    return count - target_is_hard.long()


def block_target_index(labels: Tensor, start: int, stop: int) -> Tensor:
    """Each row's target column inside classes [start, stop), −1 where the target lies elsewhere."""
    inside = (labels >= start) & (labels < stop)
    return torch.where(inside, labels - start, -1)


def class_block(weight: Tensor, rows: Tensor | None, start: int, stop: int, subcenters: int = 1) -> Tensor:
    """Classes [start, stop) of the pass: W's own rows, or the kept rows ``rows[start:stop]`` gathered (a block
    at a time, so the kept [C_kept, D] matrix is never copied whole). With K sub-centres a class is K rows,
    j·K … j·K + K − 1."""
    if rows is None:
        return weight[start * subcenters : stop * subcenters]
    return weight[subcentre_rows(rows[start:stop], subcenters)]


def subcentre_rows(classes: Tensor, subcenters: int) -> Tensor:
    """W's row ids of the classes ``classes`` (each class's K sub-centres in order)."""
    if subcenters == 1:
        return classes
    return (classes[:, None] * subcenters + torch.arange(subcenters, device=classes.device)).reshape(-1)


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
