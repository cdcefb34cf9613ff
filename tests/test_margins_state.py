"""Margin state: CurricularFace's t (EMA, training-only updates, state_dict) and SphereFace's λ schedule."""

from __future__ import annotations

import io

import pytest
import torch

import marginface as mf


def test_curricularface_ema_first_step(spec_cos, spec_label):
    margin = mf.margins.create("curricularface", s=4.0).double().train()
    assert margin.t.item() == 0.0
    margin(spec_cos, spec_label)
    assert margin.t.item() == pytest.approx(0.006, abs=1e-15)  # 0.01·0.6, not 0.99·0.6


def test_curricularface_ema_over_batches():
    generator = torch.Generator().manual_seed(0)
    margin = mf.margins.create("curricularface", t_alpha=0.05).double().train()
    expected = 0.0
    for _ in range(20):
        cos = torch.rand(8, 10, generator=generator, dtype=torch.float64) * 2 - 1
        labels = torch.randint(0, 10, (8,), generator=generator)
        margin(cos, labels)
        expected = 0.05 * cos.gather(1, labels[:, None]).mean().item() + 0.95 * expected
    assert margin.t.item() == pytest.approx(expected, abs=1e-14)


def test_curricularface_fixed_point(spec_cos, spec_label):
    margin = mf.margins.create("curricularface").double().train()
    margin.t.fill_(0.6)
    margin(spec_cos, spec_label)
    assert margin.t.item() == pytest.approx(0.6, abs=1e-15)


def test_curricularface_eval_does_not_move_t_unless_asked(spec_cos, spec_label):
    margin = mf.margins.create("curricularface").double().eval()
    margin.t.fill_(0.3)
    margin(spec_cos, spec_label)
    assert margin.t.item() == 0.3
    official = mf.margins.create("curricularface", update_in_eval=True).double().eval()
    official.t.fill_(0.3)
    official(spec_cos, spec_label)
    assert official.t.item() == pytest.approx(0.303, abs=1e-15)


def test_curricularface_state_dict_round_trip(spec_cos, spec_label):
    margin = mf.margins.create("curricularface").train()
    for _ in range(3):
        margin(spec_cos.float(), spec_label)
    assert "t" in margin.state_dict()
    buffer = io.BytesIO()
    torch.save(margin.state_dict(), buffer)
    buffer.seek(0)
    restored = mf.margins.create("curricularface")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.t.item() == margin.t.item() != 0.0


def test_head_carries_margin_state(spec_cos):
    head = mf.heads.create("curricularface", num_classes=5, embedding_size=4).train()
    head(torch.randn(6, 4), torch.randint(0, 5, (6,)))
    state = head.state_dict()
    assert "margin.t" in state and state["margin.t"].item() != 0.0


def test_sphereface_lambda_schedule():
    margin = mf.margins.create("sphereface").train()
    cos = torch.rand(2, 3) * 2 - 1
    labels = torch.tensor([0, 2])
    norms = torch.ones(2)
    margin(cos, labels, norms=norms)
    assert int(margin.iteration) == 1
    assert margin.current_lambda == pytest.approx(1000 / 1.12)  # caffe increments before use
    margin.iteration.fill_(1658)
    assert margin.current_lambda > 5.0
    margin.iteration.fill_(1659)
    assert margin.current_lambda == 5.0
    margin.eval()
    margin(cos, labels, norms=norms)
    assert int(margin.iteration) == 1659
    assert "iteration" in margin.state_dict()


def test_batch_statistics_are_reduced_before_the_update():
    """A data-parallel trainer's reduce hook sees the statistics and its result sets t on every rank."""
    head = mf.heads.create("curricularface", num_classes=5, embedding_size=4).train()
    seen = {}

    def pretend_all_reduce(stats):
        seen.update(stats)
        return {"target_cos_sum": torch.tensor(3.0), "count": torch.tensor(6.0)}  # global mean 0.5

    head.batch_reduce = pretend_all_reduce
    head(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert seen["count"].item() == 3.0
    assert head.margin.t.item() == pytest.approx(0.005)
