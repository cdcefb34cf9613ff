"""Export a backbone to ONNX with a dynamic batch axis, its `config` stored in the file's metadata, and measure
how closely the exported graph reproduces the model's embeddings (`embedding_parity`).

The default exporter is torch's TorchScript-based one (`dynamo=False`): it needs only the `onnx` package,
exports these backbones in well under a second and works on every torch >= 2.1. torch >= 2.9 marks it
deprecated, so `exporter="dynamo"` (torch.export-based; needs `onnxscript`, about 10x slower) is offered
and tested too, for the day the TorchScript one is removed.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marginface.errors import ConfigError, MarginfaceError
from marginface.fileio import atomic_output
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
    was_training = model.training
    try:
        model.eval()
        with atomic_output(path) as temporary:
            tmp_name = str(temporary)
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
    finally:
        model.train(was_training)
    return path


def embedding_parity(reference: np.ndarray, exported: np.ndarray) -> dict[str, Any]:
    """How far `exported` embeddings [N, D] are from the `reference` ones, in the terms evaluation uses.

    Evaluation scores cosines, so an embedding's scale carries no meaning there, and an absolute difference
    misjudges both ways: float32 rounding alone gives |Δ| ~ 30 on a valid model whose embeddings have norm
    2e7, and a tiny |Δ| can hide a broken graph whose embeddings are small. So the check is relative, per
    embedding: ``max_relative_error`` = max over rows of ||exported - reference|| / ||reference|| (what a
    tolerance should apply to; it also catches a wrong norm, which XNorm and flip fusion would see), with the
    row where it peaks. ``max_normalised_difference`` is the largest component difference of the
    L2-normalised embeddings, the vectors whose dot products are the scores; ``max_abs_difference`` and
    ``mean_norm`` (of the reference) say why an absolute difference may look large."""
    reference = np.asarray(reference, dtype=np.float64)
    exported = np.asarray(exported, dtype=np.float64)
    if reference.ndim != 2 or reference.shape != exported.shape:
        raise MarginfaceError(
            f"parity: the exported model gives embeddings of shape {exported.shape}, expected {reference.shape}"
        )
    # a zero embedding is matched only by a zero one: the floor keeps 0/0 at 0 and anything else large
    floor = np.finfo(np.float32).tiny
    norms = np.linalg.norm(reference, axis=1)
    relative = np.linalg.norm(exported - reference, axis=1) / np.maximum(norms, floor)
    normalised = np.abs(
        exported / np.maximum(np.linalg.norm(exported, axis=1, keepdims=True), floor)
        - reference / np.maximum(norms[:, None], floor)
    )
    # NaN is the largest of all: a non-finite output must never look like the best row
    worst = int(np.argmax(np.where(np.isnan(relative), np.inf, relative)))
    return {
        "max_relative_error": float(relative[worst]),
        "worst_image": worst,
        "max_normalised_difference": float(normalised.max()),
        "max_abs_difference": float(np.abs(exported - reference).max()),
        "mean_norm": float(norms.mean()),
    }


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
