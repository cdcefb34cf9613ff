"""Heads: the dense engine equals the margin reference; arcface/cosface equal pytorch-metric-learning's losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def inputs(seed=0, batch=24, classes=40, dim=16, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return embeddings, labels


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "name,peer,params",
    [
        ("arcface", lambda c, d: pml_losses.ArcFaceLoss(c, d, margin=math.degrees(0.5), scale=64), {"m": 0.5}),
        ("cosface", lambda c, d: pml_losses.CosFaceLoss(c, d, margin=0.35, scale=64), {"m": 0.35}),
    ],
)
def test_equals_pytorch_metric_learning(name, peer, params):
    classes, dim = 40, 16
    head = mf.heads.create(name, num_classes=classes, embedding_size=dim, s=64.0, **params).double()
    reference = peer(classes, dim).double()
    with torch.no_grad():
        reference.W.copy_(head.weight.t())  # PML stores the centres as [D, C]
    embeddings, labels = inputs()
    ours_x, theirs_x = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    ours, theirs = head(ours_x, labels), reference(theirs_x, labels)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert relative(ours_x.grad, theirs_x.grad) < 1e-6
    assert relative(head.weight.grad, reference.W.grad.t()) < 1e-6


@pytest.mark.parametrize("name", mf.margins.available())
def test_dense_engine_equals_the_margin_reference(name):
    """Loss and both gradients of the head equal margin(cos, labels) on an independently computed cos."""
    embeddings, labels = inputs(seed=1)
    head = mf.heads.create(name, num_classes=40, embedding_size=16).double()
    reference_margin = mf.margins.create(name, **head.margin.hyperparameters()).double()
    reference_margin.load_state_dict(head.margin.state_dict())
    x1, x2 = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    loss = head(x1, labels)
    cos = F.normalize(x2, dim=1) @ F.normalize(w2, dim=1).t()
    norms = x2.norm(dim=1) if reference_margin.needs_norms else None
    expected = F.cross_entropy(reference_margin(cos, labels, norms=norms), labels)
    if name == "magface":  # its loss is CE plus the magnitude regulariser, which the logits do not hold
        magnitude = x2.norm(dim=1).clamp(reference_margin.l_a, reference_margin.u_a)
        expected = expected + reference_margin.lambda_g * (magnitude / reference_margin.u_a**2 + 1 / magnitude).mean()
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert relative(x1.grad, x2.grad) < 1e-9
    assert relative(head.weight.grad, w2.grad) < 1e-9
    for key, value in head.margin.state_dict().items():  # the state moved the same way
        torch.testing.assert_close(value, reference_margin.state_dict()[key])


def test_get_logits():
    head = mf.heads.create("arcface", num_classes=10, embedding_size=8, s=30.0)
    embeddings, labels = inputs(batch=5, classes=10, dim=8, dtype=torch.float32)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(head.get_logits(embeddings), 30.0 * cos, atol=1e-5, rtol=1e-5)
    with_margin = head.get_logits(embeddings, labels)
    target = with_margin.gather(1, labels[:, None]).squeeze(1) / 30.0
    expected = torch.cos(torch.acos(cos.gather(1, labels[:, None]).squeeze(1)) + 0.5)
    torch.testing.assert_close(target, expected.detach(), atol=1e-5, rtol=1e-5)


def test_softmax_head_is_linear_plus_cross_entropy():
    head = mf.heads.create("softmax", num_classes=10, embedding_size=8).double()
    embeddings, labels = inputs(batch=6, classes=10, dim=8)
    expected = F.cross_entropy(embeddings @ head.linear.weight.t() + head.linear.bias, labels)
    assert head(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    # not scale invariant, unlike NormFace
    assert head(2 * embeddings, labels).item() != pytest.approx(expected.item(), rel=1e-3)
    normface = mf.heads.create("normface", num_classes=10, embedding_size=8).double()
    assert normface(2 * embeddings, labels).item() == pytest.approx(normface(embeddings, labels).item(), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"name": "arcfac", "num_classes": 10, "embedding_size": 8}, "arcfac"),
        ({"name": "arcface", "num_classes": 1, "embedding_size": 8}, "num_classes=1"),
        ({"name": "arcface", "num_classes": 10, "embedding_size": 0}, "embedding_size=0"),
        ({"name": "arcface", "num_classes": 10, "embedding_size": 8, "engine": "fused"}, "fused"),
        ({"name": "softmax", "num_classes": 10, "embedding_size": 8, "s": 64}, "s"),
    ],
)
def test_bad_head_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        mf.heads.create(**kwargs)
    assert fragment in str(info.value)


def test_bad_inputs_are_named():
    head = mf.heads.create("cosface", num_classes=10, embedding_size=8)
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        head(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        head(torch.randn(4, 8), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        head(torch.randn(4, 8), torch.tensor([0, 1]))
