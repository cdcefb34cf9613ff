"""What a run leaves to read: a JSON-lines history, TensorBoard events, metrics.json and report.md with plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from marginface.fileio import atomic_write_bytes

HISTORY = "history.jsonl"


class RunLog:
    """Appends one JSON record per logged step (and per evaluation) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install must not stop training
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint (they will be written again)."""
        path = self.run_dir / HISTORY
        if not self.enabled or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / HISTORY, "a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace(".", "/"), value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def write_report(run_dir: str | os.PathLike, metrics: dict[str, Any], config: dict[str, Any]) -> Path:
    """report.md with PNG plots of the history: loss, lr, accuracy per pair set and the margin's state."""
    from marginface.plots.common import save_figure
    from marginface.plots.training import history_figures

    run_dir = Path(run_dir)
    figures = [(title, save_figure(figure, run_dir / "plots" / f"{key}.png"))
               for key, title, figure in history_figures(read_history(run_dir))]

    lines = ["# marginface training report", ""]
    head = config.get("head", {})
    model = config.get("model", {})
    lines += [
        f"- model: `{model.get('name')}` ({model.get('embedding_size')}-d), head: `{head.get('margin')}` "
        f"{head.get('params')}",
        f"- steps: {metrics.get('steps')}, epochs: {metrics.get('epochs', 0):.2f}, "
        f"processes: {metrics.get('world_size', 1)}",
        f"- throughput: {metrics.get('throughput', {}).get('images_per_second', 0):.0f} images/s, "
        f"training time {metrics.get('train_seconds', 0):.0f} s",
        "",
    ]
    lines += verification_lines(metrics.get("verification", {}))
    lines.append("")
    lines += bad_record_lines(metrics.get("bad_records", {}))
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(run_dir).as_posix()})", ""]
    report = run_dir / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def verification_lines(verification: dict) -> list[str]:
    """The report's pair-set table: accuracy and TAR@FAR at every level some pair set supports (blank where its
    impostor count does not: eval/verification.py)."""
    levels = sorted({float(far) for result in verification.values() for far in result.get("tar_at_far", {})})
    lines = ["| pair set | accuracy (%) | std | XNorm | " + " | ".join(f"TAR@FAR={far:g}" for far in levels) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(levels)]
    for name, result in verification.items():
        tars = {float(far): tar for far, tar in result.get("tar_at_far", {}).items()}
        cells = ["" if far not in tars else f"{100 * tars[far]:.2f}" for far in levels]
        lines.append(f"| {name} | {100 * result['accuracy']:.2f} | {100 * result['std']:.2f} | "
                     f"{result.get('xnorm') or 0:.2f} | " + " | ".join(cells) + " |")
    return lines


def bad_record_lines(bad_records: dict) -> list[str]:
    """The damaged records a run left out (data.bad_records=skip), listed; nothing when there were none."""
    records = bad_records.get("records", [])
    if not records:
        return []
    return [f"## damaged records left out ({len(records)})", "", *(f"- {record}" for record in records), ""]
