"""The training report's feature-norm panel: mean ‖x‖ ± std over steps, drawn only when the log has norms."""

from __future__ import annotations

import json

import numpy as np

from marginface.plots.training import history_figures
from marginface.train.reporting import write_report


def norm_history(steps: int = 6) -> list[dict]:
    return [{"step": s, "train/loss": 10.0 / s, "margin/norm_mean": 20.0 + s, "margin/norm_std": 2.0 + 0.5 * s,
             "margin/margin_mean": 0.5 + 0.01 * s} for s in range(1, steps + 1)]


def test_the_norm_panel_shows_mean_and_spread():
    figures = {key: figure for key, _, figure in history_figures(norm_history())}
    axis = figures["feature_norm"].axes[0]
    assert "norm" in axis.get_ylabel() and "step" in axis.get_xlabel()
    np.testing.assert_allclose(axis.get_lines()[0].get_ydata(), [20.0 + s for s in range(1, 7)])
    (band,) = axis.collections  # the ± std band
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert np.isclose(low, 21.0 - 2.5) and np.isclose(high, 26.0 + 5.0)


def test_no_norms_no_norm_panel():
    history = [{"step": s, "train/loss": 1.0 / s, "margin/t": 0.1 * s} for s in range(1, 4)]
    assert "feature_norm" not in {key for key, _, _ in history_figures(history)}


def test_the_report_writes_the_norm_picture(tmp_path):
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in norm_history()))
    write_report(tmp_path, {"steps": 6}, {})
    assert (tmp_path / "plots" / "feature_norm.png").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "history.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    write_report(other, {"steps": 1}, {})
    assert not (other / "plots" / "feature_norm.png").exists()
