"""Numerics: no NaN or inf at cos = ±1 with s = 64, half precision computed in fp32, fp64 kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import marginface as mf

EDGE = torch.tensor([[1.0, -1.0, 1.0, 0.3], [-1.0, 1.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
EDGE_LABELS = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("name", mf.margins.available())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_at_the_edges(name, dtype):
    params = {} if name in ("sphereface", "adacos") else {"s": 64.0}  # their scale is ‖x‖ / adaptive state
    margin = mf.margins.create(name, **params).train()
    cos = EDGE.to(dtype).detach().clone().requires_grad_(True)
    norms = torch.full((4,), 30.0, dtype=dtype) if margin.needs_norms else None
    logits = margin(cos, EDGE_LABELS, norms=norms)
    assert logits.dtype == torch.float32
    loss = F.cross_entropy(logits, EDGE_LABELS)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("name", mf.margins.available())
def test_float64_stays_float64(name):
    margin = mf.margins.create(name).double()
    cos = torch.rand(3, 5, dtype=torch.float64)
    norms = torch.ones(3, dtype=torch.float64) if margin.needs_norms else None
    assert margin(cos, torch.tensor([0, 1, 4]), norms=norms).dtype == torch.float64


def test_half_input_matches_float32_computation():
    cos = (torch.rand(8, 50) * 2 - 1).half()
    labels = torch.randint(0, 50, (8,))
    margin = mf.margins.create("curricularface").eval()
    margin.t.fill_(0.4)
    torch.testing.assert_close(margin(cos, labels), margin(cos.float(), labels))


def test_head_under_autocast_runs_margin_in_fp32():
    head = mf.heads.create("arcface", num_classes=10, embedding_size=8)
    embeddings = torch.randn(4, 8)
    labels = torch.randint(0, 10, (4,))
    reference = head(embeddings, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head.get_logits(embeddings.bfloat16(), labels)
        loss = head(embeddings.bfloat16(), labels)
    assert logits.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
