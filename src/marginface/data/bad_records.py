"""Damaged training records: found in the loader's workers, reported (or left out) by the training process.

A worker that raises prints its own traceback and the trainer dies mid-run with it. Instead the worker reads the
record, and if it is damaged puts the next readable one in its place (so batch shapes never change, on any rank)
and hands the problem back beside the item; the training process then decides: `fail` stops with one line that
names the file, the record and what is wrong, `skip` counts and lists it and stops only past
`max_fraction` of the set.
"""

from __future__ import annotations

from typing import Any

import torch

from marginface.errors import ConfigError, DataFormatError

BAD_RECORD_MODES = ("fail", "skip")
# How many successors a worker tries in place of a damaged record before it gives up (a run of damaged
# records this long is a damaged file, not a few bad images).
MAX_SUBSTITUTES = 64


class GuardedItems(torch.utils.data.Dataset):
    """Items `(image, label, index, problems)`: `index` is the item actually read, `problems` '' or the faults
    met on the way, one `position<TAB>message` line each.

    A damaged item `i` is replaced by the first readable `i+1, i+2, ...` (wrapping), a pure function of the
    index, so resumed and uninterrupted runs read the same substitutes.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        problems = []
        n = len(self.dataset)
        for attempt in range(min(MAX_SUBSTITUTES, n)):
            position = (index + attempt) % n
            try:
                image, label = self.dataset[position]
            except DataFormatError as exc:
                problems.append(f"{position}\t{exc}")
                continue
            return image, label, position, "\n".join(problems)
        last = problems[-1].split("\t", 1)[1]
        raise DataFormatError(
            f"{last}; and the {len(problems) - 1} records after item {index} are damaged too: the file is damaged "
            "beyond single records (check it with `marginface data inspect --verify`)"
        )


class BadRecordLedger:
    """What the training process does with the problems its batches report (see the module docstring)."""

    def __init__(self, mode: str, max_fraction: float, dataset_size: int, dataset_path: str,
                 seen: list[str] | None = None) -> None:
        if mode not in BAD_RECORD_MODES:
            raise ConfigError(f"data.bad_records={mode!r} is invalid: expected one of {', '.join(BAD_RECORD_MODES)}")
        self.mode = mode
        self.max_fraction = float(max_fraction)
        self.dataset_size = int(dataset_size)
        self.dataset_path = dataset_path
        # The run state's own list when given, so checkpoints carry what was skipped across a resume.
        self.records: list[str] = seen if seen is not None else []

    @property
    def limit(self) -> int:
        """The most damaged records `skip` tolerates: `max_fraction` of the set, rounded down."""
        return int(self.max_fraction * self.dataset_size)

    def report(self, problems: list[str], echo: Any = print) -> None:
        """Take one batch's problem strings ('' for clean items); raise, or record and `echo` each new record."""
        found = dict(line.split("\t", 1) for text in problems if text for line in text.split("\n"))
        if not found:
            return
        hint = f"`marginface data inspect --verify {self.dataset_path}` lists every damaged record"
        if self.mode == "fail":
            raise DataFormatError(
                f"{next(iter(found.values()))} — training stopped; {hint}, and data.bad_records=skip trains "
                f"without them (up to data.max_bad_fraction={self.max_fraction:g} of the set)"
            )
        for message in found.values():
            # one entry per record, however often the sampler draws it
            if message not in self.records:
                self.records.append(message)
                echo(f"skipped damaged record ({len(self.records)} so far): {message}")
        if len(self.records) > self.limit:
            listed = "\n  ".join(self.records)
            raise DataFormatError(
                f"{len(self.records)} damaged records in {self.dataset_path} ({self.dataset_size} images), more "
                f"than data.max_bad_fraction={self.max_fraction:g} allows ({self.limit}); {hint}. "
                f"Damaged so far:\n  {listed}"
            )


def worker_message(exc: DataFormatError) -> str:
    """The original message of an error the DataLoader re-raised from a worker, without the worker's traceback."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
