"""The built-in synthetic face-identity set: procedural 112x112 faces with exact landmarks, written as RecordIO,
verification `.bin` pair sets and an IJB-style tree, so that marginface trains and evaluates with no download.
"""

from __future__ import annotations

from marginface.data.synth.build import (
    CACHE_ENV,
    GENERATOR_VERSION,
    SyntheticSet,
    cache_key,
    default_cache_dir,
    synthetic,
    synthetic_params,
)
from marginface.data.synth.latents import LATENT_DIM, FaceParams, face_params, identity_latent
from marginface.data.synth.pairs import PAIR_SETS
from marginface.data.synth.render import LANDMARK_NAMES, Nuisance, render_face, sample_nuisance
from marginface.data.synth.sample import ImageSpec, render_spec

__all__ = [
    "CACHE_ENV",
    "GENERATOR_VERSION",
    "LANDMARK_NAMES",
    "LATENT_DIM",
    "PAIR_SETS",
    "FaceParams",
    "ImageSpec",
    "Nuisance",
    "SyntheticSet",
    "cache_key",
    "default_cache_dir",
    "face_params",
    "identity_latent",
    "render_face",
    "render_spec",
    "sample_nuisance",
    "synthetic",
    "synthetic_params",
]
