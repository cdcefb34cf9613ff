"""Numpy renderer of procedural faces: soft-edged SDF layers drawn through an inverse-warped sampling grid.

Every layer is evaluated in the identity's canonical 112x112 frame (landmarks near the ArcFace template); the
output grid is mapped back through the image's similarity transform and a cylinder head-yaw model, so the
five landmarks are forward-mapped through the same transforms and are exact, for aligned crops and loose ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from marginface.data.synth.latents import FaceParams

# Landmark order is the ArcFace template's: eye at image-left, eye at image-right, nose tip, mouth corners.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
_SCLERA = np.array([0.94, 0.93, 0.90], dtype=np.float32)
_LINE = np.array([0.12, 0.08, 0.07], dtype=np.float32)
_FRAME = np.array([0.08, 0.08, 0.10], dtype=np.float32)


@dataclass(frozen=True)
class Nuisance:
    """Everything about one picture that is not the identity: pose, expression, light and degradations."""

    rotation: float = 0.0  # in-plane, radians, about the frame centre
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # pixels
    yaw: float = 0.0  # radians, cylinder head model
    smile: float = 0.0  # < 0 frown, > 0 smile
    blink: float = 0.0  # 0 open, 1 closed
    age: float = 0.0  # 0..1, applied by the caller through `face_params(z, age)`
    background: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    background_angle: float = 0.0
    light_angle: float = 0.0
    light_strength: float = 0.0
    brightness: float = 0.0
    contrast: float = 1.0
    cast: tuple[float, float, float] = (0.0, 0.0, 0.0)
    occluder: tuple[float, float, float, float, float, float, float] | None = None  # x0 y0 x1 y1 r g b (out px)
    sunglasses: bool = False
    blur: int = 0  # passes of a [1 2 1]/4 kernel
    lowres: bool = False
    noise: float = 0.0  # Gaussian sigma on the [0, 1] scale
    noise_seed: int = 0
    jpeg_quality: int = 95


def sample_nuisance(
    rng: np.random.Generator,
    difficulty: float,
    *,
    yaw: float | None = None,
    age: float | None = None,
    frame_size: int = 112,
) -> Nuisance:
    """Draw a nuisance at `difficulty` d (0 = studio portrait; 1 = the train default's upper end; up to ~2).

    Scales follow formats.md Part C: rotation sigma 6 deg * d, scale 5 % * d, shift 2.5 px * d, yaw 0.35 rad * d,
    light 0.6 * d, occluder p = 0.25 d, spurious glasses p = 0.1 d. `yaw`/`age` force those values.
    """
    d = float(difficulty)
    u = rng.uniform
    n = rng.normal
    bg = u(0.05, 0.95, size=(2, 3))
    bg[1] = np.clip(bg[0] + u(-0.35, 0.35, size=3) * min(1.0, 0.3 + d), 0.0, 1.0)
    occluder = None
    if u() < min(1.0, 0.25 * d):
        w, h = u(18, 46), u(14, 40)
        # Boxes come from the sides and the bottom (a hand, a microphone, a scarf) more than from the top.
        x0 = u(-10, frame_size - w + 10)
        y0 = u(frame_size * 0.3, frame_size - h + 8)
        col = u(0.0, 1.0, size=3)
        occluder = (x0, y0, x0 + w, y0 + h, float(col[0]), float(col[1]), float(col[2]))
    return Nuisance(
        rotation=float(np.clip(n(0, np.deg2rad(6.0) * d), -0.6, 0.6)),
        scale=float(np.exp(np.clip(n(0, 0.05 * d), -0.25, 0.25))),
        shift=(float(np.clip(n(0, 2.5 * d), -10, 10)), float(np.clip(n(0, 2.5 * d), -10, 10))),
        yaw=float(np.clip(n(0, 0.35 * d), -0.9, 0.9)) if yaw is None else float(yaw),
        smile=float(np.clip(n(0.1, 0.5 * d), -0.6, 1.0)),
        blink=1.0 if u() < 0.06 * d else float(u(0, 0.3 * d)),
        age=float(u(0, 0.5 * min(d, 1.0))) if age is None else float(age),
        background=(tuple(map(float, bg[0])), tuple(map(float, bg[1]))),
        background_angle=float(u(0, 2 * np.pi)),
        light_angle=float(u(0, 2 * np.pi)),
        light_strength=float(0.6 * d * u(0.3, 1.0)),
        brightness=float(n(0, 0.07 * d)),
        contrast=float(np.exp(n(0, 0.12 * d))),
        cast=tuple(map(float, n(0, 0.04 * d, size=3))),
        occluder=occluder,
        sunglasses=bool(u() < 0.1 * d),
        blur=int(u() < 0.3 * d) + int(u() < 0.1 * d),
        lowres=bool(u() < 0.15 * d),
        noise=float((0.5 + 4.0 * d) / 255.0 * u(0.5, 1.5)),
        noise_seed=int(rng.integers(2**31)),
        jpeg_quality=int(rng.integers(90, 96)),
    )


def similarity(rotation: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0), centre=(56.0, 56.0)) -> np.ndarray:
    """2x3 matrix: rotate and scale about `centre`, then translate by `shift` (pixel x, y)."""
    c, s = np.cos(rotation) * scale, np.sin(rotation) * scale
    a = np.array([[c, -s], [s, c]])
    ctr = np.asarray(centre, dtype=np.float64)
    t = ctr - a @ ctr + np.asarray(shift, dtype=np.float64)
    return np.concatenate([a, t[:, None]], axis=1)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 matrix of `outer(inner(p))`."""
    return np.concatenate([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]], 1)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


class _Canvas:
    """Canonical-frame coordinates of every output pixel, and the soft compositing of SDF layers onto it."""

    def __init__(self, size: int, to_output: np.ndarray, centre_x: float, radius, yaw: float) -> None:
        # `radius(v)` is the head cylinder's radius at height v: the head narrows towards the chin.
        self.size, self.to_output, self.centre_x, self.radius, self.yaw = size, to_output, centre_x, radius, yaw
        self.to_output_list = to_output.tolist()
        inv_a = np.linalg.inv(to_output[:, :2])
        grid = np.arange(size, dtype=np.float64)
        xs, ys = grid[None, :] - to_output[0, 2], grid[:, None] - to_output[1, 2]
        px = inv_a[0, 0] * xs + inv_a[0, 1] * ys
        py = inv_a[1, 0] * xs + inv_a[1, 1] * ys
        self.posed_x, self.posed_y = px.astype(np.float32), py.astype(np.float32)
        # Cylinder yaw: a surface point at angle phi shows at cx + R sin(phi + yaw); invert it per pixel.
        r = radius(py)
        self.u = _from_angle(_to_angle(px, centre_x, r) - yaw, centre_x, r).astype(np.float32)
        self.v = self.posed_y
        # One output pixel spans this many canonical pixels: edges stay about one output pixel soft.
        self.softness = float(np.sqrt(abs(np.linalg.det(inv_a))))
        self.inv_soft = np.float32(1.0 / self.softness)
        self.img = np.zeros((size, size, 3), dtype=np.float32)

    def window(self, u0: float, v0: float, u1: float, v1: float, posed: bool = False) -> tuple[slice, slice] | None:
        """Output-pixel slices covering the canonical (or, if `posed`, the posed) box [u0, u1] x [v0, v1]."""
        # Scalar math on purpose: this runs a dozen times per picture on four points, where numpy's
        # per-call overhead would cost more than the layers it saves.
        m = self.to_output_list
        xs, ys = [], []
        for cu, cv in ((u0, v0), (u1, v0), (u0, v1), (u1, v1)):
            if not posed:
                cu = _yaw_forward_scalar(cu, self.centre_x, float(self.radius(cv)), self.yaw)
            xs.append(m[0][0] * cu + m[0][1] * cv + m[0][2])
            ys.append(m[1][0] * cu + m[1][1] * cv + m[1][2])
        x0, y0 = max(math.floor(min(xs) - 2.0), 0), max(math.floor(min(ys) - 2.0), 0)
        x1, y1 = min(math.ceil(max(xs) + 3.0), self.size), min(math.ceil(max(ys) + 3.0), self.size)
        if x1 <= x0 or y1 <= y0:
            return None
        return slice(y0, y1), slice(x0, x1)

    def alpha(self, sdf: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf * self.inv_soft, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, colour: np.ndarray, win: tuple[slice, slice] | None = None) -> None:
        img = self.img if win is None else self.img[win]
        step = np.asarray(colour, dtype=np.float32) - img
        step *= alpha[..., None]
        img += step


def _ellipse(u, v, cx, cy, a, b, angle=0.0):
    du, dv = u - cx, v - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return (np.sqrt((du / a) ** 2 + (dv / b) ** 2) - 1.0) * min(a, b)


def _capsule(u, v, p0, p1, r):
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    du, dv = u - p0[0], v - p0[1]
    h = np.clip((du * ax + dv * ay) / (ax * ax + ay * ay), 0.0, 1.0)
    return np.sqrt((du - h * ax) ** 2 + (dv - h * ay) ** 2) - r


def _to_angle(x: np.ndarray, centre_x: float, radius: float) -> np.ndarray:
    """Angle on the head cylinder of horizontal position x; beyond the silhouette it grows linearly, so that
    the map stays monotonic (no folding of the back of the head) and exactly invertible by `_from_angle`."""
    rel = (np.asarray(x, dtype=np.float64) - centre_x) / radius
    inside = np.arcsin(np.clip(rel, -1.0, 1.0))
    return inside + np.sign(rel) * np.maximum(np.abs(rel) - 1.0, 0.0)


def _from_angle(angle: np.ndarray, centre_x: float, radius: float) -> np.ndarray:
    half_pi = np.pi / 2
    clipped = np.clip(angle, -half_pi, half_pi)
    return centre_x + radius * (np.sin(clipped) + (angle - clipped))


def _yaw_forward_scalar(x: float, centre_x: float, radius: float, yaw: float) -> float:
    rel = (x - centre_x) / radius
    clipped = min(max(rel, -1.0), 1.0)
    angle = math.asin(clipped) + (rel - clipped) + yaw
    inside = min(max(angle, -math.pi / 2), math.pi / 2)
    return centre_x + radius * (math.sin(inside) + (angle - inside))


def _yaw_forward(x: np.ndarray, centre_x: float, radius: float, yaw: float) -> np.ndarray:
    return _from_angle(_to_angle(x, centre_x, radius) + yaw, centre_x, radius)


def _yaw_inverse(x: float, centre_x: float, radius: float, yaw: float) -> float:
    return float(_yaw_forward(np.asarray(x), centre_x, radius, -yaw))


HeadRadius = Callable[[Any], Any]  # float -> float, array -> array: the head cylinder's radius at height v

# Pixels the mouth corners rise per unit of smile; the landmarks and the drawn mouth must agree on it.
_MOUTH_LIFT = 2.2


@dataclass(frozen=True)
class _Head:
    """The head's output window and its SDF and coverage there, which the later layers mask and light with."""

    window: tuple[slice, slice]
    sdf: np.ndarray
    alpha: np.ndarray


def render_face(
    face: FaceParams, nuisance: Nuisance, size: int = 112, frame: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one face; return (uint8 image `size`x`size`x3 RGB, float64 landmarks (5, 2) in output pixels).

    `frame` (2x3) maps the aligned 112x112 frame into the output (e.g. an unaligned 160x160 loose crop);
    by default the output is the aligned frame itself. The nuisance's rotation/scale/shift act before it.
    """
    f, nz = face, nuisance
    to_output = _output_transform(nz, frame)
    radius = _head_radius(f)
    cv = _Canvas(size, to_output, f.head_centre[0], radius, nz.yaw)
    nose, landmarks = _landmarks(f, nz, to_output, radius)

    # Back to front: what lies behind the head, the head with its skin texture and hair, then the features.
    _paint_background(cv, nz)
    _paint_behind_head(cv, f, nz.yaw)
    head = _paint_head(cv, f)
    _paint_marks(cv, f, head)
    hair_sdf = _paint_hair(cv, f, head)
    _paint_nose(cv, f, nose)
    _paint_mouth(cv, f, nz.smile)
    _paint_eyes(cv, f, nz.blink)
    if f.glasses or nz.sunglasses:
        _paint_glasses(cv, f, nz.sunglasses)
    if nz.light_strength > 0.0:
        _light_head(cv, f, nz, head, hair_sdf)
    return _degrade(cv.img, nz, size), landmarks


def _output_transform(nz: Nuisance, frame: np.ndarray | None) -> np.ndarray:
    """2x3 map from the canonical frame to output pixels: the nuisance's similarity, then `frame`."""
    to_output = similarity(nz.rotation, nz.scale, nz.shift)
    if frame is not None:
        to_output = compose(np.asarray(frame, dtype=np.float64), to_output)
    return to_output


def _head_radius(f: FaceParams) -> HeadRadius:
    """The head cylinder's radius at height v, narrowing towards the chin; scalar or array in, same out."""
    cy = f.head_centre[1]
    ha, hb = f.head_axes

    def radius(v: Any) -> Any:
        # A scalar path: `_Canvas.window` calls this on single points, where numpy would only add overhead.
        if isinstance(v, float):
            return ha * max(1.0 - f.chin * min(max((v - cy) / hb, 0.0), 1.0) ** 2, 0.5)
        return ha * np.maximum(1.0 - f.chin * np.clip((np.asarray(v) - cy) / hb, 0.0, 1.0) ** 2, 0.5)

    return radius


def _landmarks(
    f: FaceParams, nz: Nuisance, to_output: np.ndarray, radius: HeadRadius
) -> tuple[tuple[float, float], np.ndarray]:
    """(canonical point the nose is drawn at, the five landmarks in output pixels)."""
    # The nose tip stands out of the cylinder, so it moves further with yaw; it is drawn at the canonical
    # point whose cylinder image is that displaced position.
    cx = f.head_centre[0]
    lift = _MOUTH_LIFT * nz.smile
    mouth_l = (56.0 - f.mouth_half_width, f.mouth_y - lift)
    mouth_r = (56.0 + f.mouth_half_width, f.mouth_y - lift)
    r_nose = radius(f.nose_tip[1])
    nose_posed_x = float(_yaw_forward(np.array(f.nose_tip[0]), cx, r_nose, nz.yaw)) + 7.0 * np.sin(nz.yaw)
    nose = (_yaw_inverse(nose_posed_x, cx, r_nose, nz.yaw), f.nose_tip[1])
    canon = np.array([f.eye_left, f.eye_right, nose, mouth_l, mouth_r], dtype=np.float64)
    posed = canon.copy()
    posed[:, 0] = _yaw_forward(canon[:, 0], cx, radius(canon[:, 1]), nz.yaw)
    return nose, _apply(to_output, posed)


def _paint_background(cv: _Canvas, nz: Nuisance) -> None:
    """Fill the canvas with the background: a linear gradient in output pixels, not turned with the face."""
    size = cv.size
    ramp = np.arange(size, dtype=np.float32) / max(size - 1, 1) - 0.5
    g = np.clip(
        0.5 + ramp[None, :] * np.cos(nz.background_angle) + ramp[:, None] * np.sin(nz.background_angle), 0.0, 1.0
    )
    bg0, bg1 = (np.asarray(c, dtype=np.float32) for c in nz.background)
    cv.img[:] = bg0 + g[..., None] * (bg1 - bg0)


def _paint_behind_head(cv: _Canvas, f: FaceParams, yaw: float) -> None:
    """Long hair falling behind the head, then the neck and the ears, which sit behind the face."""
    # Silhouettes are drawn at posed (x, v), not canonical (u, v): a turning head keeps its outline.
    x, v = cv.posed_x, cv.v
    cx, cy = f.head_centre
    ha, hb = f.head_axes
    skin = f.skin.astype(np.float32)
    if f.hair_side > 0.2:
        bottom = 62.0 + 40.0 * f.hair_side
        w = cv.window(cx - ha - 8, cy - hb - 5, cx + ha + 8, bottom + 1, posed=True)
        if w:
            back = np.maximum(_ellipse(x[w], v[w], cx, cy + 6.0, ha + 7.0, hb + 4.0), v[w] - bottom)
            cv.paint(cv.alpha(back), f.hair.astype(np.float32) * 0.85, w)
    w = cv.window(cx - ha * 0.6, cy + hb * 0.4, cx + ha * 0.6, 200.0, posed=True)
    if w:
        cv.paint(cv.alpha(_capsule(x[w], v[w], (cx, cy + hb * 0.5), (cx, 240.0), ha * 0.55)), skin * 0.78, w)
    ear_y = f.eye_left[1] + 7.0
    for side in (-1.0, 1.0):
        ex = cx + side * ha * 0.97 - 0.3 * ha * np.sin(yaw)
        w = cv.window(ex - f.ear, ear_y - 2 * f.ear, ex + f.ear, ear_y + 2 * f.ear, posed=True)
        if w:
            cv.paint(cv.alpha(_ellipse(x[w], v[w], ex, ear_y, f.ear * 0.6, f.ear * 1.6)), skin * 0.9, w)


def _paint_head(cv: _Canvas, f: FaceParams) -> _Head:
    """Paint the skin of the head silhouette (narrowing to the chin) and return its window, SDF and coverage."""
    cx, cy = f.head_centre
    ha, hb = f.head_axes
    hw = cv.window(cx - ha - 6, cy - hb - 10, cx + ha + 6, cy + hb + 2, posed=True)
    if hw is None:  # the face is entirely off the picture: background only
        hw = (slice(0, 0), slice(0, 0))
    xh, vh = cv.posed_x[hw], cv.v[hw]
    width = ha * (1.0 - f.chin * np.clip((vh - cy) / hb, 0.0, 1.0) ** 2)
    head_sdf = (np.sqrt(((xh - cx) / width) ** 2 + ((vh - cy) / hb) ** 2) - 1.0) * min(ha, hb)
    head_alpha = cv.alpha(head_sdf)
    cv.paint(head_alpha, f.skin.astype(np.float32), hw)
    return _Head(hw, head_sdf, head_alpha)


def _paint_marks(cv: _Canvas, f: FaceParams, head: _Head) -> None:
    """Marks: signed soft blobs on the skin, the identity's high-capacity texture."""
    u, v, hw = cv.u, cv.v, head.window
    for mx, my, mr, ms in f.marks:
        w = cv.window(mx - 3 * mr, my - 3 * mr, mx + 3 * mr, my + 3 * mr)
        if w:
            blob = np.exp(((u[w] - mx) ** 2 + (v[w] - my) ** 2) * np.float32(-0.5 / (mr * mr)))
            rows, cols = w
            # Masked by the head's coverage where the head window holds the blob's, so no mark shows on
            # the background beside the face.
            inside = (
                head.alpha[
                    rows.start - hw[0].start : rows.stop - hw[0].start,
                    cols.start - hw[1].start : cols.stop - hw[1].start,
                ]
                if _inside(w, hw)
                else 1.0
            )
            cv.img[w] *= (1.0 + np.float32(ms) * blob * inside)[..., None]


def _paint_hair(cv: _Canvas, f: FaceParams, head: _Head) -> np.ndarray:
    """Beard, then the hair mass cut at the hairline; return the hair SDF over the head window (for the light)."""
    hw = head.window
    uh, vh, xh = cv.u[hw], cv.v[hw], cv.posed_x[hw]
    cx, cy = f.head_centre
    ha, hb = f.head_axes
    hair = f.hair.astype(np.float32)
    if f.beard > 0.0:
        beard = np.maximum(head.sdf + 1.0, (f.nose_tip[1] + 5.0) - vh)
        cv.paint(cv.alpha(beard) * np.float32(0.85 * f.beard), hair * 0.8, hw)
    # The mass is a posed silhouette, the hairline a surface detail: it follows canonical u as the head turns.
    hair_sdf = _ellipse(xh, vh, cx, cy - 3.0, ha + 4.0, hb + 5.0)
    rel = (uh - cx - f.hair_part) / ha
    hair_bottom = f.hairline + (14.0 + 10.0 * f.hair_side) * rel * rel
    cv.paint(cv.alpha(np.maximum(hair_sdf, vh - hair_bottom)), hair, hw)
    return hair_sdf


def _paint_nose(cv: _Canvas, f: FaceParams, nose: tuple[float, float]) -> None:
    """Nose: side shading, then nostrils at the (yaw-displaced) tip."""
    skin = f.skin.astype(np.float32)
    nx, ny = nose
    dark = skin * 0.72
    top = f.eye_left[1] + 6.0
    w = cv.window(nx - f.nose_width - 3, top - 2, nx + f.nose_width + 3, ny + 4)
    if w:
        uw, vw = cv.u[w], cv.v[w]
        for side in (-1.0, 1.0):
            ridge = _capsule(
                uw, vw, (nx + side * f.nose_width * 0.4, top), (nx + side * f.nose_width * 0.95, ny - 1.5), 0.9
            )
            cv.paint(cv.alpha(ridge) * np.float32(0.45), dark, w)
            nostril = _ellipse(uw, vw, nx + side * f.nose_width * 0.5, ny + 1.2, 1.7, 1.0)
            cv.paint(cv.alpha(nostril) * np.float32(0.9), skin * 0.35, w)


def _paint_mouth(cv: _Canvas, f: FaceParams, smile: float) -> None:
    """Mouth: lips between two arcs through the corners, and the line between them."""
    lift = _MOUTH_LIFT * smile
    mw = f.mouth_half_width
    w = cv.window(
        56.0 - mw - 2,
        f.mouth_y - lift - 2 * f.mouth_thick - 4,
        56.0 + mw + 2,
        f.mouth_y + 1.3 * abs(smile) + 2 * f.mouth_thick + 4,
    )
    if w:
        uw, vw = cv.u[w], cv.v[w]
        t = (uw - 56.0) / mw
        e = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))
        line_y = f.mouth_y - lift + (1.3 * smile + lift) * (1.0 - t * t)
        upper, lower = f.mouth_thick * 0.8, f.mouth_thick * (1.0 + 0.2 * smile)
        lips_sdf = np.maximum(
            np.abs(vw - line_y - 0.5 * (lower - upper) * e) - 0.5 * (upper + lower) * e - 0.3, (np.abs(t) - 1.0) * mw
        )
        cv.paint(cv.alpha(lips_sdf), f.lips.astype(np.float32), w)
        mouth_line = np.maximum(np.abs(vw - line_y) - 0.55, (np.abs(t) - 1.0) * mw)
        cv.paint(cv.alpha(mouth_line) * np.float32(0.85), _LINE, w)


def _paint_eyes(cv: _Canvas, f: FaceParams, blink: float) -> None:
    """Eyes: outline, sclera, iris and pupil, all centred on the landmark, and the brows above them."""
    # A blink closes the eye to a line rather than removing it: the landmark still marks something.
    open_ = 1.0 - float(np.clip(blink, 0.0, 1.0))
    ew = f.eye_size
    eh = max(f.eye_size * f.eye_aspect * open_, 0.45)
    iris_r = f.eye_size * 0.48
    brow_colour = f.hair.astype(np.float32) * 0.7
    for ex, ey in (f.eye_left, f.eye_right):
        side = -1.0 if ex < 56.0 else 1.0
        w = cv.window(ex - ew - 4, ey - f.brow_gap - f.brow_thick - 4, ex + ew + 4, ey + ew + 2)
        if not w:
            continue
        uw, vw = cv.u[w], cv.v[w]
        cv.paint(cv.alpha(_ellipse(uw, vw, ex, ey, ew + 0.8, eh + 0.8)) * np.float32(0.9), _LINE, w)
        if open_ > 0.0:
            sclera = cv.alpha(_ellipse(uw, vw, ex, ey, ew, eh))
            cv.paint(sclera, _SCLERA, w)
            dist = np.sqrt((uw - ex) ** 2 + (vw - ey) ** 2)
            cv.paint(np.minimum(cv.alpha(dist - iris_r), sclera), f.iris.astype(np.float32), w)
            cv.paint(np.minimum(cv.alpha(dist - iris_r * 0.45), sclera), _LINE * 0.5, w)
        brow = _ellipse(uw, vw, ex + side * 0.8, ey - f.brow_gap, ew + 2.6, f.brow_thick, angle=side * f.brow_tilt)
        cv.paint(cv.alpha(brow) * np.float32(0.92), brow_colour, w)


def _paint_glasses(cv: _Canvas, f: FaceParams, sunglasses: bool) -> None:
    """Glasses frames round both eyes and their bridge; sunglasses also darken the lenses."""
    ew = f.eye_size
    (lx, ly), (rx, ry) = f.eye_left, f.eye_right
    w = cv.window(lx - ew - 7, min(ly, ry) - ew - 6, rx + ew + 7, max(ly, ry) + ew + 6)
    if not w:
        return
    uw, vw = cv.u[w], cv.v[w]
    for ex, ey in (f.eye_left, f.eye_right):
        lens = _ellipse(uw, vw, ex, ey, ew + 4.5, ew * 0.75 + 3.5)
        if sunglasses:
            cv.paint(cv.alpha(lens) * np.float32(0.88), _FRAME, w)
        cv.paint(cv.alpha(np.abs(lens) - 0.7), _FRAME, w)
    bridge = _capsule(uw, vw, (lx + ew + 4.0, ly - 1.0), (rx - ew - 4.0, ry - 1.0), 0.7)
    cv.paint(cv.alpha(bridge), _FRAME, w)


def _light_head(cv: _Canvas, f: FaceParams, nz: Nuisance, head: _Head, hair_sdf: np.ndarray) -> None:
    """Directional light in the posed frame, on the head and hair (a cylinder's normal), not the background."""
    cx, cy = f.head_centre
    ha, hb = f.head_axes
    hw = head.window
    nxp = np.clip((cv.posed_x[hw] - cx) / ha, -1.0, 1.0)
    nyp = np.clip((cv.posed_y[hw] - cy) / hb, -1.0, 1.0)
    shade = np.float32(nz.light_strength) * (
        np.float32(np.cos(nz.light_angle)) * nxp + np.float32(np.sin(nz.light_angle)) * nyp
    )
    fg = np.maximum(head.alpha, cv.alpha(hair_sdf))
    cv.img[hw] *= (1.0 + shade * fg)[..., None]


def _degrade(img: np.ndarray, nz: Nuisance, size: int) -> np.ndarray:
    """The camera's part, in output pixels: occluder, exposure and colour cast, low resolution, blur, noise, uint8."""
    # In place on the canvas where numpy allows it: a picture is rendered once and these are its largest arrays.
    if nz.occluder is not None:
        x0, y0, x1, y1, r, g_, b = nz.occluder
        img[int(max(y0, 0)) : int(max(y1, 0)), int(max(x0, 0)) : int(max(x1, 0))] = (r, g_, b)
    img = (img - np.float32(0.5)) * np.float32(nz.contrast) + np.float32(0.5 + nz.brightness)
    img *= 1.0 + np.asarray(nz.cast, dtype=np.float32)
    if nz.lowres and size % 2 == 0:
        small = img.reshape(size // 2, 2, size // 2, 2, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    for _ in range(nz.blur):
        img = _blur121(img)
    if nz.noise > 0.0:
        noise = np.random.default_rng(nz.noise_seed).standard_normal(img.shape, dtype=np.float32)
        img += np.float32(nz.noise) * noise
    img *= np.float32(255.0)
    img += np.float32(0.5)  # rounds to nearest in the truncating cast below
    return np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)


def _inside(inner: tuple[slice, slice], outer: tuple[slice, slice]) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer, strict=True))


def _blur121(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
