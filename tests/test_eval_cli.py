"""`marginface eval` and `marginface export` on a real (tiny) training run: tables, JSON, plots, ONNX parity."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import marginface as mf
from marginface.cli import main

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=200",
        "train.batch_size=16", "data.num_workers=0", "train.eval_every=0", "train.max_steps=6", "train.threads=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step run on a private synthetic cache (kept in the environment for the module)."""
    from marginface.train import load_config, train

    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("MARGINFACE_CACHE")
    os.environ["MARGINFACE_CACHE"] = str(cache)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_config(None, TINY), out, progress=False)
    yield out
    if previous is None:
        os.environ.pop("MARGINFACE_CACHE", None)
    else:
        os.environ["MARGINFACE_CACHE"] = previous


def test_eval_run_directory_reproduces_training_metrics(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    trained = json.loads((run_dir / "metrics.json").read_text())["verification"]
    assert set(results["verification"]) == set(trained) == {"synth_lfw", "synth_cfp_fp", "synth_agedb", "synth_hard"}
    # one scorer: the training report's table and eval's are the same table, entry for entry
    assert results["verification"] == trained
    for result in trained.values():  # 200 pairs, 100 impostors: only FAR = 0.1 has ten impostors below it
        assert result["impostors"] == 100 and set(result["tar_at_far"]) == {"0.1"}
    report = (run_dir / "report.md").read_text()
    assert "TAR@FAR=0.1 |" in report and "TAR@FAR=0.01" not in report
    assert json.loads((run_dir / "eval.json").read_text())["verification"] == results["verification"]


def test_eval_table_and_plots(run_dir, tmp_path, capsys):
    pairs = mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=200, ijb=False).pairs
    assert main(["eval", str(run_dir / "model.safetensors"), "--pairs", str(pairs["synth_lfw"]),
                 str(pairs["synth_hard"]), "--plot", str(tmp_path / "plots"), "--output",
                 str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "[synth_lfw] XNorm:" in table and "Accuracy-Flip:" in table and "[synth_hard]" in table
    written = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert written == {"roc.png", "scores_synth_lfw.png", "scores_synth_hard.png"}
    assert set(json.loads((tmp_path / "r.json").read_text())["verification"]) == {"synth_lfw", "synth_hard"}


def test_scores_do_not_depend_on_batch_size(run_dir):
    model = mf.eval.loading.load_model(run_dir)
    pairs = mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=200, ijb=False).pairs
    images = mf.eval.load_pairs(pairs["synth_lfw"]).images[:20]
    one, _ = mf.eval.embed_images(model, images, batch_size=1)
    many, _ = mf.eval.embed_images(model, images, batch_size=64)
    np.testing.assert_allclose(mf.eval.pair_scores(one), mf.eval.pair_scores(many), atol=1e-5)


def test_export_onnx_with_parity_and_eval(run_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--onnx", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists() and report["max_relative_error"] < report["tolerance"] and report["parity_images"] == 32
    pairs = mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=200, ijb=False).pairs
    results = []
    for model in (str(out), str(run_dir)):
        assert main(["eval", model, "--pairs", str(pairs["synth_agedb"]), "--json", "--batch-size", "7"]) == 0
        results.append(json.loads(capsys.readouterr().out)["verification"]["synth_agedb"])
    assert results[0]["accuracy"] == pytest.approx(results[1]["accuracy"], abs=1e-12)


def test_eval_ijb_tree(run_dir, capsys):
    built = mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=200, ijb=True, ijb_identities=8)
    assert main(["eval", str(run_dir), "--ijb", str(built.ijb), "--target", "IJBC", "--json"]) == 0
    ijb = json.loads(capsys.readouterr().out)["ijb"]["IJBC"]
    assert ijb["mode"] == "N1D1F1" and ijb["templates"] > 0 and 0.0 <= ijb["auc"] <= 1.0
    assert {"G1", "G2"} <= set(ijb["identification"])


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["eval", "no/such/run", "--pairs", "x.bin"], "does not exist"),
        (["eval", "MODEL"], "nothing to score"),
        (["export", "model.onnx", "--onnx", "out.onnx"], "already an ONNX file"),
        (["export", "RUN", "--onnx", "out.txt"], "ending in .onnx"),
    ],
)
def test_bad_input_is_one_clear_line(run_dir, tmp_path, capsys, args, fragment):
    args = [str(tmp_path) if a == "MODEL" else str(run_dir) if a == "RUN" else a for a in args]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert fragment in error and "Traceback" not in error


def test_eval_refuses_a_bad_pair_file(run_dir, tmp_path, capsys):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"this is not a pickle")
    assert main(["eval", str(run_dir), "--pairs", str(bad)]) == 2
    assert "broken.bin" in capsys.readouterr().err
