"""Damaged training records: one clear line (fail), or left out, counted and listed (skip), never a worker traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marginface.data.bad_records import MAX_SUBSTITUTES, BadRecordLedger, GuardedItems
from marginface.data.decode import encode_jpeg
from marginface.data.recordio import parse_idx, write_identity_dataset
from marginface.errors import ConfigError, DataFormatError

IMAGES_PER_CLASS, CLASSES = 8, 8


class Items:
    """Item i is (tensor [i], i // 2); the positions in `bad` raise as a damaged record does."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise DataFormatError(f"set.rec key {i + 1}: bad magic")
        return torch.tensor([float(i)]), i // 2


def test_a_damaged_item_is_replaced_by_the_next_readable_one():
    items = GuardedItems(Items(10, {3, 4, 9}))
    image, label, position, problems = items[3]
    assert (float(image), label, position) == (5.0, 2, 5)
    assert problems == "3\tset.rec key 4: bad magic\n4\tset.rec key 5: bad magic"
    assert items[9][2] == 0 and items[9][3] == "9\tset.rec key 10: bad magic"  # wraps around
    assert items[2][2:] == (2, "")


def test_a_run_of_damaged_items_is_an_error_naming_the_last():
    items = GuardedItems(Items(200, set(range(10, 10 + MAX_SUBSTITUTES))))
    with pytest.raises(DataFormatError, match=rf"key {10 + MAX_SUBSTITUTES}: bad magic; and the 63 records"):
        items[10]
    assert items[10 + MAX_SUBSTITUTES][2] == 10 + MAX_SUBSTITUTES


def test_ledger_fail_names_the_record_and_the_way_out():
    ledger = BadRecordLedger("fail", 0.01, 1000, "set/train.rec")
    ledger.report(["", ""])
    with pytest.raises(DataFormatError) as info:
        ledger.report(["", "7\tset/train.rec key 8: bad magic"])
    text = str(info.value)
    assert text.startswith("set/train.rec key 8: bad magic — training stopped")
    assert "marginface data inspect --verify set/train.rec" in text and "data.bad_records=skip" in text


def test_ledger_skip_counts_each_record_once_and_stops_past_the_fraction():
    seen: list[str] = []
    lines: list[str] = []
    ledger = BadRecordLedger("skip", 0.002, 1000, "set/train.rec", seen=seen)
    assert ledger.limit == 2
    ledger.report(["7\tkey 8: bad", "7\tkey 8: bad\n9\tkey 10: bad"], echo=lines.append)
    ledger.report(["7\tkey 8: bad"], echo=lines.append)
    assert seen == ["key 8: bad", "key 10: bad"]  # the run state's own list: checkpoints carry it
    assert lines == ["skipped damaged record (1 so far): key 8: bad", "skipped damaged record (2 so far): key 10: bad"]
    with pytest.raises(DataFormatError, match=r"3 damaged records in set/train.rec \(1000 images\), more than "
                                              r"data.max_bad_fraction=0.002 allows \(2\)"):
        ledger.report(["11\tkey 12: bad"], echo=lines.append)
    with pytest.raises(ConfigError, match="data.bad_records='drop'"):
        BadRecordLedger("drop", 0.1, 10, "x")


@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory) -> tuple[Path, int]:
    """A 64-image RecordIO set whose image at key 30 has 4 KiB flipped in its JPEG payload."""
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    samples = [(c, encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)))
               for c in range(CLASSES) for _ in range(IMAGES_PER_CLASS)]
    write_identity_dataset(root / "set", samples, CLASSES)
    keys, offsets = parse_idx(root / "set" / "train.idx")
    damaged_key = 30
    start = int(offsets[keys == damaged_key][0]) + 8 + 24 + 600  # past the framing, IRHeader and JPEG headers
    rec = root / "set" / "train.rec"
    data = bytearray(rec.read_bytes())
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    rec.write_bytes(bytes(data))
    return root / "set", damaged_key


def train(out: Path, data: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "marginface", "train", "--no-progress", "--out", str(out), f"data.train={data}",
               "data.pairs=[]", "train.batch_size=8", "data.num_workers=1", "train.max_steps=16", "train.threads=1",
               "train.checkpoint_every=4", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def test_fail_stops_with_one_line_and_keeps_what_was_written(damaged_set, tmp_path):
    path, key = damaged_set
    result = train(tmp_path / "run", path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1, result.stderr
    assert f"{path / 'train.rec'} key {key}: cannot decode image" in error[0]
    assert "data inspect --verify" in error[0] and "0x" not in error[0].split("starting")[1]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_skip_leaves_the_record_out_and_lists_it(damaged_set, tmp_path):
    path, key = damaged_set
    result = train(tmp_path / "run", path, "data.bad_records=skip", "data.max_bad_fraction=0.02")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    bad = metrics["bad_records"]
    assert bad["mode"] == "skip" and bad["count"] == 1
    assert bad["records"][0].startswith(f"{path / 'train.rec'} key {key}: cannot decode image")
    assert metrics["steps"] == 16 and metrics["images_seen"] == 16 * 8  # every batch full
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## damaged records left out (1)" in report and f"key {key}: cannot decode" in report
    assert result.stderr.count("skipped damaged record") == 1


def test_skip_still_fails_past_the_fraction(damaged_set, tmp_path):
    path, key = damaged_set
    result = train(tmp_path / "run", path, "data.bad_records=skip")  # 0.001 of 64 images: none tolerated
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "1 damaged records in" in result.stderr
    assert "more than data.max_bad_fraction=0.001 allows (0)" in result.stderr
    assert f"key {key}" in result.stderr
