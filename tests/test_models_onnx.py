"""ONNX export of the backbones: dynamic batch axis, onnxruntime parity, metadata, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import marginface as mf
from marginface.errors import ConfigError
from test_models_forward import calibrate_norm_statistics

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("small_cnn", {"embedding_size": 128}),
        ("small_cnn", {"embedding_size": 128, "input_size": 112, "resize_to": 56}),
        ("mobilefacenet", {}),
    ],
)
def test_export_matches_onnxruntime_at_several_batch_sizes(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = calibrate_norm_statistics(mf.models.create(name, **kwargs)).train()
    path = mf.models.export_onnx(model, tmp_path / "model.onnx")
    assert model.training  # restored after the export
    model.eval()
    for batch in (1, 5):
        x = torch.randn(batch, 3, *model.input_size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = _run(path, x)
        assert 0.1 < np.abs(expected).max() < 100  # O(1) outputs, so the absolute tolerance is meaningful
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4

    graph = onnx.load(str(path))
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert json.loads(metadata["marginface_config"]) == model.config
    assert json.loads(metadata["input_size"]) == list(model.input_size)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind


def test_iresnet18_exports(tmp_path):
    torch.manual_seed(1)
    model = mf.models.create("iresnet18", embedding_size=64, input_size=48)
    model = calibrate_norm_statistics(model).eval()
    path = mf.models.export_onnx(model, tmp_path / "r18.onnx")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, x) - expected).max() < 1e-4


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(2)
    model = calibrate_norm_statistics(mf.models.create("small_cnn", embedding_size=64)).eval()
    path = mf.models.export_onnx(model, tmp_path / "dynamo.onnx", exporter="dynamo")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 56, 56)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(_run(path, x) - expected).max() < 1e-4


def test_export_errors(tmp_path):
    model = mf.models.create("small_cnn", embedding_size=16)
    with pytest.raises(ConfigError, match="exporter"):
        mf.models.export_onnx(model, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mf.models.export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ConfigError, match="input_size"):
        mf.models.export_onnx(torch.nn.Linear(3, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
