"""The classifier's rows in checkpoints, stored by class range so that any number of ranks can read them back.

A sharded head's rows (its weight and the optimiser's per-row state: SGD's momentum, AdamW's moments) do not go
into the main checkpoint file: each rank writes ``step_N.head/classes_START-STOP.pt`` for its own range, and the
main file lists the ranges. Reading asks for any class range and assembles it from whichever files overlap it,
so a run saved by 3 ranks resumes on 2, on 1, or on 8; a missing or damaged part is an error that names it.
With K sub-centres per class a class owns K consecutive rows (j·K … j·K + K − 1), so ranges stay class ranges
and a class's K rows are always saved, sliced and re-sharded together.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from marginface.errors import MarginfaceError
from marginface.fileio import atomic_output, atomic_write_bytes

WEIGHT = "weight"


def shard_file(directory: Path, class_range: range) -> Path:
    return directory / f"classes_{class_range.start:09d}-{class_range.stop:09d}.pt"


def parameter_index(optimizer: torch.optim.Optimizer, parameter: Tensor) -> int:
    """The key of ``parameter``'s state in ``optimizer.state_dict()`` (parameters are numbered in group order)."""
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, candidate in enumerate(ordered):
        if candidate is parameter:
            return index
    raise MarginfaceError("the head's weight is not among the optimiser's parameters")


def split_rows(
    module_state: dict[str, Tensor], optimizer_state: dict[str, Any], weight_key: str, index: int, rows: int
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor]]:
    """(module state without the head's weight, optimiser state without its per-row tensors, those rows)."""
    module_state = dict(module_state)
    taken = {WEIGHT: module_state.pop(weight_key)}
    per_parameter = dict(optimizer_state["state"])
    own = dict(per_parameter.get(index, {}))
    for name in [n for n, v in own.items() if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == rows]:
        taken[name] = own.pop(name)
    if index in per_parameter:
        per_parameter[index] = own
    return module_state, {**optimizer_state, "state": per_parameter}, taken


def join_rows(
    module_state: dict[str, Tensor], optimizer_state: dict[str, Any], weight_key: str, index: int,
    rows: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The inverse of ``split_rows``: the head's rows put back into the module and optimiser states."""
    rows = dict(rows)
    module_state = {**module_state, weight_key: rows.pop(WEIGHT)}
    per_parameter = dict(optimizer_state["state"])
    if rows:
        per_parameter[index] = {**per_parameter.get(index, {}), **rows}
    return module_state, {**optimizer_state, "state": per_parameter}


def write_shard(
    directory: Path, class_range: range, num_classes: int, rows: dict[str, Tensor], subcenters: int = 1
) -> Path:
    """This rank's rows (K = ``subcenters`` per class), atomically, under a name that says which classes they are."""
    for name, value in rows.items():
        if value.shape[0] != len(class_range) * subcenters:
            raise MarginfaceError(f"head rows {name!r} has {value.shape[0]} rows, expected {len(class_range)} "
                                  f"classes × {subcenters} sub-centres")
    buffer = io.BytesIO()
    torch.save({"class_range": [class_range.start, class_range.stop], "num_classes": num_classes,
                "subcenters": subcenters,
                "rows": {name: value.detach().cpu() for name, value in rows.items()}}, buffer)
    path = shard_file(directory, class_range)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_rows(
    directory: Path, ranges: Iterable[range], wanted: range, num_classes: int, subcenters: int = 1
) -> dict[str, Tensor]:
    """The rows of classes ``wanted`` (K = ``subcenters`` each) assembled from the shard files of ``ranges`` that
    overlap it (any world size wrote them)."""
    parts: dict[str, list[Tensor]] = {}
    covered = wanted.start
    for class_range in sorted(ranges, key=lambda r: r.start):
        low, high = max(class_range.start, wanted.start), min(class_range.stop, wanted.stop)
        if low >= high:
            continue
        if low != covered:
            raise MarginfaceError(f"{directory}: no shard holds classes {covered}..{low - 1} of the head")
        path = shard_file(directory, class_range)
        shard = load_shard(path, class_range, num_classes, subcenters)
        k = subcenters
        for name, value in shard["rows"].items():
            parts.setdefault(name, []).append(value[(low - class_range.start) * k : (high - class_range.start) * k])
        covered = high
    if covered != wanted.stop or not parts:
        raise MarginfaceError(f"{directory}: no shard holds classes {covered}..{wanted.stop - 1} of the head")
    return {name: torch.cat(values) for name, values in parts.items()}


def load_shard(path: Path, class_range: range, num_classes: int, subcenters: int = 1) -> dict[str, Any]:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MarginfaceError(f"checkpoint part {path} is missing") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise MarginfaceError(f"cannot load checkpoint part {path}: {exc}") from None
    if shard.get("class_range") != [class_range.start, class_range.stop] or shard.get("num_classes") != num_classes:
        raise MarginfaceError(f"checkpoint part {path} holds classes {shard.get('class_range')} of "
                              f"{shard.get('num_classes')}, expected {class_range.start}..{class_range.stop} of "
                              f"{num_classes}")
    saved = shard.get("subcenters", 1)  # parts written before sub-centres existed hold one row per class
    if saved != subcenters:
        raise MarginfaceError(f"checkpoint part {path} holds {saved} sub-centre(s) per class, but this head has "
                              f"head.subcenters={subcenters}: resume with the run's own head.subcenters")
    return shard


def write_head_safetensors(
    path: Path, num_classes: int, parts: Iterable[Tensor], metadata: dict[str, str], subcenters: int = 1
) -> None:
    """One [C·K, D] fp32 ``weight`` in class order (row j·K + k: sub-centre k of class j), streamed part by part
    (never all of W in memory at once)."""
    parts = iter(parts)
    first = next(parts)
    dim = first.shape[1]
    total_rows = num_classes * subcenters
    header = {"weight": {"dtype": "F32", "shape": [total_rows, dim], "data_offsets": [0, total_rows * dim * 4]},
              "__metadata__": metadata}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    written = 0
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        stream.write(len(encoded).to_bytes(8, "little") + encoded)
        for part in (first, *parts):
            stream.write(part.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
            written += part.shape[0]
        if written != total_rows:
            raise MarginfaceError(f"{path}: wrote {written} rows, expected {num_classes} classes × {subcenters} "
                                  "sub-centre(s)")
        stream.flush()
        os.fsync(stream.fileno())
