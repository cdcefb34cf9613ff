"""Margin names are accepted whatever their case and `-`/`_` spelling."""

import pytest

import marginface as mf
from marginface.errors import ConfigError
from marginface.margins.registry import margin_class


@pytest.mark.parametrize("spelling", ["mv-softmax", "MV_Softmax", "mv_softmax"])
def test_mv_softmax_spellings(spelling):
    assert margin_class(spelling) is margin_class("mv_softmax")


def test_arcface_case():
    assert margin_class("ArcFace") is margin_class("arcface")


def test_unknown_name_lists_margins():
    with pytest.raises(ConfigError, match="arcface"):
        margin_class("nosuch")


def test_head_names_are_normalised_and_the_error_lists_softmax():
    from marginface.train.config import config_from_dict

    assert mf.heads.create("MV-Softmax", num_classes=5, embedding_size=4).margin.name == "mv_softmax"
    assert mf.heads.create("Softmax", num_classes=5, embedding_size=4).__class__.__name__ == "SoftmaxHead"
    assert config_from_dict({"head": {"margin": "ArcFace", "params": {}}}).head.margin == "arcface"
    with pytest.raises(ConfigError, match=r"unknown head 'arcfaec': expected one of softmax, .*arcface"):
        mf.heads.create("arcfaec", num_classes=5, embedding_size=4)
