"""Weights users already have: arcface_torch state dicts in (import-weights, model.init), checked key by key;
a pickle that would run code is refused and runs nothing."""

from __future__ import annotations

import builtins
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import marginface as mf
from marginface.errors import ConfigError, DataFormatError
from marginface.eval.loading import load_model
from marginface.models.weights import import_weights, load_backbone_weights, read_state_dict, save_backbone
from marginface.train.config import load_config
from marginface.train.trainer import build_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def arcface_torch_iresnet_keys(layers: tuple[int, ...]) -> list[str]:
    """The state-dict names of arcface_torch's IResNet (backbones/iresnet.py), written from its structure: a
    3x3 stem conv + BN + PReLU, IBasicBlocks (bn1 conv1 bn2 prelu conv2 bn3, a 1x1 conv + BN downsample in
    each stage's first block), then bn2, fc and the `features` BatchNorm1d."""
    keys = ["conv1.weight", *(f"bn1.{p}" for p in BN), "prelu.weight"]
    for stage, blocks in enumerate(layers, 1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            keys += [*(f"{prefix}.bn1.{p}" for p in BN), f"{prefix}.conv1.weight", *(f"{prefix}.bn2.{p}" for p in BN),
                     f"{prefix}.prelu.weight", f"{prefix}.conv2.weight", *(f"{prefix}.bn3.{p}" for p in BN)]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{p}" for p in BN)]
    return keys + [*(f"bn2.{p}" for p in BN), "fc.weight", "fc.bias", *(f"features.{p}" for p in BN)]


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    """An iresnet18 with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = mf.models.create("iresnet18", embedding_size=64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def test_iresnet_keys_and_shapes_are_arcface_torchs(r18):
    state = r18.state_dict()
    assert sorted(state) == sorted(arcface_torch_iresnet_keys((2, 2, 2, 2)))
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["fc.weight"].shape) == (64, 512 * 7 * 7)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)


def test_an_arcface_torch_pth_imports_and_gives_the_same_embeddings(r18, tmp_path):
    # What arcface_torch writes under DDP: torch.save(backbone.state_dict()) of the wrapped module.
    pth = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v.clone() for k, v in r18.state_dict().items()}, pth)
    out = tmp_path / "r18.safetensors"
    summary = import_weights(pth, "iresnet18", out)
    assert summary["embedding_size"] == 64 and summary["tensors"] == len(r18.state_dict())
    imported = load_model(out)
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(imported(images), r18(images))


def test_import_weights_cli_writes_what_eval_loads(r18, tmp_path):
    pth = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": r18.state_dict(), "step": 7}, pth)  # only tensors: weights_only loads it
    out = tmp_path / "r18.safetensors"
    result = subprocess.run([sys.executable, "-m", "marginface", "import-weights", str(pth), "--arch", "iresnet18",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "iresnet18 (64-d)" in result.stdout
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(load_model(out)(images), r18(images))


def test_mismatched_keys_are_listed_by_name(r18, tmp_path):
    state = dict(r18.state_dict())
    del state["layer3.1.conv2.weight"]
    state["head.weight"] = torch.zeros(3)
    state["fc.bias"] = torch.zeros(32)
    pth = tmp_path / "bad.pth"
    torch.save(state, pth)
    with pytest.raises(ConfigError) as info:
        import_weights(pth, "iresnet18", tmp_path / "out.safetensors", embedding_size=64)
    text = str(info.value)
    assert "missing (1): layer3.1.conv2.weight" in text and "unexpected (1): head.weight" in text
    assert "mis-shaped (1): fc.bias (32,) (expected (64,))" in text
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConfigError, match="does not fit iresnet34: missing"):
        import_weights(tmp_path / "bad.pth", "iresnet34", tmp_path / "out.safetensors", embedding_size=64)


class RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_malicious_pickle_runs_nothing(tmp_path, writer):
    marker = tmp_path / "marker"
    pth = tmp_path / "evil.pth"
    payload = {"conv1.weight": torch.zeros(1), "x": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, pth)
    else:
        pth.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(DataFormatError, match=r"evil.pth: refused to load: .*nothing in it was run"):
        read_state_dict(pth)
    with pytest.raises(DataFormatError, match="refused to load"):
        import_weights(pth, "iresnet18", tmp_path / "out.safetensors")
    assert not marker.exists()


def test_model_init_starts_training_from_the_given_backbone(tmp_path):
    torch.manual_seed(123)
    source = mf.models.create("small_cnn", embedding_size=128, input_size=56)
    path = tmp_path / "init.safetensors"
    save_backbone(source, path)
    config = load_config(None, [f"model.init={path}"])
    module = build_model(config, num_classes=10)
    for name, value in source.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name
    fresh = build_model(load_config(), num_classes=10)
    assert not torch.equal(fresh.backbone.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    with pytest.raises(ConfigError, match="holds a small_cnn backbone, but the model is linear"):
        load_backbone_weights(mf.models.create("linear", embedding_size=128, input_size=56), path)
    with pytest.raises(ConfigError, match="model.init='nope.safetensors': no such file"):
        load_config(None, ["model.init=nope.safetensors"])
