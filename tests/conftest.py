"""Shared fixtures: the spec's three-class worked example (spec/losses.md §6.1)."""

from __future__ import annotations

import math
import os

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


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> dict[str, str]:
    """A private tiny synthetic set (16 ids × 6 images, 40-pair sets), generated once for the session; the
    environment to hand to subprocesses that should find it."""
    import marginface as mf

    root = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "MARGINFACE_CACHE": str(root), "OMP_NUM_THREADS": "1"}
    previous = os.environ.get("MARGINFACE_CACHE")
    os.environ["MARGINFACE_CACHE"] = str(root)
    try:
        mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=40, ijb=False, seed=0, difficulty=0.6)
    finally:
        if previous is None:
            os.environ.pop("MARGINFACE_CACHE")
        else:
            os.environ["MARGINFACE_CACHE"] = previous
    return env


@pytest.fixture(scope="module")
def environment(cache):
    """The session's private cache in this process's environment, for in-process runs (module-wide)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])
        yield patch
