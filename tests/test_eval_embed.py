"""Running a model over images: preprocessing, flip fusion, batch-size independence, pair-set evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import marginface.eval as ev
from marginface.errors import ConfigError

REAL_BIN = Path(__file__).resolve().parents[2] / "shared/fixtures/real/small_lfw.bin"


class Linear(nn.Module):
    """Flatten + linear: its embeddings can be recomputed in numpy."""

    def __init__(self, size=16, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, 3 * size * size, generator=g, dtype=torch.float64) * 0.01)
        self.input_size = (size, size)

    def forward(self, x):
        return x.double().flatten(1) @ self.weight.T


def _numpy_embed(model, images):
    x = images.astype(np.float64) / 255.0
    x = (x - 0.5) / 0.5
    w = model.weight.detach().numpy()
    orig = x.transpose(0, 3, 1, 2).reshape(len(x), -1) @ w.T
    flip = x[:, :, ::-1].transpose(0, 3, 1, 2).reshape(len(x), -1) @ w.T
    return orig, flip


def test_embed_images_matches_numpy_and_is_batch_independent():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 16, 16, 3), dtype=np.uint8)
    model = Linear()
    model.train()
    orig, flip = _numpy_embed(model, images)
    fused, xn = ev.embed_images(model, images, batch_size=64)
    np.testing.assert_allclose(fused, orig + flip, rtol=1e-5, atol=1e-6)
    expected_xnorm = np.r_[np.linalg.norm(orig, axis=1), np.linalg.norm(flip, axis=1)].mean()
    assert xn == pytest.approx(expected_xnorm, rel=1e-6)
    assert model.training  # the caller's mode is restored
    small, _ = ev.embed_images(model, images, batch_size=5)
    np.testing.assert_allclose(small, fused, rtol=1e-6, atol=1e-7)
    plain, xn_plain = ev.embed_images(model, images, flip=False)
    np.testing.assert_allclose(plain, orig, rtol=1e-5, atol=1e-6)
    assert xn_plain == pytest.approx(np.linalg.norm(orig, axis=1).mean(), rel=1e-6)


def test_input_size_resizes_to_the_model():
    seen = []

    class Probe(nn.Module):
        input_size = (56, 56)

        def forward(self, x):
            seen.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    images = np.full((3, 112, 112, 3), 255, dtype=np.uint8)
    emb, _ = ev.embed_images(Probe(), images, flip=False)
    assert seen == [(3, 3, 56, 56)]
    np.testing.assert_allclose(emb, 1.0, atol=1e-6)  # a constant image stays (255/255 - 0.5)/0.5 = 1


def test_bad_model_output_and_images():
    class Bad(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ConfigError, match="embeddings"):
        ev.embed_images(Bad(), np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        ev.embed_images(Linear(), np.zeros((2, 16, 16, 3), np.float32))


def test_evaluate_pairs_against_independent_scoring():
    rng = np.random.default_rng(1)
    n_pairs = 40
    colours = rng.integers(0, 256, size=(n_pairs, 3))
    issame = rng.random(n_pairs) < 0.5
    images = np.empty((2 * n_pairs, 16, 16, 3), dtype=np.uint8)
    for k in range(n_pairs):
        images[2 * k] = colours[k]
        images[2 * k + 1] = colours[k] if issame[k] else rng.integers(0, 256, size=3)
    images = np.clip(images.astype(int) + rng.integers(-3, 4, size=images.shape), 0, 255).astype(np.uint8)
    pairset = ev.PairSet(images=images, issame=issame, name="toy")
    model = Linear(seed=3)
    got = ev.evaluate_pairs(model, pairset, batch_size=16)
    orig, flip = _numpy_embed(model, images)
    emb = orig + flip
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    ref = ev.kfold_accuracy(cos, issame)
    assert got["accuracy"] == pytest.approx(ref["accuracy"]) and got["name"] == "toy" and got["pairs"] == n_pairs
    # ~20 impostors: no FAR level has ten impostors below it, so none is reported
    assert got["xnorm"] > 0 and got["tar_at_far"] == {} and got["impostors"] == int((~issame).sum())


def test_evaluate_real_small_lfw():
    if not REAL_BIN.exists():
        pytest.skip(f"{REAL_BIN} not present")
    pairs = ev.load_pairs(REAL_BIN)

    class Colour(nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    got = ev.evaluate_pairs(Colour(), pairs)
    # mean and std per channel do not change under a flip: recompute them in numpy
    x = pairs.images.astype(np.float64) / 127.5 - 1.0
    feats = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2), ddof=1)], axis=1)
    ref = ev.kfold_accuracy(ev.pair_scores(feats), pairs.issame, folds=10)
    assert got["accuracy"] == ref["accuracy"] and got["pairs"] == 10 and got["tar_at_far"] == {}
