"""Verification pair sets from insightface `.bin` files (lfw, cfp_fp, agedb_30, ...), loaded safely.

A `.bin` is a pickle of ``(encoded_images, issame)``. Pickles can run code, so this module never calls
`pickle.load` on them: it audits every opcode first, then unpickles with a `find_class` that knows only an
allow-list of globals and answers each with a harmless shim (numpy is never imported during the load). Any
other global is refused with an error naming it, before anything in the file has run.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginface.errors import ConfigError, DataFormatError
from marginface.fileio import atomic_write_bytes

__all__ = ["ALLOWED_GLOBALS", "PairSet", "load_pair_sets", "load_pairs", "read_bin_payload", "save_pairs"]

IMAGE_SIZE = 112
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class PairSet:
    """Decoded pair set: ``images`` uint8 [2P, 112, 112, 3] RGB (pair k = images 2k and 2k+1),
    ``issame`` bool [P], ``name`` (the file stem, e.g. "lfw") and the ``path`` it came from."""

    images: np.ndarray
    issame: np.ndarray
    name: str
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.issame.shape[0])


# ---------------------------------------------------------------------------------------------------------
# Shims returned by the restricted unpickler instead of numpy's own callables
# ---------------------------------------------------------------------------------------------------------


class _DType:
    """Stands for ``numpy.dtype(spec, align, copy)``; BUILD later sets the byte order."""

    def __init__(self, spec: object = None, *_: object) -> None:
        self.spec = spec.decode("latin-1") if isinstance(spec, bytes) else spec
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1:
            order = state[1]
            self.byteorder = order.decode("latin-1") if isinstance(order, bytes) else str(order)

    def to_numpy(self) -> np.dtype:
        if not isinstance(self.spec, str):
            raise DataFormatError(f"unsupported numpy dtype {self.spec!r}")
        dtype = np.dtype(self.spec)
        if self.byteorder in "<>":
            dtype = dtype.newbyteorder(self.byteorder)
        return dtype


class _Array:
    """Stands for an ndarray rebuilt by ``_reconstruct`` + BUILD(state) or by ``_frombuffer``."""

    def __init__(self, *_: object) -> None:
        self.shape: tuple = ()
        self.dtype: _DType | None = None
        self.fortran = False
        self.data: bytes | None = None

    def __setstate__(self, state: object) -> None:
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw_bytes)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise DataFormatError(f"unexpected numpy array state {type(state).__name__} of length {len(state)}")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, str):  # py2 pickles loaded with a text encoding
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)) or not isinstance(dtype, _DType):
            raise DataFormatError("numpy array state holds objects, not raw bytes (object arrays are not allowed)")
        self.shape, self.dtype, self.fortran, self.data = tuple(shape), dtype, bool(fortran), bytes(raw)

    def to_numpy(self) -> np.ndarray:
        if self.dtype is None or self.data is None:
            raise DataFormatError("numpy array without data")
        dtype = self.dtype.to_numpy()
        count = int(np.prod(self.shape, dtype=np.int64))
        if count * dtype.itemsize != len(self.data):
            raise DataFormatError(
                f"numpy array of shape {self.shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                f"the pickle holds {len(self.data)}"
            )
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape, order="F" if self.fortran else "C")


def _frombuffer(buffer: object, dtype: object, shape: object, order: object = "C") -> _Array:
    array = _Array()
    array.__setstate__((1, shape, dtype, order == "F", bytes(buffer)))  # type: ignore[arg-type]
    return array


class _Scalar:
    """Stands for ``numpy.core.multiarray.scalar(dtype, raw)`` (e.g. an ``np.bool_`` in the issame list)."""

    def __init__(self, dtype: object, raw: object = b"") -> None:
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)):
            raise DataFormatError("numpy scalar without a dtype and raw bytes")
        self.dtype, self.raw = dtype, bytes(raw)

    def to_python(self) -> object:
        return np.frombuffer(self.raw, dtype=self.dtype.to_numpy())[0].item()


def _codecs_encode(text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # protocol-2 pickles of py3 bytes: _codecs.encode(latin-1 text, "latin1"). Only that codec is allowed.
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise DataFormatError(f"_codecs.encode is only allowed for latin1 byte strings, got encoding {encoding!r}")
    return text.encode("latin-1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _Scalar,
    ("numpy._core.multiarray", "scalar"): _Scalar,
    ("_codecs", "encode"): _codecs_encode,
}

_STRING_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
}  # fmt: skip
_FORBIDDEN_OPS = {"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"}


def _audit(data: bytes, source: str) -> None:
    """Walk the opcodes without executing anything; refuse globals outside the allow-list by name."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # values of the most recent pushes, enough to resolve STACK_GLOBAL
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in _FORBIDDEN_OPS:
                raise DataFormatError(f"{source}: pickle opcode {name} at byte {pos} is not allowed in a pair file")
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _check_global(module, attr, source, pos)
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise DataFormatError(f"{source}: STACK_GLOBAL at byte {pos} with a computed name is not allowed")
                _check_global(module, attr, source, pos)
            if name in ("FRAME", "PROTO", "STOP"):
                continue
            if name in _STRING_OPS:
                recent.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
                continue
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            else:
                recent.append(None)
            del recent[:-2]
    except DataFormatError:
        raise
    except Exception as exc:  # pickletools raises ValueError/bytes errors on corrupt or truncated streams
        raise DataFormatError(f"{source}: not a valid pickle ({exc}); expected an insightface .bin pair file") from None


def _check_global(module: str, attr: str, source: str, pos: int) -> None:
    if (module, attr) not in ALLOWED_GLOBALS:
        allowed = ", ".join(sorted(f"{m}.{a}" for m, a in ALLOWED_GLOBALS))
        raise DataFormatError(
            f"{source}: refusing to load: the pickle names the global {module}.{attr} (byte {pos}); "
            f"a pair file may only name {allowed}"
        )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")  # py2 str -> bytes, as the insightface loaders do
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        shim = ALLOWED_GLOBALS.get((module, name))
        if shim is None:
            _check_global(module, name, self.source, -1)
        return shim

    def persistent_load(self, pid: object) -> object:
        raise DataFormatError(f"{self.source}: persistent ids are not allowed in a pair file")


# ---------------------------------------------------------------------------------------------------------
# Loading, validation, decoding
# ---------------------------------------------------------------------------------------------------------


def _plain(value: object) -> object:
    """Turn shims back into plain Python / numpy values."""
    if isinstance(value, _Array):
        return value.to_numpy()
    if isinstance(value, _Scalar):
        return value.to_python()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _as_encoded(item: object, index: int, source: str) -> bytes:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise DataFormatError(f"{source}: image {index} is a numpy array of dtype {item.dtype}, expected uint8")
        item = item.tobytes()
    if isinstance(item, bytearray):
        item = bytes(item)
    if not isinstance(item, bytes):
        raise DataFormatError(f"{source}: image {index} is a {type(item).__name__}, expected encoded image bytes")
    if not (item.startswith(JPEG_MAGIC) or item.startswith(PNG_MAGIC)):
        raise DataFormatError(f"{source}: image {index} is not a JPEG or PNG (starts with {item[:4]!r})")
    return item


def _as_issame(value: object, source: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(f"{source}: issame is a {type(value).__name__}, expected a list of booleans")
    for i, v in enumerate(value):
        if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))):
            raise DataFormatError(f"{source}: issame[{i}] is {v!r}, expected a boolean")
    return np.asarray(value, dtype=bool)


def read_bin_payload(data: bytes, source: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and the same/different flags of an insightface .bin pair set, read with the
    restricted unpickler (``source`` names the file in errors); nothing is decoded."""
    _audit(data, source)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataFormatError:
        raise
    except Exception as exc:  # truncated streams surface as EOFError/UnpicklingError
        raise DataFormatError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    obj = _plain(obj)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataFormatError(f"{source}: expected a pickled 2-tuple (images, issame), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataFormatError(f"{source}: images is a {type(bins).__name__}, expected a list of encoded images")
    issame = _as_issame(issame, source)
    if len(bins) < 2 * len(issame):
        raise DataFormatError(
            f"{source}: {len(issame)} pairs need {2 * len(issame)} images, the file holds {len(bins)}"
        )
    encoded = [_as_encoded(b, i, source) for i, b in enumerate(bins[: 2 * len(issame)])]
    return encoded, issame


def _decode(data: bytes, index: int, source: str, size: int) -> np.ndarray:
    image = None
    if data.startswith(JPEG_MAGIC):
        try:
            import simplejpeg

            image = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except Exception:  # some encoders' JPEGs (e.g. CMYK, progressive quirks) need Pillow
            image = None
    if image is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise DataFormatError(f"{source}: image {index} cannot be decoded ({exc})") from None
    if image.shape[1] != size or image.shape[0] != size:
        image = _resize_short(image, size)
    return image


def _resize_short(image: np.ndarray, size: int) -> np.ndarray:
    """The protocol's ``resize_short(size)``: scale the shorter side to ``size`` (bilinear, antialiased).
    The reference stops there and would fail on a non-square image; we centre-crop the longer side."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def load_pairs(path: str | os.PathLike, *, image_size: int = IMAGE_SIZE) -> PairSet:
    """Load an insightface verification `.bin` safely (see the module docstring) and decode its images.

    Accepts what the known writers produce: py2 byte strings, numpy (n, 1) uint8 JPEG arrays, protocol-2
    re-dumps that use ``_codecs.encode``, and protocol >= 3 bytes. Raises `DataFormatError` naming the file
    (and the global, image or pair) for anything else.
    """
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise DataFormatError(f"{source}: is a directory, expected a .bin pair file") from None
    if not data:
        raise DataFormatError(f"{source}: empty file, expected a pickled (images, issame) pair file")
    if data[0] != 0x80 and data[:1] not in (b"(", b"]", b")", b"c"):  # protocol 0/1 openings
        raise DataFormatError(f"{source}: not a pickle (starts with {data[:4]!r}); expected an insightface .bin")
    encoded, issame = read_bin_payload(data, source)
    images = np.empty((len(encoded), image_size, image_size, 3), dtype=np.uint8)
    for i, item in enumerate(encoded):
        images[i] = _decode(item, i, source, image_size)
    return PairSet(images=images, issame=issame, name=path.stem, path=path)


def pair_files(paths: Sequence[str | os.PathLike], option: str = "pairs") -> list[str]:
    """Expand `.bin` files and directories of them into a list of files; ``option`` names the setting in errors."""
    expanded: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.bin"))
            if not found:
                raise ConfigError(f"{option}: directory {path} holds no .bin pair files")
            expanded += found
        elif not path.exists():
            raise ConfigError(f"{option}: {path} does not exist (expected a .bin file or a directory of them)")
        else:
            expanded.append(str(path))
    return expanded


def load_pair_sets(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, PairSet]:
    """Load one `.bin` or every `.bin` of a directory (optionally only ``names``, e.g. ["lfw", "cfp_fp"])."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.bin"))
        if names is not None:
            wanted = {n.removesuffix(".bin") for n in names}
            missing = wanted - {f.stem for f in files}
            if missing:
                raise DataFormatError(f"{path}: no pair file for {', '.join(sorted(missing))}")
            files = [f for f in files if f.stem in wanted]
        if not files:
            raise DataFormatError(f"{path}: no .bin pair files in this directory")
        return {f.stem: load_pairs(f) for f in files}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such pair file or directory")
    return {path.stem: load_pairs(path)}


def save_pairs(
    path: str | os.PathLike,
    images_or_jpegs: np.ndarray | Sequence[bytes],
    issame: Sequence[bool] | np.ndarray,
    *,
    quality: int = 95,
) -> Path:
    """Write a pair file the insightface loaders read: pickle protocol 4 of (list of JPEG bytes, list of
    bools), written atomically. ``images_or_jpegs`` is uint8 [2P, H, W, 3] RGB (encoded here) or encoded
    JPEG/PNG byte strings."""
    path = Path(path)
    flags = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if isinstance(images_or_jpegs, np.ndarray):
        import simplejpeg

        if images_or_jpegs.dtype != np.uint8 or images_or_jpegs.ndim != 4 or images_or_jpegs.shape[3] != 3:
            raise DataFormatError(
                f"images must be uint8 [2P, H, W, 3], got {images_or_jpegs.dtype} {images_or_jpegs.shape}"
            )
        blobs = [
            simplejpeg.encode_jpeg(np.ascontiguousarray(im), quality=quality, colorspace="RGB")
            for im in images_or_jpegs
        ]
    else:
        blobs = [_as_encoded(bytes(b), i, str(path)) for i, b in enumerate(images_or_jpegs)]
    if len(blobs) != 2 * len(flags):
        raise DataFormatError(f"{path}: {len(flags)} pairs need {2 * len(flags)} images, got {len(blobs)}")
    payload = pickle.dumps((blobs, flags), protocol=4)
    atomic_write_bytes(path, payload)
    return path
