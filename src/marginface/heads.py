"""Heads: class centres + a margin + an engine, as drop-in loss modules (`loss = head(embeddings, labels)`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginface import engines, margins
from marginface.engines.base import BatchReduce
from marginface.engines.dense import cosine_matrix
from marginface.errors import ConfigError


class MarginHead(nn.Module):
    """A margin-softmax classifier: ``weight`` [num_classes, embedding_size] holds the class centres.

    ``subcenters`` K > 1 (Sub-center ArcFace, for any margin): ``weight`` is [num_classes·K, embedding_size],
    row j·K + k is sub-centre k of class j, and a class's cosine is the largest of its K (on every engine).

    ``forward(embeddings, labels)`` returns the mean cross-entropy of the margin logits;
    ``get_logits(embeddings)`` returns s·cos θ (no margin: what the classifier predicts), or the margin logits
    when ``labels`` are given. ``batch_reduce`` (set by a data-parallel trainer) all-reduces the margin's batch
    statistics, so CurricularFace's t is the same on every rank.
    """

    def __init__(
        self,
        margin: margins.Margin,
        num_classes: int,
        embedding_size: int,
        engine: str | engines.Engine | None = None,
        engine_params: dict[str, Any] | None = None,
        subcenters: int = 1,
    ):
        super().__init__()
        check_size("num_classes", num_classes, minimum=2)
        check_size("embedding_size", embedding_size, minimum=1)
        self.subcenters = check_size("subcenters", subcenters, minimum=1)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin = margin
        self.engine = engines.resolve(engine, engine_params)
        # The class ids whose centres this process holds (all of them, except under the sharded engine).
        self.class_range: range = self.engine.shard(num_classes)
        k = subcenters
        self.weight = nn.Parameter(torch.empty(len(self.class_range) * k, embedding_size))
        # the K rows of a class are drawn as rows j·K … j·K + K − 1 of a (C·K)-row classifier: any sharding of
        # the classes holds what one process would
        centre_rows = range(self.class_range.start * k, self.class_range.stop * k)
        init_class_centres(self.weight, centre_rows, num_classes * k, seed=int(torch.randint(2**62, ())))
        margin.set_num_classes(num_classes)  # AdaCos's initial s is in the state_dict from the start
        if margin.uses_generator:  # ElasticFace's draws: seeded by the global generator (the training seed)
            margin.seed_generator(int(torch.randint(2**62, ())))
        self.batch_reduce: BatchReduce | None = None
        # Set record_statistics to have the next forward fill last_statistics (hard-negative fraction, mean
        # margin, t) for training reports; off by default because it costs a pass over the logits.
        self.record_statistics = False
        self.last_statistics: dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check_inputs(embeddings, labels)
        statistics: dict[str, float] | None = {} if self.record_statistics else None
        loss = self.engine.loss(self.margin, embeddings, self.weight, labels, self.batch_reduce, statistics,
                                subcenters=self.subcenters)
        if statistics is not None:
            self.last_statistics = statistics
        return loss

    def get_logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None:
            self._check_inputs(embeddings, labels)
            return self.engine.logits(self.margin, embeddings, self.weight, labels, self.batch_reduce,
                                      subcenters=self.subcenters)
        cos = cosine_matrix(embeddings.float() if embeddings.dtype != torch.float64 else embeddings, self.weight,
                            self.subcenters)
        return cos * (self.margin.row_scale(embeddings.norm(dim=1)) if self.margin.needs_norms else self.margin.s)

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape [batch, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must have shape [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        self.engine.check_labels(labels, self.num_classes)

    def extra_repr(self) -> str:
        shard = "" if len(self.class_range) == self.num_classes else f", class_range={self.class_range}"
        subcenters = "" if self.subcenters == 1 else f", subcenters={self.subcenters}"
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"engine={self.engine.name}{shard}{subcenters}")


# Class centres are drawn block by block, each block from its own seed: any sharding of the classes over
# processes then holds exactly the rows one process would have drawn, so N ranks start from the same W as one.
INIT_BLOCK = 2**14


def init_class_centres(
    weight: Tensor, class_range: range, num_classes: int, seed: int, std: float = 0.01
) -> None:
    """N(0, std²) centres for the classes ``class_range`` of ``num_classes`` (only directions matter: they are
    normalised), the same rows whichever process holds them."""
    rows_per_block = min(INIT_BLOCK, num_classes)
    with torch.no_grad():
        first, last = class_range.start // rows_per_block, (class_range.stop - 1) // rows_per_block
        for block in range(first, last + 1):
            generator = torch.Generator().manual_seed((seed + block * 1_000_003) % 2**63)
            values = torch.randn(rows_per_block, weight.shape[1], generator=generator, dtype=torch.float32)
            start, stop = block * rows_per_block, (block + 1) * rows_per_block
            low, high = max(start, class_range.start), min(stop, class_range.stop)
            if low < high:
                rows = values[low - start : high - start].mul_(std)
                weight[low - class_range.start : high - class_range.start].copy_(rows)


class SoftmaxHead(nn.Module):
    """The plain softmax baseline: a linear layer with bias on unnormalised embeddings, then cross-entropy."""

    def __init__(self, num_classes: int, embedding_size: int, bias: bool = True):
        super().__init__()
        check_size("num_classes", num_classes, minimum=2)
        check_size("embedding_size", embedding_size, minimum=1)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.linear = nn.Linear(embedding_size, num_classes, bias=bias)
        nn.init.xavier_uniform_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.get_logits(embeddings), labels.long())

    def get_logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.linear(embeddings.to(self.linear.weight.dtype))


def available() -> list[str]:
    """Every head name: "softmax" and one per margin."""
    return ["softmax", *margins.available()]


def canonical_name(name: Any) -> str:
    """The head name as registered: "softmax", or the margin's own name (case and `-`/`_` do not matter)."""
    from marginface.margins.registry import normalise_name

    key = normalise_name(name) if isinstance(name, str) else None
    if key == "softmax":
        return key
    if key not in margins.available():
        raise ConfigError(f"unknown head {name!r}: expected one of {', '.join(available())}")
    return key


def create(
    name: str,
    num_classes: int,
    embedding_size: int,
    engine: str | engines.Engine | None = None,
    engine_params: dict[str, Any] | None = None,
    subcenters: int = 1,
    **margin_params: Any,
):
    """Create a head: the margin ``name`` with ``margin_params`` on ``num_classes`` class centres.

    ``engine`` is an engine name (with ``engine_params``) or an Engine object; None picks
    ``engines.DEFAULT_ENGINE``. ``subcenters`` K: K centres per class (Sub-center ArcFace) for any margin.
    The softmax baseline is a plain linear layer and takes no engine.
    """
    name = canonical_name(name)
    if name == "softmax" and subcenters != 1:
        raise ConfigError(f"head 'softmax' is a plain linear layer: subcenters={subcenters!r} needs a margin head")
    if name == "softmax":
        if margin_params.keys() - {"bias"}:
            raise ConfigError(
                f"head 'softmax' has no parameter {', '.join(sorted(margin_params.keys() - {'bias'}))}: "
                "its only parameter is bias"
            )
        if engine not in (None, engines.AUTO, "dense") or engine_params:
            raise ConfigError(
                f"head 'softmax' is a plain linear layer on the dense engine: got engine={engine!r}"
                + (f" with engine_params={engine_params!r}" if engine_params else "")
            )
        return SoftmaxHead(num_classes, embedding_size, **margin_params)
    if name not in margins.available():
        raise ConfigError(f"unknown head {name!r}: expected one of {', '.join(available())}")
    margin = margins.create(name, **margin_params)
    return MarginHead(margin, num_classes, embedding_size, engine=engine, engine_params=engine_params,
                      subcenters=subcenters)


def check_size(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected an integer >= {minimum}")
    return value
