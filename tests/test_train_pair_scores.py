"""The trainer saves its final evaluation's per-pair scores (pair_scores.npz), equal to scoring the exported
model again; `marginface compare` reads them instead of embedding every pair set a second time."""

from __future__ import annotations

import numpy as np
import pytest

from marginface.compare import running
from marginface.compare.plan import make_plan
from marginface.compare.spec import parse_margins
from marginface.eval import evaluate_pairs, load_pairs
from marginface.eval.loading import load_model
from marginface.eval.score_files import SCORES_FILE, load_pair_scores
from marginface.train import load_config, train
from marginface.train.distributed import World
from marginface.train.trainer import resolve_data

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.eval_every=0", "train.threads=1", "train.max_steps=3",
        "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "run"
    config = load_config(None, TINY)
    train(config, out, progress=False)
    return out, config


def test_saved_scores_are_the_exported_models_scores(finished):
    out, config = finished
    assert (out / SCORES_FILE).stat().st_mtime >= (out / "model.safetensors").stat().st_mtime  # current
    saved = load_pair_scores(out)
    model = load_model(out)
    _, pair_paths = resolve_data(config, World(), progress=False)
    assert sorted(saved) == sorted(load_pairs(p).name for p in pair_paths) and len(saved) >= 2
    for path in pair_paths:
        pair_set = load_pairs(path)
        _, scores = evaluate_pairs(model, pair_set, return_scores=True)  # the exported model, scored afresh
        np.testing.assert_allclose(saved[pair_set.name].scores, np.asarray(scores, dtype=np.float64), rtol=0,
                                   atol=1e-6)
        np.testing.assert_array_equal(saved[pair_set.name].issame, np.asarray(pair_set.issame, dtype=bool))


def test_compare_reads_the_saved_scores_without_embedding(finished, monkeypatch, tmp_path):
    out, config = finished
    run = make_plan(tmp_path / "cmp", config, parse_margins(["arcface"]), 1).runs[0]
    run.directory.parent.mkdir(parents=True)
    run.directory.symlink_to(out, target_is_directory=True)

    def embed_again(*args, **kwargs):
        raise AssertionError("compare embedded the pair sets again")

    monkeypatch.setattr(running, "compute_pair_scores", embed_again)
    outcome = running.finish_scores(running.RunOutcome(run, "finished", "reused"))
    assert outcome.status == "finished", outcome.error
    assert outcome.scores_match_metrics  # the saved scores give metrics.json's accuracies
