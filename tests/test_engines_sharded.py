"""The sharded and partial engines: on 1, 2 and 3 gloo processes they equal one process holding all of W."""

from __future__ import annotations

import math

import pytest
import torch

import marginface as mf
from distributed_helpers import run_ranks
from marginface import engines
from marginface.engines.sampling import sample_classes, sample_size
from marginface.errors import ConfigError
from test_engines import ALL_MARGINS, ROWS, assert_same, data, run


# -- one process ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MARGINS)
def test_partial_at_rate_one_and_sharded_alone_equal_dense(name):
    x, weight, labels = data()
    dense = run(engines.create("dense"), name, x, weight, labels)
    for engine in (engines.create("partial", sample_rate=1.0, chunk_size=4), engines.create("sharded")):
        assert_same(dense, run(engine, name, x, weight, labels), 1e-9, f"{name} on {engine.name}")


@pytest.mark.parametrize("name", ["arcface", "curricularface", "npcface", "mv_softmax", "sphereface", "am_lfs"])
def test_partial_equals_dense_on_the_kept_classes_and_leaves_the_rest_untouched(name):
    x, weight, labels = data(rows=8, classes=40, seed=4)
    engine = engines.create("partial", sample_rate=0.3, chunk_size=5)
    torch.manual_seed(11)
    partial = run(engine, name, x, weight, labels, steps=1)
    torch.manual_seed(11)
    kept = sample_classes(labels, 40, 0.3).index
    assert set(labels.tolist()) <= set(kept.tolist()), "a positive was sampled out"
    assert len(kept) == max(sample_size(40, 0.3), len(set(labels.tolist())))
    renumber = {int(c): i for i, c in enumerate(kept)}
    sub_labels = torch.tensor([renumber[int(y)] for y in labels])
    (loss_d, gx_d, gw_d, _), = run(engines.create("dense"), name, x, weight[kept], sub_labels, steps=1)[0]
    (loss_p, gx_p, gw_p, _), = partial[0]
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx_p, gx_d, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw_p[kept], gw_d, rtol=1e-10, atol=1e-14)
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[kept] = False
    assert torch.count_nonzero(gw_p[dropped]) == 0, "a sampled-out class got a gradient"


def dense_on_kept(name, x, weight, labels, kept):
    """dW of the dense engine on the kept classes only, scattered back to all of W (float64 reference)."""
    renumber = {int(c): i for i, c in enumerate(kept)}
    sub = weight.detach()[kept].clone().requires_grad_(True)
    loss = engines.create("dense").loss(mf.margins.create(name).double(), x, sub,
                                        torch.tensor([renumber[int(y)] for y in labels]))
    full = torch.zeros_like(weight)
    full[kept] = torch.autograd.grad(loss, sub)[0]
    return full


@pytest.mark.parametrize("name", ["arcface", "npcface"])
def test_partial_gradient_buffer_is_reused_exactly_across_steps(name):
    """The trainer's habit (W.grad set to None each step, one W): each step's dW equals a fresh dense reference,
    rows kept only last step are cleared, a gradient the caller still holds is never overwritten, and two
    backwards without clearing add up."""
    x, weight, labels = data(rows=6, classes=60, seed=2)
    weight = weight.clone().requires_grad_(True)
    engine = engines.create("partial", sample_rate=0.2, chunk_size=7)
    grads, kept_sets = [], []
    for step in range(3):
        torch.manual_seed(100 + step)
        kept_sets.append(sample_classes(labels, 60, 0.2).index)
        torch.manual_seed(100 + step)
        weight.grad = None
        engine.loss(mf.margins.create(name).double(), x, weight, labels).backward()
        expected = dense_on_kept(name, x, weight, labels, kept_sets[-1])
        torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-14)
        grads.append((weight.grad, weight.grad.clone()))
        if step == 0:
            weight.grad = None  # steps 1 and 2 run with nothing held: the buffer is written in place
            grads.pop()
    assert len(set(kept_sets[1].tolist()) ^ set(kept_sets[2].tolist())) > 0, "the draws should differ"
    held, copy = grads[0]
    assert torch.equal(held, copy), "a gradient still held by the caller was overwritten by the next step"
    # accumulation: two backwards into one W.grad
    weight.grad = None
    for step in (0, 1):
        torch.manual_seed(100 + step)
        engine.loss(mf.margins.create(name).double(), x, weight, labels).backward()
    total = sum(dense_on_kept(name, x, weight, labels, kept_sets[step]) for step in (0, 1))
    torch.testing.assert_close(weight.grad, total, rtol=1e-10, atol=1e-14)


def test_sampling_keeps_positives_and_draws_the_rest_uniformly():
    torch.manual_seed(0)
    labels = torch.tensor([3, 3, 7, -1, 19])  # −1: a target in another shard
    counts = torch.zeros(20)
    for _ in range(3000):
        sample = sample_classes(labels, 20, 0.25)
        index = sample.index
        assert len(index) == 5 and torch.all(index[1:] > index[:-1]), "kept classes stay sorted and distinct"
        assert {3, 7, 19} <= set(index.tolist())
        expected = torch.tensor([index.tolist().index(y) if y >= 0 else -1 for y in labels.tolist()])
        assert torch.equal(sample.labels, expected)
        counts[index] += 1
    others = torch.tensor([c for c in range(20) if c not in (3, 7, 19)])
    # 2 of the 17 others per draw: each is kept with probability 2/17; 3000 draws give a 1.1% standard error
    rate = counts[others] / 3000
    assert torch.all((rate - 2 / 17).abs() < 0.035), rate
    many = torch.arange(12)  # more positives than the sample size: all kept
    assert len(sample_classes(many, 20, 0.25).index) == 12
    assert sample_classes(labels, 20, 1.0).index is None


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, "half", True])
def test_a_sample_rate_outside_zero_one_is_a_config_error(rate):
    for name in ("partial", "sharded"):
        with pytest.raises(ConfigError, match="sample_rate"):
            engines.create(name, sample_rate=rate)


def test_shards_are_contiguous_and_uneven_splits_are_allowed():
    ranges = [engines.shard_range(1013, rank, 3) for rank in range(3)]
    assert [len(r) for r in ranges] == [337, 338, 338]
    assert ranges[0].start == 0 and ranges[-1].stop == 1013
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))


def test_a_head_holds_the_same_centres_whatever_the_sharding():
    torch.manual_seed(3)
    full = mf.heads.create("arcface", num_classes=40_000, embedding_size=4).weight
    for world in (2, 3):
        parts = []
        for rank in range(world):
            torch.manual_seed(3)
            engine = engines.create("sharded")
            engine.shard = lambda n, rank=rank, world=world: engines.shard_range(n, rank, world)
            head = mf.heads.create("arcface", num_classes=40_000, embedding_size=4, engine=engine)
            parts.append(head.weight)
        assert torch.equal(torch.cat(parts), full)
    assert float(full.detach().std()) == pytest.approx(0.01, rel=0.02)


# -- several processes ----------------------------------------------------------------------------------------
def equality_worker(rank, world, names, classes, sample_rate, steps):
    """Each rank: its rows of the global batch and its shard of W, through the sharded engine."""
    x, weight, labels = data(rows=ROWS * world, classes=classes)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    out = {}
    for name in names:
        engine = engines.create("sharded", sample_rate=sample_rate, chunk_size=3)
        shard = engine.shard(classes)
        local_x, local_w = x[rows], weight[shard.start : shard.stop]
        torch.manual_seed(100 + rank)
        results = run(engine, name, local_x, local_w, labels[rows], steps=steps)
        kept = []
        if sample_rate < 1:  # the draw the engine made, replayed from the same generator state
            torch.manual_seed(100 + rank)
            for _ in range(steps):
                local = torch.where((labels >= shard.start) & (labels < shard.stop), labels - shard.start, -1)
                kept.append(sample_classes(local, len(shard), sample_rate).index + shard.start)
        out[name] = (results, shard, kept)
    return out


@pytest.mark.parametrize("world, classes", [(2, 23), (3, 23)])
def test_sharded_equals_one_process_with_the_full_classifier_for_every_margin(world, classes):
    """Loss (the same on every rank), each rank's dX rows and dW shard, statistics and state after 2 steps."""
    per_rank = run_ranks(equality_worker, world, ALL_MARGINS, classes, 1.0, 2)
    x, weight, labels = data(rows=ROWS * world, classes=classes)
    for name in ALL_MARGINS:
        dense_steps, dense_state = run(engines.create("dense"), name, x, weight, labels)
        for rank, results in enumerate(per_rank):
            (steps, state), shard, _ = results[name]
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            expected = [(loss, gx[rows], gw[shard.start : shard.stop], stats)
                        for loss, gx, gw, stats in dense_steps]
            assert_same((expected, dense_state), (steps, state), 1e-9, f"{name} rank {rank} of {world}")


def test_partial_fc_on_shards_equals_dense_on_the_kept_classes():
    world, classes = 2, 23
    names = ["arcface", "curricularface", "npcface", "sphereface"]
    per_rank = run_ranks(equality_worker, world, names, classes, 0.4, 1)
    x, weight, labels = data(rows=ROWS * world, classes=classes)
    for name in names:
        kept = torch.cat([results[name][2][0] for results in per_rank])
        assert set(labels.tolist()) <= set(kept.tolist())
        for results in per_rank:
            shard = results[name][1]
            assert len(results[name][2][0]) == max(math.ceil(0.4 * len(shard)),
                                                   sum(1 for y in set(labels.tolist()) if y in shard))
        renumber = {int(c): i for i, c in enumerate(kept)}
        sub_labels = torch.tensor([renumber[int(y)] for y in labels])
        (loss_d, gx_d, gw_d, _), = run(engines.create("dense"), name, x, weight[kept], sub_labels, steps=1)[0]
        offset = 0
        for rank, results in enumerate(per_rank):
            ((loss, gx, gw, _),), _ = results[name][0]
            shard, local_kept = results[name][1], results[name][2][0]
            torch.testing.assert_close(loss, loss_d, rtol=1e-12, atol=0)
            torch.testing.assert_close(gx, gx_d[rank * ROWS : (rank + 1) * ROWS], rtol=1e-9, atol=1e-13)
            rows = local_kept - shard.start
            torch.testing.assert_close(gw[rows], gw_d[offset : offset + len(rows)], rtol=1e-9, atol=1e-13)
            dropped = torch.ones(len(shard), dtype=torch.bool)
            dropped[rows] = False
            assert torch.count_nonzero(gw[dropped]) == 0
            offset += len(rows)


def bad_label_worker(rank, world):
    x, weight, labels = data(rows=ROWS * world, classes=23)
    engine = engines.create("sharded")
    shard = engine.shard(23)
    local = labels[rank * ROWS : (rank + 1) * ROWS].clone()
    if rank == 1:
        local[2] = 23
    margin = mf.margins.create("arcface").double()
    try:
        engine.loss(margin, x[rank * ROWS : (rank + 1) * ROWS], weight[shard.start : shard.stop], local)
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_bad_label_on_one_rank_fails_on_every_rank_naming_it():
    messages = run_ranks(bad_label_worker, 3, timeout=60)
    for message in messages:
        assert "label 23 on rank 1" in message and "[0, 22]" in message, message


def too_many_ranks_worker(rank, world):
    try:
        mf.heads.create("arcface", num_classes=2, embedding_size=4, engine="sharded")
    except ConfigError as error:
        return str(error)
    return "no error"


def test_more_ranks_than_classes_is_a_config_error():
    for message in run_ranks(too_many_ranks_worker, 3, timeout=60):
        assert "3 ranks cannot share 2 classes" in message
