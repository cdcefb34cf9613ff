"""Evaluation plots: the curves drawn are the metrics' curves, and the PNGs are written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from marginface.errors import ConfigError
from marginface.plots import eval_plots
from marginface.plots.common import plt


def _scores(seed, n=5000):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    return rng.standard_normal(n) + 2.0 * labels, labels


def test_roc_figure_draws_sklearn_roc_for_each_curve():
    a, la = _scores(0)
    b, lb = _scores(1)
    fpr, tpr, _ = sk_roc_curve(lb, b)
    figure = eval_plots.roc_figure({"model A": (a, la), "model B": (fpr, tpr)}, far_range=(1e-3, 1.0))
    lines = figure.axes[0].get_lines()
    named = [line for line in lines if line.get_label() in ("model A", "model B")]
    assert [line.get_label() for line in named] == ["model A", "model B"]
    sk_a = sk_roc_curve(la, a)
    for line, (f, t) in zip(named, ((sk_a[0], sk_a[1]), (fpr, tpr)), strict=True):
        keep = f >= 1e-3
        np.testing.assert_array_equal(line.get_xdata(), f[keep])
        np.testing.assert_array_equal(line.get_ydata(), t[keep])
    assert figure.axes[0].get_xscale() == "log"
    plt.close(figure)


def test_roc_thinning_keeps_envelope_points_of_a_large_curve():
    fpr = np.r_[0.0, np.geomspace(1e-7, 1.0, 50_000)]
    tpr = np.sqrt(np.geomspace(1e-7, 1.0, 50_001))
    thin_f, thin_t = eval_plots._thin(fpr, tpr, 1e-6)
    assert thin_f.size <= eval_plots.MAX_POINTS and thin_f[-1] == 1.0
    # every kept point is a point of the curve
    idx = np.searchsorted(fpr, thin_f)
    np.testing.assert_array_equal(fpr[idx], thin_f)
    np.testing.assert_array_equal(tpr[idx], thin_t)


def test_pngs_are_written_atomically(tmp_path):
    scores, labels = _scores(2)
    roc = eval_plots.plot_roc({"x": (scores, labels)}, tmp_path / "out" / "roc.png", title="ROC test")
    cmc = eval_plots.plot_cmc({"G1": (np.arange(1, 11), np.linspace(0.8, 1.0, 10))}, tmp_path / "cmc.png")
    hist = eval_plots.plot_score_histogram(scores, labels, tmp_path / "hist.png", bins=40)
    for path in (roc, cmc, hist):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_histogram_bins_match_numpy():
    scores, labels = _scores(3)
    figure = eval_plots.score_histogram_figure(scores, labels, bins=30, log=False)
    patches = figure.axes[0].patches
    assert len(patches) == 2
    edges = np.linspace(scores.min(), scores.max(), 31)
    expected, _ = np.histogram(scores[labels], bins=edges, density=True)
    genuine = [p for p in patches if p.get_label().startswith("genuine")][0]
    # the stairs patch outlines the bar tops: its path's y values include every bin height
    heights = np.unique(np.round(genuine.get_path().vertices[:, 1], 9))
    assert set(np.round(expected, 9)) <= set(heights)
    plt.close(figure)


def test_bad_curves():
    with pytest.raises(ConfigError, match="at least one"):
        eval_plots.roc_figure({})
    with pytest.raises(ConfigError, match="curve 'bad'"):
        eval_plots.roc_figure({"bad": (np.zeros(3),)})
