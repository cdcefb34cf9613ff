"""The one pair-set scorer: the 10-fold table and TAR@FAR at the levels the impostor count supports.

`marginface eval`, the trainer's validation and report, and the loss search's reward all score a pair set
through `evaluate_pairs` (or `verification_table` on scores already computed), so their tables are the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import nn

from marginface.errors import ConfigError
from marginface.eval.embed import embed_images
from marginface.eval.metrics import DEFAULT_FARS, kfold_accuracy, pair_scores, tar_at_far

__all__ = ["DEFAULT_BATCH_SIZE", "MIN_IMPOSTORS_PER_LEVEL", "evaluate_pairs", "supported_fars", "verification_table"]

# The batch the CLI and the trainer embed with: one size, so both see bit-identical embeddings.
DEFAULT_BATCH_SIZE = 64
# A FAR level is reported only where at least this many impostor pairs lie at or below it (far · N >= 10):
# with fewer, the threshold is one of a handful of impostor scores and the TAR a coin toss.
MIN_IMPOSTORS_PER_LEVEL = 10


def supported_fars(impostors: int, levels: Iterable[float] = DEFAULT_FARS) -> tuple[float, ...]:
    """The levels of ``levels`` at which ``impostors`` impostor pairs support a TAR (far · impostors >= 10)."""
    # a relative slack keeps 1e-3 · 10,000 = 9.999…98 in floating point a supported level
    return tuple(far for far in levels if far * impostors >= MIN_IMPOSTORS_PER_LEVEL * (1 - 1e-9))


def verification_table(scores: np.ndarray, issame: np.ndarray, xnorm: float | None = None,
                       name: str | None = None) -> dict:
    """The table for one pair set from its cosine scores: ``name``, ``pairs``, ``accuracy``/``std`` (10 folds,
    one pair per fold below ten pairs), ``threshold`` (squared distance), ``threshold_cosine``, ``val``/
    ``val_std``/``far`` (VAL@FAR = 1e-3 over the folds), ``xnorm`` and ``tar_at_far`` ({far: tar} at every
    supported level, floor rule; empty when one class of pairs is missing)."""
    issame = np.asarray(issame, dtype=bool)
    folds = kfold_accuracy(scores, issame, folds=min(10, issame.size))
    impostors = int((~issame).sum())
    levels = supported_fars(impostors)
    tar = tar_at_far(scores, issame, levels) if levels and issame.any() else {}
    return {
        "name": name,
        "pairs": int(issame.size),
        "impostors": impostors,
        "accuracy": folds["accuracy"],
        "std": folds["std"],
        "threshold": folds["threshold"],
        "threshold_cosine": folds["threshold_cosine"],
        "val": folds["val"],
        "val_std": folds["val_std"],
        "far": folds["far"],
        "xnorm": xnorm,
        "tar_at_far": tar,
    }


def evaluate_pairs(model: nn.Module, pairset: object, batch_size: int = DEFAULT_BATCH_SIZE, flip: bool = True,
                   return_scores: bool = False, progress: bool = False, *,
                   return_norms: bool = False) -> dict | tuple:
    """Embed a `PairSet` (flip fusion) and score it with `verification_table`; ``progress`` shows a bar on stderr
    while embedding. Returns the table, or a tuple of the table and what was asked for, in this order: with
    ``return_scores`` the cosine score of every pair (for ROC plots), with ``return_norms`` each image's raw
    embedding norm in the set's order (float32 [2P], the quality score of `embed_images(..., return_norms=True)`)."""
    images = getattr(pairset, "images", None)
    issame = getattr(pairset, "issame", None)
    if images is None or issame is None:
        raise ConfigError("evaluate_pairs needs a PairSet (an object with .images and .issame)")
    embeddings, norm, image_norms = embed_images(model, images, batch_size=batch_size, flip=flip, progress=progress,
                                                 desc=getattr(pairset, "name", None), return_norms=True)
    scores = pair_scores(embeddings)
    table = verification_table(scores, issame, norm, getattr(pairset, "name", None))
    extras = ((scores,) if return_scores else ()) + ((image_norms,) if return_norms else ())
    return (table, *extras) if extras else table
