"""benchmarks/search_landscape.py draws its figure when a percentile interval excludes its estimate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "search_landscape.py"


def load_script():
    spec = importlib.util.spec_from_file_location("search_landscape", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(value: float, low: float, high: float) -> dict:
    return {"estimate": {"value": value, "low": low, "high": high}, "difference": {"value": 0.0, "low": 0.0,
                                                                                   "high": 0.0}}


def test_an_interval_that_excludes_its_estimate_is_drawn(tmp_path):
    landscape = load_script()
    grid = [0.1, 0.3]
    # with few replicates the bootstrap's percentile interval can lie wholly above the mean over seeds
    stats = {"m=0.1": entry(0.80, 0.78, 0.83), "m=0.3": entry(0.85, 0.84, 0.87),
             "search_softmax": entry(0.82, 0.825, 0.84)}
    searches = {"search_softmax": [{"trajectory": {"best": [0.1, 0.2], "found": 0.2}}]}
    path = tmp_path / "landscape.png"
    landscape.write_figure(path, grid, stats, searches, region=[0.3])
    assert path.stat().st_size > 1000
