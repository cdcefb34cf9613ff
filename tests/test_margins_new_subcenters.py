"""Sub-center heads (K centres per class, cos θ_j = max_k) for any margin, equal on every engine to a float64
reference that takes the max over an explicit [B, C, K] cosine tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import marginface as mf
from distributed_helpers import run_ranks
from marginface import engines
from marginface.errors import ConfigError

ROWS, CLASSES, DIM, K = 6, 23, 5, 3
NAMES = ["arcface", "curricularface", "npcface", "adacos", "magface", "sphereface"]
ENGINES = [("dense", {}), ("chunked", {"chunk_size": 7, "keep_mb": 0.0}), ("chunked", {"chunk_size": 4}),
           ("partial", {"sample_rate": 1.0, "chunk_size": 5})]


def data(seed=0, rows=ROWS):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES * K, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    chosen = torch.randint(0, K, (rows,), generator=generator)  # near one sub-centre of its class
    x = weight[labels * K + chosen] + 0.5 * torch.randn(rows, DIM, generator=generator, dtype=torch.float64)
    return x * (1.0 + 20.0 * torch.rand(rows, 1, generator=generator, dtype=torch.float64)), weight, labels


def reference_loss(margin, x, weight, labels):
    """The margin's dense reference on cos_j = max_k ŵ_{j,k}ᵀx̂ built as an explicit [B, C, K] tensor."""
    cos = torch.einsum("bd,ckd->bck", F.normalize(x, dim=1), F.normalize(weight, dim=1).view(CLASSES, K, DIM))
    return margin.reference_loss(cos.amax(2), labels, norms=x.norm(dim=1))


def steps(run, name, x, weight, labels, count=2):
    margin = mf.margins.create(name).double().train()
    out = []
    for _ in range(count):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = run(margin, xs, ws)
        out.append((loss.detach(), *torch.autograd.grad(loss, [xs, ws])))
    return out, margin.state_dict()


def assert_same(expected, actual, label):
    (e_steps, e_state), (a_steps, a_state) = expected, actual
    for step, (e, a) in enumerate(zip(e_steps, a_steps, strict=True)):
        for what, ev, av in zip(("loss", "dx", "dW"), e, a, strict=True):
            error = float((av - ev).abs().max() / ev.abs().max().clamp_min(1e-30))
            assert error <= 1e-9, f"{label} step {step}: {what} differs by {error:.2e}"
    for key in e_state:
        torch.testing.assert_close(a_state[key], e_state[key], rtol=1e-10, atol=0, msg=f"{label}: state {key}")


@pytest.mark.parametrize("name", NAMES)
def test_every_engine_equals_the_reference_with_subcenters(name):
    x, weight, labels = data()
    expected = steps(lambda m, xs, ws: reference_loss(m, xs, ws, labels), name, x, weight, labels)
    for engine_name, options in ENGINES:
        engine = engines.create(engine_name, **options)
        actual = steps(lambda m, xs, ws, engine=engine: engine.loss(m, xs, ws, labels, subcenters=K),
                       name, x, weight, labels)
        assert_same(expected, actual, f"{name} on {engine_name} {options}")


def test_only_the_nearest_subcentre_gets_a_gradient():
    x, weight, labels = data(seed=1)
    ws = weight.clone().requires_grad_(True)
    engines.create("chunked", chunk_size=4).loss(mf.margins.create("arcface").double(), x, ws, labels,
                                                 subcenters=K).backward()
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    nearest = cos.view(ROWS, CLASSES, K).argmax(2)  # [B, C]
    touched = torch.zeros(CLASSES * K, dtype=torch.bool)
    touched[(torch.arange(CLASSES) * K + nearest).reshape(-1)] = True
    assert torch.count_nonzero(ws.grad[~touched]) == 0
    assert (ws.grad[touched].abs().sum(1) > 0).all()


def test_one_subcentre_is_the_plain_head():
    torch.manual_seed(0)
    plain = mf.heads.create("arcface", num_classes=CLASSES, embedding_size=DIM).double()
    torch.manual_seed(0)
    single = mf.heads.create("arcface", num_classes=CLASSES, embedding_size=DIM, subcenters=1).double()
    x, _, labels = data()
    assert torch.equal(plain(x, labels), single(x, labels))


def test_head_layout_and_logits():
    head = mf.heads.create("cosface", num_classes=CLASSES, embedding_size=DIM, subcenters=K, engine="chunked").double()
    assert head.weight.shape == (CLASSES * K, DIM)
    x, _, labels = data()
    cos = (F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()).view(ROWS, CLASSES, K).amax(2)
    torch.testing.assert_close(head.get_logits(x), head.margin.s * cos)
    with_margin = head.get_logits(x, labels)
    torch.testing.assert_close(with_margin.gather(1, labels[:, None])[:, 0] / head.margin.s,
                               cos.gather(1, labels[:, None])[:, 0].detach() - 0.35)
    loss = head(x, labels)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True])
def test_bad_subcenters_is_a_config_error(value):
    with pytest.raises(ConfigError, match="subcenters"):
        mf.heads.create("arcface", num_classes=10, embedding_size=4, subcenters=value)
    with pytest.raises(ConfigError, match="subcenters"):
        mf.heads.create("softmax", num_classes=10, embedding_size=4, subcenters=3)


def sharded_worker(rank, world, names):
    x, weight, labels = data(rows=ROWS * world)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    out = {}
    for name in names:
        engine = engines.create("sharded", chunk_size=3)
        shard = engine.shard(CLASSES)
        local_w = weight[shard.start * K : shard.stop * K]
        out[name] = (steps(lambda m, xs, ws, engine=engine: engine.loss(m, xs, ws, labels[rows], subcenters=K),
                           name, x[rows], local_w, labels[rows]), shard)
    return out


def test_sharded_on_two_ranks_equals_the_reference_with_subcenters():
    world = 2
    per_rank = run_ranks(sharded_worker, world, NAMES)
    x, weight, labels = data(rows=ROWS * world)
    for name in NAMES:
        e_steps, e_state = steps(lambda m, xs, ws: reference_loss(m, xs, ws, labels), name, x, weight, labels)
        for rank, results in enumerate(per_rank):
            actual, shard = results[name]
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            expected = ([(loss, dx[rows], dw[shard.start * K : shard.stop * K]) for loss, dx, dw in e_steps], e_state)
            assert_same(expected, actual, f"{name} rank {rank}")


def test_partial_fc_keeps_every_subcentre_of_a_kept_class():
    from marginface.engines.sampling import sample_classes

    x, weight, labels = data(seed=4, rows=8)
    torch.manual_seed(11)
    (p_steps, _) = steps(lambda m, xs, ws: engines.create("partial", sample_rate=0.3, chunk_size=4).loss(
        m, xs, ws, labels, subcenters=K), "arcface", x, weight, labels, count=1)
    torch.manual_seed(11)
    kept = sample_classes(labels, CLASSES, 0.3).index
    renumber = {int(c): i for i, c in enumerate(kept)}
    sub_labels = torch.tensor([renumber[int(y)] for y in labels])
    kept_rows = (kept[:, None] * K + torch.arange(K)).reshape(-1)
    (d_steps, _) = steps(lambda m, xs, ws: engines.create("dense").loss(m, xs, ws, sub_labels, subcenters=K),
                         "arcface", x, weight[kept_rows], sub_labels, count=1)
    (loss_p, dx_p, dw_p), (loss_d, dx_d, dw_d) = p_steps[0], d_steps[0]
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx_p, dx_d, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dw_p[kept_rows], dw_d, rtol=1e-10, atol=1e-14)
    dropped = torch.ones(CLASSES * K, dtype=torch.bool)
    dropped[kept_rows] = False
    assert torch.count_nonzero(dw_p[dropped]) == 0
