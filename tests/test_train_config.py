"""Training configs: validated on load, errors name the key and what is allowed; schedules and param groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from marginface.errors import ConfigError
from marginface.train.config import Config, load_config, save_config
from marginface.train.optim import learning_rate, parameter_groups


def test_defaults_are_the_demo():
    config = load_config()
    assert config.head.margin == "curricularface" and config.data.train is None and config.model.name == "small_cnn"


@pytest.mark.parametrize(
    "yaml_text,fragment",
    [
        ("train:\n  batch_sise: 64\n", "unknown key train.batch_sise: train allows seed, device, epochs"),
        ("trian:\n  batch_size: 64\n", "unknown key trian: the config allows data, model, head"),
        ("train:\n  batch_size: sixty\n", "train.batch_size must be an integer, got 'sixty'"),
        ("train:\n  batch_size: 0\n", "train.batch_size=0 is invalid: expected a value > 0"),
        ("train:\n  precision: fp8\n", "train.precision='fp8' is invalid: expected one of fp32, bf16, fp16"),
        ("optimizer:\n  momentum: 1.5\n", "optimizer.momentum=1.5 is invalid"),
        ("schedule:\n  name: step\n", "schedule.milestones is empty"),
        ("head:\n  margin: arcfase\n", "head.margin='arcfase' is invalid: expected one of softmax"),
        ("model:\n  name: resnet9000\n", "model.name='resnet9000' is invalid"),
        ("data:\n  pairs: lfw.bin\n", "data.pairs must be a list"),
        ("train: 3\n", "train must be a mapping"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("train: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_files(tmp_path, yaml_text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_and_round_trip(tmp_path):
    config = load_config(None, ["train.max_steps=50", "head.params={s: 64, m: 0.5}", "optimizer.lr=0.05",
                                "data.pairs=[a.bin, b.bin]", "train.grad_clip="])
    assert config.train.max_steps == 50 and config.head.params == {"s": 64, "m": 0.5}
    assert config.optimizer.lr == 0.05 and config.data.pairs == ["a.bin", "b.bin"] and config.train.grad_clip is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.max_steps"])


def test_integers_and_exponents_are_accepted_for_floats(tmp_path):
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    (tmp_path / "c.yaml").write_text("optimizer:\n  weight_decay: 5e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(tmp_path / "c.yaml").optimizer.weight_decay == 5e-4
    assert isinstance(load_config(None, ["train.epochs=3"]).train.epochs, float)


def test_schedules():
    config = Config().schedule
    config.warmup_steps = 10
    # linear warm-up reaches the base LR at the end of warm-up
    assert [learning_rate(s, 110, 10.0, 0.1, config) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    config.name = "cosine"
    assert learning_rate(10, 110, 10.0, 0.1, config) == pytest.approx(0.1)
    assert learning_rate(60, 110, 10.0, 0.1, config) == pytest.approx(0.05)
    assert learning_rate(110, 110, 10.0, 0.1, config) == pytest.approx(0.0, abs=1e-12)
    config.name = "poly"
    assert learning_rate(60, 110, 10.0, 0.1, config) == pytest.approx(0.1 * 0.5**2)
    config.name, config.milestones, config.warmup_steps = "step", [2.0, 4.0], 0
    assert [learning_rate(s, 100, 10.0, 0.1, config) for s in (19, 20, 39, 40)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001]
    )
    config.name = "constant"
    assert learning_rate(99, 100, 10.0, 0.1, config) == 0.1
    assert math.isfinite(learning_rate(0, 1, 1.0, 0.1, config))


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(4, 2))
    decayed, plain = parameter_groups([model], weight_decay=5e-4)
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    decayed_ids = {id(p) for p in decayed["params"]}
    assert decayed_ids == {id(model[0].weight), id(model[4].weight)}
    assert len(plain["params"]) == sum(1 for _ in model.parameters()) - 2
    torch.optim.SGD([decayed, plain], lr=0.1)  # the groups are valid optimiser input


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = load_config(path)
    if "ms1m" in path.name:
        assert config.data.train and config.model.name == "iresnet100" and config.model.embedding_size == 512
        text = path.read_text()
        assert "Published" in text and "torchrun" in text  # each says what it should reach and how to run it


def test_demo_config_is_the_default():
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_synthetic.yaml") == load_config()


def test_an_override_of_one_margin_parameter_keeps_the_others(tmp_path):
    assert load_config(None, ["head.params.m=0.2"]).head.params == {"s": 30.0, "m": 0.2}
    assert load_config(None, ["head.params={m: 0.1}"]).head.params == {"m": 0.1}  # a whole mapping replaces
    path = tmp_path / "c.yaml"
    path.write_text("head:\n  margin: arcface\n  params: {s: 48.0, m: 0.45}\n")
    assert load_config(path, ["head.params.m=0.4"]).head.params == {"s": 48.0, "m": 0.4}
    assert load_config(None, ["model.kwargs.width=8"]).model.kwargs == {"width": 8}


def test_switching_margin_carries_only_what_means_the_same():
    from marginface.train.config import switch_margin

    demo = load_config()  # curricularface s=30, m=0.3 (an angle)
    config, carried, defaults = switch_margin(demo, "SphereFace")
    assert config.head.margin == "sphereface" and config.head.params == {} and carried == {}
    assert defaults == {"m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0}
    config, carried, defaults = switch_margin(demo, "cosface")  # its m is a cosine offset, not an angle
    assert config.head.params == {"s": 30.0} and defaults == {"m": 0.35}
    config, carried, _ = switch_margin(load_config(None, ["head.params.m=0.2"]), "cosface", explicit={"m"})
    assert config.head.params == {"s": 30.0, "m": 0.2}
    with pytest.raises(ConfigError, match="head.params.m was given, but margin 'normface' has no parameter m"):
        switch_margin(demo, "normface", explicit={"m"})


def test_train_margin_sphereface_runs_and_says_what_carried(cache, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "marginface", "train", "--no-progress", "--margin", "sphereface",
               "--max-steps", "1", "--out", str(tmp_path / "run"), "data.synthetic.identities=16",
               "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40", "train.batch_size=16",
               "data.num_workers=0", "train.eval_every=0", "train.threads=1"]
    result = subprocess.run(command, env=cache, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "--margin sphereface: carried over nothing; its defaults for the rest (m=4, base=1000.0" in result.stderr


@pytest.mark.parametrize("args,source", [
    (["--config", "configs/arcface_ms1mv2_r100.yaml"], "configs/arcface_ms1mv2_r100.yaml (train: device:) asks"),
    (["--device", "cuda"], "--device cuda asks"),
    (["train.device=cuda"], "the override train.device=cuda asks"),
])
def test_a_cuda_request_without_cuda_names_where_it_came_from(args, source, monkeypatch, capsys, tmp_path):
    from marginface import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert source in err and "pass --device cpu" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
