"""Image-folder and list-file datasets: labels by sorted folder name, relative paths, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import marginface as mf
from marginface.data.decode import encode_png
from marginface.errors import DataFormatError

RNG = np.random.default_rng(1)


def _folder(root, names=("zed", "amy", "bob"), per=2):
    images = {}
    for name in names:
        (root / name).mkdir(parents=True)
        for j in range(per):
            image = RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            (root / name / f"{j}.png").write_bytes(encode_png(image))
            images[(name, j)] = image
    return images


def test_image_folder_labels_by_sorted_name(tmp_path):
    images = _folder(tmp_path)
    (tmp_path / "amy" / "notes.txt").write_text("not an image")
    ds = mf.data.open_dataset(tmp_path)
    assert ds.format == "image-folder" and len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]  # amy, bob, zed
    expected = [images[(n, j)] for n in ("amy", "bob", "zed") for j in range(2)]
    for i, image in enumerate(expected):
        got, label = ds.read(i)
        np.testing.assert_array_equal(got, image)
        assert label == ds.labels[i]
    tensor, _ = ds[0]
    assert tuple(tensor.shape) == (3, 8, 8)


def test_list_file_relative_paths_and_im2rec_lst(tmp_path):
    images = _folder(tmp_path / "imgs")
    (tmp_path / "sub").mkdir()
    lst = tmp_path / "sub" / "train.txt"
    lst.write_text("# comment\n../imgs/zed/0.png 2\n\n../imgs/amy/1.png\t0\n" + f"{tmp_path}/imgs/bob/0.png 1\n")
    ds = mf.data.open_dataset(lst)
    assert ds.format == "list-file" and len(ds) == 3 and ds.num_classes == 3
    assert ds.labels.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(ds.read(1)[0], images[("amy", 1)])
    im2rec = tmp_path / "sub" / "train.lst"
    im2rec.write_text("0\t1.000000\t../imgs/bob/1.png\n1\t0.000000\t../imgs/amy/0.png\n")
    ds = mf.data.open_dataset(im2rec)
    assert ds.labels.tolist() == [1, 0]
    np.testing.assert_array_equal(ds.read(0)[0], images[("bob", 1)])


def test_empty_image_folder(tmp_path):
    with pytest.raises(DataFormatError, match=r"empty image folder; expected one sub-folder per identity"):
        mf.data.open_dataset(tmp_path)
    (tmp_path / "someone").mkdir()
    with pytest.raises(DataFormatError, match=r"1 identity folders but no images"):
        mf.data.open_dataset(tmp_path)


def test_identity_folder_without_images_warns_and_keeps_label_order(tmp_path):
    _folder(tmp_path, names=("a", "c"))
    (tmp_path / "b").mkdir()
    with pytest.warns(UserWarning, match="without images"):
        ds = mf.data.open_dataset(tmp_path)
    assert ds.num_classes == 3 and ds.labels.tolist() == [0, 0, 2, 2]


def test_list_file_line_without_label(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.png 0\nb.png\n")
    with pytest.raises(DataFormatError, match=r"list\.txt: line 2: 'b\.png' has no label; expected 'path label'"):
        mf.data.open_dataset(lst)
    lst.write_text("a.png -1\n")
    with pytest.raises(DataFormatError, match=r"line 1: label '-1' is not a non-negative integer"):
        mf.data.open_dataset(lst)


def test_list_file_missing_image(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("missing.png 0\n")
    ds = mf.data.open_dataset(lst)
    with pytest.raises(DataFormatError, match=r"missing\.png: cannot read image file"):
        ds[0]


def test_undecodable_image_in_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"a/x\.jpg: cannot decode image"):
        mf.data.open_dataset(tmp_path).read(0)
