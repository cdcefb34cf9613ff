"""RecordIO framing, IRHeader, writer and reader: checked against the byte layouts worked out in formats.md A1
and against an independent, deliberately naive framer/walker written here."""

from __future__ import annotations

import os
import random
import struct
import warnings

import numpy as np
import pytest

from marginface.data.recordio import (
    MAGIC,
    RecordIOReader,
    RecordIOWriter,
    frame_record,
    pack_header,
    parse_idx,
    read_property,
    unpack_header,
    write_identity_dataset,
)
from marginface.errors import ConfigError, DataFormatError

M = bytes.fromhex("0a23d7ce")


def naive_frame(payload: bytes) -> bytes:
    """Reference framer: look at every aligned word, cut on the magic, as the spec describes in prose."""
    parts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i : i + 4] == M and i >= start:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    out = b""
    for j, part in enumerate(parts):
        if len(parts) == 1:
            cflag = 0
        elif j == 0:
            cflag = 1
        elif j == len(parts) - 1:
            cflag = 3
        else:
            cflag = 2
        out += struct.pack("<II", 0xCED7230A, (cflag << 29) | len(part)) + part
    return out + b"\0" * (-len(parts[-1]) % 4)


def naive_walk(path) -> list[bytes]:
    """Reference reader: walk the file front to back, rejoining parts with the magic."""
    data = open(path, "rb").read()
    pos, records, current = 0, [], []
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == 0xCED7230A
        cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
        current.append(data[pos + 8 : pos + 8 + n])
        pos += 8 + n + (-n % 4)
        if cflag in (0, 3):
            records.append(M.join(current))
            current = []
    return records


def test_spec_worked_example_multipart():
    # formats.md A1: M+"1234"+M+M+"XY" -> lrecs 0x20000000, 0x40000004, 0x40000000, 0x60000002, 2 pad bytes.
    framed = frame_record(M + b"1234" + M + M + b"XY")
    words = [struct.unpack_from("<II", framed, off) for off in (0, 8, 20, 28)]
    assert [w[0] for w in words] == [MAGIC] * 4
    assert [w[1] for w in words] == [0x20000000, 0x40000004, 0x40000000, 0x60000002]
    assert framed[36:38] == b"XY" and framed[38:] == b"\0\0" and len(framed) == 40


def test_spec_worked_example_header_record():
    # formats.md A1 hex of an insightface header record: flag 2, label 0.0, id 0, id2 0, labels 3.0 and 5.0.
    expected = bytes.fromhex("0a23d7ce20000000" + "02000000" + "00000000" + "00" * 16 + "00004040" + "0000a040")
    assert frame_record(pack_header([3.0, 5.0])) == expected


def test_empty_and_unaligned_magic():
    assert frame_record(b"") == struct.pack("<II", MAGIC, 0)
    # A magic at offset 1 is not on a 4-byte boundary: no split.
    payload = b"x" + M + b"abc"
    assert frame_record(payload) == struct.pack("<II", MAGIC, 8) + payload


def test_framing_matches_naive_on_magic_rich_payloads():
    rng = random.Random(0)
    for _ in range(300):
        pieces = [M, b"\x0a\x23", b"ab", b"abcd", bytes([rng.randrange(256)])]
        chunks = [rng.choice(pieces) for _ in range(12)]
        payload = b"".join(chunks)
        assert frame_record(payload) == naive_frame(payload), payload.hex()


def test_header_roundtrip_scalar_and_array():
    raw = pack_header(7, record_id=12, id2=3)
    assert raw == struct.pack("<IfQQ", 0, 7.0, 12, 3)
    header, payload = unpack_header(raw + b"JPEG")
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 7.0, 12, 3, b"JPEG")
    raw = pack_header([4, 1.0], record_id=5)
    assert raw == struct.pack("<IfQQff", 2, 0.0, 5, 0, 4.0, 1.0)
    header, payload = unpack_header(raw + b"xyz")
    assert header.flag == 2 and header.label.tolist() == [4.0, 1.0] and payload == b"xyz"


@pytest.mark.parametrize("use_mmap", [True, False])
def test_writer_reader_roundtrip_and_naive_walk(tmp_path, use_mmap):
    rng = random.Random(1)
    payloads = {}
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        for key in rng.sample(range(50), 50):  # keys written out of order
            payloads[key] = b"".join(rng.choice([M, b"abcd", b"q", b""]) for _ in range(rng.randrange(0, 30)))
            writer.write(key, payloads[key])
        assert not (tmp_path / "a.rec").exists()  # only the .tmp exists until close
    assert not list(tmp_path.glob("*.tmp"))
    reader = RecordIOReader(tmp_path / "a.rec", use_mmap=use_mmap)
    for key, payload in payloads.items():
        assert reader.read(key) == payload
    keys, offsets = parse_idx(tmp_path / "a.idx")
    walked = naive_walk(tmp_path / "a.rec")
    assert walked == [payloads[k] for k in keys[np.argsort(offsets)]]


def test_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
            writer.write(0, b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_key_rejected(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        written = [3, 10**12, 0, 7, 5000000, 8, -2]  # dense, sparse, huge and negative keys
        for key in written:
            writer.write(key, b"a")
        for key in written:
            with pytest.raises(ConfigError, match=f"key {key} written twice"):
                writer.write(key, b"b")
        for key in (1, 2, 9, 10**12 + 1, -1, 4999999):
            writer.write(key, b"c")  # fresh keys still accepted


def _walk_dataset(out):
    """Decode every record with the naive walker and the idx, independent of RecordIOReader."""
    keys, offsets = parse_idx(out / "train.idx")
    records = naive_walk(out / "train.rec")
    by_offset = dict(zip(sorted(offsets.tolist()), records, strict=True))
    return {int(k): by_offset[int(o)] for k, o in zip(keys, offsets, strict=True)}


@pytest.mark.parametrize("label_array", [False, True])
def test_identity_dataset_insightface_layout(tmp_path, label_array):
    samples = [(0, b"img0"), (0, b"img1"), (2, b"img2" + M), (3, b"img3"), (3, b"img4")]
    summary = write_identity_dataset(tmp_path, samples, num_classes=4, label_array=label_array)
    assert summary["images"] == 5 and summary["classes"] == 4 and summary["layout"] == "insightface"
    recs = _walk_dataset(tmp_path)
    assert sorted(recs) == list(range(0, 1 + 5 + 4))
    head = struct.unpack_from("<IfQQff", recs[0])
    assert head == (2, 0.0, 0, 0, 6.0, 10.0)  # [N+1, N+1+C]
    for key, (label, data) in enumerate(samples, 1):
        rec = recs[key]
        if label_array:
            assert struct.unpack_from("<IfQQff", rec) == (2, 0.0, key, 0, float(label), 1.0)
            assert rec[32:] == data
        else:
            assert struct.unpack_from("<IfQQ", rec) == (0, float(label), key, 0)
            assert rec[24:] == data
    # identity records: class 0 -> [1,3), class 1 empty -> [3,3), class 2 -> [3,4), class 3 -> [4,6)
    ranges = [struct.unpack_from("<IfQQff", recs[6 + c])[4:] for c in range(4)]
    assert ranges == [(1.0, 3.0), (3.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
    assert read_property(tmp_path / "property") == (4, 112, 112)
    # header record is first in the file, like face2rec2 writes it
    assert parse_idx(tmp_path / "train.idx")[1][0] == 0


def test_identity_dataset_flat_layout(tmp_path):
    samples = [(0, b"a"), (1, b"bb"), (1, b"ccc")]
    summary = write_identity_dataset(tmp_path, iter(samples), num_classes=2, image_size=(112, 96), flat=True)
    assert summary["layout"] == "flat"
    recs = _walk_dataset(tmp_path)
    assert sorted(recs) == [0, 1, 2]
    for key, (label, data) in enumerate(samples):
        assert struct.unpack_from("<IfQQ", recs[key]) == (0, float(label), key, 0)
        assert recs[key][24:] == data
    assert read_property(tmp_path / "property") == (2, 112, 96)


def test_identity_dataset_rejects_unsorted_labels_and_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="ascending"):
        write_identity_dataset(tmp_path / "out", [(1, b"a"), (0, b"b")], num_classes=2)
    assert not (tmp_path / "out" / "train.rec").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ConfigError, match="outside"):
        write_identity_dataset(tmp_path / "out", [(5, b"a")], num_classes=2)


# ----- bad input ------------------------------------------------------------------------------------------


def _small_rec(tmp_path, n=4):
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as writer:
        for key in range(n):
            writer.write(key, pack_header(key) + bytes([key]) * 40)
    return tmp_path / "t.rec"


@pytest.mark.parametrize("use_mmap", [True, False])
def test_truncated_rec(tmp_path, use_mmap):
    rec = _small_rec(tmp_path)
    size = rec.stat().st_size
    os.truncate(rec, size - 10)
    reader = RecordIOReader(rec, use_mmap=use_mmap)
    with pytest.raises(DataFormatError, match=r"t\.rec.*key 3.*truncated"):
        reader.read(3)


@pytest.mark.parametrize("use_mmap", [True, False])
def test_bad_magic(tmp_path, use_mmap):
    rec = _small_rec(tmp_path)
    offset = int(parse_idx(tmp_path / "t.idx")[1][2])
    with open(rec, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef")
    with pytest.raises(DataFormatError, match=r"t\.rec.*key 2.*bad magic 0xEFBEADDE"):
        RecordIOReader(rec, use_mmap=use_mmap).read(2)


def test_index_outside_file(tmp_path):
    rec = _small_rec(tmp_path)
    with open(tmp_path / "t.idx", "a") as f:
        f.write("9\t99999\n")
    with pytest.raises(DataFormatError, match=r"t\.idx.*key 9.*byte 99999.*outside"):
        RecordIOReader(rec)


def test_malformed_idx_line(tmp_path):
    rec = _small_rec(tmp_path)
    with open(tmp_path / "t.idx", "a") as f:
        f.write("7 oops\n")
    with pytest.raises(DataFormatError, match=r"t\.idx.*line 5"):
        RecordIOReader(rec)


def test_missing_idx_rebuilt_by_scanning(tmp_path):
    rec = _small_rec(tmp_path)
    expected = [RecordIOReader(rec).read(k) for k in range(4)]
    os.unlink(tmp_path / "t.idx")
    with pytest.warns(UserWarning, match="rebuilt index by scanning"):
        reader = RecordIOReader(rec)
    assert [reader.read(k) for k in range(4)] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rec"]  # nothing written into the dataset dir


def test_malformed_property(tmp_path):
    (tmp_path / "property").write_text("abc,112\n")
    with pytest.raises(DataFormatError, match=r"property.*num_classes,height,width"):
        read_property(tmp_path / "property")


def test_reader_reopens_after_fork(tmp_path):
    rec = _small_rec(tmp_path)
    reader = RecordIOReader(rec)
    reader.read(0)
    parent_fd = reader._fd
    pid = os.fork()
    if pid == 0:  # child: must open its own descriptor
        try:
            ok = reader.read(1)[24:] == bytes([1]) * 40 and reader._pid == os.getpid()
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader._fd == parent_fd


def test_read_header_multipart_label(tmp_path):
    # A label array whose float bits spell the magic forces the split inside the header itself.
    magic_float = np.frombuffer(M, dtype="<f4")[0]
    with RecordIOWriter(tmp_path / "m.rec", tmp_path / "m.idx") as writer:
        writer.write(0, pack_header([magic_float, 1.0]) + b"tail")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = RecordIOReader(tmp_path / "m.rec")
    header = reader.read_header(0)
    assert header.flag == 2 and header.label.tobytes() == M + np.float32(1.0).tobytes()


def test_reader_pickles_without_open_handles(tmp_path):
    import pickle

    rec = _small_rec(tmp_path)
    reader = RecordIOReader(rec)
    reader.read(1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and clone.read(2) == reader.read(2)


# Written by mxnet 1.9.1 (`MXIndexedRecordIO.write_idx(key, recordio.pack(IRHeader(...), payload))`, in a
# throwaway venv) for keys 2, 0, 3, 1: a scalar label with aligned magics (3 parts), an array label [5, 1],
# an empty payload, and unaligned magics (no split).
MXNET_REC = bytes.fromhex(
    "0a23d7ce180000200000000000004040020000000000000000000000000000000a23d7ce04000040313233340a23d7ce"
    "000000400a23d7ce02000060585900000a23d7ce2300000002000000000000000000000000000000000000000000000000"
    "00a0400000803f616263000a23d7ce18000000000000000000803f030000000000000000000000000000000a23d7ce2300"
    "0000000000000000000001000000000000000000000000000000780a23d7ce797a0a23d7ce00"
)
MXNET_IDX = "2\t0\n0\t64\n3\t108\n1\t140\n"
MXNET_ITEMS = [
    (2, 3.0, M + b"1234" + M + M + b"XY"),
    (0, [5.0, 1.0], b"abc"),
    (3, 1.0, b""),
    (1, 0.0, b"x" + M + b"yz" + M),
]


def test_mxnet_written_file_reads_and_rewrites_identically(tmp_path):
    (tmp_path / "mx.rec").write_bytes(MXNET_REC)
    (tmp_path / "mx.idx").write_text(MXNET_IDX)
    reader = RecordIOReader(tmp_path / "mx.rec")
    for key, label, payload in MXNET_ITEMS:
        header, data = unpack_header(reader.read(key))
        assert data == payload and header.id == key
        assert (header.label.tolist() if header.flag else header.label) == label
    with RecordIOWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for key, label, payload in MXNET_ITEMS:
            writer.write(key, pack_header(label, record_id=key) + payload)
    assert (tmp_path / "ours.rec").read_bytes() == MXNET_REC
    assert (tmp_path / "ours.idx").read_text() == MXNET_IDX


@pytest.mark.parametrize("use_mmap", [True, False])
def test_multipart_truncated_and_bad_continuation(tmp_path, use_mmap):
    with RecordIOWriter(tmp_path / "p.rec", tmp_path / "p.idx") as writer:
        writer.write(0, b"abcd" + M + b"efgh" * 10 + M + b"ij")
    raw = (tmp_path / "p.rec").read_bytes()
    (tmp_path / "p.rec").write_bytes(raw[:30])  # cut inside the second part
    with pytest.raises(DataFormatError, match=r"p\.rec: key 0: .*truncated"):
        RecordIOReader(tmp_path / "p.rec", use_mmap=use_mmap).read(0)
    # A record that starts with a middle-part flag (2) is not a record start.
    (tmp_path / "p.rec").write_bytes(struct.pack("<II", MAGIC, (2 << 29) | 4) + b"abcd")
    with pytest.raises(DataFormatError, match=r"key 0: part at byte 0 has continuation flag 2; expected 0 or 1"):
        RecordIOReader(tmp_path / "p.rec", use_mmap=use_mmap).read(0)


def test_parse_idx_tolerates_blank_lines_and_crlf(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"0\t0\n1\t40\n\n2\t80\r\n3\t128")
    keys, offsets = parse_idx(tmp_path / "a.idx")
    assert keys.tolist() == [0, 1, 2, 3] and offsets.tolist() == [0, 40, 80, 128]
