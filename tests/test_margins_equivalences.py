"""The reductions between margins that spec/losses.md §6.3 lists, on random batches; and every margin driven block
by block over the classes in training mode, equal to the dense engine and the float64 reference (loss, both
gradients, state)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf
from marginface.margins.base import combine_row_statistics
from test_margins_gradients import CASE_IDS, REFERENCE_CASES, start
from test_margins_gradients import assert_close as assert_grad_close


def batch(seed: int, rows: int = 32, classes: int = 20, low: float = -0.9, high: float = 0.95):
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, classes, generator=generator, dtype=torch.float64) * (high - low) + low
    labels = torch.randint(0, classes, (rows,), generator=generator)
    return cos, labels


def loss_and_grad(margin, cos, labels):
    cos = cos.clone().requires_grad_(True)
    loss = F.cross_entropy(margin(cos, labels), labels)
    loss.backward()
    return loss.detach(), cos.grad


def assert_same(first, second, cos, labels, atol=1e-12):
    loss_a, grad_a = loss_and_grad(first, cos, labels)
    loss_b, grad_b = loss_and_grad(second, cos, labels)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=atol)
    torch.testing.assert_close(grad_a, grad_b, atol=atol, rtol=0)


def create(name, **params):
    return mf.margins.create(name, **params).double().eval()


def test_zero_margins_are_normface():
    cos, labels = batch(0)
    normface = create("normface", s=30.0)
    for name, params in [("cosface", {"m": 0.0}), ("arcface", {"m": 0.0}), ("lfs", {"a": 0.0}),
                         ("combined", {"m1": 1.0, "m2": 0.0, "m3": 0.0}), ("am_lfs", {}),
                         ("mv_softmax", {"t": 0.0, "m": 0.0})]:
        assert_same(normface, create(name, s=30.0, **params), cos, labels)


def test_normface_is_cross_entropy_of_scaled_cosines():
    cos, labels = batch(1)
    loss, _ = loss_and_grad(create("normface", s=20.0), cos, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(20.0 * cos, labels).item(), abs=1e-14)


def test_combined_special_cases():
    cos, labels = batch(2, low=-0.5)  # arcface's fallback region (c <= cos(π − m)) avoided
    assert_same(create("combined", s=64.0, m1=1.0, m2=0.5, m3=0.0), create("arcface", s=64.0, m=0.5), cos, labels,
                atol=1e-9)
    assert_same(create("combined", s=64.0, m1=1.0, m2=0.0, m3=0.35), create("cosface", s=64.0, m=0.35), cos, labels,
                atol=1e-9)


@pytest.mark.parametrize("s,m", [(4.0, 0.35), (32.0, 0.35), (64.0, 0.5)])
def test_lfs_with_cosface_factor_is_cosface(s, m):
    cos, labels = batch(3)
    assert_same(create("lfs", s=s, a=1.0 - math.exp(s * m)), create("cosface", s=s, m=m), cos, labels, atol=1e-9)


def test_lfs_local_with_equal_bins_is_lfs():
    cos, labels = batch(4)
    assert_same(create("lfs_local", s=16.0, a_bins=[-7.0] * 10), create("lfs", s=16.0, a=-7.0), cos, labels)


def test_lfs_reduces_the_softmax_probability():
    cos, labels = batch(5)
    plain = F.softmax(10.0 * cos, dim=1).gather(1, labels[:, None])
    for a in (0.0, -0.5, -3.0, -100.0):
        modulated = F.softmax(create("lfs", s=10.0, a=a)(cos, labels), dim=1).gather(1, labels[:, None])
        torch.testing.assert_close(modulated, plain / (a * plain + 1 - a), atol=1e-14, rtol=1e-12)
        assert (modulated <= plain + 1e-15).all()


def test_am_lfs_cosface_pieces_and_tau():
    cos, labels = batch(6)
    assert_same(create("am_lfs", s=30.0, t_params=[[1.0, -0.35]] * 4), create("cosface", s=30.0, m=0.35), cos, labels,
                atol=1e-10)
    # τ(p) = 0.5·p + 0.1 on the whole of [0, 1]: the loss is −log τ(p)
    margin = create("am_lfs", s=30.0, tau_params=[[0.5, 0.1]])
    p = F.softmax(30.0 * cos, dim=1).gather(1, labels[:, None]).squeeze(1)
    loss = F.cross_entropy(margin(cos, labels), labels)
    assert loss.item() == pytest.approx((-torch.log(0.5 * p + 0.1)).mean().item(), rel=1e-12)


def test_arcface_structure():
    m = 0.5
    inside = torch.linspace(math.cos(math.pi - m) + 1e-6, 0.999, 101, dtype=torch.float64)
    margin = create("arcface", s=1.0, m=m)
    target = margin.target_logit(inside, {})
    torch.testing.assert_close(target, torch.cos(torch.acos(inside) + m), atol=1e-12, rtol=0)
    below = torch.tensor([math.cos(math.pi - m) - 1e-9], dtype=torch.float64)
    assert margin.target_logit(below, {}).item() == pytest.approx(below.item() - m * math.sin(m), abs=1e-12)
    # the jump at θ = π − m: from −1 to −cos m − m·sin m
    above = torch.tensor([math.cos(math.pi - m) + 1e-12], dtype=torch.float64)
    jump = margin.target_logit(below, {}) - margin.target_logit(above, {})
    assert jump.item() == pytest.approx(-0.11730, abs=1e-5)
    easy = create("arcface", s=1.0, m=m, easy_margin=True)
    negative = torch.tensor([-0.4, -0.1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(easy.target_logit(negative, {}), negative)


def test_sphereface_psi_is_continuous_and_monotone():
    margin = create("sphereface", m=4)
    for k in range(1, 4):
        theta = k * math.pi / 4
        left = margin.psi(torch.tensor([math.cos(theta - 1e-9)], dtype=torch.float64))
        right = margin.psi(torch.tensor([math.cos(theta + 1e-9)], dtype=torch.float64))
        assert left.item() == pytest.approx(right.item(), abs=1e-7)
    thetas = torch.linspace(1e-4, math.pi - 1e-4, 2001, dtype=torch.float64)
    psi = margin.psi(torch.cos(thetas))
    assert (psi[1:] < psi[:-1]).all()
    assert margin.psi(torch.tensor([1.0 - 1e-12], dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-5)
    assert margin.psi(torch.tensor([-1.0 + 1e-12], dtype=torch.float64)).item() == pytest.approx(-7.0, abs=1e-5)


def test_sphereface_large_lambda_is_unscaled_normface():
    cos, labels = batch(7)
    norms = torch.rand(cos.shape[0], dtype=torch.float64) + 0.5
    sphere = create("sphereface", base=0.0, lambda_min=1e12)
    torch.testing.assert_close(sphere(cos, labels, norms=norms), cos * norms[:, None], atol=1e-9, rtol=0)


def test_curricularface_is_arcface_without_hard_negatives():
    cos, labels = batch(8, low=-0.9, high=-0.6)
    cos.scatter_(1, labels[:, None], 0.9)  # cos(acos 0.9 + 0.5) ≈ 0.55 > every negative
    arcface = create("arcface", s=64.0, m=0.5)
    for t in (0.0, 0.3, 0.9):
        curricular = create("curricularface", s=64.0, m=0.5)
        curricular.t.fill_(t)
        assert_same(curricular, arcface, cos, labels, atol=1e-10)


def test_curricularface_hard_negatives_are_deemphasised_early():
    cos, labels = batch(9)
    curricular = create("curricularface", s=1.0, m=0.5)  # t = 0: hard negatives become c², below c for 0 < c < 1
    logits = curricular(cos, labels)
    ctx = curricular.prepare(cos.gather(1, labels[:, None])[:, 0])
    hard = (cos > ctx["threshold"][:, None]) & ~F.one_hot(labels, cos.shape[1]).bool()
    assert hard.any()
    torch.testing.assert_close(logits[hard], cos[hard] ** 2)


def test_npcface_reductions():
    cos, labels = batch(10, low=-0.9, high=0.9)
    cos.scatter_(1, labels[:, None], torch.rand(cos.shape[0], 1, dtype=torch.float64) * 0.8 + 0.1)  # c_y > 0
    # t = 1, α = 0, m1 = 0: ArcFace(m0) (the NPCFace target has the easy-margin guard, not the fallback)
    assert_same(create("npcface", s=64.0, m0=0.4, m1=0.0, t=1.0, alpha=0.0), create("arcface", s=64.0, m=0.4),
                cos, labels, atol=1e-10)


def test_npcface_without_hard_negatives_uses_m0():
    cos, labels = batch(11, low=-0.9, high=-0.7)
    cos.scatter_(1, labels[:, None], 0.8)
    assert_same(create("npcface", s=64.0), create("arcface", s=64.0, m=0.4), cos, labels, atol=1e-10)
    cos.scatter_(1, labels[:, None], -0.95)  # c_y <= 0: the guard leaves the target alone
    npc = create("npcface", s=1.0)
    torch.testing.assert_close(npc(cos, labels).gather(1, labels[:, None]), cos.gather(1, labels[:, None]))


def test_mv_softmax_with_zero_t_is_its_base():
    cos, labels = batch(12)
    assert_same(create("mv_softmax", s=32.0, m=0.35, t=0.0), create("cosface", s=32.0, m=0.35), cos, labels)
    cos, labels = batch(13, low=-0.5)
    assert_same(create("mv_softmax", s=32.0, m=0.5, t=0.0, base="arc"), create("arcface", s=32.0, m=0.5), cos, labels)


def test_arcnegface_with_unit_alpha_and_infinite_sigma_is_arcface():
    cos, labels = batch(14)
    assert_same(create("arcnegface", s=64.0, m=0.5, alpha=1.0, sigma=1e12), create("arcface", s=64.0, m=0.5), cos,
                labels, atol=1e-8)


# -- one margin driven block by block, in training mode, against the dense engine and the float64 reference ------

BLOCKS = (slice(19, 30), slice(0, 7), slice(7, 19))  # uneven blocks of the 30 classes, visited out of order


def embedding_batch(seed: int, rows: int = 16, classes: int = 30, dim: int = 6):
    """Embeddings near their class centres (targets, hard and easy negatives all occur), unequal norms."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    x = weight[labels] * 0.8 + 0.6 * torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    x = x * (1.0 + torch.rand(rows, 1, generator=generator, dtype=torch.float64))
    return x, weight, labels


def blockwise_loss(margin, x, weight, labels, use_slope: bool):
    """The margin driven through the steps of margins/base.py by hand, on BLOCKS of the class centres: state
    update, row context, per-block row statistics and N (autograd of ``negative_logits``, or the closed-form
    slope of ``negatives_with_slope`` as the engines' backward uses it), log-sum-exp combined across blocks,
    ``finish`` and ``row_loss``."""
    x_hat = F.normalize(x, dim=1)
    norms = x.norm(dim=1) if margin.needs_norms else None
    inverse = weight.norm(dim=1).reciprocal()
    target_cos = (x_hat * weight[labels]).sum(1) * inverse[labels]
    margin.update_from_batch(target_cos.detach(), norms)
    ctx = margin.prepare(target_cos.detach(), norms)
    scale = margin.row_scale(norms)
    stats, lse = [], []
    for block in BLOCKS:
        cos = (x_hat @ weight[block].t()) * inverse[block]
        inside = (labels >= block.start) & (labels < block.stop)
        target_index = torch.where(inside, labels - block.start, -1)
        with torch.no_grad():
            stats.append(margin.row_statistics(cos, target_index, ctx))
        if margin.identity_negatives:
            negatives = cos
        elif use_slope:
            values, slope = margin.negatives_with_slope(cos.detach(), ctx)
            negatives = values + slope * (cos - cos.detach())  # value N, derivative the margin's own dN/dc
        else:
            negatives = margin.negative_logits(cos, ctx)
        target_column = F.one_hot(target_index.clamp_min(0), cos.shape[1]).bool() & inside[:, None]
        lse.append((negatives * scale).masked_fill(target_column, float("-inf")).logsumexp(1))
    row_stats = combine_row_statistics(stats, margin.row_reductions)
    row_stats["negatives_lse"] = combine_row_statistics([{"l": v} for v in lse], {"l": "logsumexp"})["l"]
    ctx["target_cos"] = target_cos
    ctx = margin.finish(ctx, row_stats)
    target_scale = scale[:, 0] if isinstance(scale, torch.Tensor) else scale
    return margin.row_loss(ctx["target"] * target_scale, row_stats["negatives_lse"], ctx).mean()


def reference_loss(reference, x, weight, labels):
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    return reference.loss(cos, labels, x.norm(dim=1))


@pytest.mark.parametrize("use_slope", [False, True], ids=["autograd", "slope"])
@pytest.mark.parametrize("name,params,training,state", REFERENCE_CASES, ids=CASE_IDS)
def test_margins_work_on_blocks_of_classes(name, params, training, state, use_slope):
    """Block-wise == dense engine == float64 reference: loss, ∂L/∂x, ∂L/∂W and the state, over two steps."""
    blockwise, reference = start(name, params, training, state)
    head = mf.heads.create(name, num_classes=30, embedding_size=6, engine="dense", **params).double()
    head.train(training)
    head.margin.load_state_dict(blockwise.state_dict())
    for step in range(2):
        x, weight, labels = embedding_batch(300 + step)
        results = {}
        for what in ("blockwise", "dense", "reference"):
            xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            if what == "blockwise":
                loss = blockwise_loss(blockwise, xs, ws, labels, use_slope)
            elif what == "dense":
                with torch.no_grad():
                    head.weight.copy_(weight)
                ws = head.weight
                loss = head(xs, labels)
            else:
                loss = reference_loss(reference, xs, ws, labels)
            results[what] = (loss.detach(), *torch.autograd.grad(loss, [xs, ws]))
        label = f"{name} {params} step {step}"
        for what in ("blockwise", "dense"):
            for part, got, expected in zip(("loss", "dL/dx", "dL/dW"), results[what], results["reference"],
                                           strict=True):
                assert_grad_close(got, expected, 1e-10, f"{label}: {what} {part}")
            reference.assert_state(blockwise if what == "blockwise" else head.margin, f"{label}: {what}")
        if "hard" in reference.last:
            assert reference.last["hard"].any(), f"{label}: the batch needs hard negatives"
