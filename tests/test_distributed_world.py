"""World's tensor gather (the step's only gather): rank order, shapes and dtypes on a real two-rank gloo group."""

from __future__ import annotations

import torch

from distributed_helpers import run_ranks
from marginface.train.distributed import World


def _gather_indices(rank: int, world: int) -> list[list[int]]:
    indices = torch.arange(4, dtype=torch.int64) + 100 * rank
    gathered = World(rank=rank, world_size=world).gather_equal(indices)
    assert gathered.shape == (world, 4) and gathered.dtype == torch.int64
    return gathered.tolist()


def test_gather_equal_stacks_every_rank_in_rank_order() -> None:
    results = run_ranks(_gather_indices, 3)
    expected = [[0, 1, 2, 3], [100, 101, 102, 103], [200, 201, 202, 203]]
    assert results == [expected] * 3


def test_gather_equal_on_one_process_adds_the_rank_axis() -> None:
    value = torch.tensor([0.25, 0.5], dtype=torch.float64)
    gathered = World().gather_equal(value)
    assert gathered.shape == (1, 2) and gathered.tolist() == [[0.25, 0.5]]
