"""Partial FC's class sampling: every positive of the batch plus a uniform draw of the other classes of a shard.

With sample rate r, a shard of C_local classes keeps ⌈r·C_local⌉ of them per step (more when the batch has more
distinct positives there: a positive is never dropped). The kept classes stay in class order, so the class pass
over them is the unsampled pass over a smaller W. Sampled-out classes are not negatives this step and get
exactly zero gradient; the draw uses the global torch generator of the weight's device, which checkpoints save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from marginface.errors import ConfigError


@dataclass
class ClassSample:
    """The classes kept this step: their shard-local ids (sorted) and each row's target among them (−1: elsewhere)."""

    index: Tensor | None  # None when every class is kept (r = 1, or a shard too small to sample)
    labels: Tensor


def check_sample_rate(engine: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"engine {engine!r}: option sample_rate={value!r} is invalid: expected a number in (0, 1]")
    return float(value)


def sample_size(num_local: int, sample_rate: float) -> int:
    """Classes kept per step from a shard of ``num_local`` (before positives beyond it are added)."""
    return min(num_local, max(1, math.ceil(sample_rate * num_local)))


def sample_classes(local_labels: Tensor, num_local: int, sample_rate: float) -> ClassSample:
    """Keep every class that is a target in ``local_labels`` (−1: not in this shard) and fill up to the sample
    size with a uniform draw of the others; return the kept ids and the labels renumbered among them."""
    keep = sample_size(num_local, sample_rate)
    if keep >= num_local:
        return ClassSample(None, local_labels)
    device = local_labels.device
    inside = local_labels >= 0
    hits = torch.zeros(num_local, device=device).index_add_(0, local_labels.clamp_min(0), inside.float())
    positive = hits > 0
    # positives score 2, above every uniform draw in [0, 1): the top scores are the positives, then a uniform
    # random subset of the rest
    scores = torch.where(positive, torch.full_like(hits, 2.0), torch.rand(num_local, device=device))
    keep = max(keep, int(positive.sum()))  # the only host sync: how many positives this shard holds
    index = scores.topk(keep, sorted=False).indices.sort().values
    renumber = torch.full((num_local,), -1, dtype=torch.long, device=device)
    renumber[index] = torch.arange(keep, device=device)
    labels = torch.where(inside, renumber[local_labels.clamp_min(0)], local_labels)
    return ClassSample(index, labels)


class GradientBuffer:
    r"""The [C_local, D] gradient of W that a sampling engine reuses between steps: zero outside the kept rows.

        ∂L/∂W[c] = ∂L/∂W_kept[k]  where index[k] = c,   0 for every class not kept.

    A sampled step writes only its kept rows after clearing last step's, instead of allocating and zero-filling a
    fresh [C_local, D] tensor (which on CPU costs more than the draw and the head's epilogue together;
    docs/benchmarks.md, C3). The gradient handed to autograd shares the buffer's memory (W.grad adopts it), so
    the buffer is reused only once nothing outside it still refers to that memory: after ``zero_grad`` (set to
    None, the trainer's habit) the next step writes in place; while last step's gradient is still held (kept by
    the caller, or W.grad not cleared) a fresh one is allocated. When W already holds a gradient (accumulation
    over several backwards) or a graph of the gradient is being built, the fresh zero tensor is what autograd
    adds, so accumulating into ``W.grad`` stays exact.
    """

    def __init__(self) -> None:
        self.full: Tensor | None = None
        self.rows: Tensor | None = None  # the rows holding last step's values

    def begin(self, weight: Tensor, rows: Tensor) -> Tensor:
        """A [C_local, D] gradient, zero everywhere; the caller writes the rows ``rows``."""
        if weight.grad is not None or torch.is_grad_enabled():
            return torch.zeros_like(weight)
        full = self.full
        if full is None or full.shape != weight.shape or full.dtype != weight.dtype or full.device != weight.device \
                or not only_reference(full):
            full = self.full = torch.zeros_like(weight)
        elif self.rows is not None:
            full.index_fill_(0, self.rows, 0)
        self.rows = rows
        return full.view_as(full)  # a fresh tensor on the same memory, which autograd adopts as W.grad


def only_reference(tensor: Tensor) -> bool:
    """Whether ``tensor`` is the only tensor on its memory (no gradient handed out from it is alive any more)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the counter: never reuse (always exact, only slower)
        return False
    storage = tensor.untyped_storage()
    return use_count(storage._cdata) <= 2  # the tensor and the ``storage`` object just made
