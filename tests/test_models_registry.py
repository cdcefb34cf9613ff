"""Registry behaviour of marginface.models: names, argument checks and rebuilding from `model.config`."""

from __future__ import annotations

import pytest
import torch

import marginface as mf
from marginface.errors import ConfigError

ALL_MODELS = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "small_cnn"]


def test_available_lists_every_model():
    names = mf.models.available()
    assert names == sorted(names)
    assert set(ALL_MODELS) <= set(names)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        mf.models.create("resnet50")
    message = str(info.value)
    assert "resnet50" in message
    for name in ALL_MODELS:
        assert name in message


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "small_cnn"])
@pytest.mark.parametrize("bad", [0, -4, 1.5, "512", True])
def test_bad_embedding_size(name, bad):
    with pytest.raises(ConfigError, match="embedding_size"):
        mf.models.create(name, embedding_size=bad)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "small_cnn"])
@pytest.mark.parametrize("bad", [1.0, -0.1, 2, float("nan"), "0.2"])
def test_bad_dropout(name, bad):
    with pytest.raises(ConfigError, match="dropout"):
        mf.models.create(name, dropout=bad)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
@pytest.mark.parametrize("bad", [100, (112, 100), 0, (112,), "112", 8])
def test_bad_input_size_for_stride16_models(name, bad):
    with pytest.raises(ConfigError, match="input_size"):
        mf.models.create(name, input_size=bad)


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"input_size": 8}, "input_size"),
        ({"input_size": 112, "resize_to": 12}, "resize_to"),
        ({"channels": [32, 64]}, "strides"),
        ({"strides": [2, 2, 3, 1, 2, 1]}, "strides"),
        ({"channels": [32, 0, 64, 128, 128, 128]}, "channels"),
    ],
)
def test_bad_small_cnn_arguments(kwargs, parameter):
    with pytest.raises(ConfigError, match=parameter):
        mf.models.create("small_cnn", **kwargs)


def test_unknown_keyword_names_it_and_the_accepted_ones():
    with pytest.raises(ConfigError) as info:
        mf.models.create("mobilefacenet", widht=2)
    assert "widht" in str(info.value) and "dropout" in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("iresnet18", {"embedding_size": 64, "dropout": 0.2, "input_size": (128, 112)}),
        ("mobilefacenet", {"embedding_size": 128}),
        ("small_cnn", {"embedding_size": 128, "input_size": 112, "resize_to": 56, "channels_last": False}),
    ],
)
def test_config_rebuilds_the_same_architecture(name, kwargs):
    torch.manual_seed(0)
    model = mf.models.create(name, **kwargs)
    assert model.config["name"] == name
    assert model.config["embedding_size"] == kwargs["embedding_size"]
    expected_size = kwargs.get("input_size", model.input_size)
    expected_size = (expected_size, expected_size) if isinstance(expected_size, int) else tuple(expected_size)
    assert model.input_size == expected_size
    assert tuple(model.config["input_size"]) == expected_size

    # The config goes through JSON beside the weights: lists, not tuples, must rebuild the model too.
    import json

    rebuilt = mf.models.create(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    rebuilt.eval()
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.config == model.config


def test_lazy_subpackage_exports():
    for name in ("create", "available", "count_parameters", "count_flops", "export_onnx"):
        assert callable(getattr(mf.models, name))
