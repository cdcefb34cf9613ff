"""Plots that read at a glance: units on the axes, whole-number steps/epochs/ranks, the ROC from the FAR the
impostor count supports, a visible perfect curve, the threshold on the histograms, every margin parameter in
the legends, coinciding curves told apart, and the search distribution also in the margin m."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import marginface as mf
from marginface.eval.verification import MIN_IMPOSTORS_PER_LEVEL, supported_fars, verification_table
from marginface.plots import eval_plots
from marginface.plots.common import plt
from marginface.plots.margins import ANGLES, margins_figure, parse_margin_spec
from marginface.plots.training import history_figures
from marginface.search.plots import distribution_figure, margin_of_z, rewards_figure
from marginface.search.spaces import equivalent_margin, factor_from_z


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tick_values(axis, which: str = "x") -> np.ndarray:
    """The major tick values matplotlib draws inside the axis' view limits."""
    ticks = axis.get_xticks() if which == "x" else axis.get_yticks()
    low, high = sorted(axis.get_xlim() if which == "x" else axis.get_ylim())
    return np.array([t for t in ticks if low - 1e-9 <= t <= high + 1e-9])


def assert_integer_ticks(axis, which: str = "x") -> None:
    axis.figure.canvas.draw()  # tick labels are only formatted at draw time
    values = tick_values(axis, which)
    assert values.size >= 1
    np.testing.assert_array_equal(values, np.round(values))
    labels = [t.get_text() for t in (axis.get_xticklabels() if which == "x" else axis.get_yticklabels())]
    shown = [text for text in labels if text]
    assert shown and all(text.replace("−", "-").lstrip("-").isdigit() for text in shown), shown


def legend_texts(axis) -> list[str]:
    return [text.get_text() for text in axis.get_legend().get_texts()]


# -- training report ------------------------------------------------------------------------------------------

def short_history(steps: int = 6) -> list[dict]:
    history = [{"step": s, "train/loss": 12.0 / s, "train/lr": 1e-3 * s, "margin/t": 1e-3 * s,
                "margin/hard_fraction": 1.0 - 0.08 * s, "margin/margin_mean": 0.4 + 1e-3 * s}
               for s in range(1, steps + 1)]
    for record in history[2::3]:
        record["verification/synth_lfw/accuracy"] = 0.5 + 0.01 * record["step"]
    return history


def test_training_report_axes_have_units_and_whole_steps():
    figures = {key: figure for key, _, figure in history_figures(short_history())}
    assert set(figures) == {"loss", "lr", "t", "hard_fraction", "margin_mean", "accuracy"}
    units = {"loss": "nats", "lr": "dimensionless", "t": "cosine", "hard_fraction": "%", "margin_mean": "radians",
             "accuracy": "%"}
    for key, figure in figures.items():
        axis = figure.axes[0]
        assert units[key] in axis.get_ylabel(), (key, axis.get_ylabel())
        assert "step" in axis.get_xlabel()
        assert_integer_ticks(axis, "x")  # 6 steps; the accuracy at steps 3 and 6 would show 3.5, 4.5
    # the hard fraction is drawn in percent, as its label says
    np.testing.assert_allclose(figures["hard_fraction"].axes[0].get_lines()[0].get_ydata(),
                               [100 * (1.0 - 0.08 * s) for s in range(1, 7)])


def test_a_one_step_history_is_a_visible_marked_point():
    (_, _, figure), *_ = history_figures([{"step": 1, "train/loss": 3.0}])
    line = figure.axes[0].get_lines()[0]
    assert line.get_marker() not in (None, "None", "", " ")
    assert_integer_ticks(figure.axes[0], "x")


def test_write_report_writes_the_same_panels(tmp_path):
    import json

    from marginface.train.reporting import write_report

    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short_history()))
    write_report(tmp_path, {"steps": 6}, {})
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "loss.png", "lr.png", "t.png", "hard_fraction.png", "margin_mean.png", "accuracy.png"}


# -- ROC --------------------------------------------------------------------------------------------------------

def labelled_scores(genuine: int, impostors: int, seed: int = 0, gap: float = 2.0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(genuine, bool), np.zeros(impostors, bool)]
    return rng.standard_normal(labels.size) + gap * labels, labels


@pytest.mark.parametrize("impostors", [20, 106, 3000])
def test_roc_axis_starts_at_the_smallest_supported_far(impostors):
    scores, labels = labelled_scores(40, impostors)
    axis = eval_plots.roc_figure({"set": (scores, labels)}).axes[0]
    lowest = axis.get_xlim()[0]
    assert lowest == pytest.approx(MIN_IMPOSTORS_PER_LEVEL / impostors)
    # the project's rule: that FAR is supported, and no lower default level is
    assert lowest * impostors >= MIN_IMPOSTORS_PER_LEVEL * (1 - 1e-9)
    assert all(far >= lowest * (1 - 1e-9) for far in supported_fars(impostors))
    # the curve is drawn from the left edge of the axis, never below it
    xs = np.concatenate([line.get_xdata() for line in axis.get_lines() if line.get_label().startswith(("set", "_set"))])
    assert xs.min() == pytest.approx(lowest)


def test_roc_each_curve_stops_at_its_own_supported_far():
    small, small_labels = labelled_scores(40, 50, seed=1)
    large, large_labels = labelled_scores(400, 5000, seed=2)
    axis = eval_plots.roc_figure({"small": (small, small_labels), "large": (large, large_labels)}).axes[0]
    assert axis.get_xlim()[0] == pytest.approx(10 / 5000)
    small_x = np.concatenate([ln.get_xdata() for ln in axis.get_lines() if "small" in ln.get_label()])
    assert small_x.min() == pytest.approx(10 / 50)
    assert any("5,000 impostor pairs" in text for text in legend_texts(axis))


def test_roc_from_fpr_tpr_never_claims_more_impostors_than_it_had():
    scores, labels = labelled_scores(30, 200)
    fpr, tpr, _ = mf.eval.metrics.roc_curve(scores, labels)
    axis = eval_plots.roc_figure({"curve": (fpr, tpr)}).axes[0]
    assert axis.get_xlim()[0] >= 10 / 200 * (1 - 1e-9)
    assert "≥" in legend_texts(axis)[0]  # a count read off the curve is a lower bound, and says so


def test_a_perfect_roc_is_a_visible_line_under_the_frame():
    scores, labels = labelled_scores(300, 3000, gap=100.0)  # every genuine score above every impostor one
    axis = eval_plots.roc_figure({"perfect": (scores, labels)}).axes[0]
    lines = [ln for ln in axis.get_lines() if "perfect" in ln.get_label()]
    xs = np.concatenate([ln.get_xdata() for ln in lines])
    ys = np.concatenate([ln.get_ydata() for ln in lines])
    np.testing.assert_array_equal(ys, 1.0)
    assert xs.min() == pytest.approx(axis.get_xlim()[0]) and xs.max() == pytest.approx(1.0)  # spans the axis
    bottom, top = axis.get_ylim()
    assert top > 1.0 + 0.01 * (top - bottom)  # not on the frame's top edge


def test_roc_curves_get_distinct_line_styles():
    a, la = labelled_scores(100, 1000, seed=3, gap=100.0)
    b, lb = labelled_scores(100, 1000, seed=4, gap=100.0)  # two perfect curves: the same line
    axis = eval_plots.roc_figure({"A": (a, la), "B": (b, lb)}).axes[0]
    named = {ln.get_label(): ln for ln in axis.get_lines() if not ln.get_label().startswith("_")}
    assert named["A"].get_linestyle() != named["B"].get_linestyle()


def test_short_far_axis_labels_more_than_powers_of_ten():
    scores, labels = labelled_scores(40, 106)
    axis = eval_plots.roc_figure({"set": (scores, labels)}).axes[0]
    axis.figure.canvas.draw()
    assert len(tick_values(axis)) >= 3


# -- score histograms -------------------------------------------------------------------------------------------

def test_histogram_draws_the_threshold_the_eval_table_reports():
    scores, labels = labelled_scores(20, 20, seed=5)
    axis = eval_plots.score_histogram_figure(scores, labels).axes[0]
    expected = verification_table(scores, labels)["threshold_cosine"]
    vertical = [ln for ln in axis.get_lines() if "threshold" in ln.get_label()]
    assert len(vertical) == 1
    np.testing.assert_allclose(vertical[0].get_xdata(), [expected, expected])
    assert f"{expected:.3f}" in vertical[0].get_label()


def test_histogram_takes_a_given_threshold():
    scores, labels = labelled_scores(200, 200, seed=6)
    axis = eval_plots.score_histogram_figure(scores, labels, threshold=0.25, threshold_label="TAR@FAR=1e-2").axes[0]
    (vertical,) = [ln for ln in axis.get_lines() if "threshold" in ln.get_label() or "TAR" in ln.get_label()]
    np.testing.assert_allclose(vertical.get_xdata(), [0.25, 0.25])
    assert "TAR@FAR=1e-2" in vertical.get_label()


def test_small_set_histogram_is_linear_from_zero_with_few_bins():
    scores, labels = labelled_scores(20, 20, seed=7)
    axis = eval_plots.score_histogram_figure(scores, labels).axes[0]
    assert axis.get_yscale() == "linear"
    bottom, top = axis.get_ylim()
    heights = np.concatenate([p.get_path().vertices[:, 1] for p in axis.patches])
    assert bottom == 0.0 and heights.max() < top <= 2 * heights.max()
    genuine = [p for p in axis.patches if p.get_label().startswith("genuine")][0]
    assert len(np.unique(np.round(genuine.get_path().vertices[:, 0], 12))) - 1 <= 12  # ~2·√20 bins, not 100


def test_large_set_histogram_log_axis_spans_only_the_bars():
    scores, labels = labelled_scores(2000, 40_000, seed=8)
    axis = eval_plots.score_histogram_figure(scores, labels).axes[0]
    assert axis.get_yscale() == "log"
    bottom, top = axis.get_ylim()
    heights = np.concatenate([p.get_path().vertices[:, 1] for p in axis.patches])
    lowest_bar = heights[heights > 0].min()
    assert 0.1 * lowest_bar <= bottom < lowest_bar and top < 100 * heights.max()
    assert "Density" in axis.get_ylabel()


# -- CMC --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [6, 100])
def test_cmc_rank_ticks_are_whole_numbers(ranks):
    rank = np.arange(1, ranks + 1)
    axis = eval_plots.cmc_figure({"G1": (rank, 1 - 0.5 / rank)}).axes[0]
    assert_integer_ticks(axis, "x")
    assert axis.get_ylim()[1] > 1.0  # a rate of 1 is not drawn on the frame


def test_cmc_galleries_that_share_a_line_get_distinct_styles():
    rank = np.arange(1, 7)
    axis = eval_plots.cmc_figure({"G1": (rank, np.minimum(1, rank / 5)), "G2": (rank, np.minimum(1, rank / 2))}).axes[0]
    first, second = axis.get_lines()
    assert first.get_linestyle() != second.get_linestyle() and first.get_marker() != second.get_marker()


# -- plot margins -----------------------------------------------------------------------------------------------

def target_lines(figure) -> dict[str, object]:
    return {ln.get_label(): ln for ln in figure.axes[0].get_lines() if not ln.get_label().startswith("softmax")}


def test_legends_carry_every_parameter():
    figure = margins_figure(["mv_softmax:t=0.3,base=arc", "arcface:m=0.3", "sphereface"])
    text = " ".join(legend_texts(figure.axes[0])).replace("\n", " ").replace("  ", " ")
    for name in ("mv_softmax", "arcface", "sphereface"):
        margin = parse_margin_spec(name if name != "mv_softmax" else "mv_softmax:t=0.3,base=arc")
        for key in margin.hyperparameters():
            assert f"{key}=" in text, (name, key)
    assert "base=arc" in text and "m=0.3," in text and "adaptive=true" in text


def test_sphereface_legend_shows_the_lambda_drawn():
    margin = mf.margins.create("sphereface", base=1000.0, lambda_min=7.5)
    figure = margins_figure([margin])
    (label,) = [text for text in legend_texts(figure.axes[0]) if text.startswith("sphereface")]
    assert "λ=7.5 drawn" in label and "base=1000" in label
    # 7.5 is the λ of the curve drawn: T = (λ cos θ + ψ(θ)) / (1 + λ), away from the clamped ends
    line = [ln for ln in figure.axes[0].get_lines() if ln.get_label().startswith("sphereface")][0]
    inside = slice(10, -10)
    cos = torch.cos(ANGLES)[inside]
    expected = (7.5 * cos + margin.double().psi(cos)) / 8.5
    np.testing.assert_allclose(line.get_ydata()[inside], expected.numpy(), atol=1e-9)


def test_coinciding_curves_have_distinct_styles_and_a_note():
    # combined(m1=1, m2=0.5, m3=0) is ArcFace(0.5) wherever θ + m < π: the two lines lie on one another
    figure = margins_figure(["arcface:m=0.5", "combined:m1=1,m2=0.5,m3=0"])
    lines = target_lines(figure)
    arc = [ln for label, ln in lines.items() if label.startswith("arcface")][0]
    combined = [ln for label, ln in lines.items() if label.startswith("combined")][0]
    assert np.isclose(arc.get_ydata(), combined.get_ydata(), atol=1e-9).mean() > 0.5
    assert (arc.get_linestyle(), arc.get_marker()) != (combined.get_linestyle(), combined.get_marker())
    assert arc.get_linestyle() != combined.get_linestyle()
    notes = [text for text in legend_texts(figure.axes[0]) if "arcface = combined" in text]
    assert len(notes) == 1


def test_same_name_margins_are_told_apart_in_every_panel():
    figure = margins_figure(["mv_softmax:base=arc", "mv_softmax:base=am"])
    for axis in figure.axes[1:]:
        texts = legend_texts(axis)
        assert any("base=arc" in t for t in texts) and any("base=am" in t for t in texts)
        styles = {ln.get_linestyle() for ln in axis.get_lines() if ln.get_label().startswith("mv_softmax")}
        assert len(styles) == 2


def test_panel_titles_name_only_the_margins_plotted():
    figure = margins_figure(["arcface", "npcface"])
    titles = [axis.get_title().replace("\n", " ") for axis in figure.axes]
    assert all("curricular" not in title.lower() for title in titles), titles
    assert "arcface" in titles[0] and "npcface" in titles[0]
    assert "npcface" in titles[1] and "arcface" not in titles[1]  # ArcFace leaves its negatives unchanged
    assert any("arcface" in text for text in legend_texts(figure.axes[1]) if text.startswith("unchanged"))
    curricular = margins_figure(["curricularface"])
    assert "M = 2cos θ_j + t" in curricular.axes[2].get_title().replace("\n", " ")


def test_no_negative_margin_says_so():
    figure = margins_figure(["cosface"])
    assert "no margin plotted changes its negatives" in figure.axes[1].get_title().replace("\n", " ")


# -- search plots -----------------------------------------------------------------------------------------------

def search_summary(space: str = "global", warmup: int = 2, epochs: int = 5, candidates: int = 3) -> dict:
    s = 30.0
    dimension = {"global": 1, "local": 10, "piecewise": 12}[space]
    mean = [10.0] * dimension if space != "piecewise" else [1.0, 0.0] * 6
    records = []
    for epoch in range(epochs):
        is_warmup = epoch < warmup
        after = [m + (0 if is_warmup else 0.1 * (epoch - warmup + 1)) for m in mean]
        count = 1 if is_warmup else candidates
        records.append({
            "epoch": epoch, "warmup": is_warmup,
            "distribution_before": {"mean": list(mean), "sigma": [1.0] * dimension},
            "distribution_after": {"mean": after, "sigma": [1.0] * dimension},
            "candidates": [{"params": {"x": [m + k for m in after], "margin": "lfs",
                                       "params": {"s": s, "a": factor_from_z(after[0] + k)}},
                            "reward": 0.5 + 0.01 * k + 0.02 * epoch} for k in range(count)],
            "best": count - 1,
        })
    return {"method": "am_lfs" if space == "piecewise" else "search_softmax", "space": space,
            "settings": {"pieces": 6}, "epochs": records}


def span_x(patch) -> tuple[float, float]:
    """The data x range of an axvspan (a Rectangle or, in older matplotlib, a Polygon)."""
    if hasattr(patch, "get_width"):
        return float(patch.get_x()), float(patch.get_x() + patch.get_width())
    xs = np.asarray(patch.get_xy())[:, 0]
    return float(xs.min()), float(xs.max())


def test_rewards_shade_the_warmup_and_use_whole_epochs():
    axis = rewards_figure(search_summary(warmup=2)).axes[0]
    spans = [p for p in axis.patches if "warm-up" in p.get_label()]
    assert len(spans) == 1
    assert span_x(spans[0]) == (0.5, 2.5)  # epochs 1 and 2
    warm = [c for c in axis.collections if c.get_label() == "warm-up model"]
    assert warm and warm[0].get_offsets()[:, 0].tolist() == [1.0, 2.0]
    assert_integer_ticks(axis, "x")


@pytest.mark.parametrize("space", ["global", "local", "piecewise"])
def test_distribution_has_whole_epochs_warmup_and_a_margin_panel(space):
    summary = search_summary(space, warmup=1, epochs=4)
    figure = distribution_figure(summary)
    raw, margin = figure.axes
    for axis in (raw, margin):
        assert_integer_ticks(axis, "x")
        spans = [p for p in axis.patches if "warm-up" in p.get_label()]
        assert len(spans) == 1 and span_x(spans[0]) == (0.0, 1.0)
    assert "m" in margin.get_ylabel()


def test_margin_panel_is_the_cosface_equivalent_margin_of_the_docs():
    summary = search_summary("global", warmup=1, epochs=3)
    _, margin = distribution_figure(summary).axes
    mean_line = [ln for ln in margin.get_lines() if ln.get_label() == "z"][0]
    means = [summary["epochs"][0]["distribution_before"]["mean"][0]] + [
        r["distribution_after"]["mean"][0] for r in summary["epochs"]]
    # docs/search.md: a = −e^z is CosFace(m) with m = ln(1 − a)/s = ln(1 + e^z)/s
    expected = [equivalent_margin(factor_from_z(z), 30.0) for z in means]
    np.testing.assert_allclose(mean_line.get_ydata(), expected, rtol=1e-12)
    np.testing.assert_allclose(margin_of_z(np.array([10.0]), 30.0), [math.log1p(math.exp(10.0)) / 30.0])
    assert "s = 30" in margin.get_title()


def test_am_lfs_margin_panel_is_the_shift_of_the_target_cosine():
    summary = search_summary("piecewise", warmup=1, epochs=3)
    _, margin = distribution_figure(summary).axes
    pieces = [ln for ln in margin.get_lines() if ln.get_label().startswith("piece")]
    assert len(pieces) == 6
    # slope 1 + d, intercept d (every variable moved by d): m = c(1 − (1 + d)) − d = −d(c + 1)
    final_shift = 0.1 * 2
    centres = -1.0 + (2.0 * np.arange(6) + 1.0) / 6
    np.testing.assert_allclose([ln.get_ydata()[-1] for ln in pieces], -final_shift * (centres + 1.0), atol=1e-12)
