"""Sub-center ArcFace's cleaning step: each class's dominant sub-centre, and the samples too far from it.

After training with K sub-centres per class, the sub-centre that most of a class's samples are nearest to is the
class's dominant one; samples farther than ``max_angle`` degrees from it are likely label noise and are dropped
before retraining (Deng et al., ECCV 2020, 75° in the paper). ``clean_run`` does it for a trained run (the
`marginface data clean` command): the kept samples become a new RecordIO set that `data.train` reads directly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginface.errors import ConfigError, MarginfaceError
from marginface.fileio import atomic_write_text


@dataclass
class CleaningResult:
    """What ``clean_by_subcentres`` found: a keep mask over the samples and a per-class report."""

    keep: Tensor  # bool [N]: the sample is within max_angle of its class's dominant sub-centre
    dominant: Tensor  # long [C]: each class's dominant sub-centre k (0 for a class without samples)
    samples: Tensor  # long [C]: samples per class
    dropped: Tensor  # long [C]: samples dropped per class

    def report(self) -> list[dict[str, int]]:
        """One row per class that has samples: class, dominant sub-centre, samples, dropped."""
        return [{"class": c, "dominant_subcenter": int(self.dominant[c]), "samples": int(self.samples[c]),
                 "dropped": int(self.dropped[c])} for c in range(len(self.samples)) if int(self.samples[c]) > 0]


def clean_by_subcentres(
    embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int, max_angle: float = 75.0
) -> CleaningResult:
    """Dominant sub-centre per class (the one most of its samples are nearest to; ties: the lower k) and the
    samples within ``max_angle`` degrees of it. ``weight`` is [C·K, D], row j·K + k sub-centre k of class j."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 2:
        raise ConfigError(f"cleaning needs a classifier trained with sub-centres (subcenters >= 2), got "
                          f"subcenters={subcenters!r}: this run has one centre per class, nothing to clean by")
    if not 0.0 < max_angle <= 180.0:
        raise ConfigError(f"max_angle={max_angle!r} is invalid: expected degrees in (0, 180]")
    if weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters}")
    classes = weight.shape[0] // subcenters
    labels = labels.long()
    with torch.no_grad():
        centres = F.normalize(weight.double(), dim=1).view(classes, subcenters, -1)
        x_hat = F.normalize(embeddings.double(), dim=1)
        own = torch.einsum("nd,nkd->nk", x_hat, centres[labels])  # [N, K]: cos to each sub-centre of its class
        nearest = own.argmax(1)
        votes = torch.zeros(classes, subcenters, dtype=torch.long)
        votes.index_put_((labels, nearest), torch.ones_like(labels), accumulate=True)
        dominant = votes.argmax(1)  # argmax returns the first maximum: ties go to the lower k
        cos_dominant = own.gather(1, dominant[labels][:, None])[:, 0]
        keep = cos_dominant >= math.cos(math.radians(max_angle))
        samples = torch.bincount(labels, minlength=classes)
        dropped = torch.bincount(labels[~keep], minlength=classes)
    return CleaningResult(keep, dominant, samples, dropped)


# -- the `marginface data clean RUN` step: embed a run's training set, clean it, write the kept samples ----------

CLEANED_DIRECTORY = "cleaned"  # RUN/cleaned/ unless --out says otherwise
REPORT_JSON, REPORT_TEXT = "clean_report.json", "clean_report.txt"


def load_subcentre_head(run_dir: Path) -> tuple[Tensor, int]:
    """The run's exported classifier [C·K, D] and K; a run trained without sub-centres is refused, saying how to
    train one."""
    from safetensors import safe_open

    path = run_dir / "head.safetensors"
    if not path.is_file():
        raise MarginfaceError(f"{path} is missing: `data clean` needs the run's exported classifier (written when "
                              "training finishes; a softmax head has none)")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            weight = handle.get_tensor("weight")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise MarginfaceError(f"cannot read {path}: {exc}") from None
    subcenters = int(metadata.get("subcenters", "1"))
    if subcenters < 2:
        raise ConfigError(f"{run_dir} was trained without sub-centres (head.subcenters=1, one centre per class), so "
                          "there is no dominant sub-centre to clean by: train with head.subcenters=K (the paper "
                          "uses K=3), e.g. `marginface train head.margin=arcface head.subcenters=3`, then clean "
                          "that run")
    return weight, subcenters


@torch.no_grad()
def embed_dataset(
    model: nn.Module, dataset: Any, batch_size: int = 256, progress: bool = True, input_size: int | None = None
) -> Tensor:
    """Embeddings [N, D] of every image of ``dataset`` (stored images, no flip: what the head classified), decoded
    and embedded chunk by chunk so that the whole set is never in memory as pixels."""
    from marginface.eval.embed import embed_images, progress_bar

    parts = []
    bar = progress_bar(len(dataset), "embed training set") if progress else None
    try:
        for start in range(0, len(dataset), batch_size):
            images = np.stack([dataset.read(i)[0] for i in range(start, min(start + batch_size, len(dataset)))])
            parts.append(torch.from_numpy(embed_images(model, images, batch_size=batch_size, flip=False,
                                                      input_size=input_size)[0]))
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(parts)


def write_kept_dataset(dataset: Any, keep: Tensor, out_dir: Path) -> dict[str, Any]:
    """The kept samples as a RecordIO set (OUT/train.rec, train.idx, property; image bytes copied, not re-encoded)
    with the original class ids and class count, so that `data.train=OUT` trains on it with the same labels."""
    from marginface.data.decode import image_size as encoded_size
    from marginface.data.recordio.dataset import write_identity_dataset

    labels = np.asarray(dataset.labels, dtype=np.int64)
    kept = np.flatnonzero(keep.numpy())
    kept = kept[np.argsort(labels[kept], kind="stable")]  # the writer wants samples grouped by ascending label
    if len(kept) == 0:
        raise MarginfaceError("every sample was dropped: nothing to write (is --max-angle too small?)")
    size = dataset.stored_size or encoded_size(dataset.read_bytes(int(kept[0]))[0], dataset.describe_item(int(kept[0])))
    samples = ((label, data) for data, label in (dataset.read_bytes(int(i)) for i in kept))
    return write_identity_dataset(out_dir, samples, dataset.num_classes, image_size=tuple(size))


def format_report(summary: dict[str, Any]) -> str:
    """A short text table: each class that lost samples (most first), then the totals."""
    rows = sorted((r for r in summary["classes"] if r["dropped"]), key=lambda r: (-r["dropped"], r["class"]))
    lines = [f"data clean of {summary['run']} (K={summary['subcenters']}, max angle {summary['max_angle']}°)",
             f"{'class':>8} {'dominant':>8} {'samples':>8} {'dropped':>8}"]
    lines += [f"{r['class']:>8} {r['dominant_subcenter']:>8} {r['samples']:>8} {r['dropped']:>8}" for r in rows]
    lines.append(f"{'total':>8} {'':>8} {summary['samples']:>8} {summary['dropped']:>8}  "
                 f"({100 * summary['dropped'] / max(summary['samples'], 1):.2f} % dropped, {len(rows)} of "
                 f"{len(summary['classes'])} classes touched; kept set: {summary['out']})")
    return "\n".join(lines) + "\n"


def clean_run(
    run_dir: str | os.PathLike, max_angle: float = 75.0, out_dir: str | os.PathLike | None = None,
    overwrite: bool = False, progress: bool = True, batch_size: int = 256,
) -> dict[str, Any]:
    """Clean a sub-centre run's training set: embed it with the run's backbone, drop the samples farther than
    ``max_angle`` from their class's dominant sub-centre, write the kept set and the report into ``out_dir``
    (default RUN/cleaned). Returns the report."""
    # The run's config, backbone and data are read lazily through the layers above data: this one command
    # needs a trained run, and nothing else in data depends on them.
    import yaml

    from marginface.data import open_dataset, synthetic
    from marginface.eval.loading import load_model
    from marginface.train.config import config_from_dict

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MarginfaceError(f"run directory {run_dir} does not exist (expected a finished training run)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise MarginfaceError(f"{run_dir} is not a training run: {config_path} is missing")
    if not (run_dir / "model.safetensors").is_file():
        raise MarginfaceError(f"{run_dir / 'model.safetensors'} is missing: the run has not finished, so it has no "
                              "backbone to embed with")
    weight, subcenters = load_subcentre_head(run_dir)
    if not 0.0 < max_angle <= 180.0:
        raise ConfigError(f"--max-angle={max_angle!r} is invalid: expected degrees in (0, 180]")
    config = config_from_dict(yaml.safe_load(config_path.read_text()) or {})
    out_dir = Path(out_dir) if out_dir is not None else run_dir / CLEANED_DIRECTORY
    if (out_dir / "train.rec").exists() and not overwrite:
        raise MarginfaceError(f"{out_dir / 'train.rec'} exists: pass --overwrite to replace it, or --out another "
                              "directory")
    train_path = config.data.train or str(synthetic(**vars(config.data.synthetic)).train)
    dataset = open_dataset(train_path, train=False)
    if dataset.num_classes * subcenters != weight.shape[0]:
        raise MarginfaceError(f"{run_dir / 'head.safetensors'} has {weight.shape[0]} rows, but the training set "
                              f"{train_path} has {dataset.num_classes} classes × K={subcenters}: was it retrained "
                              "on another set?")
    model = load_model(run_dir)
    embeddings = embed_dataset(model, dataset, batch_size=batch_size, progress=progress,
                               input_size=config.data.image_size)  # the size training fed the backbone
    labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    result = clean_by_subcentres(embeddings, labels, weight, subcenters, max_angle)
    dropped = torch.nonzero(~result.keep).flatten().tolist()
    written = write_kept_dataset(dataset, result.keep, out_dir)
    summary = {
        "run": str(run_dir), "source": str(train_path), "out": str(out_dir), "max_angle": float(max_angle),
        "subcenters": subcenters, "samples": int(result.samples.sum()), "kept": int(result.keep.sum()),
        "dropped": len(dropped), "classes": result.report(),
        "dropped_samples": [{"index": i, "label": int(labels[i]), "item": dataset.describe_item(i)} for i in dropped],
        "dataset": written,
    }
    atomic_write_text(out_dir / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / REPORT_TEXT, format_report(summary))
    return summary
