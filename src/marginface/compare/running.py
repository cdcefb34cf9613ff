"""Training a comparison's runs: reuse the finished, resume the interrupted, start the rest, one failure at a time.

Each run is an ordinary run directory written by the trainer of `marginface train`. Sequentially the runs train
in this process through `marginface.train.train`; with ``parallel`` > 1 each is a `python -m marginface train`
subprocess (its own interpreter, so a crash cannot take the others down), with `train.threads` chosen so that
processes × threads fits the cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from marginface.compare.ijb import IJBSpec, compute_ijb_scores, ijb_scores_are_current
from marginface.compare.plan import ComparisonPlan, RunPlan, comparable_config
from marginface.compare.scores import accuracy_mismatches, compute_pair_scores, load_pair_scores, scores_are_current
from marginface.errors import ConfigError
from marginface.train import train
from marginface.train.config import config_from_dict, save_config

Echo = Callable[[str], None]


@dataclass
class RunOutcome:
    """What became of one run: `finished` (trained now or reused) or `failed` with its error line."""

    run: RunPlan
    status: str
    action: str  # reused | resumed | trained
    error: str | None = None
    seconds: float = 0.0
    scores_match_metrics: bool | None = None
    ijb_scores: str | None = None  # computed | reused; None without --ijb (or when the run failed before)

    def to_dict(self) -> dict[str, Any]:
        return {"margin": self.run.spec.label, "seed": self.run.seed, "status": self.status, "action": self.action,
                "error": self.error, "seconds": round(self.seconds, 3),
                "directory": self.run.directory.relative_to(self.run.directory.parents[2]).as_posix(),
                "scores_match_metrics": self.scores_match_metrics, "ijb_scores": self.ijb_scores}


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.yaml, normalised as the plan's configs are; None when it is missing or unreadable."""
    try:
        return comparable_config(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())))
    except (OSError, yaml.YAMLError, ConfigError, TypeError, AttributeError):
        return None


def run_state(run: RunPlan, force: bool) -> str:
    """`finished` (metrics.json and model, same config), `resume` (checkpoints, same config) or `fresh`.

    A directory holding a run of another config is refused unless ``force``, which removes it; a directory with
    no checkpoint (killed before its first) is cleared, since the trainer appends to its history."""
    directory = run.directory
    if not directory.exists():
        return "fresh"
    saved = saved_config(directory)
    if saved is not None and saved != comparable_config(run.config):
        if not force:
            raise ConfigError(f"{directory} holds a run with another config than {run.name} of this comparison: "
                              "remove it, or pass --force to retrain it")
        saved = None
    if saved is not None and (directory / "metrics.json").exists() and (directory / "model.safetensors").exists():
        return "finished"
    checkpoints = directory / "checkpoints"
    if saved is not None and checkpoints.is_dir() and any(checkpoints.glob("step_*.pt")):
        return "resume"
    shutil.rmtree(directory)
    return "fresh"


def threads_per_process(parallel: int, configured: int | None, echo: Echo) -> int | None:
    """train.threads for ``parallel`` processes: the configured value, else the cores shared out (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if configured is not None:
        if configured * parallel > cores:
            echo(f"warning: --parallel {parallel} × train.threads={configured} exceeds the {cores} cores")
        return configured
    return max(1, cores // parallel)


def execute(plan: ComparisonPlan, parallel: int = 1, force: bool = False, progress: bool = True,
            echo: Echo | None = None) -> list[RunOutcome]:
    """Bring every run of ``plan`` to an end (finished or failed), in plan order; returns their outcomes."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    states = {run: run_state(run, force) for run in plan.runs}
    total = len(plan.runs)
    outcomes: dict[RunPlan, RunOutcome] = {}
    pending = []
    for number, run in enumerate(plan.runs, 1):
        if states[run] == "finished":
            outcomes[run] = finish_scores(RunOutcome(run, "finished", "reused"), plan.ijb, echo)
            echo(f"[{number}/{total}] {run.name}: finished before, reused ({run.directory})")
        else:
            pending.append((number, run))
    if parallel == 1:
        for number, run in pending:
            echo(f"[{number}/{total}] {run.name}: {'resuming' if states[run] == 'resume' else 'training'} "
                 f"into {run.directory}")
            outcome = train_in_process(run, states[run] == "resume", progress)
            outcomes[run] = report(outcome, number, total, echo, plan.ijb)
    else:
        threads = threads_per_process(parallel, plan.base.train.threads, echo)
        echo(f"{len(pending)} runs, {parallel} at a time, train.threads={threads} each")

        def one(item: tuple[int, RunPlan]) -> RunOutcome:
            number, run = item
            outcome = train_in_subprocess(run, states[run] == "resume", threads)
            # the scores (pair sets, IJB) are computed here, in this process, once the subprocess has ended
            return report(outcome, number, total, echo, plan.ijb)

        # threads only wait on the subprocesses; the training happens in those
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for (_, run), outcome in zip(pending, pool.map(one, pending), strict=True):
                outcomes[run] = outcome
    return [outcomes[run] for run in plan.runs]


def report(outcome: RunOutcome, number: int, total: int, echo: Echo, ijb: IJBSpec | None = None) -> RunOutcome:
    if outcome.status == "finished":
        outcome = finish_scores(outcome, ijb, echo)
    if outcome.status == "finished":
        echo(f"[{number}/{total}] {outcome.run.name}: finished in {outcome.seconds:.1f} s")
    else:
        echo(f"[{number}/{total}] {outcome.run.name}: FAILED: {outcome.error}")
    return outcome


def train_in_process(run: RunPlan, resume: bool, progress: bool) -> RunOutcome:
    """One run through the library trainer; any exception but an interrupt marks the run failed, not the rest."""
    start = time.perf_counter()
    action = "resumed" if resume else "trained"
    try:
        train(run.config, run.directory, resume=resume, progress=progress)
    except Exception as exc:  # a failing run (non-finite abort, bad data, a bug) must not stop the others
        return RunOutcome(run, "failed", action, error_line(exc), time.perf_counter() - start)
    return RunOutcome(run, "finished", action, seconds=time.perf_counter() - start)


def train_in_subprocess(run: RunPlan, resume: bool, threads: int | None) -> RunOutcome:
    """One run as `python -m marginface train` (the same trainer); its output goes to <run>.log beside it."""
    start = time.perf_counter()
    action = "resumed" if resume else "trained"
    run.directory.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "marginface", "train", "--no-progress"]
    if resume:
        command += ["--resume", str(run.directory)]
    else:
        planned = run.directory.parent / f"{run.directory.name}.yaml"
        save_config(run.config, planned)
        command += ["--config", str(planned), "--out", str(run.directory)]
    if threads is not None:
        command.append(f"train.threads={threads}")
    log = run.directory.parent / f"{run.directory.name}.log"
    with open(log, "w") as stream:
        code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stream, check=False).returncode
    if code == 0:
        return RunOutcome(run, "finished", action, seconds=time.perf_counter() - start)
    return RunOutcome(run, "failed", action, last_error_line(log, code), time.perf_counter() - start)


def finish_scores(outcome: RunOutcome, ijb: IJBSpec | None = None, echo: Echo | None = None) -> RunOutcome:
    """Make sure a finished run has its per-pair scores, and with ``ijb`` its IJB template-pair scores (reused
    when newer than its model and of the same pair list); a run whose scores cannot be computed has failed."""
    run = outcome.run
    try:
        if scores_are_current(run.directory):
            scores = load_pair_scores(run.directory)
        else:
            scores = compute_pair_scores(run.directory, run.config)
        outcome.scores_match_metrics = not accuracy_mismatches(run.directory, scores)
    except Exception as exc:  # the run is unusable for the statistics, the comparison goes on
        outcome.status, outcome.error = "failed", f"scoring its pair sets: {error_line(exc)}"
        return outcome
    if ijb is None:
        return outcome
    try:
        if ijb_scores_are_current(run.directory, ijb):
            outcome.ijb_scores = "reused"
        else:
            if echo is not None:  # embedding every IJB image takes a while: say what is under way
                echo(f"{run.name}: scoring {ijb.title} ({ijb.images} images, {ijb.pairs} template pairs)")
            compute_ijb_scores(run.directory, run.config, ijb)
            outcome.ijb_scores = "computed"
    except Exception as exc:  # as above: without its IJB scores the run cannot enter the paired statistics
        outcome.status, outcome.error = "failed", f"scoring {ijb.title}: {error_line(exc)}"
    return outcome


def error_line(exc: BaseException) -> str:
    """One line for the report: the exception's type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else '(no message)'}"


def last_error_line(log: Path, code: int) -> str:
    """The error a `marginface train` subprocess printed (its `error:` line, else its last line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower() or "Error" in line]
    chosen = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit status {code}: {chosen} (log: {log})"

