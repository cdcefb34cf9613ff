"""One synthetic picture as data: an `ImageSpec` names the identity, the seed stream and the nuisance level, and
`render_spec` turns it into pixels and exact landmarks, the same on any machine and in any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import simplejpeg

from marginface.data.synth.latents import SPLITS, aged_latent, face_params, identity_latent
from marginface.data.synth.render import Nuisance, render_face, sample_nuisance, similarity

LOOSE_SIZE = 160  # IJB-style loose crops


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines one picture besides the global seed and the sibling spread `delta`.

    `stream` separates the seed streams of the training images and of each pair set / the IJB tree; `index`
    counts the pictures of one identity within a stream. `yaw` forces |yaw| (the sign stays random), `age`
    forces the apparent age, `age_drift` moves the age-related latent coordinates (AgeDB-like pairs).
    `loose` renders an unaligned 160x160 crop; `frame` > 0 is a later frame of the same burst (IJB media):
    the nuisance of frame 0 with a small jitter.
    """

    split: str
    family: int
    member: int
    stream: int
    index: int
    difficulty: float
    yaw: float | None = None
    age: float | None = None
    age_drift: float = 0.0
    loose: bool = False
    frame: int = 0

    @property
    def identity_key(self) -> str:
        return f"{self.split}/{self.family}/{self.member}"


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in keys)))


def spec_nuisance(seed: int, spec: ImageSpec) -> tuple[Nuisance, np.ndarray | None]:
    """The nuisance of `spec` and, for a loose crop, the 2x3 frame placing the aligned face in the crop."""
    keys = (2, SPLITS[spec.split], spec.stream, spec.family, spec.member, spec.index)
    rng = _rng(seed, *keys)
    yaw = None
    if spec.yaw is not None:
        yaw = float(spec.yaw) * (1.0 if rng.uniform() < 0.5 else -1.0)
    nz = sample_nuisance(rng, spec.difficulty, yaw=yaw, age=spec.age, frame_size=LOOSE_SIZE if spec.loose else 112)
    frame = None
    if spec.loose:
        # An unaligned detector-style crop: the face somewhat off-centre, rotated and at a varying scale.
        frame = similarity(
            rng.normal(0, np.deg2rad(8.0)),
            rng.uniform(0.85, 1.15),
            (24.0 + rng.normal(0, 6.0), 24.0 + rng.normal(0, 6.0)),
        )
    if spec.frame > 0:
        jitter = _rng(seed, *keys, spec.frame)
        nz = replace(
            nz,
            rotation=nz.rotation + jitter.normal(0, 0.02),
            shift=(nz.shift[0] + jitter.normal(0, 0.8), nz.shift[1] + jitter.normal(0, 0.8)),
            yaw=float(np.clip(nz.yaw + jitter.normal(0, 0.05), -0.9, 0.9)),
            smile=nz.smile + jitter.normal(0, 0.1),
            blink=float(jitter.uniform(0, 0.2)),
            noise_seed=int(jitter.integers(2**31)),
        )
    return nz, frame


def render_spec(seed: int, spec: ImageSpec, delta: float = 0.6) -> tuple[np.ndarray, np.ndarray, Nuisance]:
    """Render `spec`: (uint8 HxWx3 RGB image, landmarks (5, 2) in its pixels, the nuisance used)."""
    z = identity_latent(seed, spec.split, spec.family, spec.member, delta)
    if spec.age_drift:
        z = aged_latent(
            z, _rng(seed, 3, SPLITS[spec.split], spec.stream, spec.family, spec.member, spec.index), spec.age_drift
        )
    nz, frame = spec_nuisance(seed, spec)
    image, landmarks = render_face(face_params(z, nz.age), nz, size=LOOSE_SIZE if spec.loose else 112, frame=frame)
    return image, landmarks, nz


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=int(quality), colorspace="RGB")


def render_jpegs(seed: int, delta: float, specs: list[ImageSpec]) -> list[tuple[bytes, np.ndarray, Nuisance]]:
    """Worker entry point: render and JPEG-encode a batch of specs (module-level so that it pickles)."""
    out = []
    for spec in specs:
        image, landmarks, nz = render_spec(seed, spec, delta)
        out.append((encode_jpeg(image, nz.jpeg_quality), landmarks, nz))
    return out
