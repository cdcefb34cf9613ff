"""5-point alignment: the Umeyama fit and the warp against scikit-image as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import SimilarityTransform, warp

from marginface.data import ARCFACE_TEMPLATE, align, estimate_similarity
from marginface.data.align import arcface_template, warp_affine
from marginface.errors import ConfigError

TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def _skimage_params(src, dst):
    return SimilarityTransform.from_estimate(src, dst).params


@pytest.mark.parametrize("seed", range(20))
def test_estimate_similarity_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, size=(5, 2))
    dst = TEMPLATE_112 + rng.normal(0, 3, size=(5, 2)) if seed % 2 else rng.uniform(0, 112, size=(5, 2))
    ours = estimate_similarity(src, dst)
    np.testing.assert_allclose(ours, _skimage_params(src, dst)[:2], atol=1e-9)


def test_estimate_similarity_no_reflection():
    # A mirrored point set: the best proper similarity must still have det > 0 (no reflection).
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src * np.array([-1.0, 1.0])
    matrix = estimate_similarity(src, dst)
    assert np.linalg.det(matrix[:, :2]) > 0
    np.testing.assert_allclose(matrix, _skimage_params(src, dst)[:2], atol=1e-9)


def test_exact_similarity_is_recovered():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = TEMPLATE_112
    dst = scale * src @ rotation.T + shift
    np.testing.assert_allclose(estimate_similarity(src, dst), np.c_[scale * rotation, shift], atol=1e-9)


def test_template_scaling_rules():
    np.testing.assert_allclose(ARCFACE_TEMPLATE, TEMPLATE_112)
    np.testing.assert_allclose(arcface_template(224), TEMPLATE_112 * 2)
    # %128 rule: scale by s/128 and add 8*s/128 to x
    expected = TEMPLATE_112 * 2.0
    expected[:, 0] += 16.0
    np.testing.assert_allclose(arcface_template(256), expected)
    legacy = TEMPLATE_112.copy()
    legacy[:, 0] -= 8.0
    np.testing.assert_allclose(arcface_template((112, 96)), legacy)
    with pytest.raises(ConfigError, match="size 100"):
        arcface_template(100)


def test_warp_matches_skimage_bilinear():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(150, 130, 3), dtype=np.uint8)
    landmarks = TEMPLATE_112 * 1.1 + np.array([10.0, 5.0]) + rng.normal(0, 2, size=(5, 2))
    ours = align(image, landmarks, 112).astype(np.float64)
    tform = SimilarityTransform.from_estimate(landmarks, TEMPLATE_112)
    reference = warp(
        image.astype(np.float64),
        tform.inverse,
        output_shape=(112, 112),
        order=1,
        mode="constant",
        cval=0.0,
        preserve_range=True,
    )
    assert ours.shape == (112, 112, 3)
    # Rounding to uint8 is the only difference allowed.
    assert np.abs(ours - reference).max() <= 0.5 + 1e-9


def test_warp_border_is_black():
    image = np.full((40, 40, 3), 200, dtype=np.uint8)
    # Map the image into the top-left corner only: everything else must read the border value 0.
    out = warp_affine(image, np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]), (60, 60))
    assert (out[:15, :15] == 200).all()
    assert (out[25:, :] == 0).all() and (out[:, 25:] == 0).all()


def test_align_identity_on_template():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align(image, TEMPLATE_112), image)


def test_align_bad_landmarks():
    with pytest.raises(ConfigError, match="5"):
        align(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="coincide"):
        align(np.zeros((10, 10, 3), np.uint8), np.ones((5, 2)))
