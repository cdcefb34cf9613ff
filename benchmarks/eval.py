"""Evaluation benchmark (perf.md C4, C5, C7): marginface.eval beside reference-style implementations written the
way insightface's verification.py and eval_ijbc.py work, interleaved round-robin in one process.

- C4: LFW-style 10-fold accuracy + VAL@FAR=1e-3 on 6,000 pairs vs threshold loops (400 + 4,000 thresholds x 10
  folds). Gate: identical fold accuracies, thresholds and VAL.
- C5: IJB-C-sized 1:1 scoring from template features (23,124 x 512; 15,658,489 pairs, 19,593 genuine, with the
  gallery/probe structure 3,531 x 19,593) + the TAR@FAR table (nearest rule, float64 refinement of the pairs
  near each threshold), vs a float64 gather of template pairs in 100k chunks + sklearn roc_curve + a Python
  nearest-FPR scan. Gate: the table equals the float64 reference's exactly.
- C7: template aggregation, 469,375 images -> 23,124 templates (media mean, sum, normalise) vs a per-template
  loop with np.where. Gate: max |difference| to a float64 computation.

The reference-style peers are slow (minutes per round at full size); with --ref-fraction < 1 they run on the
first fraction of the pairs (C5 scoring) or templates (C7) and their time is scaled up linearly, which is
reported. Ratios are medians over rounds of (reference time / marginface time) measured in the same round.

    python benchmarks/eval.py                       # all three, 5 rounds after a warm-up
    python benchmarks/eval.py --only kfold --rounds 7
    python benchmarks/eval.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import marginface.eval as ev

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# ---------------------------------------------------------------------------------------------------------
# Reference-style implementations (written here from the published descriptions; loops as the originals)
# ---------------------------------------------------------------------------------------------------------


def ref_kfold(dist: np.ndarray, issame: np.ndarray, folds: int = 10, far_target: float = 1e-3) -> dict:
    """insightface verification.py style: squared distance, KFold(10), a Python loop over thresholds."""
    n = dist.size
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    acc_thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)
    accuracy, best, val, far = (np.zeros(folds) for _ in range(4))
    for f in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[f] : bounds[f + 1]] = True
        train = ~test
        acc_train = np.zeros(acc_thresholds.size)
        for t, threshold in enumerate(acc_thresholds):
            predict = np.less(dist[train], threshold)
            tp = np.sum(predict & issame[train])
            tn = np.sum(~predict & ~issame[train])
            acc_train[t] = float(tp + tn) / dist[train].size
        b = int(np.argmax(acc_train))
        best[f] = acc_thresholds[b]
        predict = np.less(dist[test], acc_thresholds[b])
        accuracy[f] = float(np.sum(predict & issame[test]) + np.sum(~predict & ~issame[test])) / dist[test].size
        # VAL: FAR on the train folds at every threshold, then the largest threshold with FAR <= target
        far_train = np.zeros(val_thresholds.size)
        for t, threshold in enumerate(val_thresholds):
            accept = np.less(dist[train], threshold)
            far_train[t] = np.sum(accept & ~issame[train]) / np.sum(~issame[train])
        threshold = 0.0
        if np.max(far_train) >= far_target:
            threshold = val_thresholds[np.flatnonzero(far_train <= far_target)[-1]]
        accept = np.less(dist[test], threshold)
        val[f] = np.sum(accept & issame[test]) / np.sum(issame[test])
        far[f] = np.sum(accept & ~issame[test]) / np.sum(~issame[test])
    return {"fold_accuracies": accuracy, "fold_thresholds": best, "val": val.mean(), "far": far.mean()}


def ref_pair_scores(template_ids, template_feats64, pairs, start=0, stop=None, chunk=100_000) -> np.ndarray:
    """eval_ijbc.py style: a dense template->row table, float64 features gathered per pair, 100k-pair chunks."""
    table = np.zeros(int(template_ids.max()) + 1, dtype=np.int64)
    table[template_ids] = np.arange(template_ids.size)
    stop = pairs.shape[0] if stop is None else stop
    scores = np.zeros(stop - start)
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        feat1 = template_feats64[table[pairs[s:e, 0]]]
        feat2 = template_feats64[table[pairs[s:e, 1]]]
        scores[s - start : e - start] = np.sum(feat1 * feat2, -1)
    return scores


def ref_tar_table(scores: np.ndarray, labels: np.ndarray) -> dict:
    """eval_ijbc.py style: sklearn roc_curve, reversed, then a Python nearest-FPR scan per target."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    table = {}
    for x in FARS:
        _, i = min(list(zip(abs(fpr - x), range(len(fpr)), strict=True)))
        table[x] = float(tpr[i])
    return table


def ref_templates(features, templates, medias, unique_templates) -> np.ndarray:
    """eval_ijbc.py style: per template, np.where over all images, media means, sum; normalise at the end."""
    out = np.zeros((len(unique_templates), features.shape[1]))
    for k, t in enumerate(unique_templates):
        (rows,) = np.where(templates == t)
        feats, media = features[rows], medias[rows]
        media_ids, counts = np.unique(media, return_counts=True)
        parts = []
        for m, c in zip(media_ids, counts, strict=True):
            (sel,) = np.where(media == m)
            parts.append(feats[sel] if c == 1 else np.mean(feats[sel], axis=0, keepdims=True))
        out[k] = np.sum(np.concatenate(parts), axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Synthetic data with the real structure
# ---------------------------------------------------------------------------------------------------------


def lfw_like(seed: int = 0, pairs: int = 6000, dim: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of 6,000 pairs in 10 blocks of 300 genuine + 300 impostor, from noisy unit embeddings."""
    rng = np.random.default_rng(seed)
    issame = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], pairs // 600)
    a = rng.standard_normal((pairs, dim))
    b = np.where(issame[:, None], a + 5.0 * rng.standard_normal((pairs, dim)), rng.standard_normal((pairs, dim)))
    emb = np.empty((2 * pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return ev.pair_scores(emb), issame


def ijbc_like(seed: int = 0, gallery: int = 3531, probes: int = 19593, total: int = 15_658_489, dim: int = 512):
    """Template features and a pair list shaped like IJB-C's: every pair joins one of 3,531 gallery-side
    templates to one of 19,593 probe-side templates; each probe has its genuine pair, the rest are impostors
    drawn without replacement (22.6 % of all gallery x probe combinations); pairs are listed sorted by
    (first, second) template."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 200_000), size=gallery + probes, replace=False)
    g_ids, p_ids = ids[:gallery], ids[gallery:]
    feats = rng.standard_normal((gallery + probes, dim), dtype=np.float32)
    mate = rng.integers(0, gallery, probes)
    # genuine similarity spread from ~0.05 to ~0.45 (impostors ~0 +- 0.044): TAR@1e-6 well below 100 %
    strength = rng.uniform(0.05, 0.5, size=(probes, 1)).astype(np.float32)
    feats[gallery:] = strength * feats[mate] + feats[gallery:]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    impostors = total - probes
    flat = rng.choice(gallery * probes, size=int(impostors * 1.001) + 1000, replace=False)
    rows, cols = flat // probes, flat % probes
    keep = rows != mate[cols]
    rows, cols = rows[keep][:impostors], cols[keep][:impostors]
    first = np.r_[mate, rows]
    second = np.r_[np.arange(probes), cols]
    labels = np.r_[np.ones(probes, bool), np.zeros(impostors, bool)]
    order = np.lexsort((second, first))
    pairs = np.stack([g_ids[first[order]], p_ids[second[order]]], axis=1)
    return ids, feats, pairs, labels[order]


def ijbc_images(seed: int = 0, images: int = 469_375, templates: int = 23_124, dim: int = 512):
    """Per-image features with template/media ids: template sizes vary (1 to a few hundred images), media
    are runs of frames inside a template; image order shuffled."""
    rng = np.random.default_rng(seed)
    sizes = rng.geometric(1.0 / (images / templates), size=templates)
    sizes = np.maximum(1, np.round(sizes * images / sizes.sum())).astype(np.int64)
    sizes[-1] += images - sizes.sum()
    while sizes[-1] < 1:  # keep the total exact
        i = int(np.argmax(sizes))
        sizes[i] -= 1
        sizes[-1] += 1
    template_ids = rng.choice(np.arange(1, 200_000), size=templates, replace=False)
    per_image_template = np.repeat(template_ids, sizes)
    # media: consecutive frames of a template share a media id with probability 0.7
    new_media = rng.random(images) > 0.7
    new_media[np.r_[0, np.cumsum(sizes)[:-1]]] = True
    media = np.cumsum(new_media) + 50_000
    order = rng.permutation(images)
    feats = rng.standard_normal((images, dim), dtype=np.float32)
    return feats, per_image_template[order], media[order]


# ---------------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------------


def interleave(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, round-robin, after one warm-up round; seconds per variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r > 0:
                times[name].append(elapsed)
        if r > 0:
            print(f"  round {r}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str, scale: float = 1.0) -> float:
    return statistics.median(scale * s / f for s, f in zip(times[slow], times[fast], strict=True))


def bench_kfold(rounds: int) -> dict:
    cos, issame = lfw_like()
    dist = 2.0 - 2.0 * cos
    ours = ev.kfold_accuracy(cos, issame)
    ref = ref_kfold(dist, issame)
    identical = (
        np.array_equal(ours["fold_accuracies"], ref["fold_accuracies"])
        and np.array_equal(ours["fold_thresholds"], ref["fold_thresholds"])
        and ours["val"] == ref["val"]
        and ours["far"] == ref["far"]
    )
    print(f"C4 gate: identical accuracies/thresholds/VAL = {identical}; accuracy {ours['accuracy']:.5f}")
    times = interleave(
        {"reference": lambda: ref_kfold(dist, issame), "marginface": lambda: ev.kfold_accuracy(cos, issame)}, rounds
    )
    return {
        "identical": bool(identical),
        "accuracy": ours["accuracy"],
        "val": ours["val"],
        "reference_min_s": min(times["reference"]),
        "marginface_min_s": min(times["marginface"]),
        "marginface_median_s": statistics.median(times["marginface"]),
        "ratio_median": ratio(times, "reference", "marginface"),
    }


def bench_ijbc(rounds: int, ref_fraction: float) -> dict:
    t0 = time.perf_counter()
    ids, feats, pairs, labels = ijbc_like()
    print(
        f"C5 data: {pairs.shape[0]:,} pairs ({int(labels.sum()):,} genuine), {ids.size:,} templates "
        f"({time.perf_counter() - t0:.1f}s to build)",
        flush=True,
    )
    feats64 = feats.astype(np.float64)
    m = pairs.shape[0]
    subset = m if ref_fraction >= 1 else int(m * ref_fraction)
    scale = m / subset

    # correctness gate: full float64 reference scores once, then both tables
    ours_scores = ev.score_template_pairs(ids, feats, pairs)
    ref_scores = ref_pair_scores(ids, feats64, pairs)
    max_diff = float(np.max(np.abs(ours_scores - ref_scores)))
    refiner = ev.pair_refiner(ids, feats64, pairs)
    ours_table = ev.tar_at_far(ours_scores, labels, FARS, rule="nearest", refine=refiner)
    unrefined = ev.tar_at_far(ours_scores, labels, FARS, rule="nearest")
    ref_table = ref_tar_table(ref_scores, labels)
    identical_same = unrefined == ref_tar_table(ours_scores, labels)
    identical = ours_table == ref_table
    print(
        f"C5 gate: max |score diff| {max_diff:.2e}; nearest rule on the same float32 scores identical to the "
        f"reference scan = {identical_same}; refined table identical to the float64 reference = {identical}"
    )
    print("  TAR@FAR:", {x: round(ours_table[x] * 100, 2) for x in FARS})
    if unrefined != ref_table:
        print(
            "  (unrefined float32 table differs from the float64 reference:",
            {x: (unrefined[x], ref_table[x]) for x in FARS if unrefined[x] != ref_table[x]},
            ")",
        )
    floor_table = ev.tar_at_far(ours_scores, labels, FARS)
    del ref_scores

    times = interleave(
        {
            "ref_scores": lambda: ref_pair_scores(ids, feats64, pairs, 0, subset),
            "ref_table": lambda: ref_tar_table(ours_scores, labels),
            "mf_scores": lambda: ev.score_template_pairs(ids, feats, pairs),
            "mf_table": lambda: ev.tar_at_far(ours_scores, labels, FARS, rule="nearest", refine=refiner),
            "mf_table_unrefined": lambda: ev.tar_at_far(ours_scores, labels, FARS, rule="nearest"),
            "mf_table_floor": lambda: ev.tar_at_far(ours_scores, labels, FARS),
            "mf_auc": lambda: ev.auc(ours_scores, labels),
        },
        rounds,
    )
    scoring = statistics.median(
        (scale * rs + rt) / (ms + mt)
        for rs, rt, ms, mt in zip(
            times["ref_scores"], times["ref_table"], times["mf_scores"], times["mf_table"], strict=True
        )
    )
    return {
        "pairs": int(m),
        "genuine": int(labels.sum()),
        "reference_scored_pairs": int(subset),
        "reference_scale": scale,
        "max_score_diff": max_diff,
        "nearest_identical_on_same_scores": bool(identical_same),
        "refined_table_identical_to_float64_reference": bool(identical),
        "unrefined_table_identical_to_float64_reference": unrefined == ref_table,
        "tar_at_far_nearest": ours_table,
        "tar_at_far_floor": floor_table,
        "reference_scores_min_s_extrapolated": scale * min(times["ref_scores"]),
        "reference_table_min_s": min(times["ref_table"]),
        "marginface_scores_min_s": min(times["mf_scores"]),
        "marginface_scores_median_s": statistics.median(times["mf_scores"]),
        "marginface_table_min_s": min(times["mf_table"]),
        "marginface_table_median_s": statistics.median(times["mf_table"]),
        "marginface_table_unrefined_min_s": min(times["mf_table_unrefined"]),
        "marginface_table_unrefined_median_s": statistics.median(times["mf_table_unrefined"]),
        "marginface_table_floor_min_s": min(times["mf_table_floor"]),
        "marginface_auc_min_s": min(times["mf_auc"]),
        "ratio_scores_median": ratio(times, "ref_scores", "mf_scores", scale),
        "ratio_table_median": ratio(times, "ref_table", "mf_table"),
        "ratio_scores_plus_table_median": scoring,
        "ratio_scores_plus_unrefined_table_median": statistics.median(
            (scale * rs + rt) / (ms + mt)
            for rs, rt, ms, mt in zip(
                times["ref_scores"], times["ref_table"], times["mf_scores"], times["mf_table_unrefined"], strict=True
            )
        ),
    }


def bench_templates(rounds: int, ref_templates_count: int) -> dict:
    t0 = time.perf_counter()
    feats, templates, medias = ijbc_images()
    unique = np.unique(templates)
    print(
        f"C7 data: {feats.shape[0]:,} images, {unique.size:,} templates ({time.perf_counter() - t0:.1f}s)", flush=True
    )
    subset = unique[:ref_templates_count]
    scale = unique.size / subset.size
    tids, ours = ev.template_features(feats, templates, medias)
    ref = ref_templates(feats, templates, medias, subset)
    # float64 gold standard for the same subset: media means and sums in float64
    gold = ref_templates(feats.astype(np.float64), templates, medias, subset)
    rows = np.searchsorted(tids, subset)
    max_diff_gold = float(np.max(np.abs(ours[rows] - gold)))
    max_diff_ref = float(np.max(np.abs(ours[rows] - ref)))
    print(f"C7 gate: max |diff| to float64 = {max_diff_gold:.2e}, to the reference loop = {max_diff_ref:.2e}")
    times = interleave(
        {
            "reference": lambda: ref_templates(feats, templates, medias, subset),
            "marginface": lambda: ev.template_features(feats, templates, medias),
        },
        rounds,
    )
    return {
        "images": int(feats.shape[0]),
        "templates": int(unique.size),
        "reference_templates_timed": int(subset.size),
        "reference_scale": scale,
        "max_diff_float64": max_diff_gold,
        "max_diff_reference": max_diff_ref,
        "reference_min_s_extrapolated": scale * min(times["reference"]),
        "marginface_min_s": min(times["marginface"]),
        "marginface_median_s": statistics.median(times["marginface"]),
        "ratio_median": ratio(times, "reference", "marginface", scale),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("kfold", "ijbc", "templates"), nargs="*")
    parser.add_argument(
        "--ref-fraction",
        type=float,
        default=1 / 16,
        help="share of the IJB-C pairs the reference scorer runs on each round (time scaled up)",
    )
    parser.add_argument(
        "--ref-templates",
        type=int,
        default=2000,
        help="templates the reference aggregation loop runs on each round (time scaled up)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    only = set(args.only or ("kfold", "ijbc", "templates"))
    results = {}
    if "kfold" in only:
        results["kfold"] = bench_kfold(args.rounds)
    if "templates" in only:
        results["templates"] = bench_templates(args.rounds, args.ref_templates)
    if "ijbc" in only:
        results["ijbc"] = bench_ijbc(args.rounds, args.ref_fraction)
    text = json.dumps(results, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
