"""Engines: the chunked engine equals the dense one for every margin (loss, both gradients, state, statistics)."""

from __future__ import annotations

import math

import pytest
import torch

import marginface as mf
from marginface import engines
from marginface.engines.chunked import ChunkedClassPass
from marginface.errors import ConfigError
from marginface.margins.base import BlockScratch

ALL_MARGINS = mf.margins.available()
ROWS, CLASSES, DIM = 6, 23, 5  # 23 is prime: no chunk size above 1 divides it


def data(dtype=torch.float64, rows=ROWS, classes=CLASSES, dim=DIM, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # embeddings near a few centres, so that targets, hard negatives and easy ones all occur
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    x = weight[labels] * 0.8 + 0.6 * torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    x = x * (1.0 + torch.rand(rows, 1, generator=generator, dtype=torch.float64))  # unequal norms (SphereFace)
    return x.to(dtype), weight.to(dtype), labels


def run(engine, name, x, weight, labels, steps=2, training=True, params=None):
    """Loss, gradients, statistics and state after ``steps`` training steps of one fresh margin."""
    margin = mf.margins.create(name, **(params or {})).to(x.dtype)
    margin.train(training)
    results = []
    for _ in range(steps):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        statistics: dict[str, float] = {}
        loss = engine.loss(margin, xs, ws, labels, None, statistics)
        grad_x, grad_w = torch.autograd.grad(loss, [xs, ws])
        results.append((loss.detach(), grad_x, grad_w, statistics))
    state = {k: v.clone() for k, v in margin.state_dict().items()}
    return results, state


def assert_same(expected, actual, rtol, label):
    (steps_e, state_e), (steps_a, state_a) = expected, actual
    for (loss_e, gx_e, gw_e, stats_e), (loss_a, gx_a, gw_a, stats_a) in zip(steps_e, steps_a, strict=True):
        for what, e, a in (("loss", loss_e, loss_a), ("dx", gx_e, gx_a), ("dW", gw_e, gw_a)):
            scale = e.abs().max().clamp_min(1e-30)
            error = float((a - e).abs().max() / scale)
            assert error <= rtol, f"{label}: {what} differs by {error:.2e} (relative)"
        assert stats_e.keys() == stats_a.keys(), label
        for key in stats_e:
            assert stats_a[key] == pytest.approx(stats_e[key], rel=rtol, abs=1e-12), f"{label}: statistic {key}"
    for key in state_e:
        torch.testing.assert_close(state_a[key], state_e[key], rtol=rtol, atol=0, msg=f"{label}: state {key}")


@pytest.mark.parametrize("name", ALL_MARGINS)
def test_chunked_equals_dense_in_float64_for_every_chunk_size(name):
    x, weight, labels = data()
    dense = run(engines.create("dense"), name, x, weight, labels)
    for chunk_size in (1, 2, 5, 7, 22, 23, 40):
        for keep_mb in (0.0, 64.0):  # recompute in the backward, and keep the forward's blocks
            engine = engines.create("chunked", chunk_size=chunk_size, keep_mb=keep_mb)
            chunked = run(engine, name, x, weight, labels)
            assert_same(dense, chunked, 1e-9, f"{name} chunk_size={chunk_size} keep_mb={keep_mb}")


@pytest.mark.parametrize("name", ALL_MARGINS)
def test_chunked_equals_dense_in_float32(name):
    x, weight, labels = data(torch.float32, rows=32, classes=700, dim=64, seed=3)
    dense = run(engines.create("dense"), name, x, weight, labels, steps=1)
    for keep_mb in (0.0, 64.0):
        chunked = run(engines.create("chunked", chunk_size=96, keep_mb=keep_mb), name, x, weight, labels, steps=1)
        assert_same(dense, chunked, 1e-5, f"{name} fp32 keep_mb={keep_mb}")


@pytest.mark.parametrize("name", ["arcface", "curricularface", "npcface", "arcnegface", "sphereface"])
def test_chunked_equals_dense_in_eval_mode_and_without_gradient(name):
    x, weight, labels = data()
    values = {}
    for engine in (engines.create("dense"), engines.create("chunked", chunk_size=4)):
        margin = mf.margins.create(name).double().eval()
        with torch.no_grad():
            values[engine.name] = engine.loss(margin, x, weight, labels)
    torch.testing.assert_close(values["chunked"], values["dense"], rtol=1e-12, atol=0)


def test_state_moves_once_per_step_whatever_the_chunking():
    """CurricularFace's t is an EMA of the batch mean target cosine: one update per call, not per block."""
    x, weight, labels = data()
    margin = mf.margins.create("curricularface", t_alpha=0.25).double().train()
    engines.create("chunked", chunk_size=2).loss(margin, x, weight, labels)
    cos_y = torch.nn.functional.cosine_similarity(x, weight[labels], dim=1)
    assert float(margin.t) == pytest.approx(0.25 * float(cos_y.mean()), rel=1e-12)
    sphere = mf.margins.create("sphereface").double().train()
    engines.create("chunked", chunk_size=3).loss(sphere, x, weight, labels)
    assert int(sphere.iteration) == 1


@pytest.mark.parametrize("engine_name", ["dense", "chunked"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "eval", "train"])
def test_am_lfs_with_a_non_identity_tau_matches_its_closed_form(engine_name, grad_mode):
    """AM-LFS: loss = −log τ(p), τ(p) = 0.5·p + 0.1, p = softmax of z_t = s·(0.9·c_y + 0.05) among s·c_j."""
    x, weight, labels = data()
    s = 8.0
    margin = mf.margins.create("am_lfs", s=s, t_params=[[0.9, 0.05]], tau_params=[[0.5, 0.1]]).double()
    margin.train(grad_mode == "train")
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    expected = 0.0
    for row in range(ROWS):
        target = s * (0.9 * float(cos[row, labels[row]]) + 0.05)
        negatives = [s * float(c) for j, c in enumerate(cos[row]) if j != labels[row]]
        p = math.exp(target) / (math.exp(target) + sum(math.exp(n) for n in negatives))
        expected += -math.log(0.5 * p + 0.1) / ROWS
    engine = engines.create(engine_name, **({"chunk_size": 5} if engine_name == "chunked" else {}))
    if grad_mode == "no_grad":
        with torch.no_grad():
            loss = engine.loss(margin, x, weight, labels)
    else:
        loss = engine.loss(margin, x, weight, labels)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["arcface", "mv_softmax", "npcface", "sphereface"])
def test_gradcheck_of_the_chunked_function(name):
    x, weight, labels = data(rows=4, classes=9, dim=3)
    margin = mf.margins.create(name).double().eval()
    norms = x.norm(dim=1) if margin.needs_norms else None
    x_hat = torch.nn.functional.normalize(x, dim=1)
    ctx = margin.prepare(engines.base.target_cosines(x_hat, weight, labels), norms)
    scale = margin.row_scale(norms)
    scale_tensor = scale.reshape(-1).clone().requires_grad_(True) if isinstance(scale, torch.Tensor) else None
    scale_value = None if scale_tensor is not None else float(scale)
    for keep in (False, True):

        def outputs(x_hat, weight, scale_tensor=scale_tensor, keep=keep):
            target, lse, *_ = ChunkedClassPass.apply(
                x_hat, weight, scale_tensor, labels, margin, ctx, scale_value, 4, keep, True, False
            )
            return target, lse

        inputs = (x_hat.clone().requires_grad_(True), weight.clone().requires_grad_(True))
        if scale_tensor is not None:
            inputs = (*inputs, scale_tensor)
        assert torch.autograd.gradcheck(outputs, inputs, eps=1e-6, atol=1e-7)


def test_logits_are_the_same_on_every_engine():
    x, weight, labels = data()
    for name in ("arcface", "npcface"):
        margin = mf.margins.create(name).double().eval()
        dense = engines.create("dense").logits(margin, x, weight, labels)
        chunked = engines.create("chunked", chunk_size=3).logits(margin, x, weight, labels)
        torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)


def test_a_non_finite_block_gives_a_non_finite_loss():
    x, weight, labels = data()
    weight[(int(labels[0]) + 1) % CLASSES, 0] = float("nan")  # a negative's centre, in some block
    margin = mf.margins.create("arcface").double()
    loss = engines.create("chunked", chunk_size=4).loss(margin, x, weight, labels)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"chunk_size": -3}, "chunk_size=-3"),
        ({"chunk_size": 2.5}, "chunk_size=2.5"),
        ({"chunk_size": "64"}, "chunk_size='64'"),
        ({"chunk_size": True}, "chunk_size=True"),
        ({"keep_mb": -1}, "keep_mb=-1"),
        ({"keep_mb": float("nan")}, "keep_mb=nan"),
        ({"chunks": 4}, "no option chunks"),
    ],
)
def test_bad_engine_options_name_the_option(options, needle):
    with pytest.raises(ConfigError) as error:
        engines.create("chunked", **options)
    assert needle in str(error.value)
    if "no option" in needle:
        assert "chunk_size" in str(error.value) and "keep_mb" in str(error.value)


def test_unknown_engine_lists_the_engines():
    with pytest.raises(ConfigError, match="unknown engine 'fused'.*chunked, dense"):
        engines.create("fused")
    with pytest.raises(ConfigError, match="no option chunk_size: its options are none"):
        engines.create("dense", chunk_size=4)


def test_heads_take_a_name_with_options_or_an_engine_object():
    head = mf.heads.create("arcface", num_classes=10, embedding_size=4, engine="chunked",
                           engine_params={"chunk_size": 3})  # fmt: skip
    assert head.engine.options() == {"chunk_size": 3, "keep_mb": head.engine.keep_mb}
    engine = engines.create("dense")
    assert mf.heads.create("cosface", num_classes=10, embedding_size=4, engine=engine).engine is engine
    assert mf.heads.create("cosface", num_classes=10, embedding_size=4).engine.name == engines.DEFAULT_ENGINE
    with pytest.raises(ConfigError, match="engine object"):
        mf.heads.create("cosface", num_classes=10, embedding_size=4, engine=engine, engine_params={"x": 1})
    with pytest.raises(ConfigError, match="softmax"):
        mf.heads.create("softmax", num_classes=10, embedding_size=4, engine="chunked")


def test_the_config_validates_engine_and_options():
    from marginface.train.config import config_from_dict

    assert config_from_dict({}).head.engine == engines.AUTO
    config_from_dict({"head": {"engine": "chunked", "engine_params": {"chunk_size": 128}}})
    with pytest.raises(ConfigError, match="head.engine='fast'"):
        config_from_dict({"head": {"engine": "fast"}})
    with pytest.raises(ConfigError, match="head.engine_params has chunk"):
        config_from_dict({"head": {"engine": "chunked", "engine_params": {"chunk": 128}}})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["arcface", "curricularface", "npcface"])
def test_chunked_on_cuda_under_bf16_autocast_matches_fp32_dense(name):
    x, weight, labels = (t.cuda() for t in data(torch.float32, rows=64, classes=5000, dim=128, seed=5))
    expected = run(engines.create("dense"), name, x, weight, labels, steps=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = run(engines.create("chunked", chunk_size=1024), name, x, weight, labels, steps=1)
    assert_same(expected, chunked, 1e-5, f"{name} on CUDA under autocast")


@pytest.mark.parametrize("name", [n for n in ALL_MARGINS if not mf.margins.create(n).identity_negatives])
def test_each_margins_closed_form_slope_equals_autograd_of_its_negatives(name):
    """The engines' backward multiplies by negatives_with_slope's dN/dc: it must be the derivative of N."""
    x, weight, labels = data(rows=16, classes=40)
    margin = mf.margins.create(name).double()
    margin.update_state(margin.batch_statistics(torch.full((16,), 0.3, dtype=torch.float64)))  # t ≠ 0
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    ctx = margin.prepare(cos.gather(1, labels[:, None])[:, 0])
    leaf = cos.clone().requires_grad_(True)
    expected_values = margin.negative_logits(leaf, ctx)
    (expected_slope,) = torch.autograd.grad(expected_values.sum(), leaf)
    values, slope = margin.negatives_with_slope(cos.clone(), ctx)
    torch.testing.assert_close(values, expected_values.detach(), rtol=1e-12, atol=1e-14)  # (an FMA may round once)
    torch.testing.assert_close(torch.as_tensor(slope).expand_as(cos), expected_slope, rtol=1e-12, atol=1e-14)
    if "threshold" in ctx:
        hard = int((cos > ctx["threshold"][:, None]).sum())
        assert 0 < hard < cos.numel(), "the data must hold both hard and easy negatives"


@pytest.mark.parametrize("name", [n for n in ALL_MARGINS if not mf.margins.create(n).identity_negatives])
def test_lent_scratch_gives_the_fresh_results_and_never_hands_out_n_in_a_reused_buffer(name):
    """With an engine's lent BlockScratch a margin writes N over the block and its temporaries into reused
    buffers: the values must be those of fresh tensors, and N must not live in a buffer the next block reuses."""
    x, weight, labels = data(rows=16, classes=40)
    margin = mf.margins.create(name).double()
    margin.update_state(margin.batch_statistics(torch.full((16,), 0.3, dtype=torch.float64)))
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    ctx = margin.prepare(cos.gather(1, labels[:, None])[:, 0])
    fresh_values, fresh_slope = margin.negatives_with_slope(cos.clone(), ctx)
    fresh_stats = margin.row_statistics(cos, labels, ctx)
    scratch = BlockScratch(lent=True)
    for block in (slice(0, 40), slice(0, 17), slice(17, 40)):  # a full block, then a smaller one reusing it
        stats = margin.row_statistics(cos[:, block], labels, ctx, scratch)
        lent_block = cos[:, block].clone()
        values, slope = margin.negatives_with_slope(lent_block, ctx, scratch)
        torch.testing.assert_close(values, fresh_values[:, block], rtol=0, atol=0)
        torch.testing.assert_close(torch.as_tensor(slope).expand_as(values), torch.as_tensor(
            fresh_slope).expand_as(fresh_values)[:, block], rtol=0, atol=0)
        held = [buffer.untyped_storage().data_ptr() for buffer in scratch._held.values()]
        assert values.untyped_storage().data_ptr() not in held, "N must not be one of the reused buffers"
        if block == slice(0, 40):
            for key, value in fresh_stats.items():
                torch.testing.assert_close(stats[key], value, rtol=0, atol=0)


def test_block_scratch_reuses_a_slots_memory_and_grows_it_when_a_block_is_larger():
    like = torch.zeros(4, 8)
    scratch = BlockScratch(lent=True)
    first = scratch.buffer(like, 0)
    smaller = scratch.buffer(like[:, :3], 0)
    assert smaller.shape == (4, 3) and smaller.data_ptr() == first.data_ptr()
    assert scratch.buffer(like, 1).data_ptr() != first.data_ptr()  # slots never share memory
    larger = scratch.buffer(torch.zeros(4, 16), 0)
    assert larger.shape == (4, 16) and larger.numel() == 64
    assert scratch.output(like) is like
    fresh = BlockScratch()
    one, two = fresh.buffer(like, 0), fresh.buffer(like, 0)
    assert fresh.output(like) is None and one.data_ptr() != two.data_ptr()


@pytest.mark.parametrize("name", ["arcface", "curricularface", "npcface"])
def test_a_second_backward_through_kept_blocks_gives_the_same_gradients(name):
    # the backward consumes the kept blocks in place; with retain_graph a second backward must recompute them
    x, weight, labels = data()
    margin = mf.margins.create(name).double().train()
    engine = engines.create("chunked", chunk_size=5, keep_mb=64.0)
    xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = engine.loss(margin, xs, ws, labels)
    first = torch.autograd.grad(loss, [xs, ws], retain_graph=True)
    second = torch.autograd.grad(loss, [xs, ws])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
