"""The `.idx` index (key<TAB>offset per line), parsed fast, and rebuilt by scanning a `.rec` when missing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from marginface.data.recordio.record import LENGTH_MASK, MAGIC, RECORD_HEAD
from marginface.errors import DataFormatError


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
            magic, lrec = RECORD_HEAD.unpack(head)
            if magic != MAGIC:
                raise DataFormatError(
                    f"{rec_path}: bad magic 0x{magic:08X} at byte {pos} while scanning; expected 0x{MAGIC:08X}"
                )
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
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
