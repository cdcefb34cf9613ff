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


Encoded = tuple[int, bytes, tuple[int, int], bool]  # label, JPEG bytes, (height, width), copied unchanged


def _encode_one(source: Any, index: int, quality: int, size: tuple[int, int] | None = None) -> Encoded:
    """One image as JPEG: copied byte for byte when it is a JPEG of the wanted size, else decoded (resized)."""
    data, label = source.read_bytes(index)
    where = source.describe_item(index)
    if sniff(data) == "jpeg":
        try:
            stored = image_size(data, where)
            if size is None or stored == size:
                return label, bytes(data), stored, True
        except DataFormatError:  # a JPEG whose header does not parse is decoded (and judged) below
            pass
    image = decode_rgb(data, where)
    if size is not None and image.shape[:2] != size:
        from marginface.data.transforms import resize  # torch comes with it: only when resizing

        image = resize(image, size)
    return label, encode_jpeg(image, quality), (image.shape[0], image.shape[1]), False


def _encode_guarded(source: Any, index: int, quality: int, size: tuple[int, int] | None,
                    skip_bad: bool) -> Encoded | str:
    """`_encode_one`, or with `skip_bad` the problem as a string (the image is left out)."""
    try:
        return _encode_one(source, index, quality, size)
    except DataFormatError as exc:
        if skip_bad:
            return str(exc)
        raise DataFormatError(f"{exc}; pass --skip-bad to pack without the unreadable images (they are listed "
                              "in the summary and in OUT_DIR/skipped.txt)") from None


def _worker_task(args: tuple[int, int, tuple[int, int] | None, bool]) -> Encoded | str:
    index, quality, size, skip_bad = args
    return _encode_guarded(_WORKER_SOURCE, index, quality, size, skip_bad)


def parse_size(size: int | str | tuple[int, int] | None) -> tuple[int, int] | None:
    """`112`, `"112x96"` (height x width) or (h, w) -> (h, w); None stays None."""
    if size is None:
        return None
    try:
        if isinstance(size, str):
            parts = size.lower().split("x")
            hw = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else None
        elif isinstance(size, int):
            hw = (size, size)
        else:
            hw = (int(size[0]), int(size[1]))
    except (ValueError, TypeError, IndexError):
        hw = None
    if hw is None or min(hw) < 8:
        raise ConfigError(f"pack: --size {size!r} is invalid: expected a side such as 112, or HEIGHTxWIDTH like "
                          "112x96, at least 8 pixels")
    return hw


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
    skip_bad: bool = False,
    size: int | str | tuple[int, int] | None = None,
) -> dict:
    """Write `out_dir/{train.rec, train.idx, property}` from any dataset `open_dataset` accepts.

    Images are grouped by label (stable within a label), so identity records describe contiguous key ranges.
    `workers` processes encode in parallel (default: CPU count; 0 or 1 encodes in this process).
    Every image must have one size: `size` resizes those that differ (re-encoded; the others are copied), and
    without it a second size is an error naming the image. `skip_bad` leaves unreadable images out and lists
    them (summary `skipped`, `OUT_DIR/skipped.txt`) instead of stopping.
    """
    wanted = parse_size(size)
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

    def results() -> Iterator[Encoded | str]:
        if workers <= 1:
            for index in order.tolist():
                yield _encode_guarded(source, index, quality, wanted, skip_bad)
            return
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(workers, initializer=_init_worker, initargs=(str(source_path), num_classes)) as pool:
            tasks = ((index, quality, wanted, skip_bad) for index in order.tolist())
            yield from pool.imap(_worker_task, tasks, chunksize=64)

    skipped: list[str] = []
    first_size: list[tuple[int, int]] = []

    def samples() -> Iterator[tuple[int, bytes]]:
        nonlocal copied
        for position, result in enumerate(results()):
            bar.update(1)
            if isinstance(result, str):
                skipped.append(result)
                continue
            label, data, hw, was_jpeg = result
            if not first_size:
                first_size.append(hw)
            elif hw != first_size[0]:
                # Training stacks images into batches: one set, one size (or every image resized at load time).
                where = source.describe_item(int(order[position]))
                raise DataFormatError(
                    f"{where}: {hw[0]}x{hw[1]}, but the images before it are {first_size[0][0]}x{first_size[0][1]}; "
                    f"pass --size {first_size[0][0]}x{first_size[0][1]} to resize every image to one size"
                )
            sizes[hw] += 1
            copied += was_jpeg
            yield label, data

    try:
        summary = write_identity_dataset(
            out_dir,
            samples(),
            num_classes=source.num_classes,
            image_size=lambda: first_size[0] if first_size else (wanted or (112, 112)),
            flat=flat,
            label_array=label_array,
        )
    finally:
        bar.close()
        source.close()
    if skipped:
        from marginface.fileio import atomic_write_text

        atomic_write_text(out_dir / "skipped.txt", "".join(f"{line}\n" for line in skipped))
    summary.update(
        source=str(source_path),
        source_format=source.format,
        copied_jpeg=int(copied),
        reencoded=int(summary["images"] - copied),
        quality=int(quality),
        image_sizes={f"{h}x{w}": n for (h, w), n in sizes.most_common()},
        skipped=skipped,
    )
    return summary
