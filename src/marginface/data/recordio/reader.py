"""Random access to RecordIO records by key: memory-mapped or pread, fork-safe, every fault a clear error."""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from marginface.data.recordio.index import parse_idx, scan_rec
from marginface.data.recordio.record import LENGTH_MASK, MAGIC, MAGIC_BYTES, RECORD_HEAD, IRHeader, unpack_header
from marginface.errors import DataFormatError

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
                magic, lrec = RECORD_HEAD.unpack_from(view, offset)
                end = offset + 8 + (lrec & LENGTH_MASK)
                if magic == MAGIC and lrec >> 29 == 0 and end <= self.file_size:
                    return view[offset + 8 : end]
            return self._read_parts(offset, key)
        if span <= _SPAN_LIMIT:
            buf = os.pread(self._fd, span, offset)
            if len(buf) >= 8:
                magic, lrec = RECORD_HEAD.unpack_from(buf, 0)
                end = 8 + (lrec & LENGTH_MASK)
                if magic == MAGIC and lrec >> 29 == 0 and end <= len(buf):
                    return buf[8:end]
        return self._read_parts(offset, key)

    def read_prefix(self, key: int, nbytes: int = 64) -> bytes:
        """The first up to `nbytes` of the record under `key` (enough for its IRHeader); one small read."""
        offset, _ = self._locate(int(key))
        head = self._fetch(offset, 8 + nbytes)
        _, lrec = self._check_head(head, offset, key)
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if cflag == 0 or length >= nbytes:
            return head[8 : 8 + min(length, nbytes)]
        return self.read(key)[:nbytes]

    def _check_head(self, head: bytes, offset: int, key: int) -> tuple[int, int]:
        if len(head) < 8:
            raise DataFormatError(
                f"{self.rec_path}: key {key}: truncated at byte {offset} (file has {self.file_size} bytes); "
                "expected an 8-byte record head"
            )
        magic, lrec = RECORD_HEAD.unpack_from(head, 0)
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
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
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
