"""Sub-centre heads through training: the `head.subcenters` key, checkpoints and elastic resume that keep a class's
K rows together, and `head.safetensors` with C·K rows in class order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from marginface.errors import ConfigError, MarginfaceError
from marginface.train import head_rows
from marginface.train.config import load_config
from run_copies import back_to_step

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "data.num_workers=0", "train.log_every=1", "train.eval_every=0", "train.threads=1", "--no-progress",
        "model.name=linear", "model.embedding_size=32", "--max-steps", "6", "--checkpoint-every", "3",
        "train.keep_checkpoints=3", "--device", "cpu"]
NEW_RUN = ["--margin", "arcface", "head.subcenters=2"]


def launch(env: dict, ranks: int, *args: str) -> subprocess.CompletedProcess:
    if "--resume" not in args:
        args = (*NEW_RUN, *args)
    prefix = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    result = subprocess.run([*prefix, "-m", "marginface", "train", *TINY, *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result



def weights(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(run / "model.safetensors"), "head": load_file(run / "head.safetensors")["weight"]}


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "two"])
def test_bad_subcenters_name_the_key(value):
    with pytest.raises(ConfigError, match="head.subcenters"):
        load_config(None, [f"head.subcenters={value}"])


def test_softmax_with_subcenters_names_the_key():
    with pytest.raises(ConfigError, match="head.subcenters"):
        load_config(None, ["head.margin=softmax", "head.subcenters=3"])


def test_default_is_one_centre_per_class():
    assert load_config(None, []).head.subcenters == 1
    assert load_config(None, ["head.subcenters=3"]).head.subcenters == 3


def test_head_rows_keep_a_class_sub_centres_together(tmp_path):
    k, classes = 3, 10
    full = {"weight": torch.randn(classes * k, 4), "momentum_buffer": torch.randn(classes * k, 4)}
    written = [range(0, 4), range(4, 7), range(7, 10)]
    for part in written:
        head_rows.write_shard(tmp_path, part, classes,
                              {n: v[part.start * k : part.stop * k] for n, v in full.items()}, subcenters=k)
    for wanted in (range(0, 10), range(2, 9), range(5, 6)):
        rows = head_rows.read_rows(tmp_path, written, wanted, classes, subcenters=k)
        for name, value in full.items():
            assert torch.equal(rows[name], value[wanted.start * k : wanted.stop * k]), (name, wanted)
    with pytest.raises(MarginfaceError, match="head.subcenters=1"):
        head_rows.read_rows(tmp_path, written, range(0, 4), classes)
    with pytest.raises(MarginfaceError, match="sub-centres"):
        head_rows.write_shard(tmp_path, range(0, 2), classes, {"weight": torch.zeros(5, 4)}, subcenters=k)


def test_head_safetensors_has_every_sub_centre(tmp_path):
    parts = [torch.randn(4, 3), torch.randn(2, 3)]
    path = tmp_path / "head.safetensors"
    head_rows.write_head_safetensors(path, 3, parts, {"subcenters": "2"}, subcenters=2)
    assert torch.equal(load_file(path)["weight"], torch.cat(parts))
    with pytest.raises(MarginfaceError, match="sub-centre"):
        head_rows.write_head_safetensors(path, 4, parts, {}, subcenters=2)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("subcentres") / "straight"
    launch(cache, 1, "train.batch_size=16", "--out", str(run))
    return run


def test_a_sub_centre_run_exports_c_times_k_rows_in_class_order(straight):
    with safe_open(straight / "head.safetensors", "pt") as handle:
        metadata = handle.metadata()
        weight = handle.get_tensor("weight")
    assert metadata["subcenters"] == "2" and metadata["num_classes"] == "16"
    assert weight.shape == (32, 32)
    checkpoint = sorted((straight / "checkpoints").glob("step_*.pt"))[-1]
    module = torch.load(checkpoint, weights_only=True)["module"]
    assert torch.equal(module["head.weight"], weight)


def test_resume_of_a_sub_centre_run_is_bit_exact(cache, straight, tmp_path):
    resumed = back_to_step(straight, tmp_path / "resumed", 3)
    result = launch(cache, 1, "--resume", str(resumed))
    assert "resumed" in result.stderr
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_sharded_ranks_resume_on_one(cache, straight, tmp_path):
    """2 ranks × batch 8 with the sharded head, saved at step 3, resumed on one process: each class's K rows are
    re-sharded together, so the run ends where the uninterrupted 2-rank run does (and near the 1 × 16 run)."""
    sharded = tmp_path / "sharded2"
    launch(cache, 2, "train.batch_size=8", "head.engine=sharded", "--out", str(sharded))
    assert any((sharded / "checkpoints").glob("step_*.head"))
    resumed = back_to_step(sharded, tmp_path / "resumed1", 3)
    launch(cache, 1, "--resume", str(resumed), "train.batch_size=16")
    a, b, one = weights(sharded), weights(resumed), weights(straight)
    assert b["head"].shape == (32, 32)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=2e-4, atol=2e-6, msg=key)
        torch.testing.assert_close(a[key], one[key], rtol=2e-4, atol=2e-6, msg=key)
