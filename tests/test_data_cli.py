"""`marginface data pack` and `marginface data inspect` end to end through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

import marginface as mf
from marginface.cli import main
from marginface.data.decode import encode_jpeg, encode_png
from marginface.data.recordio import parse_idx, read_property

RNG = np.random.default_rng(2)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "faces"
    images = {}
    for name in ("id_b", "id_a", "id_c"):
        (root / name).mkdir(parents=True)
        for j in range(3):
            image = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            if j == 0:
                data = encode_jpeg(image, 90)
                (root / name / f"{j}.jpg").write_bytes(data)
                images[(name, j)] = data
            else:
                (root / name / f"{j}.png").write_bytes(encode_png(image))
                images[(name, j)] = image
    return root, images


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_then_open(folder, tmp_path, capsys, workers):
    root, images = folder
    out = tmp_path / "rec"
    assert main(["data", "pack", str(root), str(out), "--workers", str(workers), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 9 and summary["classes"] == 3 and summary["layout"] == "insightface"
    assert summary["copied_jpeg"] == 3 and summary["reencoded"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]
    assert read_property(out / "property") == (3, 16, 16)
    assert sorted(parse_idx(out / "train.idx")[0].tolist()) == list(range(1 + 9 + 3))
    ds = mf.data.open_dataset(out)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, (name, j) in enumerate((n, j) for n in ("id_a", "id_b", "id_c") for j in range(3)):
        payload, _ = ds.read_bytes(i)
        if j == 0:
            assert payload == images[(name, j)]  # JPEG copied byte for byte
        else:
            got, _ = ds.read(i)  # PNG re-encoded at quality 95: close, not exact
            assert np.abs(got.astype(int) - images[(name, j)].astype(int)).mean() < 8


def test_pack_flat_from_list_file(folder, tmp_path, capsys):
    root, _ = folder
    lst = tmp_path / "list.txt"
    lst.write_text("faces/id_c/0.jpg 1\nfaces/id_a/1.png 0\n")
    assert main(["data", "pack", str(lst), str(tmp_path / "o"), "--flat", "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "flat"
    ds = mf.data.open_dataset(tmp_path / "o")
    assert ds.layout == "flat" and ds.labels.tolist() == [0, 1]


def test_pack_refuses_to_overwrite(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "rec"
    assert main(["data", "pack", str(root), str(out), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "pack", str(root), str(out), "--workers", "0"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_pack_bad_image_leaves_nothing(folder, tmp_path, capsys):
    root, _ = folder
    (root / "id_b" / "9.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "rec"
    assert main(["data", "pack", str(root), str(out), "--workers", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "id_b/9.png: cannot decode image" in err and err.count("\n") == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_inspect_text_json_and_verify(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "rec"
    main(["data", "pack", str(root), str(out), "--workers", "0", "--no-progress"])
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "insightface layout" in text and "images:      9" in text and "16x16" in text
    assert main(["data", "inspect", str(out / "train.rec"), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and info["verified"] == 9 and info["identities"] == 3 and info["decoded_sizes"] == {"16x16": 9}


def test_inspect_verify_reports_bad_record(tmp_path, capsys):
    good = encode_jpeg(RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    mf.data.write_identity_dataset(
        tmp_path, [(0, good), (1, b"\xff\xd8\xffbroken"), (1, good)], num_classes=2, image_size=(16, 16)
    )
    assert main(["data", "inspect", str(tmp_path), "--verify", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert not info["ok"] and info["problem_count"] == 1 and "key 2: cannot decode image" in info["problems"][0]


def test_inspect_bad_property_is_one_line_error(tmp_path, capsys):
    mf.data.write_identity_dataset(tmp_path, [(0, b"x")], num_classes=1)
    (tmp_path / "property").write_text("oops\n")
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginface data: error:") and "property" in err and err.count("\n") == 1


def test_help_has_examples(capsys):
    for argv in (["data", "--help"], ["data", "pack", "--help"], ["data", "inspect", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "example:" in capsys.readouterr().out


def test_pack_workers_zero_stays_in_process(folder, tmp_path, monkeypatch):
    import multiprocessing

    from marginface.data.pack import pack_dataset

    root, _ = folder

    def no_pool(*args, **kwargs):
        raise AssertionError("workers=0 must not start a pool")

    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    summary = pack_dataset(root, tmp_path / "o", workers=0, progress=False)
    assert summary["images"] == 9
