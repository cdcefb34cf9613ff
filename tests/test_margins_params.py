"""Bad parameters raise a ValueError that names the parameter and what is allowed."""

from __future__ import annotations

import pytest

import marginface as mf
from marginface.errors import ConfigError


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("arcface", {"m": -0.1}, "m=-0.1"),
        ("cosface", {"m": -1}, "m=-1"),
        ("normface", {"s": 0}, "s=0"),
        ("curricularface", {"s": -64.0}, "s=-64.0"),
        ("lfs", {"a": 0.5}, "a=0.5"),
        ("lfs_local", {"a_bins": [-1.0, 2.0]}, "a_bins[1]=2.0"),
        ("lfs_local", {"a_bins": []}, "a_bins"),
        ("am_lfs", {"t_params": [[1.0, 0.0, 3.0]]}, "t_params"),
        ("mv_softmax", {"base": "sphere"}, "base='sphere'"),
        ("arcface", {"gradient": "approximate"}, "gradient='approximate'"),
        ("arcface", {"easy_margin": "yes"}, "easy_margin='yes'"),
        ("curricularface", {"t_alpha": 1.5}, "t_alpha=1.5"),
        ("npcface", {"m1": float("nan")}, "m1=nan"),
        ("sphereface", {"m": 0.5}, "m=0.5"),
        ("arcnegface", {"sigma": 0.0}, "sigma=0.0"),
    ],
)
def test_bad_parameter_is_named(name, params, fragment):
    with pytest.raises(ValueError) as info:
        mf.margins.create(name, **params)
    assert isinstance(info.value, ConfigError)
    assert fragment in str(info.value)


def test_unknown_margin_lists_the_available_ones():
    with pytest.raises(ValueError) as info:
        mf.margins.create("cosineface")
    message = str(info.value)
    assert "cosineface" in message
    for name in mf.margins.available():
        assert name in message


def test_unknown_parameter_lists_the_parameters():
    with pytest.raises(ValueError) as info:
        mf.margins.create("arcface", margin=0.5)
    assert "margin" in str(info.value) and "easy_margin" in str(info.value)


def test_available_has_every_loss_of_the_issue():
    expected = {"normface", "cosface", "arcface", "combined", "sphereface", "mv_softmax", "arcnegface",
                "curricularface", "npcface", "lfs", "lfs_local", "am_lfs"}
    assert expected <= set(mf.margins.available())


@pytest.mark.parametrize("name", sorted({"arcface", "curricularface", "npcface", "lfs_local", "am_lfs", "sphereface"}))
def test_hyperparameters_recreate_the_margin(name):
    margin = mf.margins.create(name)
    again = mf.margins.create(name, **margin.hyperparameters())
    assert again.hyperparameters() == margin.hyperparameters()


def test_sphereface_without_norms_is_a_clear_error():
    import torch

    with pytest.raises(ValueError, match="norms"):
        mf.margins.create("sphereface")(torch.zeros(2, 3), torch.tensor([0, 1]))
