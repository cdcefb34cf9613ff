"""Shared fixtures: the spec's three-class worked example (spec/losses.md §6.1)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture
def spec_cos() -> torch.Tensor:
    """c = (0.6, 0.5, −0.2) for one sample of class 0: x = (0.6, 0.5, −0.2, √0.35) against e1, e2, e3."""
    x = torch.tensor([0.6, 0.5, -0.2, math.sqrt(0.35)], dtype=torch.float64)
    weights = torch.eye(4, dtype=torch.float64)[:3]
    return (weights @ x)[None, :]


@pytest.fixture
def spec_label() -> torch.Tensor:
    return torch.tensor([0])
