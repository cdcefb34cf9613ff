"""`marginface compare --ijb`: IJB template-pair scores per run, TAR@FAR with intervals checked against an
independent computation, --ijb added to a finished comparison scoring without retraining, --parallel runs
scored too, and a bad IJB tree refused before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import marginface as mf
from marginface import cli
from marginface.compare import running
from test_compare import compare_args

MARGINS = ["arcface", "CosFace:m=0.2"]
LABELS = ["arcface", "cosface:m=0.2"]
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def ijb_tree(tmp_path_factory) -> Path:
    """The built-in synthetic IJB-C-style tree (16 subjects, 48 templates, ~260 loose crops), with its pair list
    replaced by every pair of templates (1128 pairs, 1080 impostor) so that FAR 1e-2 is supported too."""
    built = mf.data.synthetic(identities=2, images_per_id=1, pairs_per_set=0, eval_identities=0, ijb=True,
                              ijb_identities=16, root=tmp_path_factory.mktemp("ijb") / "synthetic", workers=1)
    root = built.ijb
    rows = [line.split() for line in (root / "meta/ijbc_face_tid_mid.txt").read_text().splitlines()]
    subject_of = {}  # every template is in a gallery or among the probes, with its subject
    for listing in ("1N_gallery_G1", "1N_gallery_G2", "1N_probe_mixed"):
        for line in (root / f"meta/ijbc_{listing}.csv").read_text().splitlines()[1:]:
            template, subject = line.split(",")[:2]
            subject_of[int(template)] = int(subject)
    templates = sorted({int(r[1]) for r in rows})
    assert set(templates) == set(subject_of)
    pairs = [(a, b, int(subject_of[a] == subject_of[b])) for i, a in enumerate(templates) for b in templates[i + 1:]]
    (root / "meta/ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    return root


def floor_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """The floor rule of `tar_at_far`'s docstring, written out: with N impostors at most k = floor(far·N) may be
    accepted; the threshold is the (k+1)-th largest impostor score and a pair is accepted strictly above it."""
    impostors = np.sort(scores[~labels])[::-1]
    k = int(np.floor(far * impostors.size))
    if k >= impostors.size:
        return 1.0
    return float(np.mean(scores[labels] > impostors[k]))


@pytest.fixture(scope="module")
def added_later(environment, ijb_tree, tmp_path_factory):
    """A finished 2 margins × 2 seeds comparison without --ijb, then the same command with --ijb added (training
    forbidden). Returns the directory, the models' mtimes before, and the two summaries."""
    out = tmp_path_factory.mktemp("compare_ijb") / "tournament"
    assert cli.main(compare_args(out, margins=MARGINS)) == 0
    before = json.loads((out / "compare.json").read_text())
    before["report.md"] = (out / "report.md").read_text()
    models = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/model.safetensors")}
    assert len(models) == 4
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(running, "train", lambda *a, **k: pytest.fail("a finished run was trained again for --ijb"))
        assert cli.main(compare_args(out, "--ijb", str(ijb_tree), margins=MARGINS)) == 0
    after = json.loads((out / "compare.json").read_text())
    return out, models, before, after


def test_adding_ijb_to_a_finished_comparison_scores_without_training(added_later):
    out, models, before, after = added_later
    assert isinstance(before["ijb"], str) and before["ijb"].startswith("not evaluated")
    assert "- IJB: not evaluated" in before["report.md"] and "## IJB" not in before["report.md"]
    assert {p: p.stat().st_mtime_ns for p in models} == models  # no model was written again
    assert [r["action"] for r in after["runs"]] == ["reused"] * 4
    assert [r["ijb_scores"] for r in after["runs"]] == ["computed"] * 4
    for run in after["runs"]:
        assert (out / run["directory"] / "ijb_scores.npz").is_file()
    assert "IJB-C: 1128 template pairs" not in before["report.md"]
    assert after["identity"] == before["identity"]  # the IJB tree is no part of what the runs train
    # the pair-set statistics are those of the first call: same runs, same bootstrap
    assert after["pair_sets"] == before["pair_sets"]


def test_ijb_tar_at_far_equals_an_independent_computation_from_the_saved_scores(added_later, ijb_tree):
    out, _, _, summary = added_later
    ijb = summary["ijb"]
    assert (ijb["target"], ijb["title"], ijb["root"], ijb["far_rule"]) == ("IJBC", "IJB-C", str(ijb_tree), "floor")
    assert (ijb["pairs"], ijb["impostors"]) == (1128, 1080)
    assert ijb["levels"] == [far for far in FARS if far * 1080 >= 10] == [1e-2, 1e-1]
    assert ijb["metrics"] == ["tar@far=1e-02", "tar@far=1e-01"]  # no 10-fold accuracy on IJB
    for label, directory in zip(LABELS, ("arcface", "cosface-m=0.2"), strict=True):
        entry = ijb["margins"][label]
        per_seed = []
        for seed in (0, 1):
            with np.load(out / f"runs/{directory}/seed{seed}/ijb_scores.npz") as saved:
                scores, labels = saved["scores"].astype(np.float64), saved["labels"].astype(bool)
                assert str(saved["target"]) == "IJBC" and scores.shape == labels.shape == (1128,)
            expected = {f"tar@far={far:.0e}": floor_tar(scores, labels, far) for far in ijb["levels"]}
            assert entry["per_seed"][str(seed)] == pytest.approx(expected, abs=1e-12)
            per_seed.append(expected)
        for metric in ijb["metrics"]:
            estimate = entry["estimates"][metric]
            assert estimate["value"] == pytest.approx(np.mean([s[metric] for s in per_seed]), abs=1e-12)
            assert estimate["low"] <= estimate["value"] <= estimate["high"] and estimate["runs"] == 2
    for metric in ijb["metrics"]:
        baseline = ijb["margins"]["arcface"]["differences"][metric]
        assert (baseline["value"], baseline["low"], baseline["high"]) == (0.0, 0.0, 0.0)
        other = ijb["margins"]["cosface:m=0.2"]["differences"][metric]
        expected = np.mean([ijb["margins"]["cosface:m=0.2"]["per_seed"][s][metric]
                            - ijb["margins"]["arcface"]["per_seed"][s][metric] for s in ("0", "1")])
        assert other["value"] == pytest.approx(expected, abs=1e-12) and other["runs"] == 2
        assert other["low"] <= other["high"]


def test_saved_scores_are_those_of_marginface_eval(added_later, ijb_tree):
    from marginface.eval import evaluate_ijb
    from marginface.eval.loading import load_model

    out, *_ = added_later
    run = out / "runs/cosface-m=0.2/seed1"
    direct = evaluate_ijb(load_model(run), ijb_tree, "IJBC", one_to_n=False, return_scores=True)
    with np.load(run / "ijb_scores.npz") as saved:
        assert np.array_equal(saved["scores"], direct["scores"])
        assert np.array_equal(saved["labels"], direct["labels"])


def test_report_has_an_ijb_table_and_a_rerun_reuses_the_scores(added_later, ijb_tree, monkeypatch, capsys):
    out, *_ = added_later
    report = (out / "report.md").read_text()
    assert "not evaluated" not in report
    assert "## IJB-C" in report and "1128 template pairs (1080 impostor)" in report
    section = report[report.index("## IJB-C"):]
    assert "| margin | runs | TAR@FAR=0.01 (%) | TAR@FAR=0.1 (%) |" in section
    assert "| cosface:m=0.2 | 2 |" in section and "Paired difference to **arcface**" in section
    scores = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/ijb_scores.npz")}
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(running, "compute_ijb_scores", lambda *a, **k: pytest.fail("IJB scored again"))
    capsys.readouterr()
    assert cli.main(compare_args(out, "--ijb", str(ijb_tree), "--json", margins=MARGINS)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["ijb_scores"] for r in summary["runs"]] == ["reused"] * 4
    assert {p: p.stat().st_mtime_ns for p in scores} == scores


def test_parallel_subprocess_runs_get_ijb_scores(environment, ijb_tree, added_later, tmp_path):
    sequential, *_ = added_later
    out = tmp_path / "parallel"
    assert cli.main(compare_args(out, "--parallel", "2", "--ijb", str(ijb_tree), margins=["arcface"])) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [(r["status"], r["action"], r["ijb_scores"]) for r in summary["runs"]] == [
        ("finished", "trained", "computed")] * 2
    for seed in (0, 1):
        with np.load(out / f"runs/arcface/seed{seed}/ijb_scores.npz") as mine, \
                np.load(sequential / f"runs/arcface/seed{seed}/ijb_scores.npz") as theirs:
            # the same run trained in a subprocess: the same model (test_compare.py), so the same IJB scores
            np.testing.assert_allclose(mine["scores"], theirs["scores"], rtol=0, atol=1e-6)
            assert np.array_equal(mine["labels"], theirs["labels"])
    assert summary["ijb"]["margins"]["arcface"]["estimates"]["tar@far=1e-01"]["runs"] == 2


def break_tree(tree: Path, damage: str, tmp_path: Path) -> Path:
    if damage == "absent":
        return tmp_path / "no_such_ijb"
    broken = tmp_path / "broken_ijb"
    shutil.copytree(tree, broken)
    if damage == "no loose_crop":
        shutil.rmtree(broken / "loose_crop")
    elif damage == "no pair list":
        (broken / "meta/ijbc_template_pair_label.txt").unlink()
    elif damage == "bad pair line":
        with open(broken / "meta/ijbc_template_pair_label.txt", "a") as stream:
            stream.write("1 2 yes\n")
    elif damage == "missing image":
        (broken / "loose_crop/7.jpg").unlink()
    return broken


@pytest.mark.parametrize(("damage", "extra", "message"), [
    ("absent", [], "no such directory; expected an IJB tree with loose_crop/ and meta/"),
    ("no loose_crop", [], "no loose_crop/ directory"),
    ("no pair list", [], "ijbc_template_pair_label.txt: missing IJB meta file"),
    ("bad pair line", [], "expected 3 integer columns"),
    ("missing image", [], "1 of"),
    ("intact", ["--ijb-target", "IJBB"], "ijbb_face_tid_mid.txt: missing IJB meta file"),
])
def test_a_bad_ijb_tree_fails_before_training(environment, ijb_tree, tmp_path, monkeypatch, capsys, damage, extra,
                                              message):
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained despite a bad --ijb"))
    root = break_tree(ijb_tree, damage, tmp_path)
    out = tmp_path / "bad"
    assert cli.main(compare_args(out, "--ijb", str(root), *extra, margins=MARGINS)) == 2
    error = capsys.readouterr().err
    assert f"--ijb {root}" in error and message in error
    if damage == "missing image":
        assert "7.jpg" in error and "missing from" in error
    assert not out.exists()


def test_ijb_target_without_ijb_is_refused(environment, tmp_path, capsys):
    assert cli.main(compare_args(tmp_path / "t", "--ijb-target", "IJBB", margins=MARGINS)) == 2
    assert "--ijb-target IJBB needs --ijb ROOT" in capsys.readouterr().err


def test_tar_only_bootstrap_is_the_tar_part_of_the_full_one():
    """`accuracy=False` (IJB) takes the same draws: its TARs equal the TAR columns of the pair-set bootstrap, on
    float32 scores as IJB stores them."""
    from marginface.compare.statistics import bootstrap_pair_set

    rng = np.random.default_rng(7)
    issame = rng.permutation(np.arange(1200) % 6 == 0)  # 1000 impostors: FAR 1e-2 and 1e-1
    scores = [[(np.where(issame, 0.3 + 0.1 * m, 0.0) + rng.normal(0, 0.3, issame.size)).astype(np.float32)
               for _ in range(3)] for m in range(2)]
    scores[1][2] = None  # a failed run
    full = bootstrap_pair_set([[None if s is None else s.astype(np.float64) for s in row] for row in scores],
                              issame, replicates=25, seed=3)
    tar_only = bootstrap_pair_set(scores, issame, replicates=25, seed=3, accuracy=False)
    assert tar_only["metrics"] == ["tar@far=1e-02", "tar@far=1e-01"] == full["metrics"][1:]
    for kind in ("estimates", "differences"):
        for mine, theirs in zip(tar_only[kind], full[kind], strict=True):
            assert {k: mine[k] for k in tar_only["metrics"]} == {k: theirs[k] for k in tar_only["metrics"]}
    np.testing.assert_array_equal(tar_only["per_seed"], full["per_seed"][:, :, 1:])


def test_ijb_scores_go_stale_with_a_newer_model_or_another_pair_list(added_later, ijb_tree, tmp_path):
    import os

    from marginface.compare.ijb import check_ijb, ijb_scores_are_current

    out, *_ = added_later
    run = out / "runs/arcface/seed0"
    spec = check_ijb(ijb_tree)
    assert ijb_scores_are_current(run, spec)
    scores = run / "ijb_scores.npz"
    stat = scores.stat()
    try:
        model_time = (run / "model.safetensors").stat().st_mtime
        os.utime(scores, (model_time - 10, model_time - 10))  # as if the model had been retrained after it
        assert not ijb_scores_are_current(run, spec)
    finally:
        os.utime(scores, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ijb_scores_are_current(run, spec)
    other = tmp_path / "fewer_pairs"
    shutil.copytree(ijb_tree, other)
    pair_file = other / "meta/ijbc_template_pair_label.txt"
    pair_file.write_text("".join(pair_file.read_text().splitlines(keepends=True)[:-1]))
    assert not ijb_scores_are_current(run, check_ijb(other))


def test_ijb_bootstrap_sets_the_ijb_replicates_alone(added_later, ijb_tree, tmp_path, capsys):
    """`--ijb-bootstrap 7` beside `--bootstrap 30`: the IJB statistics are those of a comparison run entirely at
    7 replicates, the pair sets those at 30; a count below 1 is refused, naming the option."""
    out, _, _, at_30 = added_later
    summaries = {}
    for name, extra in (("split", ("--ijb-bootstrap", "7")), ("all_7", ("--bootstrap", "7"))):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(running, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
            assert cli.main(compare_args(copy, "--ijb", str(ijb_tree), *extra, margins=MARGINS)) == 0
        summaries[name] = json.loads((copy / "compare.json").read_text())
        summaries[name]["report.md"] = (copy / "report.md").read_text()
    split, all_7 = summaries["split"], summaries["all_7"]
    assert (split["bootstrap"]["replicates"], split["bootstrap"]["ijb_replicates"]) == (30, 7)
    assert (at_30["bootstrap"]["replicates"], at_30["bootstrap"]["ijb_replicates"]) == (30, 30)
    assert split["pair_sets"] == at_30["pair_sets"]
    assert split["ijb"] == all_7["ijb"] != at_30["ijb"]
    assert "30 replicates (7 for IJB)" in split["report.md"] and "7 replicates," in all_7["report.md"]
    capsys.readouterr()
    assert cli.main(compare_args(tmp_path / "split", "--ijb", str(ijb_tree), "--ijb-bootstrap", "0",
                                 margins=MARGINS)) == 2
    assert "--ijb-bootstrap 0 is invalid" in capsys.readouterr().err
