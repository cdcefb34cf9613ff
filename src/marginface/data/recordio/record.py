"""The RecordIO record format: IRHeader (flag, label, id, id2) and dmlc-core's magic-split framing (spec A1)."""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Sequence

import numpy as np

from marginface.errors import ConfigError, DataFormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
# A record head is (magic, lrec): the top 3 bits of lrec are the continuation flag, the low 29 the length.
LENGTH_MASK = (1 << 29) - 1
MAX_RECORD = 1 << 29
RECORD_HEAD = struct.Struct("<II")
IR_STRUCT = struct.Struct("<IfQQ")
IR_SIZE = IR_STRUCT.size  # 24 bytes, no padding

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Record header: flag (0 = scalar label, N = N float32 labels follow), label, id, id2."


def pack_header(label: float | Sequence[float], record_id: int = 0, id2: int = 0) -> bytes:
    """Encode an IRHeader: a scalar label gives flag 0, a sequence flag=len and float32 labels after it."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IR_STRUCT.pack(0, float(label), int(record_id), int(id2))
    labels = np.asarray(label, dtype="<f4").reshape(-1)
    if labels.size == 0:
        raise ConfigError("pack_header: label sequence is empty; expected a number or at least one value")
    return IR_STRUCT.pack(labels.size, 0.0, int(record_id), int(id2)) + labels.tobytes()


def unpack_header(data: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload; with flag>0 `label` is a float32 numpy array."""
    if len(data) < IR_SIZE:
        raise DataFormatError(f"record of {len(data)} bytes is shorter than the 24-byte IRHeader")
    flag, label, rid, id2 = IR_STRUCT.unpack_from(data, 0)
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
    if n >= MAX_RECORD:
        raise ConfigError(f"record of {n} bytes is too large; RecordIO records must be < 2^29 bytes")
    view = memoryview(data)
    out = []
    start = 0
    cflag_next = 1
    limit = (n >> 2) << 2
    pos = data.find(MAGIC_BYTES, 0, limit)
    while pos != -1:
        if pos & 3 == 0:
            out.append(RECORD_HEAD.pack(MAGIC, (cflag_next << 29) | (pos - start)))
            out.append(view[start:pos])
            cflag_next = 2
            start = pos + 4
            pos = data.find(MAGIC_BYTES, start, limit)
        else:
            pos = data.find(MAGIC_BYTES, pos + 1, limit)
    last_cflag = 0 if cflag_next == 1 else 3
    out.append(RECORD_HEAD.pack(MAGIC, (last_cflag << 29) | (n - start)))
    out.append(view[start:])
    out.append(b"\0" * ((-(n - start)) & 3))
    return b"".join(out)
