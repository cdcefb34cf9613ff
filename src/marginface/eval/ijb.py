"""IJB-B / IJB-C evaluation: meta files, aligned per-image features with the N/D/F switches, media-then-template
aggregation, 1:1 verification (TAR@FAR, AUC) and 1:N identification (rank-k, TPIR@FPIR per gallery).

Layout (formats.md A3): ``ROOT/loose_crop/<image>`` and ``ROOT/meta/<target>_face_tid_mid.txt``,
``<target>_name_5pts_score.txt``, ``<target>_template_pair_label.txt`` and, for 1:N, the gallery/probe CSVs.
Scoring uses the structure of the pair list: one matrix product between the unique templates of the first
and of the second column, then a gather of the listed pairs.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marginface.errors import ConfigError, DataFormatError
from marginface.eval.metrics import DEFAULT_FARS, auc, cmc, rank_k, tar_at_far, tpir_at_fpir
from marginface.eval.verification import supported_fars

__all__ = [
    "IJBMeta",
    "combine_image_features",
    "evaluate_ijb",
    "ijb_identification",
    "ijb_image_features",
    "ijb_verification",
    "pair_refiner",
    "read_ijb_meta",
    "score_template_pairs",
    "template_features",
]

TARGETS = {"IJBB": "ijbb", "IJBC": "ijbc"}
GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


@dataclass
class IJBMeta:
    """The parsed meta files of one IJB target (arrays in the order of the image lists)."""

    root: Path
    target: str
    image_names: list[str]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float64 [N, 5, 2], pixel (x, y) in the loose crop
    faceness: np.ndarray  # float32 [N]
    pairs: np.ndarray  # int64 [M, 2] template ids
    labels: np.ndarray  # bool [M]
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (tids, sids)
    probes: tuple[np.ndarray, np.ndarray] | None = None


# ---------------------------------------------------------------------------------------------------------
# Meta files
# ---------------------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing IJB meta file") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not a text file ({exc})") from None


def _table(path: Path, columns: Sequence[str]) -> list[list[str]]:
    """Space-separated rows with exactly ``len(columns)`` tokens; blank lines are skipped."""
    rows = []
    for number, line in enumerate(_lines(path), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != len(columns):
            raise DataFormatError(
                f"{path}:{number}: expected {len(columns)} columns ({' '.join(columns)}), got {len(tokens)}: {line!r}"
            )
        rows.append(tokens)
    if not rows:
        raise DataFormatError(f"{path}: no rows; expected lines of {' '.join(columns)}")
    return rows


def _numbers(path: Path, rows: list[list[str]], col: slice | int, dtype: type, what: str) -> np.ndarray:
    values = [r[col] for r in rows]
    try:
        return np.array(values, dtype=dtype)
    except ValueError:
        for number, r in enumerate(rows, 1):
            cells = r[col] if isinstance(r[col], list) else [r[col]]
            for cell in cells:
                try:
                    dtype(cell)
                except ValueError:
                    raise DataFormatError(f"{path}: row {number}: {what} {cell!r} is not a number") from None
        raise


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``t1 t2 label`` lines, parsed in C (15.7M lines for IJB-C); a slow scan names the first bad line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing IJB meta file") from None
    values = None
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")  # whitespace, newlines included
    except ValueError:
        values = None
    if values is None or values.size % 3:
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            tokens = line.split()
            if tokens and (len(tokens) != 3 or not all(t.lstrip("-").isdigit() for t in tokens)):
                raise DataFormatError(
                    f"{path}:{number}: expected 3 integer columns (template_id_1 template_id_2 label), got {line!r}"
                )
        raise DataFormatError(f"{path}: cannot parse the template pair list")
    table = values.reshape(-1, 3)
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise DataFormatError(f"{path}:{bad[0] + 1}: label must be 0 or 1, got {table[bad[0], 2]}")
    if table.shape[0] == 0:
        raise DataFormatError(f"{path}: no template pairs")
    return table[:, :2].copy(), table[:, 2].astype(bool)


def _read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Gallery/probe CSV (header row; TEMPLATE_ID, SUBJECT_ID first): unique templates and their subjects."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing IJB 1:N file") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or len(header) < 2:
        raise DataFormatError(f"{path}: expected a header row TEMPLATE_ID,SUBJECT_ID,...")
    subject_of: dict[int, int] = {}
    for number, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) < 2:
            raise DataFormatError(f"{path}:{number}: expected at least 2 columns (TEMPLATE_ID, SUBJECT_ID), got {row}")
        try:
            tid, sid = int(row[0]), int(row[1])
        except ValueError:
            raise DataFormatError(
                f"{path}:{number}: TEMPLATE_ID and SUBJECT_ID must be integers, got {row[:2]}"
            ) from None
        if subject_of.setdefault(tid, sid) != sid:
            raise DataFormatError(
                f"{path}:{number}: template {tid} belongs to subject {subject_of[tid]} and to subject {sid}"
            )
    if not subject_of:
        raise DataFormatError(f"{path}: no templates")
    tids = np.fromiter(subject_of.keys(), dtype=np.int64, count=len(subject_of))
    sids = np.fromiter(subject_of.values(), dtype=np.int64, count=len(subject_of))
    return tids, sids


def _meta_dir(root: Path, target: str) -> Path:
    for candidate in (root / "meta", root / target / "meta"):
        if candidate.is_dir():
            return candidate
    raise DataFormatError(f"{root}: no meta/ directory (expected {root / 'meta'} with the {target} meta files)")


def _check_known(templates_known: np.ndarray, ids: np.ndarray, source: str) -> None:
    """Every template named in ``ids`` (rows of a list file) must have images in the tid/mid table."""
    missing = ~np.isin(ids, templates_known)
    if missing.any():
        first = int(np.flatnonzero(missing.reshape(-1))[0])
        row = first // (ids.shape[1] if ids.ndim == 2 else 1)
        raise DataFormatError(
            f"{source}: template {int(ids.reshape(-1)[first])} (entry {row + 1}) has no images in the "
            f"face_tid_mid table; expected every listed template to have at least one image "
            f"({int(missing.sum())} such entries)"
        )


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC", *, one_to_n: bool = True) -> IJBMeta:
    """Read and cross-check the IJB meta files of ``target`` ("IJBB" or "IJBC") under ``root``.

    Errors name the file and line and say what was expected; every template of the pair list and of the
    1:N lists must have at least one image. ``one_to_n=False`` skips the gallery/probe CSVs (when the
    1:N files are absent they are skipped too)."""
    target = str(target).upper()
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    root = Path(root)
    prefix = TARGETS[target]
    meta = _meta_dir(root, target)
    tid_path = meta / f"{prefix}_face_tid_mid.txt"
    rows = _table(tid_path, ("img_name", "template_id", "media_id"))
    names = [r[0] for r in rows]
    templates = _numbers(tid_path, rows, 1, np.int64, "template_id")
    medias = _numbers(tid_path, rows, 2, np.int64, "media_id")

    lmk_path = meta / f"{prefix}_name_5pts_score.txt"
    columns = ("img_name", *(f"{a}{i}" for i in range(1, 6) for a in "xy"), "faceness")
    lmk_rows = _table(lmk_path, columns)
    if len(lmk_rows) != len(rows):
        raise DataFormatError(
            f"{lmk_path}: {len(lmk_rows)} rows, expected one per image of {tid_path.name} ({len(rows)})"
        )
    for number, (a, b) in enumerate(zip(names, (r[0] for r in lmk_rows), strict=True), 1):
        if a != b:
            raise DataFormatError(f"{lmk_path}:{number}: image {b!r}, expected {a!r} (same order as {tid_path.name})")
    numbers = _numbers(lmk_path, lmk_rows, slice(1, 12), np.float64, "value")
    landmarks = numbers[:, :10].reshape(-1, 5, 2)  # float64: alignment is sensitive to rounding
    faceness = numbers[:, 10].astype(np.float32)

    pair_path = meta / f"{prefix}_template_pair_label.txt"
    pairs, labels = _read_pairs(pair_path)
    known = np.unique(templates)
    _check_known(known, pairs, str(pair_path))
    result = IJBMeta(root, target, names, templates, medias, landmarks, faceness, pairs, labels)

    if one_to_n:
        g_names = GALLERIES[target]
        paths = {g: meta / f"{prefix}_1N_gallery_{g}.csv" for g in g_names}
        probe_path = meta / f"{prefix}_1N_probe_mixed.csv"
        if all(p.exists() for p in (*paths.values(), probe_path)):
            for g, p in paths.items():
                tids, sids = _read_1n_csv(p)
                _check_known(known, tids, str(p))
                result.galleries[g] = (tids, sids)
            tids, sids = _read_1n_csv(probe_path)
            _check_known(known, tids, str(probe_path))
            result.probes = (tids, sids)
    return result


# ---------------------------------------------------------------------------------------------------------
# Per-image features
# ---------------------------------------------------------------------------------------------------------


def _read_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: image listed in the IJB meta files is missing") from None
    if data[:3] == b"\xff\xd8\xff":
        try:
            import simplejpeg

            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except Exception:
            pass
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot decode image ({exc})") from None


def _default_align() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    try:
        from marginface.data.align import align
    except ImportError as exc:
        raise ConfigError("marginface.data.align is not available; pass align= (a callable or False)") from exc
    return lambda image, landmarks: align(image, landmarks, size=112)


def ijb_image_features(
    model: object,
    meta: IJBMeta,
    *,
    align: Callable[[np.ndarray, np.ndarray], np.ndarray] | bool | None = None,
    batch_size: int = 64,
    flip: bool = True,
    device: object = None,
    chunk: int = 1024,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw features of every image (original, and flipped when ``flip``), each float32 [N, D].

    ``model`` is a torch module (run by `embed_images_separate`) or a callable mapping uint8 [n, 112, 112, 3]
    RGB to [n, D] features. Loose crops are aligned from their 5 landmarks by ``align`` (default
    ``marginface.data.align`` to 112x112; ``False`` means the crops are aligned already). Reading and
    aligning run on ``workers`` threads (default: the CPU count; decoding and the warp release the GIL
    for most of their time), ``chunk`` images at a time. ``progress`` shows a bar of the images on stderr."""
    if align is None or align is True:
        align_fn = _default_align()
    elif align is False:
        align_fn = None
    else:
        align_fn = align
    crop_dir = meta.root / "loose_crop"
    if not crop_dir.is_dir() and (meta.root / meta.target / "loose_crop").is_dir():
        crop_dir = meta.root / meta.target / "loose_crop"

    def load(i: int) -> np.ndarray:
        image = _read_image(crop_dir / meta.image_names[i])
        image = align_fn(image, meta.landmarks[i]) if align_fn is not None else image
        if image.shape != (112, 112, 3):
            raise DataFormatError(
                f"{crop_dir / meta.image_names[i]}: aligned crop has shape {image.shape}, expected (112, 112, 3)"
            )
        return image

    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    originals, flipped = [], []
    bar = _progress_bar(len(meta.image_names), f"{meta.target} images", "img") if progress else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(meta.image_names), chunk):
            batch = np.stack(list(pool.map(load, range(start, min(start + chunk, len(meta.image_names))))))
            orig, flip_feats = _run(model, batch, batch_size, flip, device)
            originals.append(orig)
            if flip_feats is not None:
                flipped.append(flip_feats)
            if bar is not None:
                bar.update(batch.shape[0])
    if bar is not None:
        bar.close()
    return np.concatenate(originals), (np.concatenate(flipped) if flip else None)


def _progress_bar(total: int, desc: str, unit: str) -> object:
    # eval/embed.py's bar; it imports torch, which only a progress bar on precomputed features pays for
    from marginface.eval.embed import progress_bar

    return progress_bar(total, desc, unit)


def _run(model, images, batch_size, flip, device):
    # a torch module cannot exist unless torch is imported: do not pay torch's import for a plain callable
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from marginface.eval.embed import embed_images_separate

        return embed_images_separate(model, images, batch_size=batch_size, flip=flip, device=device)
    if not callable(model):
        raise ConfigError(f"model must be a torch module or a callable on uint8 images, got {type(model).__name__}")
    orig = np.asarray(model(images), dtype=np.float32)
    flipped = np.asarray(model(np.ascontiguousarray(images[:, :, ::-1])), dtype=np.float32) if flip else None
    return orig, flipped


def combine_image_features(
    original: np.ndarray,
    flipped: np.ndarray | None = None,
    faceness: np.ndarray | None = None,
    *,
    norm: bool = True,
    detector: bool = True,
    flip: bool = True,
) -> np.ndarray:
    """Apply the N/D/F switches of eval_ijbc.py, in its order: F1 sums the original and flipped features
    (F0 uses the original only), N1 keeps the raw norm (N0 L2-normalises each image feature), D1 multiplies
    by the detector's faceness score. Returns float32 [N, D]."""
    feats = np.asarray(original, dtype=np.float32)
    if flip:
        if flipped is None:
            raise ConfigError("flip=True (F1) needs the flipped features")
        feats = feats + np.asarray(flipped, dtype=np.float32)
    if not norm:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if detector:
        if faceness is None:
            raise ConfigError("detector=True (D1) needs the faceness scores")
        feats = feats * np.asarray(faceness, dtype=np.float32)[:, None]
    return feats


# ---------------------------------------------------------------------------------------------------------
# Templates and scoring
# ---------------------------------------------------------------------------------------------------------


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray, *, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Template features: within a template, average the images of each media, sum the media means, then
    L2-normalise. Returns ``(template_ids sorted, features [T, D] of dtype)``; sums are in float64.

    Vectorised: one lexsort by (template, media) gives every image the weight 1/|its media|. Templates are
    then ranked by size, and step k adds the k-th image of every template that has more than k images, as
    one gather + multiply + add over a contiguous prefix of the accumulator: as many steps as the largest
    template has images, O(N * D) work, no per-template Python loop. (Row-wise ``np.add.reduceat``,
    ``np.cumsum`` and ``np.add.at`` on [N, 512] arrays, and a block-sparse matrix product, are all several
    times slower.)"""
    features = np.asarray(features)
    if not np.issubdtype(features.dtype, np.floating):
        features = features.astype(np.float32)
    templates = np.asarray(templates, dtype=np.int64).reshape(-1)
    medias = np.asarray(medias, dtype=np.int64).reshape(-1)
    n = features.shape[0]
    if features.ndim != 2 or templates.size != n or medias.size != n or n == 0:
        raise ConfigError(
            f"features [N, D], templates [N] and medias [N] must agree, got {features.shape}, "
            f"{templates.shape}, {medias.shape}"
        )
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    new_template = np.r_[True, t_sorted[1:] != t_sorted[:-1]]
    new_media = new_template | np.r_[True, m_sorted[1:] != m_sorted[:-1]]
    media_starts = np.flatnonzero(new_media)
    media_sizes = np.diff(np.r_[media_starts, n])
    # per sorted image: 1 / images in its media (in the features' precision: the sums stay float64)
    weight = np.repeat(1.0 / media_sizes, media_sizes).astype(features.dtype)[:, None]
    template_starts = np.flatnonzero(new_template)
    template_ids = t_sorted[template_starts]
    sizes = np.diff(np.r_[template_starts, n])
    by_size = np.argsort(-sizes, kind="stable")
    starts, sizes = template_starts[by_size], sizes[by_size]
    # active[k] = number of templates with more than k images (a prefix, since sizes are decreasing)
    active = np.searchsorted(-sizes, -np.arange(1, int(sizes[0]) + 1), side="right")
    dim = features.shape[1]
    acc = np.zeros((starts.size, dim), dtype=np.float64)
    # reused buffers: fresh large temporaries in every step cost more in page faults than the arithmetic
    rows = np.empty((starts.size, dim), dtype=features.dtype)
    for k, m in enumerate(active):  # steps = images in the largest template
        position = starts[:m] + k
        np.take(features, order[position], axis=0, out=rows[:m])
        rows[:m] *= weight[position]
        acc[:m] += rows[:m]
    acc /= np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
    out = np.empty((starts.size, dim), dtype=dtype)
    out[by_size] = acc
    return template_ids, out


def _row_lookup(template_ids: np.ndarray, ids: np.ndarray, source: str) -> np.ndarray:
    """Row of each id in ``template_ids``, through an O(N) table when ids are small (no sort of 15M ids)."""
    template_ids = np.asarray(template_ids, dtype=np.int64)
    lo = min(int(template_ids.min()), int(ids.min()))
    hi = max(int(template_ids.max()), int(ids.max()))
    if lo >= 0 and hi < 1 << 27:
        table = np.full(hi + 1, -1, dtype=np.int32)
        table[template_ids] = np.arange(template_ids.size, dtype=np.int32)
        rows = table[ids]
    else:
        order = np.argsort(template_ids)
        pos = np.clip(np.searchsorted(template_ids, ids, sorter=order), 0, template_ids.size - 1)
        rows = np.where(template_ids[order[pos]] == ids, order[pos], -1).astype(np.int32)
    if (rows < 0).any():
        first = int(np.flatnonzero(rows.reshape(-1) < 0)[0])
        raise DataFormatError(f"{source}: template {int(ids.reshape(-1)[first])} has no template feature")
    return rows


def _column_index(ids: np.ndarray) -> tuple[np.ndarray, Callable[[slice], np.ndarray]]:
    """Unique ids of one pair column (sorted) and a function giving the pairs' positions among them for a
    slice of the column: an O(N) mark table when the ids are small non-negative integers (as IJB's are),
    a sort otherwise."""
    ids = np.asarray(ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < 1 << 27:
        mark = np.zeros(hi + 1, dtype=bool)
        mark[ids] = True
        unique = np.flatnonzero(mark)
        table = np.zeros(hi + 1, dtype=np.int32)
        table[unique] = np.arange(unique.size, dtype=np.int32)
        return unique, lambda part: table[ids[part]]
    unique, positions = np.unique(ids, return_inverse=True)
    positions = positions.astype(np.int64).reshape(-1)
    return unique, lambda part: positions[part]


def score_template_pairs(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    pairs: np.ndarray,
    *,
    max_block_elements: int = 1 << 28,
) -> np.ndarray:
    """Dot product of the template features of each pair ``[M, 2]`` (template ids), float32 [M].

    Uses the structure of the list: the unique templates of column 1 (U1) and of column 2 (U2) give one
    U1 x U2 matrix product, from which the pairs are gathered. When U1 x U2 exceeds
    ``max_block_elements`` (default 2^28, 1 GiB of float32) the product is done in row blocks (pairs
    bucketed by block), so memory stays bounded whatever the structure."""
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ConfigError(f"pairs must be [M, 2] template ids, got shape {pairs.shape}")
    feats = np.ascontiguousarray(template_feats, dtype=np.float32)
    m = pairs.shape[0]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        (u1, pos1_of), (u2, pos2_of) = pool.map(_column_index, (pairs[:, 0], pairs[:, 1]))
        left = feats[_row_lookup(template_ids, u1, "pairs column 1")]
        right = feats[_row_lookup(template_ids, u2, "pairs column 2")].T  # BLAS reads the transpose in place
        n2 = u2.size
        if u1.size * n2 <= max_block_elements:
            product = left @ right
            flat_product = product.reshape(-1)
            wide = u1.size * n2 >= 1 << 31
            scores = np.empty(m, dtype=np.float32)

            def gather(part: slice) -> None:
                # position lookups and the gather release the GIL: slices of pairs run on the thread pool
                flat = pos1_of(part).astype(np.int64) * n2 if wide else pos1_of(part) * np.int32(n2)
                flat += pos2_of(part)
                np.take(flat_product, flat, out=scores[part])

            list(pool.map(gather, [slice(i, i + (1 << 20)) for i in range(0, m, 1 << 20)]))
            return scores
    pos1, pos2 = pos1_of(slice(None)), pos2_of(slice(None))
    block = max(1, max_block_elements // n2)
    bucket = (pos1 // block).astype(np.int32)
    order = np.argsort(bucket, kind="stable")
    edges = np.searchsorted(bucket[order], np.arange(0, (u1.size + block - 1) // block + 1))
    scores = np.empty(pairs.shape[0], dtype=np.float32)
    for b in range(edges.size - 1):  # a handful of row blocks
        idx = order[edges[b] : edges[b + 1]]
        if idx.size == 0:
            continue
        product = left[b * block : (b + 1) * block] @ right
        scores[idx] = product.reshape(-1).take((pos1[idx] - b * block).astype(np.int64) * n2 + pos2[idx])
    return scores


def pair_refiner(
    template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """A ``refine`` callable for `tar_at_far`: float64 dot products of the template features of the
    selected pairs (given by index into ``pairs``)."""
    feats64 = np.asarray(template_feats, dtype=np.float64)

    def exact(index: np.ndarray) -> np.ndarray:
        chosen = pairs[index]
        rows1 = _row_lookup(template_ids, chosen[:, 0], "pairs column 1")
        rows2 = _row_lookup(template_ids, chosen[:, 1], "pairs column 2")
        out = np.empty(index.size, dtype=np.float64)
        for start in range(0, index.size, 4096):  # small blocks: no large fresh temporaries
            part = slice(start, start + 4096)
            out[part] = np.einsum("ij,ij->i", feats64[rows1[part]], feats64[rows2[part]])
        return out

    return exact


def ijb_verification(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    pairs: np.ndarray,
    labels: np.ndarray,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
    rule: str = "nearest",
    refine: bool = True,
) -> dict:
    """1:1 verification: ``{"tar_at_far": {far: tar}, "auc": float, "scores": float32 [M]}``.

    Scores come from one float32 matrix product (`score_template_pairs`); with ``refine`` (default) the
    few pairs near each decision threshold are recomputed in float64 from ``template_feats`` (pass float64
    features for a float64-exact table), so the table equals that of float64 scores.
    ``rule="nearest"`` (default) reproduces eval_ijbc.py's table (sklearn ROC, nearest FPR); ``"floor"``
    never exceeds the target FAR (see `tar_at_far`)."""
    scores = score_template_pairs(template_ids, template_feats, pairs)
    labels = np.asarray(labels, dtype=bool)
    refiner = pair_refiner(template_ids, template_feats, np.asarray(pairs)) if refine else None
    return {
        "tar_at_far": tar_at_far(scores, labels, fars, rule=rule, refine=refiner),
        "auc": auc(scores, labels),
        "scores": scores,
    }


def split_supported_levels(tars: dict[float, float], impostors: int) -> dict[str, dict[float, float]]:
    """``tar_at_far`` at the levels the impostor count supports (eval/verification.py's rule: far·N >= 10) and,
    when some requested level is not, ``tar_at_far_few_impostors`` for those (kept for comparison with
    published tables, marked as such wherever printed)."""
    supported = set(supported_fars(impostors, tars))
    out = {"tar_at_far": {far: tar for far, tar in tars.items() if far in supported}}
    few = {far: tar for far, tar in tars.items() if far not in supported}
    if few:
        out["tar_at_far_few_impostors"] = few
    return out


def ijb_identification(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    galleries: dict[str, tuple[np.ndarray, np.ndarray]],
    probes: tuple[np.ndarray, np.ndarray],
    *,
    ranks: Sequence[int] = (1, 5, 10),
    fpirs: Sequence[float] = (1e-2, 1e-1),
) -> dict:
    """1:N identification, each gallery on its own (NIST-like): probes whose subject is absent from that
    gallery are non-mated searches. Per gallery: ``rank1``/``rank5``/``rank10``, ``tpir_at_fpir``,
    ``cmc`` (ranks, rates); plus ``mean`` over the galleries."""
    feats = np.asarray(template_feats, dtype=np.float32)
    probe_tids, probe_sids = probes
    probe_feats = feats[_row_lookup(template_ids, np.asarray(probe_tids), "probe list")]
    out: dict = {}
    for name, (tids, sids) in galleries.items():
        gallery_feats = feats[_row_lookup(template_ids, np.asarray(tids), f"gallery {name}")]
        sim = probe_feats @ gallery_feats.T
        entry = {f"rank{k}": v for k, v in rank_k(sim, probe_sids, sids, ks=ranks).items()}
        mated = np.isin(probe_sids, sids)
        entry["tpir_at_fpir"] = tpir_at_fpir(sim, probe_sids, sids, fpirs) if (~mated).any() else {}
        entry["cmc"] = cmc(sim, probe_sids, sids, max_rank=min(sim.shape[1], 100))
        entry["mated_probes"] = int(mated.sum())
        entry["nonmated_probes"] = int((~mated).sum())
        out[name] = entry
    if out:
        keys = [f"rank{k}" for k in ranks]
        mean = {k: float(np.mean([out[g][k] for g in galleries])) for k in keys}
        if all(out[g]["tpir_at_fpir"] for g in galleries):
            mean["tpir_at_fpir"] = {x: float(np.mean([out[g]["tpir_at_fpir"][x] for g in galleries])) for x in fpirs}
        out["mean"] = mean
    return out


def evaluate_ijb(
    model_or_features: object,
    root: str | os.PathLike,
    target: str = "IJBC",
    *,
    norm: bool = True,
    detector: bool = True,
    flip: bool = True,
    align: Callable[[np.ndarray, np.ndarray], np.ndarray] | bool | None = None,
    batch_size: int = 64,
    device: object = None,
    fars: Sequence[float] = DEFAULT_FARS,
    far_rule: str = "nearest",
    one_to_n: bool = True,
    return_scores: bool = False,
    return_norms: bool = False,
    progress: bool = False,
) -> dict:
    """Evaluate on IJB-B/IJB-C end to end.

    ``model_or_features``: a torch module or a callable on uint8 aligned crops (images are read and
    aligned here), or precomputed per-image features in the meta order: an array [N, D] (already fused;
    then ``flip`` is ignored), [N, 2, D] (original, flipped) or a tuple ``(original, flipped)``. The
    switches ``norm``/``detector``/``flip`` are N1/D1/F1 of eval_ijbc.py (its defaults: all on).
    Returns ``mode`` (e.g. "N1D1F1"), counts, ``tar_at_far``, ``auc``, and ``identification`` per gallery
    when the 1:N files exist; ``scores``/``labels`` too with ``return_scores``, and with ``return_norms``
    ``image_names`` (the meta order) and ``norms``, float32 [N]: the L2 norm of each image's original feature
    before any normalisation (MagFace's quality score; of the fused rows when fused features are passed).
    ``progress`` shows bars on
    stderr: one over the images embedded, one over the scoring stages (templates, 1:1, 1:N)."""
    meta = read_ijb_meta(root, target, one_to_n=one_to_n)
    flipped = None
    if isinstance(model_or_features, tuple):
        original, flipped = (np.asarray(a) for a in model_or_features)
    elif isinstance(model_or_features, np.ndarray):
        if model_or_features.ndim == 3 and model_or_features.shape[1] == 2:
            original, flipped = model_or_features[:, 0], model_or_features[:, 1]
        else:
            original, flip = model_or_features, False
    else:
        original, flipped = ijb_image_features(
            model_or_features, meta, align=align, batch_size=batch_size, flip=flip, device=device, progress=progress
        )
    if original.shape[0] != len(meta.image_names):
        raise ConfigError(f"{original.shape[0]} feature rows for {len(meta.image_names)} images in the meta files")
    image_feats = combine_image_features(
        original, flipped, meta.faceness, norm=norm, detector=detector, flip=flip and flipped is not None
    )
    identify = meta.probes is not None and bool(meta.galleries)
    # a few long steps, not a loop: the bar names the step under way (IJB-C: 15.7M pairs to score)
    stages = _progress_bar(3 if identify else 2, f"{meta.target} scoring", "step") if progress else None

    def step_done(next_step: str) -> None:
        if stages is not None:
            stages.update(1)
            stages.set_postfix_str(next_step)

    if stages is not None:
        stages.set_postfix_str("templates")
    tids, tfeats = template_features(image_feats, meta.templates, meta.medias, dtype=np.float64)
    step_done("1:1 verification")
    verification = ijb_verification(tids, tfeats, meta.pairs, meta.labels, fars=fars, rule=far_rule)
    result = {
        "target": meta.target,
        "mode": f"N{int(norm)}D{int(detector)}F{int(flip and flipped is not None)}",
        "images": len(meta.image_names),
        "templates": int(tids.size),
        "pairs": int(meta.labels.size),
        "genuine_pairs": int(meta.labels.sum()),
        "far_rule": far_rule,
        **split_supported_levels(verification["tar_at_far"], int((~meta.labels.astype(bool)).sum())),
        "auc": verification["auc"],
    }
    if identify:
        step_done("1:N identification")
        result["identification"] = ijb_identification(tids, tfeats, meta.galleries, meta.probes)
    step_done("done")
    if stages is not None:
        stages.close()
    if return_scores:
        result["scores"], result["labels"] = verification["scores"], meta.labels
    if return_norms:
        # the features already computed for scoring: the quality scores cost no second pass over the images
        result["image_names"] = list(meta.image_names)
        result["norms"] = np.linalg.norm(np.asarray(original, dtype=np.float32), axis=1)
    return result
