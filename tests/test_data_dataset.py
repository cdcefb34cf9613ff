"""`open_dataset` over RecordIO: both layouts, label arrays, PNG payloads, out-of-order keys, multi-part
records, transforms and bad input. Images are checked pixel for pixel against lossless PNG originals and
against Pillow's JPEG decoder."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import marginface as mf
from marginface.data.decode import encode_jpeg, encode_png
from marginface.data.recordio import MAGIC_BYTES, RecordIOWriter, pack_header, parse_idx
from marginface.data.transforms import flip_decision
from marginface.errors import DataFormatError

RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8) for _ in range(9)]
LABELS = [0, 0, 1, 1, 1, 3, 3, 4, 4]  # class 2 has no images


def _write(tmp_path, **kwargs):
    samples = [(label, encode_png(image)) for label, image in zip(LABELS, IMAGES, strict=True)]
    mf.data.write_identity_dataset(tmp_path, samples, num_classes=5, image_size=(12, 10), **kwargs)
    return tmp_path


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("label_array", [False, True])
def test_layouts_read_back_exactly(tmp_path, flat, label_array):
    ds = mf.data.open_dataset(_write(tmp_path, flat=flat, label_array=label_array))
    assert ds.format == "recordio" and ds.layout == ("flat" if flat else "insightface")
    assert len(ds) == 9 and ds.num_classes == 5
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == LABELS
    for i, image in enumerate(IMAGES):
        got, label = ds.read(i)
        assert got.dtype == np.uint8 and got.shape == (12, 10, 3)
        np.testing.assert_array_equal(got, image)
        assert label == LABELS[i]
    # also by .rec path and .idx path
    assert len(mf.data.open_dataset(tmp_path / "train.rec")) == 9
    assert len(mf.data.open_dataset(tmp_path / "train.idx")) == 9


def test_items_are_normalised_chw_with_reproducible_flips(tmp_path):
    ds = mf.data.open_dataset(_write(tmp_path), seed=11)
    flips = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i, image in enumerate(IMAGES):
            tensor, label = ds[i]
            assert tensor.dtype == torch.float32 and tensor.shape == (3, 12, 10) and label == LABELS[i]
            reference = (image.astype(np.float64) / 255.0 - 0.5) / 0.5
            flipped = flip_decision(11, epoch, i)
            if flipped:
                reference = reference[:, ::-1]
            np.testing.assert_allclose(tensor.numpy(), reference.transpose(2, 0, 1), atol=1e-6)
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)  # both outcomes occur over 18 draws
    again = mf.data.open_dataset(tmp_path, seed=11)
    again.set_epoch(1)
    assert torch.equal(again[4][0], ds[4][0])
    evaluation = mf.data.open_dataset(tmp_path, train=False)
    np.testing.assert_allclose(evaluation[0][0].numpy(), ((IMAGES[0] / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def test_flip_probability_is_half():
    draws = [flip_decision(3, 0, i) for i in range(20000)]
    assert abs(np.mean(draws) - 0.5) < 0.015


def test_resize_matches_pillow(tmp_path):
    ds = mf.data.open_dataset(_write(tmp_path), image_size=6, train=False)
    tensor, _ = ds[2]
    expected = np.asarray(Image.fromarray(IMAGES[2]).resize((6, 6), Image.BILINEAR)).astype(np.float64)
    np.testing.assert_allclose(tensor.numpy(), ((expected / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def test_jpeg_payload_matches_pillow(tmp_path):
    image = RNG.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    data = encode_jpeg(image, 90)
    mf.data.write_identity_dataset(tmp_path, [(0, data)], num_classes=1)
    got, _ = mf.data.open_dataset(tmp_path).read(0)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 2


@pytest.mark.parametrize("use_mmap", [True, False])
def test_out_of_order_keys_and_multipart_payload(tmp_path, use_mmap):
    # Flat layout written by hand: keys in the .idx in shuffled order, one payload carrying aligned magics.
    payloads = {}
    order = [3, 0, 4, 1, 2]
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in order:
            png = encode_png(IMAGES[key])
            header = pack_header(key % 2, record_id=key)
            if key == 4:  # PNG ignores bytes after IEND; append aligned magics to force a 3-part record
                pad = (-(len(header) + len(png))) % 4
                png = png + b"\0" * pad + MAGIC_BYTES + b"abcd" + MAGIC_BYTES
            payloads[key] = png
            writer.write(key, header + png)
    (tmp_path / "property").write_text("2,12,10\n")
    assert parse_idx(tmp_path / "train.idx")[0].tolist() == order
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(struct.pack("<I", 0xCED7230A)) > 5  # the multi-part record added part heads
    ds = mf.data.open_dataset(tmp_path, use_mmap=use_mmap)
    assert ds.source.reader.use_mmap == use_mmap
    assert ds.layout == "flat" and ds.labels.tolist() == [0, 1, 0, 1, 0]
    for i in range(5):
        np.testing.assert_array_equal(ds.read(i)[0], IMAGES[i])
        assert ds.read_bytes(i)[0] == payloads[i]


def test_labels_from_identity_records_do_not_read_images(tmp_path, monkeypatch):
    ds = mf.data.open_dataset(_write(tmp_path))
    calls = []
    original = ds.source.reader.read
    monkeypatch.setattr(ds.source.reader, "read", lambda key: calls.append(key) or original(key))
    assert ds.labels.tolist() == LABELS
    assert calls == []


# ----- bad input ------------------------------------------------------------------------------------------


def test_undecodable_image(tmp_path):
    mf.data.write_identity_dataset(tmp_path, [(0, b"\xff\xd8\xffnot a jpeg at all")], num_classes=1)
    with pytest.raises(DataFormatError, match=r"train\.rec key 1: cannot decode image.*expected a JPEG or PNG"):
        mf.data.open_dataset(tmp_path)[0]


def test_label_outside_property_class_count(tmp_path):
    _write(tmp_path, flat=True)
    (tmp_path / "property").write_text("4,12,10\n")  # label 4 is now out of range
    with pytest.raises(DataFormatError, match=r"train\.rec: key 7: label 4 outside 0\.\.3.*property"):
        _ = mf.data.open_dataset(tmp_path).labels
    ds = mf.data.open_dataset(tmp_path)
    with pytest.raises(DataFormatError, match=r"key 7: label 4 outside"):
        ds[7]


def test_label_outside_property_insightface_layout(tmp_path):
    _write(tmp_path)
    (tmp_path / "property").write_text("3,12,10\n")
    with pytest.raises(DataFormatError, match=r"train\.rec: key 6: label 3 outside 0\.\.2"):
        _ = mf.data.open_dataset(tmp_path).labels


def test_malformed_property_via_open_dataset(tmp_path):
    _write(tmp_path)
    (tmp_path / "property").write_text("five,112,112\n")
    with pytest.raises(DataFormatError, match=r"property: first line 'five,112,112'"):
        mf.data.open_dataset(tmp_path)


def test_missing_idx_rebuilt_and_nothing_written(tmp_path):
    _write(tmp_path)
    (tmp_path / "train.idx").unlink()
    with pytest.warns(UserWarning, match="rebuilt index by scanning"):
        ds = mf.data.open_dataset(tmp_path)
    assert ds.layout == "insightface" and ds.labels.tolist() == LABELS
    np.testing.assert_array_equal(ds.read(8)[0], IMAGES[8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.rec"]


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        mf.data.open_dataset(tmp_path / "nope")


def test_dataloader_workers_after_parent_read(tmp_path):
    ds = mf.data.open_dataset(_write(tmp_path), train=False)
    ds.read(0)  # the parent opens its map before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    images, labels = zip(*[(x, y) for x, y in loader], strict=True)
    assert torch.cat(labels).tolist() == LABELS
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(torch.cat(images), expected)


def test_dct_scaled_decode_matches_pillow_draft(tmp_path):
    image = np.asarray(Image.fromarray(RNG.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)).resize((112, 112)))
    data = encode_jpeg(image, 95)
    mf.data.write_identity_dataset(tmp_path, [(0, data)], num_classes=1)
    tensor, _ = mf.data.open_dataset(tmp_path, image_size=56, train=False)[0]
    with Image.open(io.BytesIO(data)) as reference:
        reference.draft("RGB", (56, 56))
        expected = np.asarray(reference.convert("RGB"), dtype=np.float64)
    assert expected.shape == (56, 56, 3)
    np.testing.assert_allclose(tensor.numpy(), ((expected / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=2 * 2 / 255)


def test_header_record_listing_a_missing_image_key(tmp_path):
    _write(tmp_path)
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(line for line in lines if not line.startswith("4\t")) + "\n")
    ds = mf.data.open_dataset(tmp_path)
    assert ds.labels.tolist() == LABELS  # identity records still give every label
    with pytest.raises(DataFormatError, match=r"train\.idx: key 4 is missing"):
        ds[3]


def test_insightface_layout_without_identity_records(tmp_path):
    _write(tmp_path)
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(line for line in lines if int(line.split("\t")[0]) <= 9) + "\n")
    ds = mf.data.open_dataset(tmp_path)
    assert ds.layout == "insightface" and len(ds) == 9 and ds.labels.tolist() == LABELS
