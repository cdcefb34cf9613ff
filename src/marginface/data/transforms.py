"""Training and evaluation transforms: optional resize, seeded horizontal flip, `(x/255 - 0.5)/0.5` to CHW.

Flip randomness is a pure function of (seed, epoch, index), so a resumed run, or a run with a different
number of DataLoader workers, sees exactly the same images.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_random(seed: int, epoch: int, index: int) -> int:
    """A 64-bit pseudo-random integer that depends only on (seed, epoch, index)."""
    return _splitmix64(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(epoch) & _MASK64)) ^ int(index))


def flip_decision(seed: int, epoch: int, index: int, p: float = 0.5) -> bool:
    """Whether item `index` is flipped in `epoch` (probability `p`), reproducibly."""
    return (item_random(seed, epoch, index) >> 11) * (1.0 / (1 << 53)) < p


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a uint8 HxWx3 array to `size` (int or (h, w))."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if image.shape[0] == height and image.shape[1] == width:
        return image
    from PIL import Image

    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def to_tensor(image: np.ndarray, flip: bool = False) -> torch.Tensor:
    """uint8 HxWx3 -> contiguous float32 3xHxW normalised as (x/255 - 0.5)/0.5, flipped left-right if asked."""
    if not image.flags.writeable:
        image = image.copy()  # torch.from_numpy warns on read-only arrays (e.g. np.asarray of a PIL image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    if flip:
        chw = chw.flip(-1)
    # Flip and transpose on uint8 (a quarter of the bytes), then one conversion and an in-place affine.
    return chw.contiguous().float().mul_(2.0 / 255.0).sub_(1.0)


class FaceTransform:
    """Resize (optional), random horizontal flip seeded by (seed, epoch, index), normalise to CHW float32."""

    def __init__(self, image_size: int | tuple[int, int] | None = None, flip_p: float = 0.5, seed: int = 0) -> None:
        self.image_size = image_size
        self.flip_p = float(flip_p)
        self.seed = int(seed)

    @property
    def size_hw(self) -> tuple[int, int] | None:
        """The output (height, width), or None to keep the stored size."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return (int(self.image_size[0]), int(self.image_size[1]))

    def __call__(self, image: np.ndarray, index: int = 0, epoch: int = 0) -> torch.Tensor:
        if self.image_size is not None:
            image = resize(image, self.image_size)
        flip = self.flip_p > 0 and flip_decision(self.seed, epoch, index, self.flip_p)
        return to_tensor(image, flip)

    def __repr__(self) -> str:
        return f"FaceTransform(image_size={self.image_size}, flip_p={self.flip_p}, seed={self.seed})"
