"""Run a torch model over uint8 face crops, with flip fusion (eval/verification.py scores pair sets with it).

This is the path a training run calls every N steps, so it stays small: one batched forward of the original
and flipped images together, no per-image Python work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import ConfigError

__all__ = ["embed_images", "embed_images_separate"]

# In a log (CI, nohup) every redraw of a bar is kept: there it redraws at most this often.
LOG_REDRAW_SECONDS = 30.0


def progress_bar(total: int, desc: str, unit: str = "img") -> Any:
    """A tqdm bar on stderr (stdout stays free for --json), redrawn rarely when stderr is not a terminal."""
    from tqdm import tqdm

    terminal = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if terminal else LOG_REDRAW_SECONDS)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _input_size(model: nn.Module, input_size: Sequence[int] | int | None) -> tuple[int, int] | None:
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(v) for v in size)
    if len(size) != 2:
        raise ConfigError(f"input_size must be (height, width), got {size}")
    return size  # type: ignore[return-value]


def _forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    if isinstance(out, (tuple, list)):  # some backbones return (embedding, extras)
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return embeddings [batch, D]; it returned {shape}")
    return out


@torch.no_grad()
def embed_images_separate(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
    input_size: Sequence[int] | int | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings of the original images and (if ``flip``) of their horizontal flips, each float32
    [N, D]. Images are uint8 [N, H, W, 3] RGB, normalised as ``(x/255 - 0.5)/0.5``; when the model's input
    size (``input_size`` or ``model.input_size``) differs from H x W they are resized bilinearly
    (antialiased). The model runs in eval mode under ``no_grad`` and its training flag is restored. With
    ``progress`` a bar named ``desc`` counts the images on stderr."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ConfigError(f"images must be uint8 [N, H, W, 3] RGB, got {images.dtype} {images.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    originals: list[torch.Tensor] = []
    flipped: list[torch.Tensor] = []
    bar = progress_bar(images.shape[0], desc) if progress else None
    try:
        for start in range(0, images.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            x = chunk.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            if size is not None and tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            if flip:
                # one forward for both views; eval-mode layers treat rows independently
                out = _forward(model, torch.cat([x, x.flip(3)]))
                originals.append(out[: x.shape[0]].float().cpu())
                flipped.append(out[x.shape[0] :].float().cpu())
            else:
                originals.append(_forward(model, x).float().cpu())
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not originals:
        raise ConfigError("no images to embed")
    orig = torch.cat(originals).numpy()
    return orig, (torch.cat(flipped).numpy() if flip else None)


def embed_images(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
    input_size: Sequence[int] | int | None = None,
    progress: bool = False,
    desc: str = "embed",
    return_norms: bool = False,
) -> tuple[np.ndarray, float] | tuple[np.ndarray, float, np.ndarray]:
    """Embeddings float32 [N, D], unnormalised, fused as ``emb(orig) + emb(flip)`` when ``flip``, and the
    XNorm (mean L2 norm of the raw embeddings over both views and all images). See
    `embed_images_separate` for preprocessing and ``progress``.

    ``return_norms``: also each image's raw norm, float32 [N]: ‖model(image)‖ of the image as given, before any
    normalisation, not of its flip nor of the fused sum (MagFace trains this norm to be a face-quality score).
    It comes from the same forward pass: asking for it costs no extra model run."""
    orig, flipped = embed_images_separate(model, images, batch_size, flip, device, input_size, progress, desc)
    norms = np.linalg.norm(orig, axis=1)
    if flipped is None:
        embeddings, xnorm = orig, float(norms.mean())
    else:
        embeddings, xnorm = orig + flipped, float(np.concatenate([norms, np.linalg.norm(flipped, axis=1)]).mean())
    return (embeddings, xnorm, norms) if return_norms else (embeddings, xnorm)
