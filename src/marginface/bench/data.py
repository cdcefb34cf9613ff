"""Data-path throughput on the user's own set: items per core (read + decode + flip + normalise) and the
loader's images per second with N workers, so a user sees how many workers keep a training step fed."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from marginface.data.dataset import FaceDataset


@dataclass
class ItemRate:
    """Single-process dataset items: the median over rounds of items per wall second and per CPU second."""

    items: int
    per_wall_second: float
    per_cpu_second: float


@dataclass
class LoaderRate:
    """A DataLoader with ``workers`` worker processes (0: in the training process), images per wall second."""

    workers: int
    batch_size: int
    batches: int
    images_per_second: float


def item_rate(dataset: FaceDataset, items: int, rounds: int, seed: int = 0) -> ItemRate:
    """Time ``items`` random items ``rounds`` times in this process (one thread, as one loader worker runs)."""
    generator = torch.Generator().manual_seed(seed)
    wall, cpu = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]  # warm-up: opens the memory map and the decoder
        for _ in range(rounds):
            order = torch.randint(len(dataset), (items,), generator=generator).tolist()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for index in order:
                dataset[index]  # results are dropped at once: holding them measures the allocator instead
            wall.append(items / max(time.perf_counter() - start_wall, 1e-9))
            cpu.append(items / max(time.process_time() - start_cpu, 1e-9))
    finally:
        torch.set_num_threads(threads)
    return ItemRate(items, statistics.median(wall), statistics.median(cpu))


def loader_rate(dataset: FaceDataset, workers: int, batch_size: int, batches: int, seed: int = 0) -> LoaderRate:
    """Images per second out of a shuffled DataLoader (the trainer's settings), after its first batch."""
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 1),
                                             generator=generator)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True)
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per epoch, not per batch
    start = time.perf_counter()
    count = sum(1 for _ in iterator)
    seconds = max(time.perf_counter() - start, 1e-9)
    return LoaderRate(workers, batch_size, count, count * batch_size / seconds)


def worker_counts(requested: list[int] | None) -> list[int]:
    """The worker counts to try: as asked, or 0, 1, 2, … up to the cores this process may use."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts, n = [0], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    return counts


def format_table(source: str, size: str, item: ItemRate, loaders: list[LoaderRate]) -> str:
    """The plain-text report `marginface bench data` prints."""
    lines = [
        f"data: {source} ({size})",
        f"one core, read + decode + flip + normalise: {item.per_cpu_second:,.0f} items per CPU second "
        f"({item.per_wall_second:,.0f} per wall second; median of rounds of {item.items} random items)",
        "| loader workers | batch | images/s |",
        "|---:|---:|---:|",
    ]
    threads = torch.get_num_threads()
    # workers = 0 decodes in the training process at its torch thread count: small per-image ops then pay the
    # thread pool's overhead (measured 10-20x slower on 2 cores), which loader workers (1 thread each) avoid
    lines += [f"| {r.workers}{f' (in process, {threads} torch threads)' if r.workers == 0 else ''} | {r.batch_size} "
              f"| {r.images_per_second:,.0f} |" for r in loaders]
    lines.append("A training step of batch B taking t seconds needs B / t images/s: pick the fewest workers "
                 "above it (workers share the cores with the training process).")
    return "\n".join(lines)
