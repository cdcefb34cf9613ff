"""What a run tells its user while it trains: a bar in a terminal, plain lines elsewhere, and `train.log`.

Everything goes to stderr, so stdout stays free for `--json`. A progress bar redraws in place, which in a CI log
or a `nohup` file becomes one line per step; there the reporter writes a plain line every `every_steps` steps
or `every_seconds` seconds instead. `train.log` in the run directory gets every line (status, speed, the
estimated time left), like the training.log users know from arcface_torch.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

PLAIN_EVERY_STEPS = 50
PLAIN_EVERY_SECONDS = 30.0


def duration(seconds: float) -> str:
    """`1:02:03` for a number of seconds (rounded down)."""
    return str(datetime.timedelta(seconds=max(int(seconds), 0)))


class ProgressReporter:
    """Step progress and messages of one process; only the main process shows or logs anything."""

    def __init__(self, total: int, initial: int, show: bool, log_path: Path | None,
                 stream: IO[str] | None = None, every_steps: int = PLAIN_EVERY_STEPS,
                 every_seconds: float = PLAIN_EVERY_SECONDS) -> None:
        self.total, self.step = int(total), int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.log_path = log_path
        self.postfix: dict[str, str] = {}
        self._start, self._start_step = time.perf_counter(), self.step
        self._last_line = self._start
        self._bar = None
        self.plain = show and not _is_terminal(self.stream)
        if show and not self.plain:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True, file=self.stream)

    def set_postfix(self, values: dict[str, str]) -> None:
        """The latest loss / lr / speed, shown on the bar or the next plain line."""
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def update(self, steps: int = 1) -> None:
        """Count finished steps; in plain mode print a status line when one is due."""
        self.step += steps
        if self._bar is not None:
            self._bar.update(steps)
        now = time.perf_counter()
        due = self.step % self.every_steps == 0 or now - self._last_line >= self.every_seconds
        if due or self.step == self.total:
            self._last_line = now
            line = self.status_line(now)
            self._log(line)
            if self.plain:
                print(line, file=self.stream, flush=True)

    def status_line(self, now: float | None = None) -> str:
        """`step 40/200 (20%) loss 3.2 ... elapsed 0:01:10, left ~0:04:40`."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._start
        done = self.step - self._start_step
        left = elapsed / done * (self.total - self.step) if done > 0 else float("nan")
        values = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        eta = duration(left) if left == left else "?"
        return (f"step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%) {values} "
                f"elapsed {duration(elapsed)}, left ~{eta}").replace("  ", " ")

    def write(self, line: str) -> None:
        """A message for the user: above the bar, or a plain line; always into train.log."""
        self._log(line)
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _log(self, line: str) -> None:
        if self.log_path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # append-only and line-buffered: a kill -9 loses at most the line being written
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {line}\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class SilentReporter(ProgressReporter):
    """A process that is not the main one: no progress; its own messages (a damaged record it read) still shown."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.log_path = None
        self._bar = None
        self.stream = stream if stream is not None else sys.stderr

    def set_postfix(self, values: dict[str, str]) -> None:
        pass

    def update(self, steps: int = 1) -> None:
        pass


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
