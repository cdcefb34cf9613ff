"""Image bytes to RGB arrays and back: format sniffing, simplejpeg (libjpeg-turbo) for JPEG, else Pillow."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
import simplejpeg

from marginface.errors import DataFormatError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG"


def sniff(data: bytes) -> str:
    """'jpeg', 'png' or 'other' from the first bytes (formats.md A1: FF D8 FF / 89 50 4E 47)."""
    head = bytes(data[:4])
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return "other"


def decode_rgb(
    data: bytes, where: str | Callable[[], str] = "image", size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode encoded image bytes to a uint8 HxWx3 RGB array.

    `where` names the file/record in error messages; it may be a callable, evaluated only when one is raised.

    With `size=(h, w)` a JPEG whose dimensions are exactly 2, 4 or 8 times `size` is scaled down inside the
    decoder (DCT scaling, several times faster than decoding in full and resizing); any other input is
    decoded at full size and left for the caller to resize.
    """
    if not len(data):
        raise DataFormatError(f"{_name(where)}: empty image payload; expected JPEG or PNG bytes")
    if sniff(data) == "jpeg":
        try:
            if size is not None and _dct_factor(data, size):
                return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size[0], min_width=size[1])
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ValueError, RuntimeError):
            pass  # CMYK, arithmetic coding, partly corrupt files: let Pillow try before giving up
    return _decode_pillow(data, where, size)


def _dct_factor(data: bytes, size: tuple[int, int]) -> int:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    for factor in (2, 4, 8):
        if height == size[0] * factor and width == size[1] * factor:
            return factor
    return 0


def _name(where: str | Callable[[], str]) -> str:
    return where() if callable(where) else where


def _decode_pillow(data: bytes, where: str | Callable[[], str], size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            if size is not None and image.format == "JPEG" and _exact_reduction(image.size, size):
                image.draft("RGB", (size[1], size[0]))  # the same DCT scaling as the simplejpeg path
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # Pillow names its in-memory file ("<_io.BytesIO object at 0x...>"): noise that differs run to run.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise DataFormatError(
            f"{_name(where)}: cannot decode image ({len(data)} bytes starting {bytes(data[:4]).hex()}): {reason}; "
            "expected a JPEG or PNG"
        ) from None
    return np.array(rgb, dtype=np.uint8)


def _exact_reduction(full: tuple[int, int], size: tuple[int, int]) -> bool:
    width, height = full
    return any(height == size[0] * f and width == size[1] * f for f in (2, 4, 8))


def image_size(data: bytes, where: str = "image") -> tuple[int, int]:
    """(height, width) of encoded image bytes, reading only the header where the format allows it."""
    if sniff(data) == "jpeg":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(height), int(width)
        except (ValueError, RuntimeError):
            pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            return int(image.height), int(image.width)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataFormatError(f"{where}: cannot read image header: {exc}; expected a JPEG or PNG") from None


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode a uint8 HxWx3 RGB (or HxW grey) array as JPEG with 4:4:4 chroma, as face datasets are stored."""
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return simplejpeg.encode_jpeg(array[:, :, None], quality=int(quality), colorspace="GRAY")
    return simplejpeg.encode_jpeg(array, quality=int(quality), colorspace="RGB", colorsubsampling="444")


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 image array losslessly as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
