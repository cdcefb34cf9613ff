"""Metrics of marginface.eval checked against scikit-learn and straightforward loop implementations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

import marginface.eval as ev
from marginface.errors import ConfigError

# --- reference implementations, written the way insightface's verification.py loops -----------------------


def _ref_accuracy(threshold, dist, actual):
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, actual))
    fp = np.sum(np.logical_and(predict, np.logical_not(actual)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
    fn = np.sum(np.logical_and(np.logical_not(predict), actual))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _ref_kfold(dist, actual, folds=10):
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(folds)
    best = np.zeros(folds)
    indices = np.arange(dist.size)
    for f, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(indices)):
        acc_train = np.zeros(thresholds.size)
        for t, thr in enumerate(thresholds):
            _, _, acc_train[t] = _ref_accuracy(thr, dist[train], actual[train])
        b = np.argmax(acc_train)
        best[f] = thresholds[b]
        _, _, accuracy[f] = _ref_accuracy(thresholds[b], dist[test], actual[test])
    return accuracy, best


def _ref_val(dist, actual, far_target=1e-3, folds=10):
    """VAL with the documented direct-search rule: the largest grid threshold whose train FAR <= target."""
    thresholds = np.arange(0, 4, 0.001)
    val = np.zeros(folds)
    far = np.zeros(folds)
    for f, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(np.arange(dist.size))):
        far_train = np.zeros(thresholds.size)
        for t, thr in enumerate(thresholds):
            acc = np.less(dist[train], thr)
            far_train[t] = np.sum(acc & ~actual[train]) / np.sum(~actual[train])
        threshold = 0.0
        if np.max(far_train) >= far_target:
            for t in range(thresholds.size):
                if far_train[t] <= far_target:
                    threshold = thresholds[t]
        acc = np.less(dist[test], threshold)
        val[f] = np.sum(acc & actual[test]) / np.sum(actual[test])
        far[f] = np.sum(acc & ~actual[test]) / np.sum(~actual[test])
    return val, far


def _pairs(rng, n_pairs, dim=32, noise=0.9):
    a = rng.standard_normal((n_pairs, dim))
    same = rng.random(n_pairs) < 0.5
    mate = a + noise * rng.standard_normal((n_pairs, dim))
    b = np.where(same[:, None], mate, rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return emb, same


@pytest.mark.parametrize("n_pairs", [600, 613])
def test_kfold_accuracy_equals_insightface_loop(n_pairs):
    rng = np.random.default_rng(n_pairs)
    emb, same = _pairs(rng, n_pairs)
    norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.sum(np.square(norm[0::2] - norm[1::2]), axis=1)
    ref_acc, ref_thr = _ref_kfold(dist, same)
    got = ev.kfold_accuracy(dist, same, distance=True)
    np.testing.assert_array_equal(got["fold_accuracies"], ref_acc)
    np.testing.assert_array_equal(got["fold_thresholds"], ref_thr)
    assert got["accuracy"] == np.mean(ref_acc) and got["std"] == np.std(ref_acc)
    # cosine input: the same protocol on dist = 2 - 2 cos
    cos = ev.pair_scores(emb)
    ref_acc_cos, ref_thr_cos = _ref_kfold(2.0 - 2.0 * cos, same)
    got_cos = ev.kfold_accuracy(cos, same)
    np.testing.assert_array_equal(got_cos["fold_accuracies"], ref_acc_cos)
    np.testing.assert_array_equal(got_cos["fold_thresholds"], ref_thr_cos)
    assert got_cos["threshold_cosine"] == pytest.approx(1 - np.mean(ref_thr_cos) / 2)


def test_val_at_far_equals_direct_search_loop():
    rng = np.random.default_rng(3)
    emb, same = _pairs(rng, 2000, noise=1.2)
    cos = ev.pair_scores(emb)
    dist = 2.0 - 2.0 * cos
    ref_val, ref_far = _ref_val(dist, same, 1e-2)
    got = ev.val_at_far(cos, same, 1e-2)
    assert got["val"] == ref_val.mean() and got["far"] == ref_far.mean()
    assert got["val_std"] == pytest.approx(ref_val.std(), abs=1e-15)
    assert 0 < got["val"] < 1


def test_pair_scores_and_xnorm_by_hand():
    emb = np.array([[3.0, 4.0], [4.0, 3.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(ev.pair_scores(emb), [24 / 25, 0.0])
    assert ev.xnorm(emb) == pytest.approx((5 + 5 + 1 + 2) / 4)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_and_auc_equal_sklearn(ties):
    rng = np.random.default_rng(7)
    labels = rng.random(3000) < 0.3
    scores = rng.standard_normal(3000) + labels
    if ties:
        scores = np.round(scores, 1)
    for drop in (True, False):
        fpr, tpr, thr = ev.roc_curve(scores, labels, drop_intermediate=drop)
        sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=drop)
        np.testing.assert_array_equal(fpr, sk_fpr)
        np.testing.assert_array_equal(tpr, sk_tpr)
        np.testing.assert_array_equal(thr, sk_thr)
    assert ev.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ev.auc(fpr, tpr) == pytest.approx(sk_auc(sk_fpr, sk_tpr), abs=1e-12)


def _brute_tar_floor(scores, labels, far):
    gen, imp = scores[labels], scores[~labels]
    best = 0.0
    # every candidate threshold (accept when score > t); keep the most accepting one with FAR <= far
    for t in np.r_[-np.inf, np.unique(imp)]:
        if np.sum(imp > t) / imp.size <= far:
            best = max(best, np.sum(gen > t) / gen.size)
    return best


def _eval_ijbc_scan(scores, labels, far):
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(zip(abs(fpr - far), range(len(fpr)), strict=True))
    return tpr[i]


@pytest.mark.parametrize("ties", [False, True])
def test_tar_at_far_floor_and_nearest(ties):
    rng = np.random.default_rng(11)
    labels = rng.random(4000) < 0.2
    scores = rng.standard_normal(4000) + 2.0 * labels
    if ties:
        scores = np.round(scores, 1)
    fars = [1e-3, 1e-2, 3e-2, 0.1, 0.5, 1.0]
    got = ev.tar_at_far(scores, labels, fars)
    for far in fars:
        assert got[far] == _brute_tar_floor(scores, labels, far)
    # all targets (full ROC) and only small ones (the ROC prefix above an impostor cutoff)
    for targets in (fars, [1e-3, 4e-3, 1e-2]):
        near = ev.tar_at_far(scores, labels, targets, rule="nearest")
        for far in targets:
            assert near[far] == _eval_ijbc_scan(scores, labels, far)


def test_tar_at_far_by_hand():
    # impostors 0.1..0.9, genuine 0.5, 0.85, 0.95: FAR 1/9 allows one impostor above the threshold 0.8
    imp = np.arange(1, 10) / 10
    scores = np.r_[imp, 0.5, 0.85, 0.95]
    labels = np.r_[np.zeros(9, bool), np.ones(3, bool)]
    assert ev.tar_at_far(scores, labels, [1 / 9])[1 / 9] == pytest.approx(2 / 3)
    assert ev.tar_at_far(scores, labels, [0.01])[0.01] == pytest.approx(1 / 3)


def test_eer_by_hand_and_against_roc():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    # one genuine (0.35) below one impostor (0.4): at threshold 0.4 FAR = FRR = 1/4
    assert ev.eer(scores, labels)["eer"] == pytest.approx(0.25)
    rng = np.random.default_rng(5)
    labels = rng.random(5000) < 0.5
    scores = rng.standard_normal(5000) + 1.5 * labels
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    i = np.argmin(np.abs((1 - tpr) - fpr))
    assert ev.eer(scores, labels)["eer"] == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=2e-3)


def _brute_ranks(sim, probe, gallery):
    ranks = []
    for q in range(sim.shape[0]):
        mates = [g for g in range(sim.shape[1]) if gallery[g] == probe[q]]
        if not mates:
            ranks.append(np.inf)
            continue
        best = max(sim[q, g] for g in mates)
        ranks.append(1 + sum(1 for g in range(sim.shape[1]) if gallery[g] != probe[q] and sim[q, g] > best))
    return np.array(ranks)


def test_identification_metrics_against_loops():
    rng = np.random.default_rng(2)
    gallery = np.arange(40)
    probe = rng.integers(0, 60, size=300)  # ids >= 40 are non-mated
    sim = rng.standard_normal((300, 40)) + 2.5 * (probe[:, None] == gallery[None, :])
    sim = np.round(sim, 1)
    ranks = _brute_ranks(sim, probe, gallery)
    mated = np.isfinite(ranks)
    got = ev.rank_k(sim, probe, gallery, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == np.mean(ranks[mated] <= k)
    r, rates = ev.cmc(sim, probe, gallery)
    np.testing.assert_array_equal(r, np.arange(1, 41))
    np.testing.assert_allclose(rates, [np.mean(ranks[mated] <= k) for k in r])
    for fpir in (0.01, 0.1, 0.5):
        top = sim.max(axis=1)
        nonmated = np.sort(top[~mated])[::-1]
        k = int(np.floor(fpir * nonmated.size))
        thr = nonmated[k]
        hits = [ranks[q] == 1 and top[q] > thr for q in range(300) if mated[q]]
        assert ev.tpir_at_fpir(sim, probe, gallery, [fpir])[fpir] == np.mean(hits)
        # the achieved FPIR never exceeds the target
        assert np.mean(top[~mated] > thr) <= fpir


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="same length"):
        ev.tar_at_far([0.1, 0.2], [1])
    with pytest.raises(ConfigError, match="FAR targets"):
        ev.tar_at_far([0.1, 0.2], [1, 0], [0.0])
    with pytest.raises(ConfigError, match="finite"):
        ev.kfold_accuracy([np.nan] * 20, [True] * 20)
    with pytest.raises(ConfigError, match="rule"):
        ev.tar_at_far([0.1, 0.2], [1, 0], rule="closest")


def test_nearest_rule_across_a_long_collinear_stretch():
    # 300 distinct values each holding one genuine and one impostor: sklearn drops every point inside that
    # diagonal stretch, so the nearest corner lies far from the target and the search must widen
    values = np.linspace(0.5, 1.0, 300)
    low = np.linspace(-1.0, 0.4, 2000)
    scores = np.r_[values, values, low]
    labels = np.r_[np.ones(300, bool), np.zeros(300, bool), np.zeros(2000, bool)]
    fars = [0.01, 0.05, 0.1]
    near = ev.tar_at_far(scores, labels, fars, rule="nearest")
    for far in fars:
        assert near[far] == _eval_ijbc_scan(scores, labels, far)


@pytest.mark.parametrize("rule", ["floor", "nearest"])
def test_refine_makes_an_approximate_table_exact(rule):
    rng = np.random.default_rng(21)
    labels = rng.random(200_000) < 0.01
    exact = rng.standard_normal(200_000) * 0.05 + 0.2 * labels
    approx = exact + rng.uniform(-2e-5, 2e-5, exact.size)  # e.g. float32 GEMM rounding, exaggerated
    fars = [1e-4, 1e-3, 1e-2, 1e-1]
    calls = []

    def refine(index):
        calls.append(index.size)
        return exact[index]

    got = ev.tar_at_far(approx, labels, fars, rule=rule, refine=refine)
    assert got == ev.tar_at_far(exact, labels, fars, rule=rule)
    assert 0 < calls[0] < exact.size // 10  # only the neighbourhoods of the thresholds are recomputed


def test_threshold_at_far_accepts_at_most_the_asked_share_and_is_the_smallest_such() -> None:
    from marginface.eval import threshold_at_far

    impostor = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    # FAR 0.2 of 10 impostors: two may pass, so the threshold sits just above the third-highest score (0.7)
    assert threshold_at_far(impostor, 0.2) == np.nextafter(0.7, np.inf)
    assert threshold_at_far(impostor, 0.05) == np.nextafter(0.9, np.inf)  # none may pass
    tied = np.array([0.5] * 5 + [0.1] * 5)
    assert threshold_at_far(tied, 0.4) == np.nextafter(0.5, np.inf)  # the tie at 0.5 would pass five
    assert threshold_at_far(tied, 0.5) == np.nextafter(0.1, np.inf)


def test_the_ijb_histogram_is_drawn_at_the_tables_smallest_far() -> None:
    from marginface.cli.eval import ijb_threshold

    rng = np.random.default_rng(3)
    impostor, genuine = rng.normal(0.0, 0.1, 200_000), rng.normal(0.5, 0.1, 200)
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(200, bool), np.zeros(200_000, bool)]
    threshold, label = ijb_threshold(scores, labels)
    assert label == "threshold at FAR=0.0001"
    assert int((impostor >= threshold).sum()) == 20 and int((impostor >= np.nextafter(threshold, -1)).sum()) == 21
