"""Five-point face alignment to the ArcFace template: Umeyama similarity fit and an inverse-map bilinear warp.

Template and scaling rules follow formats.md A4; the warp matches `cv2.warpAffine(..., borderValue=0)` with
bilinear interpolation (pixel centres on integer coordinates), implemented in numpy.
"""

from __future__ import annotations

import numpy as np

from marginface.errors import ConfigError

# L-eye, R-eye, nose, L-mouth, R-mouth in (x, y) pixels of a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(v) for v in size)
    return height, width


def arcface_template(size: int | tuple[int, int] = 112) -> np.ndarray:
    """The 5-point template for an output of `size` (int, or (height, width) for 112x96 crops).

    Sizes divisible by 112 scale the template by size/112; sizes divisible by 128 scale by size/128 and shift
    x by 8*size/128 (the template then sits in a 128-wide frame, as insightface does). (112, 96) is the legacy
    crop with every x moved 8 px left.
    """
    height, width = _size_hw(size)
    if (height, width) == (112, 96):
        return ARCFACE_TEMPLATE - np.array([8.0, 0.0])
    if height != width:
        raise ConfigError(f"align: size {height}x{width} unsupported; expected a square size or (112, 96)")
    if height % 112 == 0:
        return ARCFACE_TEMPLATE * (height / 112.0)
    if height % 128 == 0:
        ratio = height / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ConfigError(f"align: size {height} unsupported; expected a multiple of 112 or of 128")


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    Umeyama (1991). Returns the 2x3 matrix `M` with `dst ~ M @ [x, y, 1]`.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ConfigError(f"estimate_similarity: src {src.shape} and dst {dst.shape} must both be (N, 2) with N >= 2")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ConfigError("estimate_similarity: landmarks contain NaN or infinity")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ConfigError("estimate_similarity: source landmarks all coincide; cannot fit a similarity")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    # Excluding reflection: flip the smallest singular direction when the best orthogonal map would mirror.
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float((sigma * d).sum() / src_var)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border_value: float = 0) -> np.ndarray:
    """Warp `image` (HxW or HxWxC) with the forward 2x3 `matrix` into an output of `size` = (height, width).

    Each output pixel samples the input at the inverse-mapped point with bilinear interpolation; samples
    outside the input read `border_value` (so edges blend into it, as cv2's constant border does).
    """
    height, width = size
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    src = np.asarray(image)
    squeeze = src.ndim == 2
    if squeeze:
        src = src[:, :, None]
    in_h, in_w, channels = src.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    # Pad by one border pixel on each side so that every neighbour index is valid after clipping.
    padded = np.full((in_h + 2, in_w + 2, channels), border_value, dtype=np.float64)
    padded[1:-1, 1:-1] = src
    xa = np.clip(x0 + 1, 0, in_w + 1)
    xb = np.clip(x0 + 2, 0, in_w + 1)
    ya = np.clip(y0 + 1, 0, in_h + 1)
    yb = np.clip(y0 + 2, 0, in_h + 1)
    top = padded[ya, xa] * (1 - fx) + padded[ya, xb] * fx
    bottom = padded[yb, xa] * (1 - fx) + padded[yb, xb] * fx
    out = top * (1 - fy) + bottom * fy
    far = (x0 < -1) | (x0 > in_w - 1) | (y0 < -1) | (y0 > in_h - 1)
    out[far] = border_value
    if np.issubdtype(src.dtype, np.integer):
        info = np.iinfo(src.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(src.dtype)
    else:
        out = out.astype(src.dtype)
    return out[:, :, 0] if squeeze else out


def align(image: np.ndarray, landmarks5: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """Crop a face by its 5 landmarks (x, y; L-eye, R-eye, nose, L-mouth, R-mouth) to the ArcFace template.

    Returns a uint8 array of `size` x `size` (x 3 for colour input) with black outside the source image.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ConfigError(f"align: image has shape {image.shape}; expected HxW or HxWxC")
    landmarks = np.asarray(landmarks5, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ConfigError(f"align: landmarks5 has {landmarks.size} values; expected 5 (x, y) points")
    template = arcface_template(size)
    matrix = estimate_similarity(landmarks, template)
    return warp_affine(np.asarray(image, dtype=np.uint8), matrix, _size_hw(size))
