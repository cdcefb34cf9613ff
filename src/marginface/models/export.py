"""Export a backbone to ONNX with a dynamic batch axis, its `config` stored in the file's metadata.

The default exporter is torch's TorchScript-based one (`dynamo=False`): it needs only the `onnx` package,
exports these backbones in well under a second and works on every torch >= 2.1. torch >= 2.9 marks it
deprecated, so `exporter="dynamo"` (torch.export-based; needs `onnxscript`, about 10x slower) is offered
and tested too, for the day the TorchScript one is removed.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginface.errors import ConfigError, MarginfaceError
from marginface.models.registry import parse_size

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
METADATA_KEY = "marginface_config"
EXPORTERS = ("torchscript", "dynamo")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_size: Any = None,
    *,
    opset: int = 18,
    exporter: str = "torchscript",
    dynamic_batch: bool = True,
) -> Path:
    """Write `model` (in eval mode) as an ONNX graph `input` [N, 3, H, W] float32 -> `embedding` [N, D].

    `input_size` defaults to `model.input_size`. The file is written atomically; its metadata holds
    `marginface_config` (the JSON of `model.config`, when the model has one) and `input_size`. The model's
    training flag is restored afterwards. Returns the path written.
    """
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MarginfaceError("ONNX export needs the onnx package: pip install 'marginface[onnx]'") from exc
    if exporter not in EXPORTERS:
        raise ConfigError(f"export_onnx: exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise ConfigError("export_onnx: the model has no `input_size`; pass input_size=(H, W)")
    height, width = parse_size(type(model).__name__, "input_size", input_size)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export_onnx: directory {str(path.parent)!r} does not exist")

    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    # Batch 2, not 1: a batch of one invites exporters to specialise the batch axis to a constant.
    example = torch.randn(2, 3, height, width, device=device)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    was_training = model.training
    try:
        model.eval()
        _run_exporter(model, example, tmp_name, opset, exporter, dynamic_batch)
        graph = onnx.load(tmp_name)
        metadata = {"input_size": json.dumps([height, width])}
        config = getattr(model, "config", None)
        if config is not None:
            metadata[METADATA_KEY] = json.dumps(config)
        for key, value in metadata.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    return path


def _run_exporter(
    model: nn.Module, example: torch.Tensor, filename: str, opset: int, exporter: str, dynamic_batch: bool
) -> None:
    has_dynamo_switch = "dynamo" in inspect.signature(torch.onnx.export).parameters
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
    }
    if exporter == "dynamo":
        if not has_dynamo_switch:
            raise ConfigError(f"export_onnx: exporter='dynamo' needs torch >= 2.5 (this is {torch.__version__})")
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise MarginfaceError("exporter='dynamo' needs the onnxscript package: pip install onnxscript") from exc
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        with warnings.catch_warnings():
            # torch.export's own internals raise FutureWarnings about pytree APIs; nothing a user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), filename, dynamo=True, external_data=False, verbose=False, **kwargs)
        return
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if has_dynamo_switch:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is deprecated; it is the choice made above, on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), filename, **kwargs)
