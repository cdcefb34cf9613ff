"""`marginface compare` end to end on the tiny synthetic set: outputs, the paired design, reuse and resume,
refusals, a failing run, and parallel subprocess runs equal to sequential ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import marginface as mf
from marginface import cli
from marginface.compare import running

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.log_every=2", "train.eval_every=0", "train.threads=1",
        "train.max_steps=4", "train.checkpoint_every=2"]
MARGINS = ["arcface", "CosFace:m=0.2"]


def compare_args(out: Path, *extra: str, margins=MARGINS, seeds: int = 2) -> list[str]:
    return ["compare", "--margins", *margins, "--seeds", str(seeds), "--out", str(out), "--no-progress",
            "--bootstrap", "30", *TINY, *extra]


class FirstCalls:
    """Per training run (a new backbone object), its first training-mode backbone input, its weights before
    that call, and its head's first labels: a global forward pre-hook, nothing of the trainer's internals."""

    def __init__(self) -> None:
        self.runs: list[dict] = []
        self.backbone_type = type(mf.models.create("small_cnn", embedding_size=8))

    def __enter__(self) -> FirstCalls:
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module, args) -> None:
        if not module.training:
            return
        # a mark on the module, not its id(): a freed backbone's id is reused by the next run's
        if isinstance(module, self.backbone_type) and not getattr(module, "_compare_test_seen", False):
            module._compare_test_seen = True
            self.runs.append({"images": args[0].detach().clone(),
                              "weights": {k: v.detach().clone() for k, v in module.state_dict().items()}})
        elif isinstance(module, mf.heads.MarginHead) and "labels" not in self.runs[-1]:
            self.runs[-1]["labels"] = args[1].clone()
            self.runs[-1]["centres"] = module.weight.detach().clone()


@pytest.fixture(scope="module")
def tournament(environment, tmp_path_factory):
    """2 margins × 2 seeds, sequential, in this process, with the first call of every run recorded."""
    out = tmp_path_factory.mktemp("compare") / "tournament"
    with FirstCalls() as calls:
        assert cli.main(compare_args(out)) == 0
    return out, calls.runs


def test_outputs_are_run_directories_and_a_summary(tournament):
    out, _ = tournament
    summary = json.loads((out / "compare.json").read_text())
    assert summary["counts"] == {"planned": 4, "finished": 4, "failed": 0}
    assert summary["margins"] == ["arcface", "cosface:m=0.2"] and summary["baseline"] == "arcface"
    assert [(r["margin"], r["seed"]) for r in summary["runs"]] == [
        ("arcface", 0), ("cosface:m=0.2", 0), ("arcface", 1), ("cosface:m=0.2", 1)]
    for run in summary["runs"]:
        directory = out / run["directory"]
        assert {"metrics.json", "model.safetensors", "config.yaml", "pair_scores.npz"} <= set(os.listdir(directory))
        assert run["scores_match_metrics"] is True
    assert yaml_margin(out / "runs/cosface-m=0.2/seed1") == ("cosface", {"s": 30.0, "m": 0.2}, 1)
    # the estimate is the mean of the runs' own metrics.json accuracies
    for name, table in summary["pair_sets"].items():
        for label, directory in (("arcface", "arcface"), ("cosface:m=0.2", "cosface-m=0.2")):
            recorded = [json.loads((out / f"runs/{directory}/seed{s}/metrics.json").read_text())
                        ["verification"][name]["accuracy"] for s in (0, 1)]
            entry = table["margins"][label]["estimates"]["accuracy"]
            assert entry["value"] == pytest.approx(np.mean(recorded), abs=1e-12)
            assert entry["low"] <= entry["value"] <= entry["high"] and entry["runs"] == 2
        baseline = table["margins"]["arcface"]["differences"]["accuracy"]
        assert (baseline["value"], baseline["low"], baseline["high"]) == (0.0, 0.0, 0.0)
    report = (out / "report.md").read_text()
    assert "4 of 4 finished" in report and "| cosface:m=0.2 | 2 |" in report and "Paired difference" in report
    for plot in summary["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report
    assert {"plots/accuracy.png", "plots/difference.png", "plots/loss.png", "plots/roc_synth_hard.png"} <= set(
        summary["plots"])


def yaml_margin(run_dir: Path):
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config["head"]["margin"], config["head"]["params"], config["train"]["seed"]


def test_margins_of_one_seed_see_the_same_batches_and_initial_backbone(tournament):
    _, runs = tournament
    assert len(runs) == 4  # plan order: seed 0 (arcface, cosface), seed 1 (arcface, cosface)
    for first, second in ((0, 1), (2, 3)):
        assert torch.equal(runs[first]["images"], runs[second]["images"])
        assert torch.equal(runs[first]["labels"], runs[second]["labels"])
        assert torch.equal(runs[first]["centres"], runs[second]["centres"])
        for key, value in runs[first]["weights"].items():
            assert torch.equal(value, runs[second]["weights"][key]), key
    assert not torch.equal(runs[0]["images"], runs[2]["images"])
    assert not torch.equal(runs[0]["centres"], runs[2]["centres"])
    assert any(not torch.equal(v, runs[2]["weights"][k]) for k, v in runs[0]["weights"].items())


def test_rerun_reuses_every_run_and_json_is_the_only_stdout(tournament, monkeypatch, capsys):
    out, _ = tournament
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/metrics.json")}
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    capsys.readouterr()
    assert cli.main(compare_args(out, "--json")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert [r["action"] for r in summary["runs"]] == ["reused"] * 4
    assert "reused" in captured.err
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_another_config_is_refused_before_training_unless_forced(tournament, environment, tmp_path, monkeypatch,
                                                                 capsys):
    out, _ = tournament
    before = (out / "plan.json").read_text()
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained despite the refusal"))
    assert cli.main(compare_args(out, "train.max_steps=3")) == 2
    error = capsys.readouterr().err
    assert "holds a different comparison" in error and "train.max_steps: 4 before, 3 now" in error
    assert cli.main(compare_args(out, seeds=3)) == 2
    assert "seeds: [0, 1] before, [0, 1, 2] now" in capsys.readouterr().err
    assert (out / "plan.json").read_text() == before
    monkeypatch.undo()

    small = tmp_path / "small"
    assert cli.main(compare_args(small, margins=["arcface"], seeds=1)) == 0
    assert cli.main(compare_args(small, "train.max_steps=3", margins=["arcface"], seeds=1)) == 2
    capsys.readouterr()
    assert cli.main(compare_args(small, "train.max_steps=3", "--force", "--json", margins=["arcface"], seeds=1)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"][0]["action"] == "trained"
    assert json.loads((small / "runs/arcface/seed0/metrics.json").read_text())["steps"] == 3


def test_interrupted_comparison_reuses_finished_runs_and_resumes_exactly(environment, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_train, calls = running.train, []

    def interrupt_second(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(running, "train", interrupt_second)
    assert cli.main(compare_args(out, margins=["arcface"])) == 130
    first = out / "runs/arcface/seed0/metrics.json"
    mtime = first.stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(running, "train", lambda *a, **k: (calls.append(k.get("resume")), real_train(*a, **k))[1])
    assert cli.main(compare_args(out, margins=["arcface"])) == 0
    assert calls == [False] and first.stat().st_mtime_ns == mtime  # only seed 1 trained; seed 0 reused

    # a run killed after its step-2 checkpoint: the rerun resumes it and ends where the whole run ended
    second = out / "runs/arcface/seed1"
    expected = json.loads((second / "metrics.json").read_text())["verification"]
    (second / "metrics.json").unlink()
    (second / "checkpoints/step_000000004.pt").unlink()
    calls.clear()
    assert cli.main(compare_args(out, margins=["arcface"])) == 0
    assert calls == [True]
    assert json.loads((second / "metrics.json").read_text())["verification"] == expected
    summary = json.loads((out / "compare.json").read_text())
    assert [r["action"] for r in summary["runs"]] == ["reused", "resumed"]


@pytest.mark.parametrize(("margins", "seeds", "message"), [
    (["arcface", "nosuchface"], 1, "unknown margin 'nosuchface'; expected one of"),
    (["arcface", "nosuchface", "train.max_steps=3"], 1, "unknown margin 'nosuchface'; expected one of"),
    (["arcface", "cosface:q=1"], 1, "--margins cosface:q=1: margin 'cosface' has no parameter q"),
    (["arcface", "cosface:m"], 1, "expected NAME:key=value"),
    (["arcface", "ArcFace"], 1, "lists arcface more than once"),
    (["arcface"], 0, "--seeds 0 is invalid"),
])
def test_bad_input_fails_before_any_training(environment, tmp_path, monkeypatch, capsys, margins, seeds, message):
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "bad"
    assert cli.main(compare_args(out, margins=margins, seeds=seeds)) == 2
    error = capsys.readouterr().err
    assert message in error
    if "unknown margin" in message:
        assert "curricularface" in error and "softmax" in error
    if "no parameter" in message:
        assert "its parameters are" in error
    assert not out.exists()


def test_unknown_baseline_is_refused(environment, tmp_path, capsys):
    assert cli.main(compare_args(tmp_path / "b", "--baseline", "npcface")) == 2
    assert "--baseline 'npcface' is not one of --margins (arcface, cosface:m=0.2)" in capsys.readouterr().err


def test_a_failing_run_is_reported_and_the_others_go_on(environment, tmp_path, capsys):
    out = tmp_path / "failing"
    # s beyond float32's range: every logit is infinite, the first step is non-finite, the run aborts
    args = compare_args(out, "train.max_nonfinite=1", "--json", margins=["cosface:s=1.0e+39", "arcface"], seeds=1)
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    failed, finished = summary["runs"]
    assert failed["status"] == "failed" and "NonFiniteLossError" in failed["error"]
    assert finished["status"] == "finished"
    assert summary["counts"] == {"planned": 2, "finished": 1, "failed": 1}
    hard = summary["pair_sets"]["synth_hard"]["margins"]
    assert hard["arcface"]["estimates"]["accuracy"]["runs"] == 1
    assert hard["cosface:s=1e+39"]["estimates"]["accuracy"]["value"] is None
    report = (out / "report.md").read_text()
    assert "1 failed" in report and "## failed runs" in report and "NonFiniteLossError" in report


def test_parallel_subprocess_runs_equal_the_sequential_ones(tournament, tmp_path):
    sequential, _ = tournament
    out = tmp_path / "parallel"
    assert cli.main(compare_args(out, "--parallel", "2", margins=["arcface"])) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
    for seed in (0, 1):
        mine = np.load(out / f"runs/arcface/seed{seed}/pair_scores.npz")
        theirs = np.load(sequential / f"runs/arcface/seed{seed}/pair_scores.npz")
        for key in theirs.files:
            assert np.array_equal(mine[key], theirs[key]), key


def test_a_setting_added_later_at_its_default_keeps_an_old_comparison() -> None:
    from marginface.compare.plan import comparable_config, identity_differences
    from marginface.train.config import config_from_dict

    current = comparable_config(config_from_dict({}))
    stored = {**current, "head": {k: v for k, v in current["head"].items() if k != "subcenters"}}
    assert identity_differences({"config": stored}, {"config": current}) == []
    changed = config_from_dict({"head": {"subcenters": 2}})
    assert identity_differences({"config": stored}, {"config": comparable_config(changed)}) == [
        "head.subcenters: 1 before, 2 now"]


def test_interval_plot_draws_an_interval_that_excludes_its_point():
    """A percentile interval need not hold the mean (few replicates): the plot draws it where it lies."""
    from marginface.compare.plots import interval_figure

    entry = {"accuracy": {"value": 0.80, "low": 0.82, "high": 0.90}}  # the interval lies wholly above
    summary = {"pair_sets": {"synth_lfw": {"margins": {"arcface": {"estimates": entry}}}},
               "margins": ["arcface"], "baseline": "arcface"}
    figure = interval_figure(summary, "estimates")
    axis = figure.axes[0]
    bar_ends = sorted({round(float(y), 6) for collection in axis.collections for path in collection.get_paths()
                       for y in path.vertices[:, 1]})
    assert bar_ends == [82.0, 90.0]
    (point,) = [line for line in axis.get_lines() if line.get_label() == "arcface"]
    assert float(point.get_ydata()[0]) == 80.0
