"""Margin names are accepted whatever their case and `-`/`_` spelling."""

import pytest

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
