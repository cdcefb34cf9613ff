"""Writing a `.rec` + `.idx` pair atomically: records appear under their final names only when complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from marginface.data.recordio.record import frame_record
from marginface.errors import ConfigError


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
