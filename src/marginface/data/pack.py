"""Pack an image folder, list file or another RecordIO set into insightface-layout RecordIO, encoding in parallel.

JPEG inputs are copied byte for byte (no generational loss); anything else is decoded and re-encoded as JPEG.
Files are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from marginface.data.decode import decode_rgb, encode_jpeg, image_size, sniff
from marginface.data.recordio import write_identity_dataset
from marginface.errors import ConfigError, DataFormatError

_WORKER_SOURCE: Any = None


def _open(path: str, num_classes: int | None) -> Any:
    from marginface.data.folders import open_source

    return open_source(path, num_classes=num_classes)


def _init_worker(path: str, num_classes: int | None) -> None:
    global _WORKER_SOURCE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent already showed any warning about the source
        _WORKER_SOURCE = _open(path, num_classes)


def _encode_one(source: Any, index: int, quality: int) -> tuple[int, bytes, tuple[int, int], bool]:
    data, label = source.read_bytes(index)
    where = source.describe_item(index)
    if sniff(data) == "jpeg":
        try:
            return label, bytes(data), image_size(data, where), True
        except DataFormatError:  # a JPEG whose header does not parse is decoded (and judged) below
            pass
    image = decode_rgb(data, where)
    return label, encode_jpeg(image, quality), (image.shape[0], image.shape[1]), False


def _worker_task(args: tuple[int, int]) -> tuple[int, bytes, tuple[int, int], bool]:
    index, quality = args
    return _encode_one(_WORKER_SOURCE, index, quality)


def pack_dataset(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    flat: bool = False,
    workers: int | None = None,
    quality: int = 95,
    label_array: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
) -> dict:
    """Write `out_dir/{train.rec, train.idx, property}` from any dataset `open_dataset` accepts.

    Images are grouped by label (stable within a label), so identity records describe contiguous key ranges.
    `workers` processes encode in parallel (default: CPU count; 0 or 1 encodes in this process).
    """
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"pack: --quality must be in 1..100, got {quality}")
    out_dir = Path(out_dir)
    if (out_dir / "train.rec").exists() and not overwrite:
        raise FileExistsError(f"{out_dir / 'train.rec'} already exists; pass overwrite=True (--overwrite)")
    source = _open(str(source_path), num_classes)
    labels = source.labels
    order = np.argsort(labels, kind="stable")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    sizes: Counter = Counter()
    copied = 0

    from tqdm import tqdm

    bar = tqdm(total=len(order), unit="img", desc="pack", disable=not progress, dynamic_ncols=True)

    def results() -> Iterator[tuple[int, bytes, tuple[int, int], bool]]:
        if workers <= 1:
            for index in order.tolist():
                yield _encode_one(source, index, quality)
            return
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(workers, initializer=_init_worker, initargs=(str(source_path), num_classes)) as pool:
            tasks = ((index, quality) for index in order.tolist())
            yield from pool.imap(_worker_task, tasks, chunksize=64)

    def samples() -> Iterator[tuple[int, bytes]]:
        nonlocal copied
        for label, data, size, was_jpeg in results():
            sizes[size] += 1
            copied += was_jpeg
            bar.update(1)
            yield label, data

    try:
        first_size = image_size(source.read_bytes(int(order[0]))[0], source.describe_item(int(order[0])))
        summary = write_identity_dataset(
            out_dir,
            samples(),
            num_classes=source.num_classes,
            image_size=first_size,
            flat=flat,
            label_array=label_array,
        )
    finally:
        bar.close()
        source.close()
    if len(sizes) > 1:
        common = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes.most_common(3))
        warnings.warn(
            f"pack: images have {len(sizes)} different sizes ({common}); property says {first_size[0]}x{first_size[1]}",
            stacklevel=2,
        )
    summary.update(
        source=str(source_path),
        source_format=source.format,
        copied_jpeg=int(copied),
        reencoded=int(summary["images"] - copied),
        quality=int(quality),
        image_sizes={f"{h}x{w}": n for (h, w), n in sizes.most_common()},
    )
    return summary
