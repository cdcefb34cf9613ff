"""Quality scores (issue 14, MagFace): each image's raw embedding norm, from eval's own forward pass, and the
`set,image,norm` CSV of `marginface eval --quality-scores`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import marginface as mf
from marginface.cli import main
from marginface.models.weights import save_backbone

RNG = np.random.default_rng(14)
ISSAME = [True, False, True, False, False, True, False, True]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny small_cnn taking the stored 112x112 crops (it shrinks them itself), with norms far from 1."""
    torch.manual_seed(0)
    net = mf.models.create("small_cnn", embedding_size=16, input_size=112, resize_to=32, channels=[8, 16, 16, 16],
                           strides=[2, 2, 2, 2], channels_last=False).eval()
    with torch.no_grad():  # the last affine map: norms of a few units that vary from image to image
        net.features.weight.uniform_(1.0, 4.0)
        net.features.bias.normal_(0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("quality")
    for name in ("alpha", "beta"):
        images = RNG.integers(0, 256, size=(2 * len(ISSAME), 40, 40, 3), dtype=np.uint8)
        mf.eval.save_pairs(root / f"{name}.bin", images, ISSAME)
    save_backbone(model, root / "model.safetensors")
    return root


def _independent_norms(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The backbone run here in float64 on the decoded crops, normalised as (x/255 - 0.5)/0.5, no flip."""
    reference = mf.models.create(**model.config)
    reference.load_state_dict(model.state_dict())
    reference = reference.double().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
        out = reference((x - 0.5) / 0.5)
    return torch.linalg.norm(out, dim=1).numpy()


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.reader(stream))


def test_norms_are_the_raw_norms_of_the_image_as_given(model, files):
    pairs = mf.eval.load_pairs(files / "alpha.bin")
    expected = _independent_norms(model, pairs.images)
    assert not np.allclose(expected, 1.0, atol=0.1) and expected.std() > 0.05  # normalised ones would fail
    fused, xnorm, norms = mf.eval.embed_images(model, pairs.images, batch_size=5, return_norms=True)
    assert norms.shape == (pairs.images.shape[0],) and norms.dtype == np.float32
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    # neither the flip-fused sum nor the mirror's norm
    assert not np.allclose(np.linalg.norm(fused, axis=1), expected, rtol=1e-3)
    _, flipped = mf.eval.embed_images_separate(model, pairs.images)
    assert not np.allclose(np.linalg.norm(flipped, axis=1), expected, rtol=1e-3)
    # the same pass gives embed_images' embeddings and XNorm unchanged
    plain, plain_xnorm = mf.eval.embed_images(model, pairs.images, batch_size=5)
    np.testing.assert_array_equal(plain, fused)
    assert plain_xnorm == xnorm
    table, scores, from_pairs = mf.eval.evaluate_pairs(model, pairs, return_scores=True, return_norms=True)
    np.testing.assert_allclose(from_pairs, expected, rtol=1e-5)
    assert table == mf.eval.evaluate_pairs(model, pairs) and scores.shape == (len(ISSAME),)
    no_flip = mf.eval.evaluate_pairs(model, pairs, flip=False, return_norms=True)[1]
    np.testing.assert_allclose(no_flip, expected, rtol=1e-5)


def test_cli_writes_one_row_per_image_of_each_set(model, files, tmp_path, capsys):
    out = tmp_path / "quality.csv"
    args = ["eval", str(files / "model.safetensors"), "--pairs", str(files / "alpha.bin"), str(files / "beta.bin"),
            "--output", str(tmp_path / "r.json"), "--quality-scores", str(out)]
    assert main(args) == 0
    assert f"quality scores: {out}" in capsys.readouterr().out
    rows = _read_csv(out)
    assert rows[0] == ["set", "image", "norm"]
    body = rows[1:]
    assert len(body) == 2 * 2 * len(ISSAME)  # two sets, two images per pair
    for name in ("alpha", "beta"):
        mine = [r for r in body if r[0] == name]
        assert [int(r[1]) for r in mine] == list(range(2 * len(ISSAME)))
        expected = _independent_norms(model, mf.eval.load_pairs(files / f"{name}.bin").images)
        np.testing.assert_allclose([float(r[2]) for r in mine], expected, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    # the results file holds the model's results, not where this call put its CSV
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"model", "verification"}


def test_cli_onnx_model_gives_the_same_norms(model, files, tmp_path):
    pytest.importorskip("onnxruntime")
    from marginface.models.export import export_onnx

    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    out = tmp_path / "quality.csv"
    assert main(["eval", str(onnx_path), "--pairs", str(files / "alpha.bin"), "--quality-scores", str(out),
                 "--no-progress"]) == 0
    rows = _read_csv(out)[1:]
    expected = _independent_norms(model, mf.eval.load_pairs(files / "alpha.bin").images)
    assert [r[0] for r in rows] == ["alpha"] * expected.size
    np.testing.assert_allclose([float(r[2]) for r in rows], expected, rtol=1e-4)


def test_ijb_rows_name_the_image_files(model, tmp_path):
    synth = mf.data.synthetic(identities=2, images_per_id=1, pairs_per_set=0, eval_identities=4, ijb_identities=6,
                              root=tmp_path / "synth", workers=1)
    meta = mf.eval.read_ijb_meta(synth.ijb, "IJBC")
    original, _ = mf.eval.ijb_image_features(model, meta)
    result = mf.eval.evaluate_ijb(original, synth.ijb, "IJBC", flip=False, return_norms=True)
    assert result["image_names"] == meta.image_names
    np.testing.assert_allclose(result["norms"], np.linalg.norm(original, axis=1), rtol=1e-6)
    save_backbone(model, tmp_path / "model.safetensors")
    out = tmp_path / "quality.csv"
    assert main(["eval", str(tmp_path / "model.safetensors"), "--ijb", str(synth.ijb), "--target", "IJBC",
                 "--quality-scores", str(out), "--json"]) == 0
    rows = _read_csv(out)
    assert rows[0] == ["set", "image", "norm"] and len(rows) == 1 + len(meta.image_names)
    assert [r[0] for r in rows[1:]] == ["IJBC"] * len(meta.image_names)
    assert [r[1] for r in rows[1:]] == meta.image_names
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], np.linalg.norm(original, axis=1), rtol=1e-5)


def test_missing_directory_is_named_before_any_embedding(model, files, tmp_path, capsys, monkeypatch):
    def no_embedding(*args, **kwargs):
        raise AssertionError("the model ran before the bad --quality-scores path was reported")

    monkeypatch.setattr(mf.eval.embed, "embed_images_separate", no_embedding)
    missing = tmp_path / "no" / "such" / "dir" / "quality.csv"
    assert main(["eval", str(files / "model.safetensors"), "--pairs", str(files / "alpha.bin"),
                 "--output", str(tmp_path / "r.json"), "--quality-scores", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--quality-scores" in err and str(missing) in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the CSV, its directory nor the results file
