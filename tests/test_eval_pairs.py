"""Safe loading of insightface verification `.bin` files: every writer's format, refusals, bad input."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

import marginface.eval as ev
from marginface.errors import DataFormatError

REAL_BIN = Path(__file__).resolve().parents[2] / "shared/fixtures/real/small_lfw.bin"


def _jpegs(n, size=112, seed=0):
    rng = np.random.default_rng(seed)
    # smooth images so that JPEG round trips are close to the source
    base = rng.integers(0, 255, size=(n, 8, 8, 3)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(b).resize((size, size), Image.BILINEAR)) for b in base])
    blobs = [simplejpeg.encode_jpeg(im, quality=95, colorspace="RGB") for im in images]
    return images, blobs


def _py2_pickle(blobs, issame):
    """What lfw2pack.py wrote under Python 2: protocol 2, str (byte) elements, no globals."""
    out = bytearray(b"\x80\x02](")
    for b in blobs:
        out += (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)
    out += b"e]("
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)
    out += b"e\x86."
    return bytes(out)


def _decoded(blobs):
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


@pytest.mark.parametrize("writer", ["py2", "numpy_p3", "numpy_p5", "codecs_p2", "bytes_p4", "np_bool"])
def test_every_writer_format_loads(tmp_path, writer):
    images, blobs = _jpegs(6)
    issame = [True, False, True]
    if writer == "py2":
        payload = _py2_pickle(blobs, issame)
    elif writer == "numpy_p3":
        payload = pickle.dumps(([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in blobs], issame), protocol=3)
    elif writer == "numpy_p5":
        payload = pickle.dumps(([np.frombuffer(b, np.uint8).copy() for b in blobs], issame), protocol=5)
    elif writer == "codecs_p2":
        payload = pickle.dumps((blobs, issame), protocol=2)
        assert b"_codecs" in payload
    elif writer == "bytes_p4":
        payload = pickle.dumps((blobs, issame), protocol=4)
    else:
        payload = pickle.dumps((blobs, [np.bool_(s) for s in issame]), protocol=4)
    path = tmp_path / "set.bin"
    path.write_bytes(payload)
    pairs = ev.load_pairs(path)
    assert pairs.name == "set" and len(pairs) == 3
    np.testing.assert_array_equal(pairs.issame, issame)
    assert pairs.images.shape == (6, 112, 112, 3) and pairs.images.dtype == np.uint8
    # decoded as Pillow decodes them (IDCT implementations may differ by a level or two)
    assert np.abs(pairs.images.astype(int) - _decoded(blobs).astype(int)).max() <= 3


def test_numpy_is_never_called_during_load(tmp_path, monkeypatch):
    _, blobs = _jpegs(2)
    payload = pickle.dumps(([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in blobs], [True]), protocol=3)
    import numpy._core.multiarray as multiarray

    def boom(*args, **kwargs):
        raise AssertionError("numpy's _reconstruct ran during a pair-file load")

    monkeypatch.setattr(multiarray, "_reconstruct", boom)
    path = tmp_path / "np.bin"
    path.write_bytes(payload)
    assert len(ev.load_pairs(path)) == 1


def test_real_small_lfw():
    if not REAL_BIN.exists():
        pytest.skip(f"{REAL_BIN} not present")
    pairs = ev.load_pairs(REAL_BIN)
    assert pairs.images.shape == (20, 112, 112, 3)
    assert pairs.issame.tolist() == [True] * 10
    # independent decode: plain pickle of a trusted fixture + Pillow
    with open(REAL_BIN, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    reference = _decoded([b.tobytes() for b in bins])
    assert np.abs(pairs.images.astype(int) - reference.astype(int)).mean() < 1.0


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    _, blobs = _jpegs(2)
    payload = pickle.dumps(([blobs[0], blobs[1]], [True], Evil()), protocol=protocol)
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(DataFormatError, match=r"evil\.bin.*global (posix|os)\.system"):
        ev.load_pairs(path)
    assert not sentinel.exists()
    # hand-written protocol-0 GLOBAL before anything else
    path.write_bytes(f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode())
    with pytest.raises(DataFormatError, match="os.system"):
        ev.load_pairs(path)
    assert not sentinel.exists()


def test_bad_files_name_the_problem(tmp_path):
    _, blobs = _jpegs(4)
    cases = {
        "text.bin": (b"this is not a pickle at all", "not a pickle"),
        "truncated.bin": (pickle.dumps((blobs, [True, False]), protocol=4)[:5000], "truncated.bin"),
        "counts.bin": (pickle.dumps((blobs[:3], [True, False]), protocol=4), "2 pairs need 4 images"),
        "notimage.bin": (pickle.dumps(([b"GIF89a...."] * 2, [True]), protocol=4), "image 0 is not a JPEG or PNG"),
        "issame.bin": (pickle.dumps((blobs[:2], ["yes"]), protocol=4), r"issame\[0\]"),
        "shape.bin": (pickle.dumps([blobs, [True]], protocol=4)[:-1] + b".", None),
        "single.bin": (pickle.dumps(blobs, protocol=4), "2-tuple"),
        "empty.bin": (b"", "empty file"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        if message is None:  # a list instead of a tuple is accepted (both index the same way)
            continue
        with pytest.raises(DataFormatError, match=message) as info:
            ev.load_pairs(path)
        assert name in str(info.value)


def test_non_112_images_are_resized_short_side(tmp_path):
    images, blobs = _jpegs(2, size=128, seed=4)
    path = tmp_path / "big.bin"
    path.write_bytes(pickle.dumps((blobs, [False]), protocol=4))
    pairs = ev.load_pairs(path)
    assert pairs.images.shape == (2, 112, 112, 3)
    expected = np.stack([np.asarray(Image.fromarray(im).resize((112, 112), Image.BILINEAR)) for im in _decoded(blobs)])
    assert np.abs(pairs.images.astype(int) - expected.astype(int)).max() <= 1
    # non-square: shorter side to 112, then the centre
    rect = np.asarray(Image.fromarray(images[0]).resize((168, 140)))
    blob = simplejpeg.encode_jpeg(np.ascontiguousarray(rect), quality=95, colorspace="RGB")
    path.write_bytes(pickle.dumps(([blob, blobs[1]], [True]), protocol=4))
    assert ev.load_pairs(path).images.shape == (2, 112, 112, 3)


def test_save_pairs_round_trip_and_png(tmp_path):
    images, blobs = _jpegs(4, seed=9)
    path = ev.save_pairs(tmp_path / "out" / "rt.bin", images, np.array([True, False]))
    loaded = ev.load_pairs(path)
    np.testing.assert_array_equal(loaded.issame, [True, False])
    assert np.abs(loaded.images.astype(int) - images.astype(int)).mean() < 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    ev.save_pairs(tmp_path / "png.bin", [png.getvalue(), blobs[1]], [True])
    np.testing.assert_array_equal(ev.load_pairs(tmp_path / "png.bin").images[0], images[0])
    sets = ev.load_pair_sets(tmp_path)
    assert list(sets) == ["png"]
    with pytest.raises(DataFormatError, match="cfp_fp"):
        ev.load_pair_sets(tmp_path, names=["cfp_fp"])
