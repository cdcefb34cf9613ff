"""Verification pair sets of the synthetic faces, written as insightface `.bin` files (formats.md A2).

Four sets probe different things: `synth_lfw` (mild nuisance), `synth_cfp_fp` (frontal vs |yaw| >= 0.5),
`synth_agedb` (age drift between the two pictures) and `synth_hard` (sibling negatives, 1.6x nuisance). Each
contiguous tenth is balanced and draws on its own identities, as LFW's official folds do.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from marginface.data.synth.sample import ImageSpec, _rng
from marginface.errors import ConfigError

PAIR_SETS = ("synth_lfw", "synth_cfp_fp", "synth_agedb", "synth_hard")
NUM_FOLDS = 10
# Pair sets draw their identities from this split (never from "train"), families of two members each.
PAIRS_SPLIT = "pairs"


def check_pair_sizes(pairs_per_set: int, eval_identities: int) -> None:
    if pairs_per_set < 0 or pairs_per_set % (2 * NUM_FOLDS):
        raise ConfigError(
            f"pairs_per_set must be a non-negative multiple of {2 * NUM_FOLDS} (10 folds, each half positive), "
            f"got {pairs_per_set}"
        )
    if pairs_per_set and eval_identities < 4 * NUM_FOLDS:
        raise ConfigError(
            f"eval_identities must be at least {4 * NUM_FOLDS} (two sibling families per fold), got {eval_identities}"
        )


def plan_pair_set(
    name: str, seed: int, pairs_per_set: int, eval_identities: int, difficulty: float
) -> list[tuple[ImageSpec, ImageSpec, bool]]:
    """The pairs of set `name` in file order: `pairs_per_set / 10` per fold, half of them positive, shuffled."""
    if name not in PAIR_SETS:
        raise ConfigError(f"unknown synthetic pair set {name!r}; expected one of {', '.join(PAIR_SETS)}")
    check_pair_sizes(pairs_per_set, eval_identities)
    stream = 1 + PAIR_SETS.index(name)
    families = eval_identities // 2
    d = float(difficulty)
    per_fold = pairs_per_set // NUM_FOLDS
    # Pictures of one identity within this set are numbered in the order they are planned.
    counters: dict[tuple[int, int], int] = {}

    def spec(family: int, member: int, **kw) -> ImageSpec:
        index = counters.get((family, member), 0)
        counters[(family, member)] = index + 1
        return ImageSpec(PAIRS_SPLIT, family, member, stream, index, **kw)

    def picture(family: int, member: int, first: bool, rng: np.random.Generator) -> ImageSpec:
        if name == "synth_lfw":
            return spec(family, member, difficulty=0.5 * d)
        if name == "synth_cfp_fp":  # frontal first, then a profile-ish view
            yaw = 0.0 if first else float(rng.uniform(0.5, 0.8))
            return spec(family, member, difficulty=d, yaw=yaw)
        if name == "synth_agedb":  # a young picture, then an old one with drifted looks
            if first:
                return spec(family, member, difficulty=d, age=float(rng.uniform(0.0, 0.2)))
            return spec(family, member, difficulty=d, age=float(rng.uniform(0.7, 1.0)), age_drift=1.0)
        return spec(family, member, difficulty=1.6 * d)

    plan: list[tuple[ImageSpec, ImageSpec, bool]] = []
    for fold in range(NUM_FOLDS):
        rng = _rng(seed, 4, stream, fold)
        fams = np.arange(fold, families, NUM_FOLDS)
        ids = [(int(f), m) for f in fams for m in (0, 1)]
        order = rng.permutation(len(ids))
        fold_pairs = []
        for k in range(per_fold // 2):
            fam, mem = ids[order[k % len(ids)]]
            fold_pairs.append((fam, mem, fam, mem, True))
        for k in range(per_fold // 2):
            if name == "synth_hard":  # the negative is the sibling: same family, other member
                fam = int(fams[k % len(fams)])
                a, b = (0, 1) if rng.uniform() < 0.5 else (1, 0)
                fold_pairs.append((fam, a, fam, b, False))
            else:
                fa, fb = rng.choice(fams, size=2, replace=False)
                fold_pairs.append((int(fa), int(rng.integers(2)), int(fb), int(rng.integers(2)), False))
        for j in rng.permutation(len(fold_pairs)):
            fa, ma, fb, mb, same = fold_pairs[j]
            first = picture(fa, ma, True, rng)
            second = picture(fb, mb, False, rng)
            plan.append((first, second, same))
    return plan


def write_pair_bin(path: str | os.PathLike, jpegs: list[bytes], issame: list[bool]) -> None:
    """Write `(list[bytes], list[bool])` as pickle protocol 4, atomically."""
    if len(jpegs) != 2 * len(issame):
        raise ValueError(f"write_pair_bin: {len(jpegs)} images for {len(issame)} pairs (expected twice as many)")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        pickle.dump(([bytes(b) for b in jpegs], [bool(s) for s in issame]), fh, protocol=4)
    os.replace(tmp, path)
