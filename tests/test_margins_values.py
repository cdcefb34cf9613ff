"""Every margin against the worked float64 numbers of spec/losses.md §6.1 (loss and modified logits)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf

S = 4.0
ARC_T = 0.1430091063  # cos(acos 0.6 + 0.5)

# name, params, expected loss, expected logits / s (None where the spec gives only the loss)
CASES = [
    ("normface", {}, 0.5371260651, (0.6, 0.5, -0.2)),
    ("cosface", {"m": 0.35}, 1.3567575932, (0.25, 0.5, -0.2)),
    ("arcface", {"m": 0.5}, 1.6907945122, (ARC_T, 0.5, -0.2)),
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}, 1.7111446838, (0.1367857281, 0.5, -0.2)),
    ("mv_softmax", {"m": 0.35, "t": 0.2, "base": "am", "adaptive": True}, 2.3214375031, (0.25, 0.8, -0.2)),
    ("mv_softmax", {"m": 0.35, "t": 0.2, "base": "am", "adaptive": False}, 1.9761547567, (0.25, 0.7, -0.2)),
    ("mv_softmax", {"m": 0.5, "t": 0.2, "base": "arc", "adaptive": True}, 2.7146375087, (ARC_T, 0.8, -0.2)),
    ("npcface", {}, 2.5328523402, (ARC_T, 0.75, -0.2)),
    ("arcnegface", {"m": 0.5, "alpha": 1.2, "sigma": 2.0}, 2.3285802081, (ARC_T, 0.6888797103, -0.0948454877)),
    ("lfs", {"a": 0.0}, 0.5371260651, None),
    ("lfs", {"a": -1.0}, 0.8846615619, None),
    ("lfs", {"a": -10.0}, 2.1772378048, None),
    ("lfs", {"a": 1.0 - math.exp(S * 0.35)}, 1.3567575932, (0.25, 0.5, -0.2)),
    ("lfs_local", {"a_bins": [-1.0] * 10}, 0.8846615619, None),
    ("lfs_local", {"a_bins": [-10.0] * 5}, 2.1772378048, None),
    ("am_lfs", {}, 0.5371260651, (0.6, 0.5, -0.2)),
    ("am_lfs", {"t_params": [[1.0, -0.35]] * 6}, 1.3567575932, (0.25, 0.5, -0.2)),
]


@pytest.mark.parametrize("name,params,loss,logits", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_worked_example(spec_cos, spec_label, name, params, loss, logits):
    margin = mf.margins.create(name, s=S, **params).double().eval()
    out = margin(spec_cos, spec_label)
    assert out.dtype == torch.float64
    assert F.cross_entropy(out, spec_label).item() == pytest.approx(loss, abs=1e-9)
    if logits is not None:
        torch.testing.assert_close(out[0] / S, torch.tensor(logits, dtype=torch.float64), atol=1e-9, rtol=0)


def test_npcface_positive_margin_from_hard_negative_mean(spec_cos, spec_label):
    margin = mf.margins.create("npcface", s=S).double()
    target = spec_cos[:, 0]
    ctx = margin.prepare(target)
    target_index = torch.tensor([0])  # the target's column in this block
    ctx = margin.finish(ctx, margin.row_statistics(spec_cos, target_index, ctx))
    assert ctx["margin"].item() == pytest.approx(0.4 + 0.2 * 0.5, abs=1e-12)  # m̃ = m0 + m1·mean(hard) = 0.5


@pytest.mark.parametrize(
    "t,training,loss,hard",
    [
        (0.3, False, 1.3984594392, 0.4),  # t used as is (eval): hard logit 0.5·(0.3 + 0.5)
        (0.0, False, 1.0252241348, 0.25),
        (0.3, True, 1.4026056353, 0.5 * (0.303 + 0.5)),  # official: t ← 0.01·0.6 + 0.99·0.3 before use
    ],
)
def test_curricularface_worked_example(spec_cos, spec_label, t, training, loss, hard):
    margin = mf.margins.create("curricularface", s=S, m=0.5).double().train(training)
    margin.t.fill_(t)
    out = margin(spec_cos, spec_label)
    assert F.cross_entropy(out, spec_label).item() == pytest.approx(loss, abs=1e-9)
    assert out[0, 1].item() / S == pytest.approx(hard, abs=1e-12)
    assert out[0, 0].item() / S == pytest.approx(ARC_T, abs=1e-9)


@pytest.mark.parametrize("lambda_min,loss,target", [(0.0, 2.1799495926, -1.1568), (5.0, 1.0348981614, 0.3072)])
def test_sphereface_worked_example(spec_cos, spec_label, lambda_min, loss, target):
    # base = 0 pins λ at lambda_min: λ = 0 is pure ψ, λ = 5 is the caffe schedule's floor.
    margin = mf.margins.create("sphereface", m=4, base=0.0, lambda_min=lambda_min).double().eval()
    out = margin(spec_cos, spec_label, norms=torch.ones(1, dtype=torch.float64))
    assert F.cross_entropy(out, spec_label).item() == pytest.approx(loss, abs=1e-9)
    assert out[0, 0].item() == pytest.approx(target, abs=1e-12)
    assert out[0, 1:].tolist() == pytest.approx([0.5, -0.2], abs=1e-15)


@pytest.mark.parametrize("name,loss", [("normface", 0.0016601784), ("arcface", 22.8474172001)])
def test_scale_64_is_overflow_safe(spec_cos, spec_label, name, loss):
    for dtype in (torch.float64, torch.float32):
        margin = mf.margins.create(name, s=64.0).eval()
        out = margin(spec_cos.to(dtype), spec_label)
        # the spec prints 10 decimals; fp32 holds about 7 significant digits of a 22.8 loss
        tolerance = 1e-9 if dtype == torch.float64 else 1e-5 * max(1.0, loss)
        assert F.cross_entropy(out, spec_label).item() == pytest.approx(loss, abs=tolerance)
