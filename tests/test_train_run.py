"""End-to-end training on a tiny synthetic set: every logged loss, update, statistic and verification number
recomputed here from what the run saw (a float64 reference of the margin written from spec/losses.md), exact
resume after kill -9, 2-process gloo, guards."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open

import marginface as mf
from test_margins_gradients import ReferenceMargin

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.log_every=2", "train.eval_every=0", "train.threads=1"]
SYNTHETIC = {"identities": 16, "images_per_id": 6, "pairs_per_set": 40, "ijb": False, "seed": 0, "difficulty": 0.6}


def train_cli(env, *args, check=True, **kwargs):
    command = [sys.executable, "-m", "marginface", "train", "--no-progress", *TINY, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=check, timeout=240, **kwargs)


class Recorder:
    """Every training-mode call of a margin head, as the head received it (embeddings, labels, class centres,
    margin state), and the first training-mode backbone call with a copy of the backbone as it was before it.

    A global forward pre-hook: it needs nothing of the trainer's internals.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.first_backbone: tuple[torch.nn.Module, torch.Tensor] | None = None
        self.backbone_type = type(mf.models.create("small_cnn", embedding_size=8))

    def __enter__(self) -> Recorder:
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module, args) -> None:
        if not module.training:
            return
        if isinstance(module, mf.heads.MarginHead):
            embeddings, labels = args
            self.calls.append({"x": embeddings.detach().double().clone(), "labels": labels.clone(),
                               "w": module.weight.detach().double().clone(),
                               "state": {k: v.clone() for k, v in module.margin.state_dict().items()}})
        elif isinstance(module, self.backbone_type) and self.first_backbone is None:
            self.first_backbone = (copy.deepcopy(module).double(), args[0].detach().double().clone())


def reference_cosines(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()


def replay(recorder: Recorder, margin: str, params: dict, accumulation: int = 1):
    """The float64 reference run over the recorded calls: per step the loss (mean over micro-batches), the
    gradient of the loss w.r.t. the class centres, the reference's statistics of the step's last call, and its
    state before each call."""
    reference = ReferenceMargin(margin, training=True, **params)
    steps = []
    for first in range(0, len(recorder.calls), accumulation):
        loss, grad = 0.0, 0.0
        for call in recorder.calls[first : first + accumulation]:
            if margin == "curricularface":  # the state the head had before the call is the reference's own
                assert float(call["state"]["t"]) == pytest.approx(reference.t, rel=1e-5, abs=1e-9)
            weight = call["w"].clone().requires_grad_(True)
            cos = reference_cosines(call["x"], weight)
            value = reference.loss(cos, call["labels"]) / accumulation
            (dw,) = torch.autograd.grad(value, weight)
            loss, grad = loss + float(value.detach()), grad + dw
            c_y = cos.detach().gather(1, call["labels"][:, None])[:, 0]
            statistics = {"target_cos": float(c_y.mean()),
                          "hard_fraction": float(reference.last["hard"].sum()) / (cos.shape[0] * (cos.shape[1] - 1))}
            if "margin" in reference.last:
                statistics["margin_mean"] = float(reference.last["margin"].mean())
            if margin == "curricularface":
                statistics["t"] = reference.t
        steps.append({"loss": loss, "grad_w": grad, "w": recorder.calls[first]["w"], "statistics": statistics})
    return steps, reference


def warmup_lr(base_lr: float, step: int, warmup_steps: int = 100) -> float:
    """The LR of optimiser step ``step`` (0-based) during the linear warm-up: base·(step + 1)/warmup_steps."""
    return base_lr * (step + 1) / warmup_steps


def assert_history(run: Path, steps: list[dict], base_lr: float, log_every: int, accumulation: int = 1) -> None:
    """history.jsonl: one record per ``log_every`` steps (and the last), with the mean loss of the window, the LR
    of its last step and the margin's statistics of that step; then one verification record at the end."""
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    logged = [s for s in range(1, len(steps) + 1) if s % log_every == 0 or s == len(steps)]
    assert [r["step"] for r in history] == [*logged, len(steps)]
    assert all(k.startswith("verification/") for k in history[-1] if k != "step")
    previous = 0
    for record, step in zip(history, logged, strict=False):
        window = [s["loss"] for s in steps[previous:step]]
        assert record["train/loss"] == pytest.approx(sum(window) / len(window), rel=2e-6), f"step {step}"
        assert record["train/lr"] == pytest.approx(warmup_lr(base_lr, step - 1), rel=1e-12)
        # 16 ids × 6 images = 96 per epoch: 6 batches of 16, one step per `accumulation` of them
        assert record["epoch"] == pytest.approx(step * accumulation / 6.0, rel=1e-12)
        for key, value in steps[step - 1]["statistics"].items():
            assert record[f"margin/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {step} {key}"
        previous = step


def assert_sgd_updates(steps: list[dict], final_w: torch.Tensor, lr: float, momentum=0.9, weight_decay=5e-4):
    """Each step moved the class centres by −lr·buf, buf = momentum·buf + (∇W + wd·W) (torch SGD, no dampening),
    with ∇W from the float64 reference."""
    buffer = None
    for step, record in enumerate(steps):
        direction = record["grad_w"] + weight_decay * record["w"]
        buffer = direction if buffer is None else momentum * buffer + direction
        after = steps[step + 1]["w"] if step + 1 < len(steps) else final_w
        moved, expected = after - record["w"], -warmup_lr(lr, step) * buffer
        error = float((moved - expected).abs().max() / expected.abs().max())
        assert error < 1e-5, f"step {step}: the class centres moved {error:.1e} (relative) off the reference"


def ten_fold(dist: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float, float]:
    """insightface's verification protocol, by its loops: contiguous folds; per fold the first threshold of
    arange(0, 4, 0.01) with the best accuracy on the other folds ("same" where dist < threshold), then measured on
    the fold. Returns (mean accuracy, std of the fold accuracies, mean threshold)."""
    thresholds = np.arange(0, 4, 0.01)
    sizes = [len(dist) // folds + (1 if k < len(dist) % folds else 0) for k in range(folds)]
    accuracies, chosen, start = [], [], 0
    for size in sizes:
        test = np.zeros(len(dist), dtype=bool)
        test[start : start + size] = True
        start += size
        train = [np.mean((dist[~test] < t) == issame[~test]) for t in thresholds]
        best = thresholds[int(np.argmax(train))]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
        chosen.append(best)
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(chosen))


def assert_verification(run: Path, verification: dict) -> None:
    """Every pair set's table recomputed from the saved model: embeddings of the images and of their flips (the
    documented preprocessing: (x/255 − 0.5)/0.5, bilinear antialiased resize), summed, then in float64 the
    cosine per pair, the squared distance 2 − 2·cos and ten folds."""
    with safe_open(run / "model.safetensors", "pt") as handle:
        model = mf.models.create(**json.loads(handle.metadata()["marginface_model"]))
    model.load_state_dict(load_file(run / "model.safetensors"))
    model = model.eval()
    built = mf.data.synthetic(**SYNTHETIC)
    assert set(verification) == {mf.eval.load_pairs(path).name for path in built.pairs.values()}
    for path in built.pairs.values():
        pairs = mf.eval.load_pairs(path)
        images = torch.from_numpy(pairs.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        images = F.interpolate(images, size=model.input_size, mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            original, flipped = model(images).double(), model(images.flip(3)).double()
        fused = F.normalize(original + flipped, dim=1)
        dist = (2.0 - 2.0 * (fused[0::2] * fused[1::2]).sum(1)).numpy()
        accuracy, std, threshold = ten_fold(dist, pairs.issame)
        result = verification[pairs.name]
        assert result["pairs"] == 40 and result["impostors"] == int((~pairs.issame).sum()) == 20
        assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12), pairs.name
        assert result["std"] == pytest.approx(std, abs=1e-12), pairs.name
        assert result["threshold"] == pytest.approx(threshold, abs=1e-12), pairs.name
        norms = torch.cat([original.norm(dim=1), flipped.norm(dim=1)])
        assert result["xnorm"] == pytest.approx(float(norms.mean()), rel=1e-5), pairs.name
        assert result["tar_at_far"] == {}  # 20 impostors: no FAR level has ten impostors below it


def train_recorded(monkeypatch, cache, run: Path, overrides: list[str]):
    from marginface.train import load_config, train

    monkeypatch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])
    config = load_config(None, [*TINY, *overrides])
    with Recorder() as recorder:
        metrics = train(config, run, progress=False)
    return config, metrics, recorder


def test_run_outputs(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    params = {"s": 30.0, "m0": 0.35}
    config, metrics, recorder = train_recorded(monkeypatch, cache, run, [
        "train.max_steps=8", "head.margin=npcface", f"head.params={json.dumps(params)}", "train.log_every=1"])
    for name in ("config.yaml", "metrics.json", "report.md", "history.jsonl", "model.safetensors", "head.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "lr.png", "accuracy.png",
                                                               "margin_mean.png", "hard_fraction.png"}
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*.pt"))] == ["step_000000008.pt"]
    assert metrics["steps"] == 8 and metrics["images_seen"] == 8 * 16 and len(recorder.calls) == 8
    assert metrics["throughput"]["images_per_second"] == pytest.approx(8 * 16 / metrics["train_seconds"], rel=1e-12)

    # step 0 from scratch: the initial backbone (float64) on the first batch, then the reference margin
    backbone, images = recorder.first_backbone
    with torch.no_grad():
        embeddings = backbone(images)
    torch.testing.assert_close(embeddings, recorder.calls[0]["x"], rtol=1e-4, atol=1e-5)
    first = recorder.calls[0]
    step0 = ReferenceMargin("npcface", **params).loss(reference_cosines(embeddings, first["w"]), first["labels"])
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 1 and history[0]["train/loss"] == pytest.approx(float(step0), rel=1e-5)

    steps, _ = replay(recorder, "npcface", params)
    assert_history(run, steps, config.optimizer.lr, log_every=1)
    final_w = load_file(run / "head.safetensors")["weight"].double()
    assert_sgd_updates(steps, final_w, config.optimizer.lr)
    for key, value in steps[-1]["statistics"].items():
        assert metrics["margin"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert_verification(run, metrics["verification"])

    # the deployable backbone rebuilds from its own metadata and gives the same embeddings as the checkpoint
    with safe_open(run / "model.safetensors", "pt") as handle:
        model_config = json.loads(handle.metadata()["marginface_model"])
    backbone = mf.models.create(**model_config)
    backbone.load_state_dict(load_file(run / "model.safetensors"))
    checkpoint = torch.load(run / "checkpoints" / "step_000000008.pt", weights_only=True)
    reference = mf.models.create(**model_config)
    reference.load_state_dict({k[len("backbone."):]: v for k, v in checkpoint["module"].items()
                               if k.startswith("backbone.")})
    images = torch.randn(3, 3, *backbone.input_size)
    torch.testing.assert_close(backbone.eval()(images), reference.eval()(images), rtol=0, atol=0)
    torch.testing.assert_close(checkpoint["module"]["head.weight"].double(), final_w, rtol=0, atol=0)


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
    assert "resumed" in result.stderr
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
    assert "step skipped; sample indices [" in result.stderr


@pytest.mark.parametrize(
    "overrides",
    [["train.precision=bf16"], ["train.precision=fp16"], ["train.accumulation=2", "train.grad_clip=1.0"],
     ["optimizer.name=adamw", "optimizer.lr=0.001", "schedule.name=poly"]],
    ids=["bf16", "fp16", "accumulation+clip", "adamw+poly"],
)
def test_training_options(cache, tmp_path, monkeypatch, overrides):
    """The demo margin (CurricularFace, s=30, m=0.3) under each option: the head runs in fp32 whatever the
    backbone's precision, so every logged loss, t and statistic equals the float64 reference on what it saw."""
    run = tmp_path / "run"
    config, metrics, recorder = train_recorded(monkeypatch, cache, run, [
        "train.max_steps=3", "train.checkpoint_every=0", *overrides])
    accumulation = config.train.accumulation
    assert metrics["steps"] == 3 and metrics["images_seen"] == 3 * 16 * accumulation
    assert len(recorder.calls) == 3 * accumulation and not metrics["skipped_steps"]
    steps, reference = replay(recorder, "curricularface", {"s": 30.0, "m": 0.3}, accumulation)
    assert_history(run, steps, config.optimizer.lr, log_every=2, accumulation=accumulation)
    (state,) = metrics["margin_state_per_rank"]
    assert state["t"][0] == pytest.approx(reference.t, rel=1e-5)
    for key, value in steps[-1]["statistics"].items():
        assert metrics["margin"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if overrides == ["train.precision=bf16"]:  # plain SGD: every update of the class centres is predictable
        assert_sgd_updates(steps, load_file(run / "head.safetensors")["weight"].double(), config.optimizer.lr)
    assert_verification(run, metrics["verification"])


def test_a_fixed_size_backbone_on_the_demo_size_names_the_option(cache, tmp_path):
    result = train_cli(cache, "--max-steps", "1", "--out", str(tmp_path / "mfn"), "model.name=mobilefacenet",
                       check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.name=mobilefacenet takes 112x112 images, but data.image_size=56 gives 56x56" in result.stderr
    assert "set data.image_size=112" in result.stderr
