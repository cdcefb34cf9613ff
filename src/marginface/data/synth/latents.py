"""Identities of the synthetic face set: seeded latent vectors, sibling families, and their face parameters.

An identity is a latent `z ~ N(0, I)` drawn from (seed, split, family, member) alone, so any identity can be
recreated without generating the others; a family's later members are siblings `sqrt(1-delta^2) z + delta eps`
of its first, which gives hard negatives with a known similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Latent layout. The first BASE_DIMS coordinates drive the global face shape and colouring; the rest are the
# K "marks" (4 numbers each) that carry most of the identity capacity, as in formats.md Part C.
NUM_MARKS = 5
MARK_DIMS = 4
BASE_DIMS = 28
LATENT_DIM = BASE_DIMS + NUM_MARKS * MARK_DIMS

# Splits keep the seed streams of training, evaluation-pair and IJB identities apart: identities of different
# splits are independent draws, so pair sets never share a person with the training set.
SPLITS = {"train": 0, "pairs": 1, "ijb": 2}

# Indices into z (named so that the age drift and the tests can refer to them).
HEAD_W, HEAD_H, CHIN, SKIN_TONE, SKIN_RED, HAIR_LIGHT, HAIR_HUE, HAIRLINE, HAIR_PART, HAIR_SIDE = range(10)
EYE_SPACING, EYE_HEIGHT, EYE_SIZE, EYE_ASPECT, IRIS_HUE, IRIS_DARK = range(10, 16)
BROW_THICK, BROW_TILT, BROW_GAP, NOSE_LEN, NOSE_W, MOUTH_W, MOUTH_THICK, MOUTH_Y, LIP_RED = range(16, 25)
BEARD, GLASSES, EAR = range(25, 28)
MARKS = slice(BASE_DIMS, LATENT_DIM)
# Coordinates an "age drift" perturbs (AgeDB-like pairs): hairline, skin, hair colour and the marks' strength.
AGE_DIMS = np.array(
    [HAIRLINE, SKIN_TONE, SKIN_RED, HAIR_LIGHT, CHIN, *range(BASE_DIMS + 3, LATENT_DIM, MARK_DIMS)], dtype=np.int64
)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in keys)))


def identity_latent(seed: int, split: str, family: int, member: int = 0, delta: float = 0.6) -> np.ndarray:
    """Latent vector (float64, LATENT_DIM) of member `member` of family `family` in `split`.

    Member 0 is the family's root `z`; member m > 0 is a sibling `sqrt(1 - delta^2) z + delta eps_m`, each with
    its own `eps_m`, so siblings correlate at about `sqrt(1 - delta^2)` with the root.
    """
    split_id = SPLITS[split]
    z = _rng(seed, 1, split_id, family, 0).standard_normal(LATENT_DIM)
    if member == 0:
        return z
    eps = _rng(seed, 1, split_id, family, member).standard_normal(LATENT_DIM)
    return np.sqrt(1.0 - delta * delta) * z + delta * eps


def aged_latent(z: np.ndarray, rng: np.random.Generator, amount: float, delta_age: float = 0.3) -> np.ndarray:
    """Drift a few latent coordinates (hairline, skin, hair colour, mark strength) by `amount * delta_age`."""
    out = z.copy()
    out[AGE_DIMS] += amount * delta_age * rng.standard_normal(len(AGE_DIMS))
    return out


def _sig(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _lerp(a: np.ndarray | float, b: np.ndarray | float, t: float) -> np.ndarray:
    return np.asarray(a, dtype=np.float64) * (1.0 - t) + np.asarray(b, dtype=np.float64) * t


def _hue_rgb(hue: float) -> np.ndarray:
    """A saturated RGB colour on the hue circle, hue in [0, 1)."""
    k = (np.array([0.0, 2.0 / 3.0, 1.0 / 3.0]) + hue) % 1.0
    return np.clip(np.abs(k * 6.0 - 3.0) - 1.0, 0.0, 1.0)


@dataclass(frozen=True)
class FaceParams:
    """Geometry (pixels of the 112x112 aligned frame) and colours (RGB in [0, 1]) of one identity."""

    head_centre: tuple[float, float]
    head_axes: tuple[float, float]
    chin: float
    skin: np.ndarray
    hair: np.ndarray
    hairline: float
    hair_part: float
    hair_side: float
    eye_left: tuple[float, float]
    eye_right: tuple[float, float]
    eye_size: float
    eye_aspect: float
    iris: np.ndarray
    brow_thick: float
    brow_tilt: float
    brow_gap: float
    nose_tip: tuple[float, float]
    nose_len: float
    nose_width: float
    mouth_y: float
    mouth_half_width: float
    mouth_thick: float
    lips: np.ndarray
    beard: float
    glasses: bool
    ear: float
    marks: np.ndarray  # (K, 4): x, y, radius, signed intensity


def face_params(z: np.ndarray, age: float = 0.0) -> FaceParams:
    """Map a latent vector to face parameters; `age` in [0, 1] greys the hair and raises the hairline."""
    z = np.asarray(z, dtype=np.float64)
    if z.shape != (LATENT_DIM,):
        raise ValueError(f"face_params: latent must have shape ({LATENT_DIM},), got {z.shape}")
    t = np.tanh  # bounded maps keep every face inside the frame whatever the draw
    cx, cy = 56.0, 60.0 + 2.0 * t(z[HEAD_H])
    head_a = 38.0 + 4.0 * t(z[HEAD_W])
    head_b = 50.0 + 4.0 * t(z[HEAD_H])

    tone = _sig(1.3 * z[SKIN_TONE])
    skin = _lerp([0.36, 0.24, 0.17], [0.95, 0.80, 0.70], tone)
    skin = skin + 0.05 * t(z[SKIN_RED]) * np.array([1.0, -0.3, -0.5])
    light = _sig(1.4 * z[HAIR_LIGHT])
    hair_hue = _lerp([0.10, 0.07, 0.05], 0.6 * _hue_rgb(0.02 + 0.08 * _sig(z[HAIR_HUE])) + 0.25, light)
    hair = _lerp(hair_hue, [0.72, 0.72, 0.74], min(1.0, max(0.0, age - 0.3) * 1.4))

    spacing = 17.6 + 2.6 * t(z[EYE_SPACING])
    eye_y = 51.6 + 2.2 * t(z[EYE_HEIGHT])
    iris_col = 0.75 * _hue_rgb(0.05 + 0.6 * _sig(1.5 * z[IRIS_HUE])) * (1.0 - 0.7 * _sig(z[IRIS_DARK]))

    nose_len = 20.0 + 3.0 * t(z[NOSE_LEN])
    mouth_y = 92.3 + 2.0 * t(z[MOUTH_Y])
    lips = skin * np.array([0.85, 0.55, 0.55]) + 0.12 * _sig(z[LIP_RED]) * np.array([1.0, 0.0, 0.1])

    marks = z[MARKS].reshape(NUM_MARKS, MARK_DIMS)
    # Marks sit on the skin (cheeks, forehead, jaw): positions from an angle and radius around the nose.
    ang = np.pi * t(0.8 * marks[:, 0]) + np.pi / 2
    rad = 14.0 + 14.0 * _sigv(marks[:, 1])
    mx = cx + rad * np.cos(ang) * (head_a / 38.0)
    my = 70.0 + rad * np.sin(ang) * 1.15
    radius = 3.5 + 4.0 * _sigv(marks[:, 2])
    strength = np.sign(marks[:, 3]) * (0.22 + 0.30 * np.tanh(np.abs(marks[:, 3])))
    return FaceParams(
        head_centre=(cx, cy),
        head_axes=(head_a, head_b),
        chin=0.15 + 0.25 * _sig(z[CHIN]),
        skin=np.clip(skin, 0.0, 1.0),
        hair=np.clip(hair, 0.0, 1.0),
        hairline=30.0 + 6.0 * t(z[HAIRLINE]) - 8.0 * max(0.0, age - 0.5),
        hair_part=6.0 * t(z[HAIR_PART]),
        hair_side=t(z[HAIR_SIDE]),
        eye_left=(56.0 - spacing, eye_y),
        eye_right=(56.0 + spacing, eye_y - 0.2),
        eye_size=5.8 + 1.2 * t(z[EYE_SIZE]),
        eye_aspect=0.55 + 0.15 * t(z[EYE_ASPECT]),
        iris=iris_col,
        brow_thick=1.3 + 1.0 * _sig(1.5 * z[BROW_THICK]),
        brow_tilt=0.18 * t(z[BROW_TILT]),
        brow_gap=7.5 + 2.0 * t(z[BROW_GAP]),
        nose_tip=(56.0, eye_y + nose_len),
        nose_len=nose_len,
        nose_width=4.0 + 1.6 * t(z[NOSE_W]),
        mouth_y=mouth_y,
        mouth_half_width=14.6 + 3.0 * t(z[MOUTH_W]),
        mouth_thick=2.4 + 1.4 * _sig(z[MOUTH_THICK]),
        lips=np.clip(lips, 0.0, 1.0),
        beard=float(np.clip((z[BEARD] - 0.9) * 2.0, 0.0, 1.0)),
        glasses=bool(z[GLASSES] > 1.15),
        ear=5.0 + 1.5 * t(z[EAR]),
        marks=np.stack([mx, my, radius, strength * (1.0 + 0.4 * age)], axis=1),
    )


def _sigv(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
