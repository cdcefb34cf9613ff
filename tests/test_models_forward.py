"""Forward/backward behaviour of every backbone: shapes, eval determinism, batch independence, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marginface as mf


def calibrate_norm_statistics(model: nn.Module, seed: int = 0, batches: int = 2) -> nn.Module:
    """Give every BatchNorm the running statistics of random inputs (as training would) and a non-trivial
    shift, so eval mode is tested on a model whose normalisation does something and whose outputs have
    the O(1) scale of a trained one (fresh statistics are the identity and let activations grow)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            module.bias.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, *model.input_size, generator=generator))
    for module, momentum in zip(norms, momenta, strict=True):
        module.momentum = momentum
    return model.train(was_training)


# The deep IResNets share iresnet18's code; their shapes are checked on the meta device, which costs nothing.
SHAPE_CASES = [
    ("iresnet18", {"embedding_size": 64}),
    ("mobilefacenet", {}),
    ("small_cnn", {}),
    ("small_cnn", {"embedding_size": 128, "input_size": 112}),
    ("small_cnn", {"embedding_size": 128, "input_size": 112, "resize_to": 56}),
]


@pytest.mark.parametrize("name, kwargs", SHAPE_CASES)
def test_output_shape(name, kwargs):
    torch.manual_seed(0)
    model = mf.models.create(name, **kwargs).eval()
    embedding_size = kwargs.get("embedding_size", 512)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *model.input_size))
    assert out.shape == (2, embedding_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "depth, stages", [(34, [3, 4, 6, 3]), (50, [3, 4, 14, 3]), (100, [3, 13, 30, 3]), (200, [6, 26, 60, 6])]
)
def test_deep_iresnet_shapes_on_meta(depth, stages):
    with torch.device("meta"):
        model = mf.models.create(f"iresnet{depth}")
        out = model.eval()(torch.empty(3, 3, 112, 112))
        features = model.layer4(model.layer3(model.layer2(model.layer1(torch.empty(1, 64, 112, 112)))))
    assert out.shape == (3, 512)
    assert features.shape == (1, 512, 7, 7)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == stages


def test_default_input_sizes():
    assert mf.models.create("small_cnn").input_size == (56, 56)
    assert mf.models.create("mobilefacenet").input_size == (112, 112)
    with torch.device("meta"):
        assert mf.models.create("iresnet50").input_size == (112, 112)


# Behaviour does not depend on the input size; 32x32 keeps the IResNet and MobileFaceNet checks cheap.
FAST_MODELS = [
    ("small_cnn", {"embedding_size": 128}),
    ("mobilefacenet", {"embedding_size": 128, "input_size": 32}),
    ("iresnet18", {"embedding_size": 128, "input_size": 32}),
]


@pytest.mark.parametrize("name, kwargs", FAST_MODELS)
def test_eval_is_deterministic_and_batch_independent(name, kwargs):
    torch.manual_seed(1)
    model = calibrate_norm_statistics(mf.models.create(name, dropout=0.3, **kwargs)).eval()
    x = torch.randn(8, 3, *model.input_size)
    with torch.no_grad():
        full = model(x)
        again = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    scale = full.abs().max().item()
    assert 0.1 < scale < 100  # a trained-like O(1) output: an absolute tolerance means something
    assert (singles - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name, kwargs", FAST_MODELS)
def test_gradients_reach_every_trainable_parameter(name, kwargs):
    torch.manual_seed(2)
    model = mf.models.create(name, **kwargs).train()
    x = torch.randn(4, 3, *model.input_size, requires_grad=True)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, pname
            assert torch.isfinite(parameter.grad).all(), pname
            assert parameter.grad.abs().sum() > 0, pname
        else:
            assert parameter.grad is None, pname
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_train_mode_dropout_is_active_and_eval_ignores_it():
    torch.manual_seed(3)
    model = mf.models.create("small_cnn", embedding_size=32, dropout=0.5)
    x = torch.randn(4, 3, 56, 56)
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    second = model(x)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_small_cnn_resize_equals_resizing_outside():
    torch.manual_seed(4)
    inside = calibrate_norm_statistics(
        mf.models.create("small_cnn", embedding_size=64, input_size=112, resize_to=56)
    ).eval()
    outside = mf.models.create("small_cnn", embedding_size=64, input_size=56).eval()
    outside.load_state_dict(inside.state_dict())
    x = torch.randn(3, 3, 112, 112)
    shrunk = torch.nn.functional.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(inside(x), outside(shrunk), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("small_cnn", {}), ("mobilefacenet", {"input_size": 48})])
def test_channels_last_model_matches(name, kwargs):
    torch.manual_seed(5)
    model = calibrate_norm_statistics(mf.models.create(name, embedding_size=64, **kwargs)).eval()
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        converted = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(converted, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_small_cnn_channels_last_switch_does_not_change_the_function():
    torch.manual_seed(6)
    fast = calibrate_norm_statistics(mf.models.create("small_cnn", embedding_size=64)).eval()
    plain = mf.models.create("small_cnn", embedding_size=64, channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_runs_through():
    torch.manual_seed(7)
    model = mf.models.create("small_cnn", embedding_size=64).train()
    x = torch.randn(4, 3, 56, 56)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    # bf16 keeps ~3 significant digits; a 6-layer net stays within a few percent of fp32.
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < 0.05


def test_whole_model_in_float64():
    torch.manual_seed(8)
    model = mf.models.create("mobilefacenet", embedding_size=16, input_size=32).double().eval()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "name, kwargs, bad_shape",
    [
        ("small_cnn", {}, (2, 3, 112, 112)),
        ("small_cnn", {"input_size": 112, "resize_to": 56}, (2, 3, 56, 56)),
        ("mobilefacenet", {"input_size": 32}, (2, 1, 32, 32)),
        ("iresnet18", {"input_size": 32}, (3, 32, 32)),
    ],
)
def test_wrong_input_shape_names_the_expected_one(name, kwargs, bad_shape):
    model = mf.models.create(name, embedding_size=8, **kwargs).eval()
    height, width = model.input_size
    with pytest.raises(ValueError, match=rf"{name}: expected images of shape \[N, 3, {height}, {width}\]"):
        model(torch.zeros(bad_shape))
