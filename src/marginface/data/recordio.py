"""MXNet RecordIO (`.rec` + `.idx` + `property`) read and written in pure Python, byte-compatible with dmlc.

The framing, IRHeader and the two dataset layouts (insightface header/identity records, flat im2rec) follow
spec/formats.md A1; no mxnet is needed at run time.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from collections import namedtuple
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marginface.errors import ConfigError, DataFormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC_MASK = (1 << 29) - 1
_MAX_RECORD = 1 << 29
_HEAD = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24 bytes, no padding
# Reading the whole span up to the next indexed record in one pread is the fast path; a span larger than this
# (sparse index, huge record) is read part by part instead so memory stays bounded.
_SPAN_LIMIT = 1 << 20

# Bumped in every forked child, so a reader notices a fork with one attribute compare instead of a getpid()
# system call per record (glibc no longer caches the pid).
_FORK_GENERATION = [0]


def _after_fork_in_child() -> None:
    _FORK_GENERATION[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Record header: flag (0 = scalar label, N = N float32 labels follow), label, id, id2."


# ----------------------------------------------------------------------------------------------------------
# IRHeader


def pack_header(label: float | Sequence[float], record_id: int = 0, id2: int = 0) -> bytes:
    """Encode an IRHeader: a scalar label gives flag 0, a sequence flag=len and float32 labels after it."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(label), int(record_id), int(id2))
    labels = np.asarray(label, dtype="<f4").reshape(-1)
    if labels.size == 0:
        raise ConfigError("pack_header: label sequence is empty; expected a number or at least one value")
    return _IR.pack(labels.size, 0.0, int(record_id), int(id2)) + labels.tobytes()


def unpack_header(data: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload; with flag>0 `label` is a float32 numpy array."""
    if len(data) < IR_SIZE:
        raise DataFormatError(f"record of {len(data)} bytes is shorter than the 24-byte IRHeader")
    flag, label, rid, id2 = _IR.unpack_from(data, 0)
    if flag == 0:
        return IRHeader(flag, label, rid, id2), bytes(data[IR_SIZE:])
    end = IR_SIZE + 4 * flag
    if len(data) < end:
        raise DataFormatError(
            f"record header says {flag} float32 labels follow ({end} bytes) but the record has {len(data)} bytes"
        )
    labels = np.frombuffer(data, dtype="<f4", count=flag, offset=IR_SIZE).copy()
    return IRHeader(flag, labels, rid, id2), bytes(data[end:])


def header_class(header: IRHeader) -> float:
    """The class id of an image record: the scalar label, or label[0] of a face2rec2 array label."""
    return float(header.label if header.flag == 0 else header.label[0])


# ----------------------------------------------------------------------------------------------------------
# Framing


def frame_record(data: bytes) -> bytes:
    """Frame one record as dmlc-core does: split at every 4-byte-aligned magic, pad only the last part."""
    n = len(data)
    if n >= _MAX_RECORD:
        raise ConfigError(f"record of {n} bytes is too large; RecordIO records must be < 2^29 bytes")
    view = memoryview(data)
    out = []
    start = 0
    cflag_next = 1
    limit = (n >> 2) << 2
    pos = data.find(MAGIC_BYTES, 0, limit)
    while pos != -1:
        if pos & 3 == 0:
            out.append(_HEAD.pack(MAGIC, (cflag_next << 29) | (pos - start)))
            out.append(view[start:pos])
            cflag_next = 2
            start = pos + 4
            pos = data.find(MAGIC_BYTES, start, limit)
        else:
            pos = data.find(MAGIC_BYTES, pos + 1, limit)
    last_cflag = 0 if cflag_next == 1 else 3
    out.append(_HEAD.pack(MAGIC, (last_cflag << 29) | (n - start)))
    out.append(view[start:])
    out.append(b"\0" * ((-(n - start)) & 3))
    return b"".join(out)


class RecordIOWriter:
    """Append records to `<rec>.tmp` and `<idx>.tmp`; `close()` renames both into place (context manager).

    Leaving the `with` block through an exception deletes the temporary files, so nothing half-written is
    ever found under the final names.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self._rec_tmp = self.rec_path.with_name(self.rec_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._rec = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w", encoding="ascii")
        self._offset = 0
        # Keys already written, to refuse duplicates: a bitmap for the usual dense keys (5 MB for 42M records,
        # where a set of ints would take gigabytes) and a set for sparse outliers.
        self._key_bits = bytearray()
        self._sparse_keys: set[int] = set()
        self._count = 0
        self.closed = False

    @property
    def tell(self) -> int:
        """Byte offset at which the next record will start."""
        return self._offset

    def write(self, key: int, data: bytes) -> None:
        """Write one record (IRHeader + payload bytes, see `pack_header`) under integer `key`."""
        if self.closed:
            raise ConfigError(f"RecordIOWriter for {self.rec_path} is closed")
        key = int(key)
        self._claim(key)
        framed = frame_record(bytes(data))
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)

    def _claim(self, key: int) -> None:
        byte, bit = key >> 3, 1 << (key & 7)
        in_bitmap = 0 <= byte < len(self._key_bits) and self._key_bits[byte] & bit
        if in_bitmap or key in self._sparse_keys:
            raise ConfigError(f"{self.rec_path}: key {key} written twice; keys in a .idx must be unique")
        if 0 <= key < 64 * (self._count + 4096):
            if byte >= len(self._key_bits):
                self._key_bits.extend(bytes(max(byte + 1 - len(self._key_bits), len(self._key_bits))))
            self._key_bits[byte] |= bit
        else:
            self._sparse_keys.add(key)
        self._count += 1

    def overwrite(self, offset: int, framed: bytes) -> None:
        """Overwrite already-written bytes in place (used to fill a fixed-size header reserved earlier)."""
        self._rec.flush()
        os.pwrite(self._rec.fileno(), framed, offset)

    def reserve(self, key: int, size: int) -> int:
        """Write `size` placeholder bytes indexed under `key`; returns their offset for `overwrite`."""
        offset = self._offset
        self._claim(int(key))
        self._rec.write(b"\0" * size)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self._offset += size
        return offset

    def close(self) -> None:
        """Flush, fsync and rename the temporary files to their final names."""
        if self.closed:
            return
        self.closed = True
        for handle in (self._rec, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Close and delete the temporary files without touching the final names."""
        if self.closed:
            return
        self.closed = True
        for handle, tmp in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            handle.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------------------------
# Reading


def parse_idx(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a `.idx` file into (keys, offsets) int64 arrays, in file order.

    The common strict form (`key<TAB>offset` on every line) is parsed by numpy in one pass, which keeps
    memory and time reasonable for tens of millions of records; anything else (blank lines, stray spaces)
    goes through a line-by-line parser that reports the first bad line.
    """
    idx_path = Path(idx_path)
    raw = idx_path.read_bytes()
    table = _parse_idx_fast(raw)
    if table is None:
        table = _parse_idx_lines(idx_path, raw)
    if len(table) and table[:, 1].min() < 0:
        bad = int(np.argmax(table[:, 1] < 0))
        raise DataFormatError(f"{idx_path}: line {bad + 1}: negative offset {table[bad, 1]}")
    return table[:, 0].copy(), table[:, 1].copy()


def _parse_idx_fast(raw: bytes) -> np.ndarray | None:
    if not raw.strip():
        return np.zeros((0, 2), dtype=np.int64)
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    if raw.count(b"\t") != lines:
        return None
    with warnings.catch_warnings():
        # numpy stops at the first token that is not an integer (with a DeprecationWarning); the count
        # check below catches that, and the slow parser then names the line.
        warnings.simplefilter("ignore")
        try:
            values = np.fromstring(raw, dtype=np.int64, sep=" ")
        except ValueError:
            return None
    if len(values) != 2 * lines:
        return None
    return values.reshape(-1, 2)


def _parse_idx_lines(idx_path: Path, raw: bytes) -> np.ndarray:
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(b"\t")
        try:
            if len(parts) != 2:
                raise ValueError
            rows.append((int(parts[0]), int(parts[1])))
        except ValueError:
            text = line[:80].decode("ascii", "replace")
            raise DataFormatError(
                f"{idx_path}: line {number}: {text!r} is not 'key<TAB>offset' with two integers"
            ) from None
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def scan_rec(rec_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild an index by walking the `.rec` from the start; keys are the record ordinals 0..M-1."""
    rec_path = Path(rec_path)
    offsets = []
    size = rec_path.stat().st_size
    with open(rec_path, "rb") as handle:
        fd = handle.fileno()
        pos = 0
        expect_start = True
        while pos < size:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise DataFormatError(f"{rec_path}: truncated record head at byte {pos} (file has {size} bytes)")
            magic, lrec = _HEAD.unpack(head)
            if magic != MAGIC:
                raise DataFormatError(
                    f"{rec_path}: bad magic 0x{magic:08X} at byte {pos} while scanning; expected 0x{MAGIC:08X}"
                )
            cflag, length = lrec >> 29, lrec & _LREC_MASK
            if expect_start:
                if cflag not in (0, 1):
                    raise DataFormatError(f"{rec_path}: record at byte {pos} starts with continuation flag {cflag}")
                offsets.append(pos)
            expect_start = cflag in (0, 3)
            pos += 8 + length + ((-length) & 3)
        if pos > size or not expect_start:
            raise DataFormatError(f"{rec_path}: file ends inside the record starting at byte {offsets[-1]}")
    off = np.asarray(offsets, dtype=np.int64)
    return np.arange(len(off), dtype=np.int64), off


class RecordIOReader:
    """Random access to records by key via the `.idx`, with the file opened lazily once per process.

    The file is (re)opened whenever the process id changes, so a reader created before DataLoader workers
    fork never shares a descriptor or file offset with them. Reads go through a read-only memory map
    (`use_mmap=True`, default: one slice per record, no system call once pages are mapped) or `os.pread`
    (no shared offset either). A missing `.idx` is rebuilt in memory by scanning the `.rec`, with a warning;
    nothing is written.
    """

    def __init__(
        self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, use_mmap: bool = True
    ) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise DataFormatError(f"{self.rec_path}: RecordIO file not found")
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.file_size = self.rec_path.stat().st_size
        self.use_mmap = bool(use_mmap) and self.file_size > 0
        if self.idx_path.is_file():
            keys, offsets = parse_idx(self.idx_path)
        else:
            warnings.warn(
                f"{self.idx_path} not found: rebuilt index by scanning {self.rec_path} "
                "(keys = record order; nothing written)",
                stacklevel=2,
            )
            keys, offsets = scan_rec(self.rec_path)
        if len(offsets):
            far = offsets >= self.file_size
            if far.any():
                bad = int(np.argmax(far))
                raise DataFormatError(
                    f"{self.idx_path}: key {keys[bad]} points to byte {offsets[bad]}, "
                    f"outside {self.rec_path} ({self.file_size} bytes)"
                )
        uniq = np.unique(keys)
        if len(uniq) != len(keys):
            raise DataFormatError(f"{self.idx_path}: duplicate keys; each key must appear once")
        self.keys = keys
        self.offsets = offsets
        # Upper bound of each record's extent: the next indexed offset (or the end of the file).
        order = np.argsort(offsets, kind="stable")
        ends = np.empty_like(offsets)
        ends[order[:-1]] = offsets[order[1:]]
        if len(order):
            ends[order[-1]] = self.file_size
        self._spans = ends - offsets
        self._pos_of_key: dict[int, int] | None = None
        # Dense keys (the usual 0..M-1) get key-indexed tables read through memoryviews: indexing those returns
        # Python ints directly, several times cheaper than numpy scalar indexing on the per-record path.
        self._offset_of: memoryview | None = None
        self._span_of: memoryview | None = None
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        if len(keys) and uniq[0] >= 0 and uniq[-1] < 4 * len(keys) + 16:
            offset_of = np.full(int(uniq[-1]) + 1, -1, dtype=np.int64)
            span_of = np.zeros(int(uniq[-1]) + 1, dtype=np.int64)
            offset_of[keys] = offsets
            span_of[keys] = self._spans
            self._tables = (offset_of, span_of)
            self._make_views()
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._pid: int | None = None
        self._generation = -1

    def _make_views(self) -> None:
        if self._tables is not None:
            self._offset_of, self._span_of = (memoryview(t).cast("B").cast("q") for t in self._tables)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        try:
            self._locate(int(key))
        except KeyError:
            return False
        return True

    def _position(self, key: int, strict: bool = True) -> int:
        """Row of `key` in `keys`/`offsets`, or -1 (or KeyError when `strict`)."""
        if self._pos_of_key is None:
            self._pos_of_key = {int(k): i for i, k in enumerate(self.keys.tolist())}
        pos = self._pos_of_key.get(key, -1)
        if pos < 0 and strict:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        return pos

    def _locate(self, key: int) -> tuple[int, int]:
        """(offset, span) of `key`; KeyError if the index has no such key."""
        table = self._offset_of
        if table is not None:
            if 0 <= key < len(table):
                offset = table[key]
                if offset >= 0:
                    return offset, self._span_of[key]
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        pos = self._position(key)
        return int(self.offsets[pos]), int(self._spans[pos])

    def _open(self) -> None:
        self._fd = os.open(self.rec_path, os.O_RDONLY)
        self._map = None
        if self.use_mmap:
            self._map = mmap.mmap(self._fd, self.file_size, access=mmap.ACCESS_READ)
        self._pid = os.getpid()
        self._generation = _FORK_GENERATION[0]

    def _fetch(self, offset: int, nbytes: int) -> bytes:
        if self._generation != _FORK_GENERATION[0] or self._pid is None:
            self._open()
        if self._map is not None:
            return self._map[offset : offset + nbytes]
        return os.pread(self._fd, nbytes, offset)

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._map is not None:
                self._map.close()
            if self._fd is not None:
                os.close(self._fd)
        self._fd = None
        self._map = None
        self._pid = None
        self._generation = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down os
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _map=None, _pid=None, _generation=-1, _offset_of=None, _span_of=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_views()

    def read(self, key: int) -> bytes:
        """The record stored under `key` (IRHeader + payload), parts joined with their magic restored."""
        key = int(key)
        offset, span = self._locate(key)
        if self._generation != _FORK_GENERATION[0] or self._pid is None:
            self._open()
        view = self._map
        if view is not None:
            # Fast path: a whole (single-part) record is one slice of the map.
            if offset + 8 <= self.file_size:
                magic, lrec = _HEAD.unpack_from(view, offset)
                end = offset + 8 + (lrec & _LREC_MASK)
                if magic == MAGIC and lrec >> 29 == 0 and end <= self.file_size:
                    return view[offset + 8 : end]
            return self._read_parts(offset, key)
        if span <= _SPAN_LIMIT:
            buf = os.pread(self._fd, span, offset)
            if len(buf) >= 8:
                magic, lrec = _HEAD.unpack_from(buf, 0)
                end = 8 + (lrec & _LREC_MASK)
                if magic == MAGIC and lrec >> 29 == 0 and end <= len(buf):
                    return buf[8:end]
        return self._read_parts(offset, key)

    def read_prefix(self, key: int, nbytes: int = 64) -> bytes:
        """The first up to `nbytes` of the record under `key` (enough for its IRHeader); one small read."""
        offset, _ = self._locate(int(key))
        head = self._fetch(offset, 8 + nbytes)
        _, lrec = self._check_head(head, offset, key)
        cflag, length = lrec >> 29, lrec & _LREC_MASK
        if cflag == 0 or length >= nbytes:
            return head[8 : 8 + min(length, nbytes)]
        return self.read(key)[:nbytes]

    def _check_head(self, head: bytes, offset: int, key: int) -> tuple[int, int]:
        if len(head) < 8:
            raise DataFormatError(
                f"{self.rec_path}: key {key}: truncated at byte {offset} (file has {self.file_size} bytes); "
                "expected an 8-byte record head"
            )
        magic, lrec = _HEAD.unpack_from(head, 0)
        if magic != MAGIC:
            raise DataFormatError(
                f"{self.rec_path}: key {key}: bad magic 0x{magic:08X} at byte {offset}; "
                f"expected 0x{MAGIC:08X} (is the .idx from another .rec, or the file corrupt?)"
            )
        return magic, lrec

    def _read_parts(self, offset: int, key: int) -> bytes:
        """General path: follow a multi-part record part by part, with every check and a clear error."""
        parts = []
        pos = offset
        while True:
            _, lrec = self._check_head(self._fetch(pos, 8), pos, key)
            cflag, length = lrec >> 29, lrec & _LREC_MASK
            expected = (0, 1) if not parts else (2, 3)
            if cflag not in expected:
                raise DataFormatError(
                    f"{self.rec_path}: key {key}: part at byte {pos} has continuation flag {cflag}; "
                    f"expected {' or '.join(map(str, expected))}"
                )
            part = self._fetch(pos + 8, length)
            if len(part) < length:
                self._truncated(key, pos, length)
            parts.append(part)
            pos += 8 + length + ((-length) & 3)
            if cflag in (0, 3):
                return parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)

    def _truncated(self, key: int, offset: int, length: int) -> None:
        raise DataFormatError(
            f"{self.rec_path}: key {key}: record at byte {offset} needs {length} bytes of data but the file "
            f"ends at byte {self.file_size} (truncated .rec)"
        )

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of the record under `key` (reads a few dozen bytes)."""
        prefix = self.read_prefix(key, 64)
        try:
            header, _ = unpack_header(prefix)
        except DataFormatError:
            header, _ = unpack_header(self.read(key))
        return header


# ----------------------------------------------------------------------------------------------------------
# Property file and whole datasets


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """Parse the first line of an insightface `property` file: `num_classes,height,width`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: property file not found") from None
    first = text.strip().splitlines()[0] if text.strip() else ""
    fields = [f.strip() for f in first.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        classes, height, width = (int(f) for f in fields)
        if classes <= 0 or height <= 0 or width <= 0:
            raise ValueError
    except ValueError:
        raise DataFormatError(
            f"{path}: first line {first[:60]!r} is not 'num_classes,height,width' with three positive integers"
        ) from None
    return classes, height, width


def write_property(path: str | os.PathLike, num_classes: int, image_size: tuple[int, int], images: int) -> None:
    """Write a `property` file atomically: `C,H,W`, then the image count (readers parse line 1 only)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n{images}\n", encoding="ascii")
    os.replace(tmp, path)


def write_identity_dataset(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
    flat: bool = False,
    label_array: bool = False,
) -> dict:
    """Write `train.rec`, `train.idx` and `property` from (label, encoded image) pairs grouped by label.

    Default is the insightface layout: key 0 a header `flag=2 [N+1, N+1+C]`, images at keys 1..N, identity
    records `[first, end)` at keys N+1..N+C. `flat=True` writes the im2rec layout (images at keys 0..N-1, no
    header or identity records). `label_array=True` stores face2rec2-style `[class, 1.0]` labels.
    Samples must come in ascending label order; files appear under their final names only when complete.
    """
    out_dir = Path(out_dir)
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ConfigError(f"write_identity_dataset: num_classes must be positive, got {num_classes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = out_dir / "train.rec", out_dir / "train.idx"
    start = 0 if flat else 1
    counts = np.zeros(num_classes, dtype=np.int64)
    images = 0
    previous = -1
    with RecordIOWriter(rec_path, idx_path) as writer:
        header_offset = None
        if not flat:
            # The header record has a fixed size (40 bytes framed, no magic possible in its fields), so it can
            # be reserved now and filled once N is known, keeping it first in the file as face2rec2 does.
            header_offset = writer.reserve(0, 8 + IR_SIZE + 8)
        for label, data in samples:
            label = int(label)
            if not 0 <= label < num_classes:
                raise ConfigError(f"write_identity_dataset: label {label} outside 0..{num_classes - 1}")
            if label < previous:
                raise ConfigError(
                    f"write_identity_dataset: samples must be grouped by label in ascending order; got label "
                    f"{label} after {previous} (sample {images})"
                )
            previous = label
            key = start + images
            header = pack_header([label, 1.0] if label_array else label, record_id=key)
            writer.write(key, header + bytes(data))
            counts[label] += 1
            images += 1
        if not flat:
            ends = start + np.cumsum(counts)
            starts = ends - counts
            for cls in range(num_classes):
                key = images + 1 + cls
                writer.write(key, pack_header([float(starts[cls]), float(ends[cls])], record_id=key))
            header = pack_header([float(images + 1), float(images + 1 + num_classes)], record_id=0)
            writer.overwrite(header_offset, frame_record(header))
    write_property(out_dir / "property", num_classes, image_size, images)
    return {
        "path": str(out_dir),
        "images": images,
        "classes": num_classes,
        "layout": "flat" if flat else "insightface",
        "label_array": bool(label_array),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "empty_classes": int((counts == 0).sum()),
    }


# ----------------------------------------------------------------------------------------------------------
# A dataset view over a .rec: layout detection, image keys, labels


def resolve_rec_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(rec, idx, property) for a dataset directory holding `train.rec` or for a `.rec` file path."""
    path = Path(path)
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        rec = path / "train.rec" if (path / "train.rec").is_file() else (recs[0] if len(recs) == 1 else None)
        if rec is None:
            found = ", ".join(p.name for p in recs) or "none"
            raise DataFormatError(f"{path}: expected train.rec (or a single .rec) in the directory; found {found}")
    else:
        rec = path
    return rec, rec.with_suffix(".idx"), rec.parent / "property"


class RecordIOSource:
    """An insightface-layout or flat RecordIO dataset: image keys, class count and labels, read by position.

    `labels` comes from the identity records when they tile the images (no image is touched), otherwise
    from the image headers alone (one small read each). Labels are checked against `property`'s class count.
    """

    format = "recordio"

    def __init__(self, path: str | os.PathLike, num_classes: int | None = None, use_mmap: bool = True) -> None:
        self.rec_path, idx_path, self.property_path = resolve_rec_paths(path)
        self.path = self.rec_path
        self.reader = RecordIOReader(self.rec_path, idx_path, use_mmap=use_mmap)
        self.property: tuple[int, int, int] | None = None
        if self.property_path.is_file():
            self.property = read_property(self.property_path)
        self.label_array = False
        self._labels: np.ndarray | None = None
        self._identity_ranges: np.ndarray | None = None
        header = self._header_record()
        if header is not None:
            first, end = int(header.label[0]), int(header.label[1])
            self.layout = "insightface"
            self.image_keys = np.arange(1, first, dtype=np.int64)
            self.identity_keys = np.arange(first, end, dtype=np.int64)
            if end > first and (first not in self.reader or end - 1 not in self.reader):
                # Identity records are optional for training (arcface_torch never reads them); without them
                # labels come from the image headers.
                self.identity_keys = np.zeros(0, dtype=np.int64)
        else:
            self.layout = "flat"
            self.image_keys = np.sort(self.reader.keys)
            self.identity_keys = np.zeros(0, dtype=np.int64)
        if len(self.image_keys) == 0:
            raise DataFormatError(f"{self.rec_path}: RecordIO dataset holds no image records")
        if num_classes is not None:
            self.num_classes = int(num_classes)
        elif self.property is not None:
            self.num_classes = self.property[0]
        elif len(self.identity_keys):
            self.num_classes = len(self.identity_keys)
        else:
            self.num_classes = 1 << 24  # float32 labels are exact up to 2^24; the real count comes from labels
            self.num_classes = int(self.labels.max()) + 1
        self.image_size = (self.property[1], self.property[2]) if self.property is not None else None
        first_header = self.reader.read_header(int(self.image_keys[0]))
        self.label_array = first_header.flag > 0

    def _header_record(self) -> IRHeader | None:
        if 0 not in self.reader:
            return None
        header = self.reader.read_header(0)
        if header.flag < 2:
            return None
        first, end = float(header.label[0]), float(header.label[1])
        # A flat set with face2rec2 array labels also has flag 2 at key 0, but that record carries an image;
        # the header record has no payload and its ranges point at existing keys.
        if len(self.reader.read_prefix(0, IR_SIZE + 4 * header.flag + 1)) > IR_SIZE + 4 * header.flag:
            return None
        if not (first >= 1 and end >= first and first == int(first) and end == int(end)):
            return None
        if int(first) - 1 > len(self.reader) or (int(first) > 1 and (int(first) - 1) not in self.reader):
            raise DataFormatError(
                f"{self.reader.idx_path}: header record (key 0) says images are keys 1..{int(first) - 1} but "
                f"key {int(first) - 1} is not in the index"
            )
        return header

    def __len__(self) -> int:
        return len(self.image_keys)

    def describe_item(self, i: int) -> str:
        return f"{self.rec_path} key {int(self.image_keys[i])}"

    def _check_label(self, value: float, key: int) -> int:
        label = int(value)
        if label != value or not 0 <= label < self.num_classes:
            source = f"{self.property_path}" if self.property is not None else "the class count"
            raise DataFormatError(
                f"{self.rec_path}: key {key}: label {value:g} outside 0..{self.num_classes - 1} "
                f"(num_classes {self.num_classes} from {source}); expected an integer class id in range"
            )
        return label

    def _missing(self, key: int) -> DataFormatError:
        return DataFormatError(
            f"{self.reader.idx_path}: key {key} is missing; the header record (key 0) lists image keys "
            f"1..{len(self.image_keys)}"
        )

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        key = int(self.image_keys[i])
        try:
            record = self.reader.read(key)
        except KeyError:
            raise self._missing(key) from None
        try:
            header, payload = unpack_header(record)
        except DataFormatError as exc:
            raise DataFormatError(f"{self.rec_path}: key {key}: {exc}") from None
        return payload, self._check_label(header_class(header), key)

    def read(self, i: int) -> tuple[np.ndarray, int]:
        from marginface.data.decode import decode_rgb

        payload, label = self.read_bytes(i)
        return decode_rgb(payload, where=self.describe_item(i)), label

    @property
    def identity_ranges(self) -> np.ndarray | None:
        """(C, 2) int64 `[first_key, end_key)` per class from the identity records, or None (flat layout)."""
        if self._identity_ranges is None and len(self.identity_keys):
            ranges = np.empty((len(self.identity_keys), 2), dtype=np.int64)
            for row, key in enumerate(self.identity_keys.tolist()):
                header = self.reader.read_header(key)
                if header.flag < 2:
                    raise DataFormatError(
                        f"{self.rec_path}: key {key}: identity record has flag {header.flag}; "
                        "expected 2 labels [first_key, end_key)"
                    )
                ranges[row] = header.label[:2]
            self._identity_ranges = ranges
        return self._identity_ranges

    @property
    def labels(self) -> np.ndarray:
        """int64 class id of every image, in position order."""
        if self._labels is None:
            labels = self._labels_from_identities()
            if labels is None:
                labels = self._labels_from_headers()
            self._labels = labels
        return self._labels

    def _labels_from_identities(self) -> np.ndarray | None:
        ranges = self.identity_ranges
        if ranges is None:
            return None
        first = int(self.image_keys[0])
        # The ranges must tile the image keys in order; shuffled writers (rec2shufrec) break this, and then
        # the per-image headers are the truth.
        nonempty = ranges[ranges[:, 1] > ranges[:, 0]]
        if not len(nonempty) or nonempty[0, 0] != first or nonempty[-1, 1] != first + len(self.image_keys):
            return None
        if (nonempty[1:, 0] != nonempty[:-1, 1]).any():
            return None
        counts = ranges[:, 1] - ranges[:, 0]
        if (counts < 0).any():
            return None
        labels = np.repeat(np.arange(len(ranges), dtype=np.int64), counts)
        if len(ranges) > self.num_classes and (labels >= self.num_classes).any():
            bad = int(np.argmax(labels >= self.num_classes))
            self._check_label(float(labels[bad]), int(self.image_keys[bad]))
        return labels

    def _labels_from_headers(self) -> np.ndarray:
        labels = np.empty(len(self.image_keys), dtype=np.int64)
        for position, key in enumerate(self.image_keys.tolist()):
            try:
                header = self.reader.read_header(key)
            except KeyError:
                raise self._missing(key) from None
            labels[position] = self._check_label(header_class(header), key)
        return labels

    def close(self) -> None:
        self.reader.close()
