"""MXNet RecordIO (`.rec` + `.idx` + `property`) read and written in pure Python, byte-compatible with dmlc.

`record` is the format (IRHeader, framing), `index` the `.idx`, `reader`/`writer` random access and atomic
writing, `dataset` the two layouts built on them (spec/formats.md A1); no mxnet is needed at run time.
"""

from marginface.data.recordio.dataset import (
    RecordIOSource,
    read_property,
    resolve_rec_paths,
    write_identity_dataset,
    write_property,
)
from marginface.data.recordio.index import parse_idx, scan_rec
from marginface.data.recordio.reader import RecordIOReader
from marginface.data.recordio.record import (
    IR_SIZE,
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    frame_record,
    header_class,
    pack_header,
    unpack_header,
)
from marginface.data.recordio.writer import RecordIOWriter

__all__ = [
    "IR_SIZE",
    "MAGIC",
    "MAGIC_BYTES",
    "IRHeader",
    "RecordIOReader",
    "RecordIOSource",
    "RecordIOWriter",
    "frame_record",
    "header_class",
    "pack_header",
    "parse_idx",
    "read_property",
    "resolve_rec_paths",
    "scan_rec",
    "unpack_header",
    "write_identity_dataset",
    "write_property",
]
