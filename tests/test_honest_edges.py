"""Honest edges (issue 15): scale-free ONNX parity, a missing model named, eval.json merged, `.bin` inspected,
progress bars on eval's long loops."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

import marginface as mf
from marginface.cli import main
from marginface.models.export import embedding_parity
from marginface.models.weights import save_backbone
from test_models_forward import calibrate_norm_statistics

RNG = np.random.default_rng(15)
ISSAME = [True, False, True, False, False, True, False, False]


def _model(scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = calibrate_norm_statistics(mf.models.create("small_cnn", embedding_size=32, input_size=32)).eval()
    with torch.no_grad():  # the last layer (BatchNorm1d's affine map) scales every embedding by `scale`
        model.features.weight.mul_(scale)
        model.features.bias.mul_(scale)
    return model


@pytest.fixture
def pair_file(tmp_path):
    images = RNG.integers(0, 256, size=(2 * len(ISSAME), 40, 40, 3), dtype=np.uint8)
    return mf.eval.save_pairs(tmp_path / "tiny.bin", images, ISSAME)


def _saved(tmp_path, model, name="model.safetensors"):
    path = tmp_path / name
    save_backbone(model, path)
    return path


# --- 1. ONNX parity on the scale-free relative error -------------------------------------------------------


def test_parity_is_relative_to_each_embedding():
    reference = RNG.standard_normal((6, 16)) * 2e7  # norms ~ 8e7
    rounding = reference * (1 + 3e-7 * RNG.standard_normal(reference.shape))
    parity = embedding_parity(reference, rounding)
    expected = np.max(np.linalg.norm(rounding - reference, axis=1) / np.linalg.norm(reference, axis=1))
    assert parity["max_relative_error"] == pytest.approx(expected, rel=1e-9)
    assert parity["max_relative_error"] < 1e-6 and parity["max_abs_difference"] > 1.0  # |Δ| large, error tiny
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    unit_rounding = rounding / np.linalg.norm(rounding, axis=1, keepdims=True)
    assert parity["max_normalised_difference"] == pytest.approx(np.abs(unit - unit_rounding).max(), rel=1e-9)

    broken = reference.copy()
    broken[4] = np.roll(broken[4], 1)  # one embedding points elsewhere, at the same norm
    parity = embedding_parity(reference, broken)
    assert parity["worst_image"] == 4 and parity["max_relative_error"] > 0.5
    broken[2, 0] = np.nan
    assert np.isnan(embedding_parity(reference, broken)["max_relative_error"])
    assert embedding_parity(reference, broken)["worst_image"] == 2
    with pytest.raises(mf.errors.MarginfaceError, match=r"shape \(6, 8\), expected \(6, 16\)"):
        embedding_parity(reference, reference[:, :8])


def test_export_passes_parity_on_a_huge_norm_model(tmp_path, pair_file, capsys):
    path = _saved(tmp_path, _model(scale=1e6))
    out = tmp_path / "big.onnx"
    assert main(["export", str(path), "--onnx", str(out), "--pairs", str(pair_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # float32 rounding alone is ~1e-7 of the norm: far above the tolerance in absolute terms
    assert report["mean_norm"] > 1e6 and report["mean_norm"] * 1e-7 > report["tolerance"]
    assert report["max_relative_error"] < report["tolerance"] == 1e-4
    assert report["parity_images"] == 2 * len(ISSAME) and out.exists()


def test_export_fails_parity_when_the_graph_is_wrong(tmp_path, pair_file, monkeypatch, capsys):
    import marginface.models.export as export_module

    real_export = export_module.export_onnx

    def broken_export(model, path, *args, **kwargs):  # writes the graph of a different network
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.features.bias.add_(3 * other.features.bias.abs().mean())
        return real_export(other, path, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_onnx", broken_export)
    path = _saved(tmp_path, _model())
    out = tmp_path / "broken.onnx"
    assert main(["export", str(path), "--onnx", str(out), "--pairs", str(pair_file), "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["max_relative_error"] > 0.1
    assert "ONNX parity check failed: max relative error ||onnx - torch|| / ||torch|| = " in captured.err
    assert f"image {report['worst_image']} of the parity batch" in captured.err
    assert f"{out} kept for inspection" in captured.err and out.exists()


# --- 2. a model path that does not exist ---------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--pairs", "x.bin"], ["--ijb", "IJBC"]])
def test_eval_names_the_missing_model_and_what_was_expected(tmp_path, capsys, extra):
    missing = tmp_path / "runs" / "nonexistent"
    assert main(["eval", str(missing), *extra]) == 2
    err = capsys.readouterr().err
    assert err == (f"marginface eval: error: model path {missing} does not exist: expected a run directory, "
                   ".safetensors or .onnx file\n")


# --- 3. eval.json accumulates: --ijb keeps the verification results -----------------------------------------


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth = mf.data.synthetic(identities=2, images_per_id=1, pairs_per_set=0, eval_identities=4, ijb_identities=6,
                              root=root, workers=1)
    return synth.ijb


def test_eval_ijb_merges_into_the_existing_results(tmp_path, pair_file, ijb_root, capsys):
    model = _saved(tmp_path, _model())
    output = tmp_path / "eval.json"
    assert main(["eval", str(model), "--pairs", str(pair_file), "--output", str(output), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["verification"]["tiny"]
    assert first["pairs"] == len(ISSAME) and first["impostors"] == ISSAME.count(False)

    assert main(["eval", str(model), "--ijb", str(ijb_root), "--output", str(output), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verification"] == {} and "IJBC" in printed["ijb"]  # stdout: what this call scored
    stored = json.loads(output.read_text())
    assert stored["verification"] == {"tiny": first}  # kept
    assert stored["ijb"] == printed["ijb"] and stored["ijb"]["IJBC"]["pairs"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "model.safetensors", "tiny.bin"]

    # a pair set scored again replaces its entry, the IJB result stays
    assert main(["eval", str(model), "--pairs", str(pair_file), "--no-flip", "--output", str(output)]) == 0
    stored_again = json.loads(output.read_text())
    assert stored_again["ijb"] == stored["ijb"]
    assert stored_again["verification"]["tiny"]["xnorm"] != first["xnorm"]  # no flip fusion: another XNorm


def test_eval_replaces_results_of_another_model_and_says_so(tmp_path, pair_file, capsys):
    output = tmp_path / "eval.json"
    output.write_text(json.dumps({"model": str(tmp_path / "other.safetensors"), "verification": {"lfw": {}}}))
    model = _saved(tmp_path, _model())
    assert main(["eval", str(model), "--pairs", str(pair_file), "--output", str(output)]) == 0
    assert f"replacing {output}: it holds the results of" in capsys.readouterr().err
    assert set(json.loads(output.read_text())["verification"]) == {"tiny"}


def test_eval_refuses_a_damaged_results_file_before_scoring(tmp_path, pair_file, capsys):
    output = tmp_path / "eval.json"
    output.write_text('{"model": "m", "verification": [1, 2]}')
    model = _saved(tmp_path, _model())
    assert main(["eval", str(model), "--pairs", str(pair_file), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{output}: field 'verification' is a list, expected an object of results by name" in err
    assert output.read_text() == '{"model": "m", "verification": [1, 2]}'


# --- 4. data inspect on a .bin pair set ----------------------------------------------------------------------


def test_inspect_describes_a_pair_set_without_plain_pickle(pair_file, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("plain pickle.load(s) called on a pair file")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert main(["data", "inspect", str(pair_file)]) == 0
    text = capsys.readouterr().out
    assert "pairs:       8 (3 genuine, 5 impostor)" in text
    assert "images:      16 (jpeg: 16)" in text and "image size:  40x40" in text
    assert f"path:        {pair_file} ({pair_file.stat().st_size:,} bytes)" in text

    assert main(["data", "inspect", str(pair_file), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["name"], info["pairs"], info["genuine_pairs"], info["impostor_pairs"]) == (
        "pairs", "tiny", 8, 3, 5)
    assert info["image_size"] == [40, 40] and info["image_sizes"] == {"40x40": 16}
    assert info["ok"] and info["verified"] == 16 and info["decoded_sizes"] == {"40x40": 16}


def test_inspect_pair_set_from_the_synthetic_writer(tmp_path, capsys):
    from marginface.data.decode import encode_jpeg
    from marginface.data.synth.pairs import write_pair_bin

    jpegs = [encode_jpeg(RNG.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)) for _ in range(6)]
    jpegs[3] = jpegs[3][:40]  # a truncated JPEG: one damaged image is counted, the set still described
    write_pair_bin(tmp_path / "synth_lfw.bin", jpegs, [True, False, False])
    assert main(["data", "inspect", str(tmp_path / "synth_lfw.bin")]) == 0
    assert "image size:  112x112 (sizes found: 112x112: 5, unreadable: 1; --verify names the images)" in (
        capsys.readouterr().out)
    assert main(["data", "inspect", str(tmp_path / "synth_lfw.bin"), "--verify", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert (info["pairs"], info["genuine_pairs"], info["impostor_pairs"], info["image_size"]) == (3, 1, 2, [112, 112])
    assert info["image_sizes"] == {"112x112": 5, "unreadable": 1}
    assert not info["ok"] and info["problem_count"] == 1
    assert info["problems"][0].startswith(f"{tmp_path / 'synth_lfw.bin'}: image 3 (pair 1)")


def test_inspect_refuses_a_pair_file_naming_a_foreign_global(tmp_path, capsys):
    import os

    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps((os.system, [True]), protocol=4))
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "refusing to load: the pickle names the global" in err and "system" in err


# --- 5. progress bars on stderr, off with --json / --no-progress --------------------------------------------


def test_eval_shows_progress_on_stderr_unless_asked_not_to(tmp_path, pair_file, ijb_root, capsys):
    model = _saved(tmp_path, _model())
    assert main(["eval", str(model), "--pairs", str(pair_file), "--ijb", str(ijb_root)]) == 0
    captured = capsys.readouterr()
    assert "tiny: 100%" in captured.err and "16/16" in captured.err  # the pair set's images
    assert "IJBC images: 100%" in captured.err and "IJBC scoring: 100%" in captured.err and "3/3" in captured.err
    assert "100%" not in captured.out and "[tiny] XNorm:" in captured.out

    for quiet in (["--json"], ["--no-progress"]):
        assert main(["eval", str(model), "--pairs", str(pair_file), "--ijb", str(ijb_root), *quiet]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        if quiet == ["--json"]:
            assert set(json.loads(captured.out)) == {"model", "verification", "ijb"}
