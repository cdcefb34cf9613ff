"""Training with the sharded head: N ranks × batch B equal one process × batch N·B; elastic, damaged-safe resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from marginface.errors import MarginfaceError
from marginface.train import head_rows
from run_copies import back_to_step

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "data.num_workers=0", "train.log_every=1", "train.eval_every=0", "train.threads=1", "--no-progress",
        "model.name=linear", "model.embedding_size=32", "train.grad_clip=0.5",
        "--max-steps", "6", "--checkpoint-every", "3", "train.keep_checkpoints=3", "--device", "cpu"]
NEW_RUN = ["--margin", "curricularface"]  # a resumed run keeps its margin


def launch(env, ranks, *args, check=True):
    if "--resume" not in args:
        args = (*NEW_RUN, *args)
    if ranks == 1:
        command = [sys.executable, "-m", "marginface", "train", *TINY, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "marginface", "train", *TINY, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(run / "model.safetensors"), "head": load_file(run / "head.safetensors")["weight"]}


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def assert_close_runs(actual: Path, expected: Path) -> None:
    a, e = weights(actual), weights(expected)
    assert a.keys() == e.keys()
    for key in e:
        torch.testing.assert_close(a[key], e[key], rtol=2e-4, atol=2e-6, msg=f"{actual.name} vs {expected.name}: {key}")
    assert losses(actual) == pytest.approx(losses(expected), rel=1e-5)



@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    launch(cache, 2, "train.batch_size=8", "head.engine=sharded", "--out", str(root / "sharded2"))
    launch(cache, 1, "train.batch_size=16", "head.engine=dense", "--out", str(root / "dense1"))
    return root


def test_two_sharded_ranks_train_like_one_process_with_the_doubled_batch(runs):
    sharded = runs / "sharded2"
    assert_close_runs(sharded, runs / "dense1")
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["images_seen"] == 6 * 16
    assert metrics["margin_state_per_rank"][0] == metrics["margin_state_per_rank"][1]
    # the head lives in per-range parts, not in the main checkpoint file
    checkpoint = torch.load(sharded / "checkpoints" / "step_000000006.pt", weights_only=True)
    assert "head.weight" not in checkpoint["module"]
    assert checkpoint["head_shards"]["ranges"] == [[0, 8], [8, 16]]
    parts = sorted(p.name for p in (sharded / "checkpoints" / "step_000000006.head").iterdir())
    assert parts == ["classes_000000000-000000008.pt", "classes_000000008-000000016.pt"]


def test_a_run_saved_by_two_ranks_resumes_on_one_and_on_three(cache, runs, tmp_path):
    one = back_to_step(runs / "sharded2", tmp_path / "two_to_one", 3)
    result = launch(cache, 1, "--resume", str(one), "train.batch_size=16")
    assert "resumed" in result.stderr
    assert_close_runs(one, runs / "sharded2")
    three = back_to_step(runs / "dense1", tmp_path / "one_to_three", 3)  # a whole head, resumed sharded
    launch(cache, 3, "--resume", str(three), "head.engine=sharded", "train.batch_size=5")
    checkpoint = torch.load(three / "checkpoints" / "step_000000006.pt", weights_only=True)
    assert checkpoint["head_shards"]["ranges"] == [[0, 5], [5, 10], [10, 16]]
    assert load_file(three / "head.safetensors")["weight"].shape == (16, 32)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(cache, runs, tmp_path):
    run = back_to_step(runs / "dense1", tmp_path / "damaged", 6)
    newest = run / "checkpoints" / "step_000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = launch(cache, 1, "--resume", str(run))
    assert f"cannot load checkpoint {newest}" in result.stderr
    assert "resuming from step_000000003.pt" in result.stderr and "resumed" in result.stderr
    assert_close_runs(run, runs / "dense1")
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"not a checkpoint")
    failed = launch(cache, 1, "--resume", str(run), check=False)
    assert failed.returncode != 0 and "no checkpoint could be loaded" in failed.stderr
    assert "step_000000003.pt" in failed.stderr and "Traceback" not in failed.stderr


def test_resuming_with_another_class_count_names_both(cache, runs, tmp_path):
    run = back_to_step(runs / "dense1", tmp_path / "other_data", 3)
    result = launch(cache, 1, "--resume", str(run), "data.synthetic.identities=20", check=False)
    assert result.returncode != 0 and "trained on 16 classes" in result.stderr and "has 20" in result.stderr


def test_head_rows_reshard_from_any_split(tmp_path):
    full = {"weight": torch.randn(10, 3), "momentum_buffer": torch.randn(10, 3)}
    written = [range(0, 3), range(3, 6), range(6, 10)]
    for part in written:
        head_rows.write_shard(tmp_path, part, 10, {k: v[part.start : part.stop] for k, v in full.items()})
    for wanted in (range(0, 5), range(5, 10), range(2, 9), range(0, 10)):
        rows = head_rows.read_rows(tmp_path, written, wanted, 10)
        for key in full:
            assert torch.equal(rows[key], full[key][wanted.start : wanted.stop])
    with pytest.raises(MarginfaceError, match="holds classes"):
        head_rows.read_rows(tmp_path, written, range(0, 5), 12)
    head_rows.shard_file(tmp_path, range(3, 6)).unlink()
    with pytest.raises(MarginfaceError, match="classes_000000003-000000006.pt is missing"):
        head_rows.read_rows(tmp_path, written, range(2, 9), 10)


def test_head_safetensors_streams_in_class_order(tmp_path):
    parts = [torch.randn(4, 3), torch.randn(2, 3)]
    head_rows.write_head_safetensors(tmp_path / "head.safetensors", 6, parts, {"num_classes": "6"})
    torch.testing.assert_close(load_file(tmp_path / "head.safetensors")["weight"], torch.cat(parts), rtol=0, atol=0)
