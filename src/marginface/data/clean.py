"""Sub-center ArcFace's cleaning step: each class's dominant sub-centre, and the samples too far from it.

After training with K sub-centres per class, the sub-centre that most of a class's samples are nearest to is the
class's dominant one; samples farther than ``max_angle`` degrees from it are likely label noise and are dropped
before retraining (Deng et al., ECCV 2020, 75° in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from marginface.errors import ConfigError


@dataclass
class CleaningResult:
    """What ``clean_by_subcentres`` found: a keep mask over the samples and a per-class report."""

    keep: Tensor  # bool [N]: the sample is within max_angle of its class's dominant sub-centre
    dominant: Tensor  # long [C]: each class's dominant sub-centre k (0 for a class without samples)
    samples: Tensor  # long [C]: samples per class
    dropped: Tensor  # long [C]: samples dropped per class

    def report(self) -> list[dict[str, int]]:
        """One row per class that has samples: class, dominant sub-centre, samples, dropped."""
        return [{"class": c, "dominant_subcenter": int(self.dominant[c]), "samples": int(self.samples[c]),
                 "dropped": int(self.dropped[c])} for c in range(len(self.samples)) if int(self.samples[c]) > 0]


def clean_by_subcentres(
    embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int, max_angle: float = 75.0
) -> CleaningResult:
    """Dominant sub-centre per class (the one most of its samples are nearest to; ties: the lower k) and the
    samples within ``max_angle`` degrees of it. ``weight`` is [C·K, D], row j·K + k sub-centre k of class j."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 2:
        raise ConfigError(f"cleaning needs a classifier trained with sub-centres (subcenters >= 2), got "
                          f"subcenters={subcenters!r}: this run has one centre per class, nothing to clean by")
    if not 0.0 < max_angle <= 180.0:
        raise ConfigError(f"max_angle={max_angle!r} is invalid: expected degrees in (0, 180]")
    if weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters}")
    classes = weight.shape[0] // subcenters
    labels = labels.long()
    with torch.no_grad():
        centres = F.normalize(weight.double(), dim=1).view(classes, subcenters, -1)
        x_hat = F.normalize(embeddings.double(), dim=1)
        own = torch.einsum("nd,nkd->nk", x_hat, centres[labels])  # [N, K]: cos to each sub-centre of its class
        nearest = own.argmax(1)
        votes = torch.zeros(classes, subcenters, dtype=torch.long)
        votes.index_put_((labels, nearest), torch.ones_like(labels), accumulate=True)
        dominant = votes.argmax(1)  # argmax returns the first maximum: ties go to the lower k
        cos_dominant = own.gather(1, dominant[labels][:, None])[:, 0]
        keep = cos_dominant >= math.cos(math.radians(max_angle))
        samples = torch.bincount(labels, minlength=classes)
        dropped = torch.bincount(labels[~keep], minlength=classes)
    return CleaningResult(keep, dominant, samples, dropped)
