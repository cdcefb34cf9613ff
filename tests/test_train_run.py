"""End-to-end training on a tiny synthetic set: outputs, exact resume after kill -9, 2-process gloo, guards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

import marginface as mf

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.log_every=2", "train.eval_every=0", "train.threads=1"]


def train_cli(env, *args, check=True, **kwargs):
    command = [sys.executable, "-m", "marginface", "train", "--no-progress", *TINY, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=check, timeout=240, **kwargs)


def test_run_outputs(cache, tmp_path):
    out = tmp_path / "run"
    train_cli(cache, "--max-steps", "8", "--out", str(out), "--margin", "npcface")
    for name in ("config.yaml", "metrics.json", "report.md", "history.jsonl", "model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"loss.png", "lr.png", "accuracy.png",
                                                               "margin_mean.png", "hard_fraction.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and set(metrics["verification"]) == {"synth_lfw", "synth_cfp_fp", "synth_agedb",
                                                                      "synth_hard"}
    for result in metrics["verification"].values():
        assert 0.0 <= result["accuracy"] <= 1.0 and result["pairs"] == 40
    assert metrics["throughput"]["images_per_second"] > 0
    # the deployable backbone rebuilds from its own metadata and gives the same embeddings as the checkpoint
    with safe_open(out / "model.safetensors", "pt") as handle:
        model_config = json.loads(handle.metadata()["marginface_model"])
    backbone = mf.models.create(**model_config)
    backbone.load_state_dict(load_file(out / "model.safetensors"))
    checkpoint = torch.load(out / "checkpoints" / "step_000000008.pt", weights_only=True)
    reference = mf.models.create(**model_config)
    reference.load_state_dict({k[len("backbone."):]: v for k, v in checkpoint["module"].items()
                               if k.startswith("backbone.")})
    images = torch.randn(3, 3, *backbone.input_size)
    torch.testing.assert_close(backbone.eval()(images), reference.eval()(images), rtol=0, atol=0)
    assert "margin_mean" in metrics["margin"] and metrics["margin"]["margin_mean"] >= 0.4


def final_state(run: Path) -> dict[str, torch.Tensor]:
    state = dict(load_file(run / "model.safetensors"))
    checkpoint = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    module = torch.load(checkpoint, weights_only=True)["module"]
    state.update({k: v for k, v in module.items() if k.startswith("head.")})
    return state


def test_resume_after_kill_is_bit_exact(cache, tmp_path):
    steps = ["--max-steps", "24", "--checkpoint-every", "5", "train.keep_checkpoints=2"]
    straight = tmp_path / "straight"
    train_cli(cache, *steps, "--out", str(straight))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "marginface", "train", "--no-progress", *TINY, *steps, "--out", str(killed)]
    process = subprocess.Popen(command, env=cache, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not (killed / "checkpoints" / "step_000000010.pt").exists() and time.time() < deadline:
        if process.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()  # it really died mid-run
    result = train_cli(cache, "--resume", str(killed))
    assert "resumed" in result.stdout
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = [json.loads(line)["step"] for line in (killed / "history.jsonl").read_text().splitlines()]
    assert history == sorted(history) and len(history) == len(set(history)) + 1  # one eval record at the end
    assert len(list((killed / "checkpoints").glob("step_*.pt"))) == 2  # only the last K kept


def test_two_process_gloo(cache, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "marginface", "train", "--no-progress", *TINY, "--max-steps", "6", "--device", "cpu", "--json",
               "--out", str(out)]
    result = subprocess.run(command, env=cache, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    states = metrics["margin_state_per_rank"]
    assert len(states) == 2 and states[0] == states[1] and states[0]["t"][0] > 0  # t agrees on every rank
    assert metrics["images_seen"] == 6 * 16 * 2


def test_existing_run_needs_resume(cache, tmp_path):
    out = tmp_path / "run"
    train_cli(cache, "--max-steps", "2", "--out", str(out))
    again = train_cli(cache, "--max-steps", "2", "--out", str(out), check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("engine", ["dense", "chunked"])
def test_nonfinite_steps_are_skipped_then_abort(cache, tmp_path, engine):
    # lr = 1e38 overflows the class centres, so a non-finite cosine block reaches each engine's class pass
    result = train_cli(cache, "--max-steps", "30", "--out", str(tmp_path / "nan"), "optimizer.lr=1e38",
                       "schedule.warmup_steps=0", "train.max_nonfinite=3", "--margin", "arcface",
                       f"head.engine={engine}", "head.engine_params={\"chunk_size\": 7}" if engine == "chunked"
                       else "head.engine_params={}", check=False)
    assert result.returncode == 2
    assert "3 steps in a row had a non-finite loss or gradient" in result.stderr
    assert "step skipped; sample indices [" in result.stdout


@pytest.mark.parametrize(
    "overrides",
    [["train.precision=bf16"], ["train.precision=fp16"], ["train.accumulation=2", "train.grad_clip=1.0"],
     ["optimizer.name=adamw", "optimizer.lr=0.001", "schedule.name=poly"]],
    ids=["bf16", "fp16", "accumulation+clip", "adamw+poly"],
)
def test_training_options(cache, tmp_path, monkeypatch, overrides):
    from marginface.train import load_config, train

    monkeypatch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])
    config = load_config(None, [*TINY, "train.max_steps=3", "train.checkpoint_every=0", *overrides])
    metrics = train(config, tmp_path / "run", progress=False)
    accumulation = config.train.accumulation
    assert metrics["steps"] == 3 and metrics["images_seen"] == 3 * 16 * accumulation
    assert not metrics["skipped_steps"]
    for result in metrics["verification"].values():
        assert 0.0 <= result["accuracy"] <= 1.0


def test_a_fixed_size_backbone_on_the_demo_size_names_the_option(cache, tmp_path):
    result = train_cli(cache, "--max-steps", "1", "--out", str(tmp_path / "mfn"), "model.name=mobilefacenet",
                       check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.name=mobilefacenet takes 112x112 images, but data.image_size=56 gives 56x56" in result.stderr
    assert "set data.image_size=112" in result.stderr
