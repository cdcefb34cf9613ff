"""IJB-B/IJB-C in a comparison: the tree checked before any training, and per run the 1:1 template-pair scores,
kept as `ijb_scores.npz` beside its model for the template-pair bootstrap.

The scores are those of `marginface eval --ijb ROOT --target T` (`marginface.eval.evaluate_ijb`: aligned loose
crops, flip fusion, media-then-template aggregation, its default N1D1F1 mode), computed once per run from its
`model.safetensors`. The IJB tree is not part of what the runs train, so adding or changing it never retrains.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginface.compare.scores import PairScores, scoring_device
from marginface.errors import ConfigError, DataFormatError
from marginface.fileio import atomic_output
from marginface.train.config import Config

IJB_SCORES_FILE = "ijb_scores.npz"
IJB_SCORES_FORMAT = "marginface-compare-ijb-scores"
TARGETS = ("IJBB", "IJBC")
DEFAULT_TARGET = "IJBC"
# evaluate_ijb's switches as `marginface eval --ijb` uses them: raw norms, detector scores, flip fusion
MODE = {"norm": True, "detector": True, "flip": True}
MODE_NAME = "N1D1F1"


@dataclass(frozen=True)
class IJBSpec:
    """The IJB target a comparison scores, as checked before training (counts and a fingerprint of its pairs)."""

    root: Path
    target: str  # IJBB | IJBC
    pairs: int
    impostors: int
    images: int
    digest: str  # sha256 of the template pair list and its labels: scores of another list are stale

    @property
    def title(self) -> str:
        """`IJB-C`, as the report names it."""
        return f"IJB-{self.target[3:]}"

    def to_dict(self) -> dict[str, object]:
        return {"root": str(self.root), "target": self.target, "mode": MODE_NAME, "images": self.images,
                "pairs": self.pairs, "impostors": self.impostors}


def pair_digest(pairs: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of a template pair list: its template ids and labels, in order."""
    digest = hashlib.sha256(np.ascontiguousarray(pairs, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=bool).tobytes())
    return digest.hexdigest()


def check_ijb(root: str | os.PathLike, target: str = DEFAULT_TARGET) -> IJBSpec:
    """Read and check the IJB tree at ``root`` for ``target`` before anything trains: its meta files (parsed and
    cross-checked by `marginface.eval.read_ijb_meta`) and that every listed image is in loose_crop/. A missing or
    malformed tree is a ConfigError naming --ijb and what is missing."""
    from marginface.eval import read_ijb_meta

    name = str(target).upper()
    if name not in TARGETS:
        raise ConfigError(f"--ijb-target {target!r} is invalid: expected one of {', '.join(TARGETS)}")
    root = Path(root)
    layout = "an IJB tree with loose_crop/ and meta/, as `marginface eval --ijb ROOT` reads"
    if not root.is_dir():
        raise ConfigError(f"--ijb {root}: no such directory; expected {layout}")
    try:
        meta = read_ijb_meta(root, name, one_to_n=False)  # compare scores 1:1 only
    except (DataFormatError, OSError) as exc:
        raise ConfigError(f"--ijb {root} (--ijb-target {name}): {exc}") from None
    # where evaluate_ijb reads the crops from: ROOT/loose_crop, else ROOT/<target>/loose_crop
    crops = next((c for c in (root / "loose_crop", root / name / "loose_crop") if c.is_dir()), None)
    if crops is None:
        raise ConfigError(f"--ijb {root}: no loose_crop/ directory (expected {root / 'loose_crop'} holding the "
                          f"{len(meta.image_names)} images of the {name} meta files)")
    # one listing instead of a stat per image: IJB-C lists ~470,000 crops
    present = set(os.listdir(crops))
    missing = [n for n in meta.image_names if n not in present and not (crops / n).is_file()]
    if missing:
        raise ConfigError(f"--ijb {root}: {len(missing)} of {len(meta.image_names)} images of the {name} meta "
                          f"files are missing from {crops}, e.g. {missing[0]}")
    labels = np.asarray(meta.labels, dtype=bool)
    impostors = int((~labels).sum())
    if impostors == 0 or impostors == labels.size:
        raise ConfigError(f"--ijb {root}: the {name} template pair list has {labels.size - impostors} genuine and "
                          f"{impostors} impostor pairs; TAR@FAR needs both")
    return IJBSpec(root, name, int(labels.size), impostors, len(meta.image_names), pair_digest(meta.pairs, labels))


def ijb_scores_are_current(run_dir: Path, spec: IJBSpec) -> bool:
    """Whether the run has IJB scores of its present model (a retrained model makes them stale) for this target
    and this template pair list."""
    path, model = Path(run_dir) / IJB_SCORES_FILE, Path(run_dir) / "model.safetensors"
    if not (path.exists() and model.exists() and os.path.getmtime(path) >= os.path.getmtime(model)):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:  # reads only the small arrays asked for
            return str(data["target"]) == spec.target and str(data["digest"]) == spec.digest
    except (OSError, ValueError, KeyError):  # unreadable or of an older layout: compute again
        return False


def compute_ijb_scores(run_dir: str | os.PathLike, config: Config, spec: IJBSpec) -> PairScores:
    """Score the IJB template pairs with the run's saved model and write `ijb_scores.npz`; returns the scores."""
    from marginface.eval import evaluate_ijb
    from marginface.eval.loading import load_model
    from marginface.eval.verification import DEFAULT_BATCH_SIZE

    run_dir = Path(run_dir)
    device = scoring_device(config)
    model = load_model(run_dir, device=device)
    # far_rule and fars only shape evaluate_ijb's own table, which is not kept: the statistics recompute TAR
    # from the scores; one_to_n=False skips the 1:N search, which compare does not report
    result = evaluate_ijb(model, spec.root, spec.target, batch_size=DEFAULT_BATCH_SIZE, device=device,
                          far_rule="floor", one_to_n=False, return_scores=True, **MODE)
    labels = np.asarray(result["labels"], dtype=bool)
    if labels.size != spec.pairs:
        raise DataFormatError(f"{spec.root}: the {spec.target} pair list changed since the comparison started "
                              f"({spec.pairs} pairs then, {labels.size} now)")
    scores = PairScores(spec.target, np.asarray(result["scores"], dtype=np.float32), labels)
    save_ijb_scores(run_dir / IJB_SCORES_FILE, scores, spec)
    return scores


def save_ijb_scores(path: Path, scores: PairScores, spec: IJBSpec) -> None:
    arrays = {"format": np.array(IJB_SCORES_FORMAT), "target": np.array(spec.target), "mode": np.array(MODE_NAME),
              "digest": np.array(spec.digest), "scores": scores.scores, "labels": scores.issame}
    # written to a temporary file and renamed: an interrupted write never leaves a truncated file that looks
    # current; uncompressed, since float scores hardly compress and IJB-C has 15.7M of them
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **arrays)  # a file object: np.savez would append .npz to a path


def load_ijb_scores(run_dir: str | os.PathLike) -> PairScores:
    """The scores `compute_ijb_scores` wrote for the run in ``run_dir`` (float32, as evaluate_ijb scores them)."""
    with np.load(Path(run_dir) / IJB_SCORES_FILE, allow_pickle=False) as data:
        return PairScores(str(data["target"]), data["scores"], data["labels"].astype(bool))
