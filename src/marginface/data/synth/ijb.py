"""A miniature IJB-C-style tree of synthetic faces (formats.md A3): unaligned loose crops with their exact five
points, templates of several media (bursts of frames), 1:1 template pairs and 1:N galleries and probes.

File names carry the `ijbc_` prefix so that an IJB evaluator reads the tree as `--target IJBC`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginface.data.synth.render import Nuisance
from marginface.data.synth.sample import ImageSpec, _rng

IJB_SPLIT = "ijb"
IJB_STREAM = 9
TEMPLATES_PER_SUBJECT = 3  # template 0 goes to a gallery, templates 1 and 2 are probes
IMPOSTORS_PER_TEMPLATE = 3


@dataclass(frozen=True)
class IJBPicture:
    name: str  # file name under loose_crop/
    template_id: int
    media_id: int
    subject_id: int
    spec: ImageSpec


@dataclass(frozen=True)
class IJBPlan:
    pictures: list[IJBPicture]
    templates: list[tuple[int, int, int]]  # (template id, subject id, index of the subject's template)
    pairs: list[tuple[int, int, int]]  # (template 1, template 2, genuine 0/1)


def plan_ijb(seed: int, identities: int, difficulty: float) -> IJBPlan:
    """Subjects in sibling families; 3 templates each of 2-3 media, a medium being a burst of 1-3 frames."""
    rng = _rng(seed, 5)
    pictures: list[IJBPicture] = []
    templates: list[tuple[int, int, int]] = []
    media_counter = 0
    for subject in range(identities):
        family, member = divmod(subject, 2)
        subject_id = 1001 + subject
        for t in range(TEMPLATES_PER_SUBJECT):
            # Ids are not contiguous in IJB-C; mimic that so nothing relies on them being 0..T-1.
            template_id = 3 * len(templates) + 1 + int(rng.integers(3))
            templates.append((template_id, subject_id, t))
            for _ in range(int(rng.integers(2, 4))):
                media_id = 5000 + 7 * media_counter
                for frame in range(int(rng.integers(1, 4))):
                    spec = ImageSpec(IJB_SPLIT, family, member, IJB_STREAM, media_counter, difficulty,
                                     loose=True, frame=frame)
                    pictures.append(IJBPicture(f"{len(pictures) + 1}.jpg", template_id, media_id, subject_id, spec))
                media_counter += 1
    pairs: set[tuple[int, int, int]] = set()
    by_subject: dict[int, list[int]] = {}
    for tid, sid, _ in templates:
        by_subject.setdefault(sid, []).append(tid)
    for tids in by_subject.values():
        for i in range(len(tids)):
            for j in range(i + 1, len(tids)):
                pairs.add((tids[i], tids[j], 1))
    all_t = np.array([t[0] for t in templates])
    subj = {t[0]: t[1] for t in templates}
    for tid, sid, _ in templates:
        others = all_t[[subj[int(o)] != sid for o in all_t]]
        for other in rng.choice(others, size=min(IMPOSTORS_PER_TEMPLATE, len(others)), replace=False):
            a, b = sorted((tid, int(other)))
            pairs.add((a, b, 0))
    ordered = sorted(pairs)
    order = rng.permutation(len(ordered))
    return IJBPlan(pictures, templates, [ordered[i] for i in order])


def faceness(nz: Nuisance, rng_value: float) -> float:
    """A coarse detector score in [0.5, 1]: lower for turned, occluded or degraded pictures."""
    score = 1.0 - 0.45 * abs(nz.yaw) - 0.15 * (nz.occluder is not None) - 0.05 * nz.blur - 0.1 * rng_value
    return float(np.clip(score, 0.5, 1.0))


def write_ijb(root: str | os.PathLike, plan: IJBPlan, rendered: list[tuple[bytes, np.ndarray, Nuisance]],
              seed: int) -> Path:
    """Write `loose_crop/*.jpg` and `meta/ijbc_*` under `root` (a fresh directory) and return `root`."""
    root = Path(root)
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, 6)
    tid_lines, pts_lines = [], []
    for pic, (jpeg, landmarks, nz) in zip(plan.pictures, rendered, strict=True):
        (crops / pic.name).write_bytes(jpeg)
        tid_lines.append(f"{pic.name} {pic.template_id} {pic.media_id}\n")
        pts = " ".join(f"{v:.3f}" for v in landmarks.reshape(-1))
        pts_lines.append(f"{pic.name} {pts} {faceness(nz, rng.uniform()):.3f}\n")
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(tid_lines), encoding="ascii")
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(pts_lines), encoding="ascii")
    (meta / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {label}\n" for a, b, label in plan.pairs), encoding="ascii")

    files_of: dict[int, list[str]] = {}
    for pic in plan.pictures:
        files_of.setdefault(pic.template_id, []).append(pic.name)
    subjects = sorted({sid for _, sid, _ in plan.templates})
    half = set(subjects[: (len(subjects) + 1) // 2])
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    g1, g2, probe = [header], [header], [header]
    for tid, sid, t in plan.templates:
        target = (g1 if sid in half else g2) if t == 0 else probe
        target.extend(f"{tid},{sid},loose_crop/{name}\n" for name in files_of[tid])
    (meta / "ijbc_1N_gallery_G1.csv").write_text("".join(g1), encoding="ascii")
    (meta / "ijbc_1N_gallery_G2.csv").write_text("".join(g2), encoding="ascii")
    (meta / "ijbc_1N_probe_mixed.csv").write_text("".join(probe), encoding="ascii")
    return root
