"""A user's own folders: a corrupt image (pack --skip-bad) and mixed image sizes (pack --size, or a refusal that
names the option) never end in a DataLoader traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

import marginface as mf
from marginface.data.decode import encode_jpeg
from marginface.data.pack import pack_dataset, parse_size
from marginface.data.recordio import read_property
from marginface.errors import ConfigError, DataFormatError

RNG = np.random.default_rng(3)


def folder(root, sizes=((24, 24),) * 3, corrupt=None):
    """Three identities (a, b, c), one image per entry of `sizes` each; `corrupt` = (identity, index) to damage."""
    for name in "abc":
        (root / name).mkdir(parents=True)
        for j, (h, w) in enumerate(sizes):
            data = encode_jpeg(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if corrupt == (name, j):
                data = data[:20] + bytes(len(data) - 20)
            (root / name / f"{j}.jpg").write_bytes(data)
    return root


def test_a_corrupt_image_stops_the_pack_and_names_the_way_out(tmp_path):
    source = folder(tmp_path / "in", corrupt=("b", 1))
    with pytest.raises(DataFormatError) as info:
        pack_dataset(source, tmp_path / "out", workers=0, progress=False)
    assert "b/1.jpg" in str(info.value) and "pass --skip-bad" in str(info.value)
    assert not (tmp_path / "out" / "train.rec").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_leaves_it_out_and_lists_it(tmp_path, capsys, workers):
    from marginface import cli

    source = folder(tmp_path / "in", corrupt=("b", 1))
    out = tmp_path / "out"
    assert cli.main(["data", "pack", str(source), str(out), "--skip-bad", "--workers", str(workers), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and len(summary["skipped"]) == 1 and "b/1.jpg" in summary["skipped"][0]
    assert (out / "skipped.txt").read_text() == summary["skipped"][0] + "\n"
    dataset = mf.data.open_dataset(out, image_size=None)
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_mixed_sizes_are_refused_naming_the_image_and_the_option(tmp_path):
    source = folder(tmp_path / "in", sizes=((24, 24), (24, 24), (30, 20)))
    with pytest.raises(DataFormatError, match=r"a/2.jpg: 30x20, but the images before it are 24x24; pass --size 24x24"):
        pack_dataset(source, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out" / "train.rec").exists()


def test_pack_size_resizes_the_others_and_copies_the_rest(tmp_path):
    source = folder(tmp_path / "in", sizes=((24, 24), (24, 24), (30, 20)))
    summary = pack_dataset(source, tmp_path / "out", workers=0, progress=False, size="24")
    assert summary["image_sizes"] == {"24x24": 9} and summary["copied_jpeg"] == 6 and summary["reencoded"] == 3
    assert read_property(tmp_path / "out" / "property") == (3, 24, 24)
    dataset = mf.data.open_dataset(tmp_path / "out", image_size=None)
    assert {tuple(dataset[i][0].shape) for i in range(len(dataset))} == {(3, 24, 24)}
    assert parse_size("112x96") == (112, 96) and parse_size(64) == (64, 64)
    with pytest.raises(ConfigError, match="--size 'big' is invalid"):
        parse_size("big")


def test_training_from_a_mixed_folder_without_resize_names_data_image_size(tmp_path):
    source = folder(tmp_path / "in", sizes=((24, 24), (30, 20)))
    dataset = mf.data.open_dataset(source, image_size=None)
    assert tuple(dataset[0][0].shape) == (3, 24, 24)
    with pytest.raises(DataFormatError, match=r"1.jpg: image is 30x20, but the first image says 24x24 .* set "
                                              r"data.image_size=24 to resize every image"):
        dataset[1]
    resized = mf.data.open_dataset(source, image_size=16)
    assert {tuple(resized[i][0].shape) for i in range(len(resized))} == {(3, 16, 16)}
