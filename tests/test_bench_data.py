"""`marginface bench data`: the throughput it reports is the items it really read, and bad options are named."""

from __future__ import annotations

import json

import pytest
import torch

from marginface.bench import data as bench
from marginface.cli import main


class CountingDataset(torch.utils.data.Dataset):
    """Items of a fixed size that count how often they are read (in this process)."""

    def __init__(self, size: int) -> None:
        self.size, self.reads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.reads += 1
        return torch.zeros(3, 8, 8), index


def test_item_rate_reads_the_asked_items_every_round() -> None:
    dataset = CountingDataset(50)
    rate = bench.item_rate(dataset, items=40, rounds=3)
    assert dataset.reads == 1 + 3 * 40  # the warm-up item, then three rounds
    assert rate.items == 40 and rate.per_wall_second > 0 and rate.per_cpu_second > 0


def test_loader_rate_counts_the_batches_after_the_first() -> None:
    rate = bench.loader_rate(CountingDataset(30), workers=0, batch_size=4, batches=5)
    assert rate.batches == 5 and rate.images_per_second > 0


def test_worker_counts_default_to_powers_of_two_up_to_the_cores() -> None:
    assert bench.worker_counts([3, 0]) == [3, 0]
    counts = bench.worker_counts(None)
    assert counts[0] == 0 and counts[1] == 1 and all(b == 2 * a for a, b in zip(counts[1:], counts[2:], strict=False))


def test_bench_data_on_a_real_recordio_set(cache, capsys, monkeypatch) -> None:
    from marginface.data import synthetic

    monkeypatch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])  # the session's tiny set, not a new one
    path = str(synthetic(identities=16, images_per_id=6, pairs_per_set=40, ijb=False).train)
    assert main(["bench", "data", path, "--items", "20", "--rounds", "1", "--workers", "0", "1",
                 "--batch-size", "8", "--batches", "2", "--image-size", "56", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 * 6
    assert [r["workers"] for r in result["loader"]] == [0, 1] and all(r["batches"] == 2 for r in result["loader"])


@pytest.mark.parametrize("argv, named", [
    (["--items", "0"], "--items=0"), (["--workers", "-1"], "--workers -1"), (["/no/such/set"], "/no/such/set"),
    (["--image-size", "2"], "--image-size=2"),
])
def test_bench_data_bad_options_are_named(argv, named, capsys) -> None:
    assert main(["bench", "data", *argv]) != 0
    assert named in capsys.readouterr().err
