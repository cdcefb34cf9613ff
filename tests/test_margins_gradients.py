"""Gradients: gradcheck in float64 away from switching points, and the closed forms of spec §6.2 / §6.3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf

GRADCHECK_CASES = [
    ("normface", {}),
    ("cosface", {"m": 0.35}),
    ("arcface", {"m": 0.5}),
    ("arcface", {"m": 0.5, "easy_margin": True}),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("sphereface", {"m": 4, "base": 10.0, "lambda_min": 0.5}),
    ("sphereface", {"m": 1.7, "base": 0.0, "lambda_min": 0.0}),
    ("mv_softmax", {"m": 0.35, "t": 0.2}),
    ("mv_softmax", {"m": 0.5, "t": 0.3, "base": "arc", "adaptive": False}),
    # ArcNegFace's weights and NPCFace's m̃ are detached by design, so finite differences see a dependence that
    # autograd (rightly) does not: gradcheck them where those quantities are constant (σ → ∞; no hard negative),
    # and check the detached forms separately below.
    ("arcnegface", {"sigma": 1e12, "alpha": 1.3}),
    ("curricularface", {}),
    ("npcface", {"mask_margin": 0.2}),
    ("lfs", {"a": -3.0}),
    ("lfs_local", {"a_bins": [-0.5, -2.0, -8.0, -20.0]}),
    ("am_lfs", {"t_params": [[1.2, -0.1], [0.9, -0.3], [1.1, -0.2]], "tau_params": [[0.8, 0.0], [0.9, 0.05]]}),
]


def switch_distance(margin, cos: torch.Tensor, labels: torch.Tensor, norms) -> float:
    """Smallest distance of any input to a point where the margin's piecewise definition switches."""
    target = cos.gather(1, labels[:, None]).squeeze(1)
    negatives = cos.masked_fill(F.one_hot(labels, cos.shape[1]).bool(), float("nan"))
    distances = [(target - math.cos(math.pi - getattr(margin, "m", 0.0))).abs().min()]
    ctx = margin.prepare(target, norms)
    if "threshold" in ctx:
        distances.append((negatives - ctx["threshold"][:, None]).abs().nan_to_num(1.0).min())
    if margin.name == "sphereface":
        steps = margin.m * torch.acos(target) / math.pi
        distances.append((steps - steps.round()).abs().min())
    for table, low, high, values in (
        ("t_params", -1.0, 1.0, target),
        ("tau_params", 0.0, 1.0, None),
        ("a_bins", 0.0, 1.0, None),
    ):
        if hasattr(margin, table):
            if values is None:  # bins of the softmax probability of the target
                values = F.softmax(cos * margin.s, dim=1).gather(1, labels[:, None]).squeeze(1)
            bins = len(getattr(margin, table))
            position = (values - low) / (high - low) * bins
            distances.append((position - position.round()).abs().min() * (high - low) / bins)
    if margin.name in ("npcface", "curricularface", "mv_softmax", "easy") or getattr(margin, "easy_margin", False):
        distances.append(target.abs().min())
    return float(min(distances))


def random_inputs(margin, seed: int, batch: int = 4, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(200):
        cos = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 1.6 - 0.75
        labels = torch.randint(0, classes, (batch,), generator=generator)
        # push the targets up so that both hard and easy negatives occur
        cos.scatter_(1, labels[:, None], torch.rand(batch, 1, generator=generator, dtype=torch.float64) * 0.8 + 0.1)
        norms = torch.rand(batch, generator=generator, dtype=torch.float64) * 2 + 0.5
        if switch_distance(margin, cos, labels, norms) > 1e-3:
            return cos, labels, norms
    raise AssertionError("no input away from the switching points")


@pytest.mark.parametrize("name,params", GRADCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRADCHECK_CASES)])
def test_gradcheck(name, params):
    margin = mf.margins.create(name, **params).double().eval()
    if name == "curricularface":
        margin.t.fill_(0.4)
    cos, labels, norms = random_inputs(margin, seed=len(name))
    if name == "npcface":  # all negatives easy: below cos(θ_y + 0.2) for every target in [0.1, 0.9]
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        cos = torch.where(onehot, cos, cos * 0.3 - 0.6)
        threshold = margin.prepare(cos.gather(1, labels[:, None])[:, 0])["threshold"]
        assert (cos.masked_fill(onehot, -1.0) < threshold[:, None] - 1e-3).all()
    cos.requires_grad_(True)
    if margin.needs_norms:
        norms.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda c, n: F.cross_entropy(margin(c, labels, norms=n), labels), (cos, norms))
    else:
        assert torch.autograd.gradcheck(lambda c: F.cross_entropy(margin(c, labels), labels), (cos,))


def loss_grad(margin, cos, labels):
    cos = cos.clone().requires_grad_(True)
    loss = F.cross_entropy(margin(cos, labels), labels)
    loss.backward()
    return loss.detach(), cos.grad[0]


def plain_probabilities(logits):
    return F.softmax(logits, dim=1)[0]


def test_curricularface_gradient_matches_spec(spec_cos, spec_label):
    margin = mf.margins.create("curricularface", s=4.0).double().eval()
    margin.t.fill_(0.3)
    _, grad = loss_grad(margin, spec_cos, spec_label)
    torch.testing.assert_close(grad, torch.tensor([-3.72641402, 3.59003791, 0.25052376], dtype=torch.float64),
                               atol=1e-8, rtol=0)
    # hard-negative coefficient M = 2c + t
    p = plain_probabilities(margin(spec_cos, spec_label))
    assert grad[1].item() == pytest.approx(4.0 * p[1].item() * (2 * 0.5 + 0.3), rel=1e-12)


def test_arcface_straight_through_is_s_times_p_minus_onehot(spec_cos, spec_label):
    exact = mf.margins.create("arcface", s=4.0, m=0.5).double()
    straight = mf.margins.create("arcface", s=4.0, m=0.5, gradient="straight_through", fallback=False).double()
    loss_exact, grad_exact = loss_grad(exact, spec_cos, spec_label)
    loss_straight, grad_straight = loss_grad(straight, spec_cos, spec_label)
    assert loss_exact.item() == pytest.approx(loss_straight.item(), abs=1e-14)  # same forward
    expected = torch.tensor([-3.26250808, 3.0754875, 0.18702059], dtype=torch.float64)
    torch.testing.assert_close(grad_straight, expected, atol=1e-8, rtol=0)
    p = plain_probabilities(straight(spec_cos, spec_label))
    torch.testing.assert_close(grad_straight, 4.0 * (p - F.one_hot(spec_label, 3)[0]), atol=1e-14, rtol=0)
    theta = math.acos(0.6)
    assert grad_exact[0].item() / grad_straight[0].item() == pytest.approx(math.sin(theta + 0.5) / math.sin(theta))
    assert grad_exact[0].item() / grad_straight[0].item() == pytest.approx(1.237151716, abs=1e-9)
    torch.testing.assert_close(grad_exact[1:], grad_straight[1:], atol=1e-14, rtol=0)


def test_lfs_gradient_on_logits(spec_cos, spec_label):
    # spec §6.2: with a = −1, ∂L/∂z on the plain logits z = s·c
    margin = mf.margins.create("lfs", s=4.0, a=-1.0).double()
    _, grad = loss_grad(margin, spec_cos, spec_label)
    torch.testing.assert_close(grad / 4.0, torch.tensor([-0.58714612, 0.55348846, 0.03365767], dtype=torch.float64),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("a", [0.0, -0.3, -5.0, -1e4])
def test_lfs_closed_form_gradient(a):
    generator = torch.Generator().manual_seed(3)
    cos = torch.rand(5, 7, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 7, (5,), generator=generator)
    s = 8.0
    margin = mf.margins.create("lfs", s=s, a=a).double()
    cos_leaf = cos.clone().requires_grad_(True)
    loss = F.cross_entropy(margin(cos_leaf, labels), labels, reduction="sum")
    loss.backward()
    p = F.softmax(s * cos, dim=1)
    p_y = p.gather(1, labels[:, None])
    onehot = F.one_hot(labels, 7).bool()
    denominator = 1 - a * (1 - p_y)
    expected = torch.where(onehot, -(1 - p_y) * (1 - a) / denominator, (1 - a) * p / denominator) * s
    torch.testing.assert_close(cos_leaf.grad, expected, atol=1e-10, rtol=1e-10)
    # and the loss is −log(p / (a·p + 1 − a)) computed directly
    direct = -torch.log(p_y / (a * p_y + 1 - a)).sum()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-10)


def test_cosface_target_gradient(spec_cos, spec_label):
    margin = mf.margins.create("cosface", s=4.0, m=0.35).double()
    _, grad = loss_grad(margin, spec_cos, spec_label)
    p = plain_probabilities(margin(spec_cos, spec_label))
    assert grad[0].item() == pytest.approx(-4.0 * (1 - p[0].item()), rel=1e-12)


def test_npcface_margin_is_detached(spec_cos, spec_label):
    margin = mf.margins.create("npcface", s=4.0).double()
    _, grad = loss_grad(margin, spec_cos, spec_label)
    p = plain_probabilities(margin(spec_cos, spec_label))
    # hard negative: only N_j = t·c_j + α carries gradient, so ∂L/∂c_j = s·p_j·t
    assert grad[1].item() == pytest.approx(4.0 * p[1].item() * 1.1, rel=1e-12)
    assert grad[2].item() == pytest.approx(4.0 * p[2].item(), rel=1e-12)


@pytest.mark.parametrize("adaptive,factor", [(True, 1.2), (False, 1.0)])
def test_mv_softmax_hard_negative_gradient(spec_cos, spec_label, adaptive, factor):
    margin = mf.margins.create("mv_softmax", s=4.0, m=0.35, t=0.2, adaptive=adaptive).double()
    _, grad = loss_grad(margin, spec_cos, spec_label)
    p = plain_probabilities(margin(spec_cos, spec_label))
    assert grad[1].item() == pytest.approx(4.0 * p[1].item() * factor, rel=1e-12)
    assert grad[2].item() == pytest.approx(4.0 * p[2].item(), rel=1e-12)


def test_arcnegface_weight_is_detached(spec_cos, spec_label):
    margin = mf.margins.create("arcnegface", s=4.0).double()
    _, grad = loss_grad(margin, spec_cos, spec_label)
    p = plain_probabilities(margin(spec_cos, spec_label))
    target = 0.1430091063
    for j, c in ((1, 0.5), (2, -0.2)):
        weight = 1.2 * math.exp(-((c - target) ** 2) / 2.0)
        assert grad[j].item() == pytest.approx(4.0 * p[j].item() * weight, rel=1e-8)
