"""Verification and identification metrics on similarity scores: the 10-fold pair protocol, ROC, AUC, EER,
TAR@FAR, VAL@FAR, XNorm, CMC and TPIR@FPIR, all vectorised with sorting, cumulative counts and searchsorted.

Convention: a *score* is a similarity, higher means "same identity" (cosine of L2-normalised embeddings).
The insightface pair protocol works on the squared distance of L2-normalised embeddings, which is
``dist = ||e1 - e2||^2 = 2 - 2 * cos``; `kfold_accuracy` and `val_at_far` convert with that identity, or
take distances directly with ``distance=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from marginface.errors import ConfigError

__all__ = [
    "DEFAULT_FARS",
    "auc",
    "cmc",
    "eer",
    "kfold_accuracy",
    "pair_scores",
    "rank_k",
    "roc_curve",
    "tar_at_far",
    "tpir_at_fpir",
    "val_at_far",
    "xnorm",
]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface verification.py grid on squared distance
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def _as_1d(name: str, values: object, dtype: type | None = None) -> np.ndarray:
    array = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _scores_and_labels(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_1d("scores", scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    labels = _as_1d("labels", labels)
    if labels.shape != scores.shape:
        raise ConfigError(f"scores and labels must have the same length, got {scores.shape[0]} and {labels.shape[0]}")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ConfigError("labels must be booleans or 0/1 (1 = same identity)")
        labels = labels.astype(bool)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ConfigError(f"scores must be finite; score {bad} is {scores[bad]}")
    return scores, labels


def pair_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of consecutive rows (2k, 2k+1) of ``embeddings`` [2P, D], after L2 normalisation."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ConfigError(f"embeddings must be [2P, D] with an even number of rows, got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    return np.einsum("ij,ij->i", emb[0::2], emb[1::2])


def xnorm(embeddings: np.ndarray) -> float:
    """Mean L2 norm of raw (unnormalised) embeddings [N, D], as insightface's XNorm log line."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ConfigError(f"embeddings must be [N, D], got shape {emb.shape}")
    return float(np.linalg.norm(emb, axis=1).mean())


# ----------------------------------------------------------------------------------------------------------
# 10-fold pair protocol
# ----------------------------------------------------------------------------------------------------------


def _distances(scores: object, issame: object, distance: bool) -> tuple[np.ndarray, np.ndarray]:
    values, labels = _scores_and_labels(scores, issame)
    values = values.astype(np.float64)
    return (values if distance else 2.0 - 2.0 * values), labels


def _fold_slices(n: int, folds: int) -> list[slice]:
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if n < folds:
        raise ConfigError(f"need at least folds={folds} pairs, got {n}")
    # sklearn KFold(shuffle=False): contiguous blocks, the first n % folds blocks one longer.
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def _below_counts(dist: np.ndarray, labels: np.ndarray, slices: list[slice], thresholds: np.ndarray):
    """Per fold and threshold: how many same / different pairs have ``dist < threshold`` (strict)."""
    folds = len(slices)
    same_below = np.empty((folds, thresholds.size), dtype=np.int64)
    diff_below = np.empty((folds, thresholds.size), dtype=np.int64)
    same_total = np.empty(folds, dtype=np.int64)
    diff_total = np.empty(folds, dtype=np.int64)
    for f, sl in enumerate(slices):  # a loop over the 10 folds; pairs and thresholds are vectorised
        d, y = dist[sl], labels[sl]
        same, diff = np.sort(d[y]), np.sort(d[~y])
        same_below[f] = np.searchsorted(same, thresholds, side="left")
        diff_below[f] = np.searchsorted(diff, thresholds, side="left")
        same_total[f], diff_total[f] = same.size, diff.size
    return same_below, diff_below, same_total, diff_total


def kfold_accuracy(
    scores: object,
    issame: object,
    folds: int = 10,
    *,
    distance: bool = False,
    thresholds: np.ndarray | None = None,
    far_target: float = 1e-3,
) -> dict:
    """The insightface 10-fold verification protocol, vectorised; numbers equal its threshold loops.

    ``scores`` are cosine similarities of L2-normalised embeddings (``distance=False``, converted to
    ``dist = 2 - 2*cos``) or squared L2 distances (``distance=True``). A pair is predicted "same" when
    ``dist < threshold`` (strict). Folds are contiguous blocks (KFold without shuffle). For each fold the
    threshold is the *first* grid value (``np.arange(0, 4, 0.01)`` unless given) that maximises the accuracy
    on the other folds; the fold's accuracy is measured with it. Also returns the fold-averaged ROC
    (``tpr``, ``fpr`` on the grid) and VAL@FAR (see `val_at_far`).

    Returns a dict: ``accuracy`` (mean over folds), ``std`` (np.std, ddof=0), ``threshold`` (mean of the
    fold thresholds, squared-distance units), ``threshold_cosine`` (the same as a cosine, ``1 - t/2``),
    ``fold_accuracies``, ``fold_thresholds``, ``tpr``, ``fpr``, ``thresholds``, ``val``, ``val_std``, ``far``.
    """
    dist, labels = _distances(scores, issame, distance)
    grid = ACCURACY_THRESHOLDS if thresholds is None else _as_1d("thresholds", thresholds, np.float64)
    slices = _fold_slices(dist.size, folds)
    same_below, diff_below, same_total, diff_total = _below_counts(dist, labels, slices, grid)
    # correct = true accepts (same, below) + true rejects (different, not below)
    correct = same_below + (diff_total[:, None] - diff_below)
    train_correct = correct.sum(axis=0, keepdims=True) - correct
    best = np.argmax(train_correct, axis=1)  # first maximum, as np.argmax in the reference loop
    fold_sizes = np.array([sl.stop - sl.start for sl in slices])
    fold_acc = correct[np.arange(len(slices)), best] / fold_sizes
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(same_total[:, None] > 0, same_below / np.maximum(same_total[:, None], 1), 0.0)
        fpr = np.where(diff_total[:, None] > 0, diff_below / np.maximum(diff_total[:, None], 1), 0.0)
    val = val_at_far(dist, labels, far_target, folds=folds, distance=True)
    fold_thr = grid[best]
    return {
        "accuracy": float(np.mean(fold_acc)),
        "std": float(np.std(fold_acc)),
        "threshold": float(np.mean(fold_thr)),
        "threshold_cosine": float(1.0 - np.mean(fold_thr) / 2.0),
        "fold_accuracies": fold_acc,
        "fold_thresholds": fold_thr,
        "tpr": tpr.mean(axis=0),
        "fpr": fpr.mean(axis=0),
        "thresholds": grid,
        "val": val["val"],
        "val_std": val["val_std"],
        "far": val["far"],
    }


def val_at_far(
    scores: object,
    issame: object,
    far_target: float = 1e-3,
    folds: int = 10,
    *,
    distance: bool = False,
    thresholds: np.ndarray | None = None,
) -> dict:
    """VAL (true-accept rate) at a target FAR with the insightface 10-fold protocol.

    For each fold, the threshold is chosen on the other folds by direct search (insightface interpolates
    with ``interp1d``, which is fragile on the runs of equal FAR values): the *largest* grid threshold
    (``np.arange(0, 4, 0.001)``) whose training FAR is <= ``far_target``; if no training FAR reaches the
    target at all, the threshold is 0 (insightface's fallback). VAL and FAR are then measured on the fold.
    Returns ``val`` and ``far`` (means over folds), ``val_std``, ``fold_thresholds``.
    """
    dist, labels = _distances(scores, issame, distance)
    grid = VAL_THRESHOLDS if thresholds is None else _as_1d("thresholds", thresholds, np.float64)
    slices = _fold_slices(dist.size, folds)
    same_below, diff_below, same_total, diff_total = _below_counts(dist, labels, slices, grid)
    train_diff_below = diff_below.sum(axis=0, keepdims=True) - diff_below
    train_diff_total = diff_total.sum() - diff_total
    with np.errstate(invalid="ignore", divide="ignore"):
        far_train = train_diff_below / train_diff_total[:, None]
    far_train = np.nan_to_num(far_train, nan=0.0)
    # far_train is non-decreasing along the grid: the last index with far <= target
    below = (far_train <= far_target).sum(axis=1) - 1
    reachable = far_train.max(axis=1) >= far_target
    idx = np.where(reachable & (below >= 0), below, -1)
    thr = np.where(idx >= 0, grid[np.maximum(idx, 0)], 0.0)
    # counts at the chosen thresholds on the test fold: recount exactly (thr=0 may lie off the grid)
    val = np.empty(len(slices))
    far = np.empty(len(slices))
    for f, sl in enumerate(slices):
        d, y = dist[sl], labels[sl]
        accepted = d < thr[f]
        val[f] = (accepted & y).sum() / same_total[f] if same_total[f] else 0.0
        far[f] = (accepted & ~y).sum() / diff_total[f] if diff_total[f] else 0.0
    return {
        "val": float(val.mean()),
        "val_std": float(val.std()),
        "far": float(far.mean()),
        "fold_thresholds": thr,
    }


# ----------------------------------------------------------------------------------------------------------
# ROC, AUC, EER, TAR@FAR
# ----------------------------------------------------------------------------------------------------------


def _roc_counts(scores: np.ndarray, labels: np.ndarray):
    """Cumulative (fps, tps) at each distinct score, scores taken in decreasing order (sklearn's layout)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order]
    distinct = np.flatnonzero(np.diff(s)) if s.size > 1 else np.empty(0, dtype=np.int64)
    last = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = 1 + last - tps
    return fps, tps, s[last]


def _drop_intermediate(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Indices sklearn keeps with ``drop_intermediate=True`` (corners of the ROC staircase)."""
    if fps.size <= 2:
        return np.arange(fps.size)
    corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
    return np.flatnonzero(np.r_[True, corner, True])


def roc_curve(scores: object, labels: object, drop_intermediate: bool = True):
    """ROC as ``(fpr, tpr, thresholds)``, identical to ``sklearn.metrics.roc_curve`` (same points, first
    threshold ``inf``); a point means "accept when score >= threshold"."""
    scores, labels = _scores_and_labels(scores, labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(f"roc_curve needs both genuine and impostor pairs, got {n_pos} and {n_neg}")
    fps, tps, thr = _roc_counts(scores, labels)
    if drop_intermediate:
        keep = _drop_intermediate(fps, tps)
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thr = np.r_[np.inf, thr.astype(np.float64)]
    return fps / fps[-1], tps / tps[-1], thr


def threshold_at_far(impostor_scores: object, far: float) -> float:
    """The smallest cosine threshold at which at most ``far`` of the impostor scores are accepted
    (``score >= threshold``): just above the impostor score ranked ⌊far·N⌋ + 1 from the top."""
    impostor = _as_1d("impostor_scores", impostor_scores, np.float64)
    if impostor.size == 0:
        raise ConfigError("threshold_at_far needs impostor scores, got none")
    if not 0.0 < far < 1.0:
        raise ConfigError(f"far={far} is invalid: expected a false accept rate in (0, 1)")
    accepted = int(np.floor(far * impostor.size * (1 + 1e-12)))  # the slack keeps 1e-3 · 10,000 at 10
    rejected_top = np.partition(impostor, impostor.size - 1 - accepted)[impostor.size - 1 - accepted]
    return float(np.nextafter(rejected_top, np.inf))


def auc(scores_or_fpr: object, labels_or_tpr: object) -> float:
    """Area under the ROC curve.

    Given ``(fpr, tpr)`` float arrays it integrates with the trapezoid rule (as ``sklearn.metrics.auc``).
    Given ``(scores, labels)`` (labels boolean or 0/1 integers) it computes the Mann-Whitney statistic
    P(genuine > impostor) + P(tie)/2, which is the same number, with two binary searches of the impostor
    scores into the sorted genuine scores instead of a full sort: fast on 15M IJB-C scores.
    """
    labels = np.asarray(labels_or_tpr)
    if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
        scores, labels = _scores_and_labels(scores_or_fpr, labels)
        genuine = np.sort(scores[labels])
        impostor = scores[~labels]
        if genuine.size == 0 or impostor.size == 0:
            raise ConfigError("auc needs both genuine and impostor scores")
        below = np.searchsorted(genuine, impostor, side="left")
        # ties (an impostor equal to a genuine score) are rare: count them only where they occur
        tied = genuine[np.minimum(below, genuine.size - 1)] == impostor
        ties = 0.0
        if tied.any():
            t = impostor[tied]
            ties = float((np.searchsorted(genuine, t, side="right") - below[tied]).sum())
        below_total = below.sum(dtype=np.float64)
        # pairs with genuine > impostor, plus half of the ties
        wins = genuine.size * impostor.size - below_total - ties + 0.5 * ties
        return float(wins / (genuine.size * impostor.size))
    fpr = _as_1d("fpr", scores_or_fpr, np.float64)
    tpr = _as_1d("tpr", labels, np.float64)
    if fpr.shape != tpr.shape or fpr.size < 2:
        raise ConfigError("auc needs fpr and tpr of the same length >= 2")
    area = np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr)  # noqa: NPY201
    if np.all(np.diff(fpr) <= 0):
        area = -area
    return float(area)


def eer(scores: object, labels: object) -> dict:
    """Equal error rate: where FAR equals FRR (1 - TAR) on the ROC, interpolated linearly between the two
    ROC points that bracket the crossing. Returns ``{"eer", "threshold"}`` (the threshold of the nearer
    point)."""
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.flatnonzero(gap <= 0)[0])
    if i == 0 or gap[i] == 0:
        return {"eer": float(fpr[i]), "threshold": float(thr[i])}
    # the lines fpr(a) and fnr(a) between points i-1 and i cross where the gap changes sign
    a = gap[i - 1] / (gap[i - 1] - gap[i])
    rate = fpr[i - 1] + a * (fpr[i] - fpr[i - 1])
    return {"eer": float(rate), "threshold": float(thr[i] if a >= 0.5 else thr[i - 1])}


def _fars(fars: Iterable[float] | float) -> list[float]:
    values = [float(fars)] if np.isscalar(fars) else [float(x) for x in fars]
    for x in values:
        if not 0 < x <= 1:
            raise ConfigError(f"FAR targets must lie in (0, 1], got {x}")
    return values


def _top_impostors(impostor: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` largest impostor scores in decreasing order, plus every other score tied with the smallest
    of them (so that counts at thresholds >= that value are exact). Partition + sort of the tail only."""
    n = impostor.size
    if m >= n:
        return np.sort(impostor)[::-1]
    part = np.partition(impostor, n - m)
    top, rest = part[n - m :], part[: n - m]
    ties = rest[rest == part[n - m]]
    return np.sort(np.concatenate([top, ties]))[::-1]


def tar_at_far(
    scores: object,
    labels: object,
    fars: Iterable[float] | float = DEFAULT_FARS,
    *,
    rule: str = "floor",
    refine: Callable[[np.ndarray], np.ndarray] | None = None,
    refine_tolerance: float = 1e-4,
) -> dict[float, float]:
    """True-accept rate at each target false-accept rate, ``{far: tar}``; the threshold comes from the
    impostor tail (a partition and a sort of the top ``max(far) * N`` impostor scores, no full sort).

    ``refine``: for approximate (e.g. float32) scores, a callable returning exact scores for an index
    array. Every score within ``refine_tolerance`` of the stretch of the ROC that decides a target (the
    impostor scores ranked 64 either side of ``far * N``) is recomputed, and the table is computed on the
    corrected scores; it then equals the table of exact scores whenever the approximation error is below
    the tolerance (float32 dot products of unit 512-d vectors: < 3e-5 in the worst case).

    ``rule="floor"`` (default): with N impostors, at most ``k = floor(far * N)`` may be accepted. The
    threshold is the (k+1)-th largest impostor score and a pair is accepted when ``score > threshold``
    (strict), so impostors tied with the threshold are rejected and the achieved FAR never exceeds the
    target. TAR = share of genuine scores strictly above the threshold. (``far * N >= N`` accepts all.)

    ``rule="nearest"``: insightface ``eval_ijbc.py``: on sklearn's ROC (corners only,
    ``drop_intermediate=True``), the point whose FPR is nearest the target; ties go to the larger FPR
    (then the larger TPR). It may exceed the target FAR; published IJB tables use it.
    """
    if rule not in ("floor", "nearest"):
        raise ConfigError(f"rule must be 'floor' or 'nearest', got {rule!r}")
    scores, labels = _scores_and_labels(scores, labels)
    targets = _fars(fars)
    genuine, impostor = _split_scores(scores, labels)
    n_imp, n_gen = impostor.size, genuine.size
    if n_imp == 0 or n_gen == 0:
        raise ConfigError(f"tar_at_far needs both genuine and impostor scores, got {n_gen} and {n_imp}")
    m = _tail_size(targets, n_imp, rule, refining=refine is not None)
    top = _top_impostors(impostor, m)
    if refine is not None:
        windows = _refine_windows(targets, top, genuine, n_imp, rule, refine_tolerance)
        exact = _refined_scores(scores, windows, refine)
        genuine, impostor = _split_scores(exact, labels)
        top = _refined_top(impostor, top, m, refine_tolerance)
    if rule == "floor":
        return _tar_floor(top, genuine, n_imp, targets)
    out = _tar_nearest(top, genuine, n_imp, targets)
    if out is None:  # a long collinear stretch of the ROC crosses the margin: use every impostor
        out = _tar_nearest(_top_impostors(impostor, n_imp), genuine, n_imp, targets)
    return out


def _split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores sorted ascending, impostor scores in input order)."""
    return np.sort(scores[labels]), scores[~labels]


def _tail_size(targets: list[float], n_imp: int, rule: str, *, refining: bool) -> int:
    """How many of the largest impostor scores the table needs: those every target may accept, plus a margin."""
    kmax = max(int(np.floor(x * n_imp)) for x in targets)
    # nearest: the answer lies at FPR ~ far, but sklearn drops the inner points of straight stretches of the
    # ROC, so the nearest corner can be thousands of impostors away in the bulk; a margin of 1/32 of the tail
    # costs little (the sort is of the tail anyway) and is checked by `_tar_nearest`, else widened to every
    # impostor. refine: its windows reach 64 ranks past each target (`_refine_windows`).
    margin = max(64, kmax // 32) if rule == "nearest" else (64 if refining else 1)
    return min(n_imp, kmax + margin)


def _refine_windows(
    targets: list[float], top: np.ndarray, genuine: np.ndarray, n_imp: int, rule: str, tolerance: float
) -> list[tuple[float, float]]:
    """Score intervals, widened by ``tolerance``, that decide the targets: the scores to recompute exactly."""
    n_gen = genuine.size
    windows = []
    for x in targets:
        k = int(np.floor(x * n_imp))
        if k >= n_imp:  # accepts every impostor: no threshold to get right
            continue
        high, low = top[max(0, k - 64)], top[min(top.size - 1, k + 64)]
        if rule == "nearest":
            # the corners that decide the nearest point sit at genuine scores: reach the second genuine
            # score beyond each end
            above = np.searchsorted(genuine, high, side="right") + 1
            below = np.searchsorted(genuine, low, side="left") - 2
            high = genuine[above] if above < n_gen else np.inf
            low = genuine[below] if below >= 0 else -np.inf
        windows.append((float(low) - tolerance, float(high) + tolerance))
    return windows


def _refined_scores(
    scores: np.ndarray, windows: list[tuple[float, float]], refine: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """float64 copy of ``scores`` with every score inside a window replaced by ``refine``'s exact value."""
    # one pass over the scores: merged closed windows as sorted edges, inside = odd edge count
    edges: list[float] = []
    for low, high in sorted(windows):
        if edges and low <= edges[-1]:
            edges[-1] = max(edges[-1], np.nextafter(high, np.inf))
        else:
            edges += [low, np.nextafter(high, np.inf)]
    inside = np.searchsorted(np.asarray(edges), scores, side="right") % 2 == 1
    index = np.flatnonzero(inside)
    exact = scores.astype(np.float64)
    exact[index] = np.asarray(refine(index), dtype=np.float64).reshape(-1)
    return exact


def _refined_top(impostor: np.ndarray, old_top: np.ndarray, m: int, tolerance: float) -> np.ndarray:
    """`_top_impostors` of the refined impostor scores, searched near the old tail rather than among all."""
    # scores moved by less than the tolerance, so the new top m lie above the old cutoff - tolerance
    candidates = impostor[impostor >= float(old_top[-1]) - tolerance] if m < impostor.size else impostor
    return _top_impostors(candidates if candidates.size >= m else impostor, m)


def _tar_floor(top: np.ndarray, genuine: np.ndarray, n_imp: int, targets: list[float]) -> dict[float, float]:
    """The "floor" rule: the threshold is the (k+1)-th largest impostor, k = floor(far * N); accept strictly above."""
    n_gen = genuine.size
    out = {}
    for x in targets:
        k = int(np.floor(x * n_imp))
        if k >= n_imp:
            out[x] = 1.0
            continue
        out[x] = float((n_gen - np.searchsorted(genuine, top[k], side="right")) / n_gen)
    return out


def _tar_nearest(
    top_desc: np.ndarray, genuine: np.ndarray, n_imp: int, targets: list[float]
) -> dict[float, float] | None:
    """eval_ijbc's nearest-FPR rule on the ROC prefix made of the scores >= the smallest of ``top_desc``.

    Counts at thresholds in the prefix are those of the full ROC, so the kept corners and FPR/TPR values
    equal sklearn's, except that the last prefix point's corner status depends on what follows; it is
    left out, and the answer is accepted only if every point beyond the prefix is farther than the chosen
    one. Returns None when that cannot be guaranteed."""
    n_gen = genuine.size
    complete = top_desc.size == n_imp
    cutoff = top_desc[-1]
    gen_top = genuine[np.searchsorted(genuine, cutoff, side="left") :]
    # two ascending runs: the stable (timsort) argsort inside _roc_counts merges them in linear time
    s = np.concatenate([top_desc[::-1], gen_top])
    y = np.r_[np.zeros(top_desc.size, dtype=bool), np.ones(gen_top.size, dtype=bool)]
    fps, tps, _ = _roc_counts(s, y)
    kept = _drop_intermediate(fps, tps)
    if not complete:
        kept = kept[:-1]
    fpr = np.r_[0.0, fps[kept]] / n_imp
    tpr = np.r_[0.0, tps[kept]] / n_gen
    beyond = fps[-1] / n_imp  # points past the prefix have at least this FPR
    out = {}
    for x in targets:
        gap = np.abs(fpr - x)
        # eval_ijbc scans the reversed arrays and keeps the first minimum: the last one in this order
        i = gap.size - 1 - int(np.argmin(gap[::-1]))
        if not complete and abs(beyond - x) <= gap[i]:
            return None
        out[x] = float(tpr[i])
    return out


# ----------------------------------------------------------------------------------------------------------
# Identification (1:N)
# ----------------------------------------------------------------------------------------------------------


def _identification_inputs(similarity, probe_labels, gallery_labels):
    sim = np.asarray(similarity)
    if sim.ndim != 2:
        raise ConfigError(f"similarity must be [probes, gallery], got shape {sim.shape}")
    probe_labels = _as_1d("probe_labels", probe_labels)
    gallery_labels = _as_1d("gallery_labels", gallery_labels)
    if sim.shape != (probe_labels.size, gallery_labels.size):
        raise ConfigError(
            f"similarity shape {sim.shape} does not match "
            f"{probe_labels.size} probes x {gallery_labels.size} gallery entries"
        )
    mate = probe_labels[:, None] == gallery_labels[None, :]
    mated = mate.any(axis=1)
    return sim, mate, mated


def _mate_ranks(sim: np.ndarray, mate: np.ndarray) -> np.ndarray:
    """Rank (1-based) of the best mate of every probe: 1 + number of non-mate gallery entries that score
    strictly higher (a tie goes to the mate); probes without a mate get rank ``inf``."""
    masked = np.where(mate, sim, -np.inf)
    best_mate = masked.max(axis=1)
    higher = ((sim > best_mate[:, None]) & ~mate).sum(axis=1)
    ranks = (higher + 1).astype(np.float64)
    ranks[~mate.any(axis=1)] = np.inf
    return ranks


def cmc(similarity: np.ndarray, probe_labels: object, gallery_labels: object, max_rank: int | None = None):
    """Cumulative match characteristic over the mated probes: ``(ranks, rates)`` where ``rates[r-1]`` is the
    share of mated probes whose mate is within the top r gallery entries (ties count for the mate)."""
    sim, mate, mated = _identification_inputs(similarity, probe_labels, gallery_labels)
    if not mated.any():
        raise ConfigError("cmc needs at least one probe whose identity is in the gallery")
    ranks = _mate_ranks(sim, mate)[mated]
    max_rank = sim.shape[1] if max_rank is None else int(max_rank)
    counts = np.bincount(np.minimum(ranks, max_rank + 1).astype(np.int64), minlength=max_rank + 2)
    rates = np.cumsum(counts[1 : max_rank + 1]) / ranks.size
    return np.arange(1, max_rank + 1), rates


def rank_k(
    similarity: np.ndarray, probe_labels: object, gallery_labels: object, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Rank-k identification rates ``{k: rate}`` over the mated probes."""
    sim, mate, mated = _identification_inputs(similarity, probe_labels, gallery_labels)
    if not mated.any():
        raise ConfigError("rank_k needs at least one probe whose identity is in the gallery")
    ranks = _mate_ranks(sim, mate)[mated]
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def tpir_at_fpir(
    similarity: np.ndarray,
    probe_labels: object,
    gallery_labels: object,
    fpirs: Iterable[float] | float = (1e-2, 1e-1),
) -> dict[float, float]:
    """Open-set identification, NIST-style with a separate gallery: ``{fpir: tpir}``.

    Probes whose identity is absent from the gallery are non-mated searches; their top scores set the
    threshold with the `tar_at_far` floor rule (at most ``floor(fpir * n_nonmated)`` of them may score
    strictly above it). A mated search counts as a hit when its rank-1 gallery entry is the mate and its
    score is strictly above the threshold. TPIR is the hit share of the mated searches.
    """
    sim, mate, mated = _identification_inputs(similarity, probe_labels, gallery_labels)
    targets = _fars(fpirs)
    if not mated.any() or mated.all():
        raise ConfigError("tpir_at_fpir needs both mated and non-mated probes (a separate gallery)")
    top = sim.max(axis=1)
    ranks = _mate_ranks(sim, mate)
    nonmated_top = np.sort(top[~mated])[::-1]
    mated_hit_score = np.where(ranks[mated] == 1, top[mated], -np.inf)
    out = {}
    for x in targets:
        k = int(np.floor(x * nonmated_top.size))
        threshold = -np.inf if k >= nonmated_top.size else nonmated_top[k]
        out[x] = float(np.mean(mated_hit_score > threshold))
    return out
