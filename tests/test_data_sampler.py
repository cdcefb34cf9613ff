"""DistributedIdentitySampler: partition across ranks, per-epoch reshuffle, exact mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from marginface.data import DistributedIdentitySampler
from marginface.errors import ConfigError


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_partition_the_epoch(world_size, drop_last):
    n = 103
    shares = [
        list(DistributedIdentitySampler(n, seed=5, rank=r, world_size=world_size, drop_last=drop_last))
        for r in range(world_size)
    ]
    assert len({len(s) for s in shares}) == 1
    merged = [i for s in shares for i in s]
    if drop_last:
        assert len(shares[0]) == n // world_size
        assert len(set(merged)) == len(merged)  # no overlap
        assert set(merged) <= set(range(n)) and len(merged) == n - n % world_size
    else:
        assert len(shares[0]) == -(-n // world_size)
        assert set(merged) == set(range(n))  # every index seen; padding repeats at most world_size-1
        assert len(merged) - n < world_size


def test_reshuffles_per_epoch_and_is_reproducible():
    a = DistributedIdentitySampler(50, seed=1)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    b = DistributedIdentitySampler(50, seed=1)
    b.set_epoch(1)
    assert list(b) == second
    c = DistributedIdentitySampler(50, seed=2)
    assert list(c) != first


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(world_size):
    n, batch = 97, 4
    for rank in range(world_size):
        run = DistributedIdentitySampler(n, seed=7, rank=rank, world_size=world_size)
        run.set_epoch(2)
        full = list(run)
        seen = []
        it = iter(run)
        for _ in range(5):  # train 5 batches, then "crash"
            seen.extend(next(it) for _ in range(batch))
            run.advance(batch)
        state = run.state_dict()
        assert state["epoch"] == 2 and state["offset"] == 5 * batch and state["seed"] == 7
        resumed = DistributedIdentitySampler(n, seed=7, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert seen + rest == full
        assert len(resumed) == len(rest)


def test_resume_with_a_different_world_size_covers_the_remainder():
    n = 120
    old = [DistributedIdentitySampler(n, seed=3, rank=r, world_size=4) for r in range(4)]
    seen = []
    for sampler in old:
        seen.extend(list(sampler)[:10])
        sampler.advance(10)
    state = old[0].state_dict()
    new = [DistributedIdentitySampler(n, seed=3, rank=r, world_size=3) for r in range(3)]
    rest = []
    for sampler in new:
        sampler.load_state_dict(state)
        rest.extend(sampler)
    assert len(set(seen)) == 40 and set(seen).isdisjoint(rest) and len(set(rest)) == len(rest)
    # drop_last: only the tail that 3 ranks cannot share evenly (80 % 3 = 2 indices) is left out
    assert len(rest) == 78 and len(set(range(n)) - set(seen) - set(rest)) == 2


def test_new_epoch_resets_position():
    s = DistributedIdentitySampler(10, seed=0)
    s.advance(4)
    assert len(s) == 6 and s.epoch_length == 10
    s.set_epoch(1)
    assert len(s) == 10 and s.offset == 0


def test_mismatched_state_rejected():
    s = DistributedIdentitySampler(10, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        s.load_state_dict({"epoch": 0, "offset": 0, "seed": 1, "num_samples": 10})


def test_works_in_a_dataloader():
    data = TensorDataset(torch.arange(30))
    sampler = DistributedIdentitySampler(30, seed=0, rank=1, world_size=2)
    got = torch.cat([b[0] for b in DataLoader(data, batch_size=4, sampler=sampler)]).tolist()
    assert got == list(sampler) and len(got) == 15


def test_defaults_without_torch_distributed():
    s = DistributedIdentitySampler(8, seed=0)
    assert (s.rank, s.world_size) == (0, 1)
    assert np.array_equal(np.sort(list(s)), np.arange(8))
