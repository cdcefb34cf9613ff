"""Describe a dataset (format, layout, counts, image size) or a verification pair set (`.bin`) and, on request,
verify every record.

Verification decodes every image, checks labels against the class count (RecordIO: `property`) and, for the
insightface layout, that the identity records agree with the image headers; for a pair set, that every image
decodes.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from marginface.data.decode import image_size, sniff
from marginface.errors import DataFormatError

_MAX_PROBLEMS = 20
UNREADABLE = "unreadable"


def inspect_dataset(path: str | os.PathLike, verify: bool = False, progress: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of the dataset or `.bin` pair set at `path`; with `verify=True` also `problems` and `ok`."""
    from marginface.data.folders import open_source

    if Path(path).suffix == ".bin" and Path(path).is_file():
        return inspect_pair_set(path, verify, progress)

    source = open_source(path)
    try:
        return _inspect(source, verify, progress)
    finally:
        source.close()


def _inspect(source: Any, verify: bool, progress: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": str(source.path),
        "format": source.format,
        "layout": source.layout,
        "images": len(source),
        "identities": int(source.num_classes),
    }
    if source.format == "recordio":
        info["records"] = len(source.reader)
        info["label_array"] = bool(source.label_array)
        info["property"] = str(source.property_path) if source.property is not None else None
    first, _ = source.read_bytes(0)
    info["payload"] = sniff(first)
    stored = source.image_size
    info["image_size"] = list(stored) if stored else list(image_size(first, source.describe_item(0)))
    labels = source.labels
    counts = np.bincount(labels, minlength=source.num_classes)
    info["identities_with_images"] = int((counts > 0).sum())
    info["images_per_identity"] = {
        "min": int(counts.min()),
        "median": float(np.median(counts)),
        "max": int(counts.max()),
    }
    if verify:
        info.update(_verify(source, labels, progress))
    return info


def _verify(source: Any, labels: np.ndarray, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from marginface.data.decode import decode_rgb

    problems: list[str] = []
    failures = 0
    sizes: Counter = Counter()
    formats: Counter = Counter()
    for index in tqdm(range(len(source)), unit="img", desc="verify", disable=not progress, dynamic_ncols=True):
        where = source.describe_item(index)
        try:
            data, label = source.read_bytes(index)  # checks the label against the class count
            if label != labels[index]:
                raise DataFormatError(
                    f"{where}: header label {label} but the identity records put it in class {labels[index]}"
                )
            formats[sniff(data)] += 1
            image = decode_rgb(data, where)
            sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
        except DataFormatError as exc:
            failures += 1
            if len(problems) < _MAX_PROBLEMS:
                problems.append(str(exc))
    stored = source.image_size
    if stored is not None:
        expected = f"{stored[0]}x{stored[1]}"
        off = sum(n for size, n in sizes.items() if size != expected)
        if off:
            failures += 1
            problems.append(f"{off} images are not {expected} as {source.property_path} says: {dict(sizes)}")
    return {
        "verified": len(source),
        "ok": failures == 0,
        "problem_count": failures,
        "problems": problems,
        "decoded_sizes": dict(sizes),
        "payload_formats": dict(formats),
    }


def inspect_pair_set(path: str | os.PathLike, verify: bool = False, progress: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of an insightface verification `.bin`: pairs, genuine/impostor counts, the stored
    image size(s) and payload formats, read from the image headers; `verify=True` decodes every image."""
    # eval/pairs.py's safe reader (opcode audit + allow-listed unpickler): never a plain pickle.load. Its
    # private payload step gives the encoded images, so the stored sizes are read without decoding them.
    from marginface.eval.pairs import read_bin_payload

    path = Path(path)
    data = path.read_bytes()
    encoded, issame = read_bin_payload(data, str(path))
    sizes = Counter(_header_size(blob) for blob in encoded)  # headers only: fast even for 12,000 images
    readable = [size for size in sizes if size != UNREADABLE]
    stored = [int(side) for side in readable[0].split("x")] if readable else None
    info: dict[str, Any] = {
        "path": str(path),
        "format": "pairs",
        "layout": "insightface verification .bin",
        "name": path.stem,
        "bytes": len(data),
        "pairs": int(issame.size),
        "genuine_pairs": int(issame.sum()),
        "impostor_pairs": int((~issame).sum()),
        "images": len(encoded),
        "image_size": stored,
        "image_sizes": dict(sizes),
        "payload_formats": dict(Counter(sniff(b) for b in encoded)),
    }
    if verify:
        info.update(_verify_pairs(path, encoded, progress))
    return info


def _header_size(blob: bytes) -> str:
    """"HxW" from an image's header, or UNREADABLE (one damaged image must not hide the rest; --verify names it)."""
    try:
        height, width = image_size(blob)
    except DataFormatError:
        return UNREADABLE
    return f"{height}x{width}"


def _verify_pairs(path: Path, encoded: list[bytes], progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from marginface.data.decode import decode_rgb

    problems: list[str] = []
    failures = 0
    sizes: Counter = Counter()
    for index, blob in enumerate(tqdm(encoded, unit="img", desc="verify", disable=not progress, dynamic_ncols=True)):
        try:
            image = decode_rgb(blob, f"{path}: image {index} (pair {index // 2})")
            sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
        except DataFormatError as exc:
            failures += 1
            if len(problems) < _MAX_PROBLEMS:
                problems.append(str(exc))
    return {"verified": len(encoded), "ok": failures == 0, "problem_count": failures, "problems": problems,
            "decoded_sizes": dict(sizes)}


def _format_pair_set(info: dict[str, Any]) -> list[str]:
    size = info["image_size"]
    sizes = ", ".join(f"{k}: {n:,}" for k, n in info["image_sizes"].items())
    formats = ", ".join(f"{k}: {n:,}" for k, n in info["payload_formats"].items())
    return [
        f"path:        {info['path']} ({info['bytes']:,} bytes)",
        f"format:      pairs ({info['layout']}), set name {info['name']}",
        f"pairs:       {info['pairs']:,} ({info['genuine_pairs']:,} genuine, {info['impostor_pairs']:,} impostor)",
        f"images:      {info['images']:,} ({formats})",
        f"image size:  {f'{size[0]}x{size[1]}' if size else '-'}"
        + (f" (sizes found: {sizes}; --verify names the images)" if len(info["image_sizes"]) > 1 else ""),
    ]


def format_report(info: dict[str, Any]) -> str:
    """Human-readable lines for `marginface data inspect`."""
    if info["format"] == "pairs":
        lines = _format_pair_set(info)
    else:
        lines = [
            f"path:        {info['path']}",
            f"format:      {info['format']} ({info['layout']} layout)",
            f"images:      {info['images']:,}",
            f"identities:  {info['identities']:,} ({info['identities_with_images']:,} with images; per identity "
            f"min {info['images_per_identity']['min']}, median {info['images_per_identity']['median']:g}, "
            f"max {info['images_per_identity']['max']})",
            f"image size:  {info['image_size'][0]}x{info['image_size'][1]} ({info['payload']})",
        ]
    if info["format"] == "recordio":
        labels = "array [class, 1.0]" if info["label_array"] else "scalar"
        lines.append(f"records:     {info['records']:,} (labels: {labels})")
    if "verified" in info:
        status = "OK" if info["ok"] else f"{info['problem_count']} problem(s)"
        lines.append(f"verify:      {info['verified']:,} images decoded; {status}")
        lines.extend(f"  - {problem}" for problem in info["problems"])
    return "\n".join(lines)
