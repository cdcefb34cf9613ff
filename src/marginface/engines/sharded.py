"""The sharded engine: the class centres split over the ranks of a process group (model parallel), and Partial FC.

Rank r of N holds the contiguous classes ``shard_range(C, r, N)`` only. A step gathers the batch, streams the
local classes as the chunked engine does, and all-reduces what the margin needs, so the loss and every gradient
are those of one process holding all of W on the gathered batch. ``partial`` is the same engine on one process:
Partial FC's class sampling without a process group. The collectives are torch.distributed's (gloo and NCCL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from marginface.engines.base import ClassPass, margin_loss
from marginface.engines.chunked import DEFAULT_KEEP_MB, ChunkedEngine
from marginface.engines.sampling import GradientBuffer, check_sample_rate, sample_classes
from marginface.errors import ConfigError
from marginface.margins.base import BatchReduce, Margin, RowContext


def shard_range(num_classes: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous classes: sizes differ by at most one (1,013 classes on 3 ranks: 337, 338, 338)."""
    return range(num_classes * rank // world_size, num_classes * (rank + 1) // world_size)


def process_group_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEngine(ChunkedEngine):
    r"""Classes sharded over the ranks; ``sample_rate`` < 1 adds Partial FC. Its math, per step:

    Every rank all-gathers the batch (X [N·B, D], labels), so each works on the global batch; rank r holds W_r.
    With the target partials p_r,i = cos θ_{y_i} where y_i ∈ W_r (0 elsewhere) and the local pass of the chunked
    engine L_r,i = log Σ_{j∈W_r, j≠y_i} e^{s·N(c_ij)} (−∞ for a shard with no negative of row i):

        cos θ_y = Σ_r p_r                              (all-reduce sum, before the pass: the margin's t, τ, …)
        L = M + log Σ_r e^{L_r − M},  M = max_r L_r     (all-reduce max, then sum)

    and the margin's row statistics are all-reduced with their declared reductions (sum, max, logsumexp: max then
    sum); the hard-negative counts are summed. Everything after that is computed alike on every rank, so the
    loss is the same number everywhere, the mean over the N·B rows. Backward needs no collective inside the head:
    ∂L/∂L_r = e^{L_r − L} and ∂(cos θ_y)/∂p_r = 1 reach each rank's own classes; a quantity all ranks compute
    alike from X itself (the feature norm that SphereFace uses as its scale) sends its gradient from rank 0 only
    (``count_once``); and the gradient of X, summed over the ranks' contributions, is reduce-scattered back to the
    rank that owns each row (``GatherBatch``). Each rank's W_r and its own embeddings then get ∂L/∂(·) of the
    global loss — what one process computes on the gathered batch with the full W.

    Partial FC: each rank keeps every class that is a target in the global batch and samples the rest of its
    shard to ⌈r·C_local⌉ (engines/sampling.py); the pass runs on the kept rows only, so sampled-out classes are
    not negatives that step and get exactly zero gradient. At r = 1 nothing is sampled.
    """

    name = "sharded"
    # Whether the engine reads the default process group; ``partial`` is the same engine on one process.
    uses_process_group = True

    def __init__(
        self, sample_rate: float = 1.0, chunk_size: int | None = None, keep_mb: float = DEFAULT_KEEP_MB
    ) -> None:
        super().__init__(chunk_size=chunk_size, keep_mb=keep_mb)
        self.sample_rate = check_sample_rate(self.name, sample_rate)
        self.num_classes: int | None = None
        self.class_range: range | None = None
        self._world = (0, 1)
        self._global_target: Tensor | None = None
        self._rows: Tensor | None = None  # this step's kept classes (Partial FC), None: all
        self._gradient = GradientBuffer()  # Partial FC's reused gradient of W

    def process(self) -> tuple[int, int]:
        return process_group_size() if self.uses_process_group else (0, 1)

    def shard(self, num_classes: int) -> range:
        rank, world = self.process()
        if world > num_classes:
            raise ConfigError(
                f"engine {self.name!r}: {world} ranks cannot share {num_classes} classes (each rank needs at least "
                "one): use fewer processes or another engine"
            )
        shard = shard_range(num_classes, rank, world)
        if self.class_range is not None and (self.num_classes, self.class_range) != (num_classes, shard):
            raise ConfigError(f"engine {self.name!r} already serves a head of {self.num_classes} classes: "
                              "give every head its own engine (pass the engine's name)")
        self.num_classes, self.class_range, self._world = num_classes, shard, (rank, world)
        return shard

    def check_labels(self, labels: Tensor, num_classes: int) -> None:
        """On one process as every engine does; across ranks in ``loss``, on the gathered labels, so that a bad
        label on one rank stops every rank."""
        if self.process()[1] == 1:
            super().check_labels(labels, num_classes)

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
        if self.class_range is None:  # used without a head: one process holding every class
            self.shard(weight.shape[0] // subcenters)
        rank, world = self._world
        if self.process() != self._world:
            raise ConfigError(f"engine {self.name!r} was set up for rank {rank} of {world}, but the process group "
                              f"is now {self.process()}: create the head inside the process group it trains in")
        if weight.shape[0] != len(self.class_range) * subcenters:
            raise ValueError(f"engine {self.name!r}: expected the {len(self.class_range) * subcenters} centres of "
                             f"classes {self.class_range.start}..{self.class_range.stop - 1} ({subcenters} per "
                             f"class), got {weight.shape[0]} rows")
        labels = labels.long()
        if world > 1:
            check_equal_batches(embeddings.shape[0], labels.device)
            embeddings = GatherBatch.apply(embeddings)
            labels = gather_labels(labels)
            batch_reduce = None  # the batch statistics are those of the gathered batch already
            check_gathered_labels(labels, self.num_classes, world)
        start, stop = self.class_range.start, self.class_range.stop
        local = torch.where((labels >= start) & (labels < stop), labels - start, -1)
        sample = sample_classes(local, len(self.class_range), self.sample_rate)
        self._rows = sample.index
        try:
            return margin_loss(self, margin, embeddings, weight, sample.labels, batch_reduce, statistics, subcenters)
        finally:
            self._rows = None

    def pass_rows(self) -> tuple[Tensor | None, GradientBuffer]:
        return self._rows, self._gradient

    # -- the hooks of margin_loss -------------------------------------------------------------------------
    def combine_targets(self, partial: Tensor) -> Tensor:
        if self._world[1] == 1:
            return partial
        total = partial.detach().clone()
        dist.all_reduce(total)
        self._global_target = total  # the class pass's differentiable target takes this value
        return total

    def count_once(self, value: Any) -> Any:
        if self._world[1] == 1 or not isinstance(value, Tensor) or self._world[0] == 0:
            return value
        return value.detach()

    def total_classes(self, weight: Tensor, subcenters: int = 1) -> int:
        return self.num_classes if self.num_classes is not None else weight.shape[0] // subcenters

    def combine_state_rows(self, stats: dict[str, Tensor], reductions: dict[str, str]) -> dict[str, Tensor]:
        if self._world[1] == 1:
            return stats
        return {key: all_reduce_row_statistic(value, reductions[key]) for key, value in stats.items()}

    def class_pass(
        self,
        margin: Margin,
        x_hat: Tensor,
        weight: Tensor,
        labels: Tensor,
        ctx: RowContext,
        scale: float | Tensor,
        count_hard_negatives: bool,
        subcenters: int = 1,
    ) -> ClassPass:
        local = super().class_pass(margin, x_hat, weight, labels, ctx, scale, count_hard_negatives, subcenters)
        local.classes = weight.shape[0] // subcenters if self._rows is None else self._rows.shape[0]
        if self._world[1] == 1:
            return local
        global_target, self._global_target = self._global_target, None
        return combine_across_ranks(local, margin, global_target)


class PartialEngine(ShardedEngine):
    """Partial FC on one process: every class on this process, ⌈sample_rate·C⌉ of them (all positives) per step."""

    name = "partial"
    uses_process_group = False

    def __init__(
        self, sample_rate: float = 0.1, chunk_size: int | None = None, keep_mb: float = DEFAULT_KEEP_MB
    ) -> None:
        super().__init__(sample_rate=sample_rate, chunk_size=chunk_size, keep_mb=keep_mb)


def combine_across_ranks(local: ClassPass, margin: Margin, global_target: Tensor) -> ClassPass:
    """The global pass from each rank's local one: two all-reduces (max, then sum) carry everything."""
    reductions = margin.row_reductions
    max_keys = [key for key, kind in reductions.items() if kind in ("max", "logsumexp")]
    sum_keys = [key for key, kind in reductions.items() if kind == "sum"]
    lse_keys = [key for key, kind in reductions.items() if kind == "logsumexp"]
    dtype = torch.float64  # counts and exp-sums of many ranks stay exact
    lse = local.negatives_lse
    maxima = torch.stack([lse.detach(), *(local.row_stats[k] for k in max_keys)]).to(dtype)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))
    exp_sums = [torch.exp(lse.detach().to(dtype) - shift[0])]
    exp_sums += [torch.exp(local.row_stats[k].to(dtype) - shift[1 + max_keys.index(k)]) for k in lse_keys]
    hard = [local.hard_count.to(dtype)] if local.hard_count is not None else []
    classes = torch.full_like(shift[0], float(local.classes))
    sums = torch.stack([*exp_sums, *(local.row_stats[k].to(dtype) for k in sum_keys), *hard, classes])
    dist.all_reduce(sums)
    total_lse = (shift[0] + sums[0].log()).to(lse.dtype)
    # value: the global log-sum-exp; gradient: e^{L_r − L} into this rank's own pass
    share = torch.exp(lse.detach() - total_lse).nan_to_num(0.0)
    negatives_lse = total_lse + (lse - lse.detach()) * share
    target_cos = local.target_cos + (global_target - local.target_cos.detach())
    stats: dict[str, Tensor] = {}
    for key in reductions:
        like = local.row_stats[key]
        if key in lse_keys:
            value = shift[1 + max_keys.index(key)] + sums[1 + lse_keys.index(key)].log()
        elif key in max_keys:
            value = maxima[1 + max_keys.index(key)]
        else:
            value = sums[len(exp_sums) + sum_keys.index(key)]
        stats[key] = value.to(like.dtype)
    hard_count = sums[-2].round().long() if hard else None
    return ClassPass(target_cos, negatives_lse, stats, hard_count, classes=sums[-1][0].round())


def all_reduce_row_statistic(value: Tensor, kind: str) -> Tensor:
    """One per-row statistic combined over the ranks by its reduction (sum, max, or logsumexp: max then sum)."""
    combined = value.to(torch.float64)
    if kind == "sum":
        dist.all_reduce(combined)
    elif kind == "max":
        dist.all_reduce(combined, op=dist.ReduceOp.MAX)
    else:
        top = combined.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.exp(combined - shift)
        dist.all_reduce(total)
        combined = shift + total.log()
    return combined.to(value.dtype)


def check_equal_batches(batch: int, device: torch.device) -> None:
    """Every rank must bring as many rows (all-gather needs equal sizes): one tiny all-reduce says so on all."""
    sizes = torch.tensor([batch, -batch], device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    largest, smallest = int(sizes[0]), -int(sizes[1])
    if largest != smallest:
        raise ValueError(f"the sharded engine needs the same batch size on every rank, got sizes from {smallest} "
                         f"to {largest} (this rank: {batch}); use drop_last batches of one size")


def gather_labels(labels: Tensor) -> Tensor:
    world = dist.get_world_size()
    gathered = labels.new_empty((world * labels.shape[0],))
    dist.all_gather_single(gathered, labels.contiguous())
    return gathered


def check_gathered_labels(labels: Tensor, num_classes: int, world: int) -> None:
    """Every rank holds the same gathered labels, so every rank raises the same error: nobody hangs."""
    bad = (labels < 0) | (labels >= num_classes)
    if labels.numel() and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        rows = labels.shape[0] // world
        raise ValueError(f"label {int(labels[first])} on rank {first // rows} (its sample {first % rows}) is "
                         f"outside [0, {num_classes - 1}] (num_classes={num_classes})")


class GatherBatch(torch.autograd.Function):
    r"""All-gather of every rank's rows [B, D] into [N·B, D] (rank order); backward reduce-scatters.

    Each rank's backward reaches the gathered rows only through its own classes, g_r = ∂L/∂X restricted to
    W_r's paths; the gradient of the global loss with respect to rank q's rows is Σ_r g_r[rows of q], which is
    exactly a reduce-scatter (sum) of the per-rank gradients.
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        world = dist.get_world_size()
        gathered = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(gathered, rows.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        world = dist.get_world_size()
        own = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_single(own, grad.contiguous())
        return own
