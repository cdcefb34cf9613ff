"""What a run prints and writes for scripts and clusters: --json alone on stdout, plain status lines and train.log
outside a terminal, files with the umask's mode."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

from marginface.fileio import atomic_write_bytes, default_file_mode
from marginface.train.progress import ProgressReporter, duration

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.log_every=1", "train.eval_every=0", "train.threads=1"]


def test_train_json_is_the_only_thing_on_stdout(cache, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "marginface", "train", *TINY, "--max-steps", "3", "--json", "--out", str(out)]
    result = subprocess.run(command, env=cache, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert metrics["steps"] == 3 and metrics == json.loads((out / "metrics.json").read_text())
    # not a terminal: no bar redrawn per step, but the last step's status line
    assert "\r" not in result.stderr and "step 3/3 (100%) loss " in result.stderr
    log = (out / "train.log").read_text().splitlines()
    assert any("step 3/3 (100%)" in line and "left ~0:00:00" in line for line in log)


def test_files_get_the_mode_of_an_ordinary_open(tmp_path):
    previous = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    finally:
        os.umask(previous)
    atomic_write_bytes(tmp_path / "b.json", b"{}")
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~previous


def test_plain_status_lines_every_n_steps_with_time_left(tmp_path):
    stream = io.StringIO()
    reporter = ProgressReporter(total=10, initial=0, show=True, log_path=tmp_path / "train.log", stream=stream,
                                every_steps=4, every_seconds=1e9)
    assert reporter.plain  # a StringIO is not a terminal
    reporter.set_postfix({"loss": "2.500"})
    for _ in range(10):
        reporter.update()
    reporter.write("step 10: synth_lfw 99.00±1.00")
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == ["step 4/10", "step 8/10", "step 10/10"]
    assert "loss 2.500" in lines[0] and "left ~" in lines[0] and lines[3] == "step 10: synth_lfw 99.00±1.00"
    log = (tmp_path / "train.log").read_text().splitlines()
    assert len(log) == 4 and log[3].endswith("step 10: synth_lfw 99.00±1.00")
    silent = ProgressReporter(total=10, initial=0, show=False, log_path=None, stream=io.StringIO())
    silent.update()
    assert silent.stream.getvalue() == ""
    assert duration(3725.9) == "1:02:05"
