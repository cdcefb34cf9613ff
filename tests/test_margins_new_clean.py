"""Sub-centre cleaning on synthetic embeddings with injected label noise: the noisy samples are found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from marginface.data.clean import clean_by_subcentres
from marginface.errors import ConfigError


def noisy_set(classes=40, per_class=30, dim=64, noise=0.15, seed=0):
    """Samples near their class's centre; a ``noise`` share relabelled to another class. A trained sub-centre
    head puts one sub-centre on the clean majority and others on the noise: the weight here does the same."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + 0.2 * torch.randn(len(labels), dim, generator=generator)
    noisy = torch.rand(len(labels), generator=generator) < noise
    wrong = (labels + torch.randint(1, classes, (len(labels),), generator=generator)) % classes
    labels = torch.where(noisy, wrong, labels)
    weight = torch.stack([centres, F.normalize(torch.randn(classes, dim, generator=generator), dim=1),
                          F.normalize(torch.randn(classes, dim, generator=generator), dim=1)], 1).reshape(-1, dim)
    return x, labels, weight, noisy


def test_cleaning_finds_most_of_the_injected_noise():
    x, labels, weight, noisy = noisy_set()
    result = clean_by_subcentres(x, labels, weight, subcenters=3, max_angle=75.0)
    dropped = ~result.keep
    precision = float((dropped & noisy).sum() / dropped.sum())
    recall = float((dropped & noisy).sum() / noisy.sum())
    assert precision > 0.95 and recall > 0.95, (precision, recall)
    assert (result.dominant == 0).all()
    report = result.report()
    assert sum(row["dropped"] for row in report) == int(dropped.sum())
    assert sum(row["samples"] for row in report) == len(labels)


def test_cleaning_needs_subcentres():
    x, labels, weight, _ = noisy_set()
    with pytest.raises(ConfigError, match="trained with sub-centres"):
        clean_by_subcentres(x, labels, weight[::3], subcenters=1)
    with pytest.raises(ConfigError, match="max_angle"):
        clean_by_subcentres(x, labels, weight, subcenters=3, max_angle=0.0)
