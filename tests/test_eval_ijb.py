"""IJB-B/C evaluation on a tiny IJB tree built here, checked against brute-force per-template/per-pair loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import marginface.eval as ev
from marginface.data import align as mf_align
from marginface.errors import DataFormatError

TEMPLATE = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])


def _build_tree(root: Path, rng, n_subjects=6, target="ijbc"):
    """Loose crops of a few synthetic 'subjects' (a colour pattern each), with landmarks and meta files."""
    crops = root / "loose_crop"
    crops.mkdir(parents=True)
    meta = root / "meta"
    meta.mkdir()
    patterns = rng.integers(0, 256, size=(n_subjects, 6, 6, 3))
    tid_lines, lmk_lines, subject_of_template = [], [], {}
    image_no, template_id, media_id = 1, 100, 5000
    for subject in range(n_subjects):
        for _ in range(3):  # templates per subject
            template_id += int(rng.integers(1, 5))  # non-contiguous ids
            subject_of_template[template_id] = subject
            for _ in range(int(rng.integers(1, 4))):  # media per template
                media_id += int(rng.integers(1, 7))
                for _ in range(int(rng.integers(1, 4))):  # images per media
                    noisy = np.clip(patterns[subject] + rng.normal(0, 25, size=(6, 6, 3)), 0, 255).astype(np.uint8)
                    h, w = int(rng.integers(120, 150)), int(rng.integers(120, 150))
                    image = np.asarray(Image.fromarray(noisy).resize((w, h), Image.BILINEAR))
                    name = f"{image_no}.jpg"
                    Image.fromarray(image).save(crops / name, quality=95)
                    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(0, 10, size=2)
                    lmk = TEMPLATE * scale + shift
                    tid_lines.append(f"{name} {template_id} {media_id}")
                    coords = " ".join(f"{v:.3f}" for v in lmk.reshape(-1))
                    lmk_lines.append(f"{name} {coords} {rng.uniform(0.1, 0.9):.3f}")
                    image_no += 1
    (meta / f"{target}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (meta / f"{target}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    tids = list(subject_of_template)
    pairs = [(a, b, int(subject_of_template[a] == subject_of_template[b])) for a in tids[::2] for b in tids if a != b]
    (meta / f"{target}_template_pair_label.txt").write_text("\n".join(f"{a} {b} {y}" for a, b, y in pairs) + "\n")
    # 1:N: gallery G1 = first template of subjects 0..3, G2 = of subjects 2..5; probes = the other templates
    by_subject = {}
    for t, s in subject_of_template.items():
        by_subject.setdefault(s, []).append(t)
    g1 = [(by_subject[s][0], s) for s in range(4)]
    g2 = [(by_subject[s][0], s) for s in range(2, 6)]
    probes = [(t, s) for s in range(n_subjects) for t in by_subject[s][1:]]
    names = ("G1", "G2") if target == "ijbc" else ("S1", "S2")
    for gname, rows in zip(names, (g1, g2), strict=True):
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{t},{s},img/{t}.jpg" for t, s in rows for _ in range(2)]
        (meta / f"{target}_1N_gallery_{gname}.csv").write_text("\n".join(lines) + "\n")
    lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{t},{s},x.jpg" for t, s in probes]
    (meta / f"{target}_1N_probe_mixed.csv").write_text("\n".join(lines) + "\n")
    return subject_of_template


PROJECTION = np.random.default_rng(123).standard_normal((16 * 16 * 3, 24))


def _features(images):
    """A fixed 'model': downsample to 16x16 and project."""
    small = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in images])
    return (small.reshape(len(images), -1) / 255.0 - 0.5) @ PROJECTION


def _brute_force(root: Path, norm: bool, detector: bool, flip: bool, target="ijbc"):
    meta = root / "meta"
    tid_rows = [line.split() for line in (meta / f"{target}_face_tid_mid.txt").read_text().splitlines()]
    lmk_rows = [line.split() for line in (meta / f"{target}_name_5pts_score.txt").read_text().splitlines()]
    feats = {}
    for (name, tid, mid), lrow in zip(tid_rows, lmk_rows, strict=True):
        # decoded as the pipeline decodes (IDCTs differ by a level between libraries)
        image = simplejpeg.decode_jpeg((root / "loose_crop" / name).read_bytes(), colorspace="RGB")
        lmk = np.array([float(v) for v in lrow[1:11]]).reshape(5, 2)
        crop = mf_align(image, lmk, size=112)
        f = _features(crop[None])[0]
        if flip:
            f = f + _features(crop[None, :, ::-1])[0]
        if not norm:
            f = f / np.linalg.norm(f)
        if detector:
            f = f * float(np.float32(lrow[11]))
        feats.setdefault(int(tid), {}).setdefault(int(mid), []).append(f)
    templates = {}
    for tid, medias in feats.items():
        total = sum(np.mean(np.stack(v), axis=0) for v in medias.values())
        templates[tid] = total / np.linalg.norm(total)
    pair_rows = [line.split() for line in (meta / f"{target}_template_pair_label.txt").read_text().splitlines()]
    scores = np.array([float(templates[int(a)] @ templates[int(b)]) for a, b, _ in pair_rows])
    labels = np.array([int(y) for _, _, y in pair_rows])
    return templates, scores, labels


def _scan(scores, labels, far):
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(zip(abs(fpr - far), range(len(fpr)), strict=True))
    return tpr[i]


def _brute_identification(templates, gallery, probes):
    ranks = []
    for pt, ps in probes:
        sims = {gt: float(templates[pt] @ templates[gt]) for gt, _ in gallery}
        mates = [gt for gt, gs in gallery if gs == ps]
        if not mates:
            continue
        best = max(sims[m] for m in mates)
        ranks.append(1 + sum(1 for gt, gs in gallery if gs != ps and sims[gt] > best))
    return np.array(ranks)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    subjects = _build_tree(root, np.random.default_rng(0))
    return root, subjects


@pytest.mark.parametrize("mode", [(True, True, True), (False, False, False), (False, True, True)])
def test_evaluate_ijb_end_to_end_equals_brute_force(tree, mode):
    root, subjects = tree
    norm, detector, flip = mode
    got = ev.evaluate_ijb(
        _features, root, "IJBC", norm=norm, detector=detector, flip=flip, fars=(0.01, 0.1, 0.3), return_scores=True
    )
    templates, scores, labels = _brute_force(root, norm, detector, flip)
    assert got["mode"] == f"N{int(norm)}D{int(detector)}F{int(flip)}"
    assert got["templates"] == len(templates) == len(subjects)
    np.testing.assert_allclose(got["scores"], scores, atol=1e-5)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    for far in (0.01, 0.1, 0.3):
        assert all_levels(got, labels)[far] == pytest.approx(_scan(scores, labels, far), abs=1e-12)
    ident = got["identification"]
    meta = root / "meta"

    def rows(name):
        lines = (meta / name).read_text().splitlines()[1:]
        return list(dict.fromkeys((int(a), int(b)) for a, b, *_ in (line.split(",") for line in lines)))

    probes = rows("ijbc_1N_probe_mixed.csv")
    for g in ("G1", "G2"):
        ranks = _brute_identification(templates, rows(f"ijbc_1N_gallery_{g}.csv"), probes)
        for k in (1, 5, 10):
            assert ident[g][f"rank{k}"] == pytest.approx(np.mean(ranks <= k))
    assert ident["mean"]["rank1"] == pytest.approx((ident["G1"]["rank1"] + ident["G2"]["rank1"]) / 2)
    assert set(ident["G1"]["tpir_at_fpir"]) == {0.01, 0.1}


def test_precomputed_features_and_torch_model(tree):
    import torch

    root, _ = tree
    meta = ev.read_ijb_meta(root, "IJBC")
    orig, flipped = ev.ijb_image_features(_features, meta)
    from_arrays = ev.evaluate_ijb((orig, flipped), root, "IJBC", return_scores=True)
    stacked = ev.evaluate_ijb(np.stack([orig, flipped], axis=1), root, "IJBC", return_scores=True)
    np.testing.assert_array_equal(from_arrays["scores"], stacked["scores"])

    class Mean(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    result = ev.evaluate_ijb(Mean(), root, "IJBC", batch_size=8)
    assert 0.5 < result["auc"] <= 1.0


def test_template_features_against_float64_loop():
    rng = np.random.default_rng(1)
    n = 3000
    templates = rng.integers(0, 200, n) * 7 + 3
    medias = rng.integers(0, 5, n) + templates * 10
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    tids, tf = ev.template_features(feats, templates, medias)
    for i, t in enumerate(tids):
        sel = templates == t
        total = sum(feats[sel & (medias == m)].astype(np.float64).mean(axis=0) for m in np.unique(medias[sel]))
        np.testing.assert_allclose(tf[i], total / np.linalg.norm(total), atol=1e-6)
    assert list(tids) == sorted(set(templates.tolist()))


@pytest.mark.parametrize(("max_block", "offset"), [(1 << 28, 0), (50, 0), (1 << 28, 1 << 40), (50, -5000)])
def test_score_template_pairs_against_loop(max_block, offset):
    rng = np.random.default_rng(2)
    tids = np.sort(rng.choice(10_000, size=120, replace=False)) + offset  # large/negative ids: sort path
    feats = rng.standard_normal((120, 8)).astype(np.float32)
    pairs = np.stack([rng.choice(tids[:30], 500), rng.choice(tids, 500)], axis=1)
    got = ev.score_template_pairs(tids, feats, pairs, max_block_elements=max_block)
    row = {t: i for i, t in enumerate(tids)}
    expected = [float(feats[row[a]].astype(np.float64) @ feats[row[b]]) for a, b in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(DataFormatError, match="template 999999"):
        ev.score_template_pairs(tids, feats, np.array([[tids[0], 999_999]]))


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_meta_files_name_file_line_and_expectation(tree, tmp_path):
    root, subjects = tree
    bad = _copy_tree(root, tmp_path / "bad")
    tid = bad / "meta" / "ijbc_face_tid_mid.txt"
    lines = tid.read_text().splitlines()
    original = list(lines)
    lines[2] = lines[2].rsplit(" ", 1)[0]  # drop the media column
    tid.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"ijbc_face_tid_mid\.txt:3: expected 3 columns"):
        ev.read_ijb_meta(bad, "IJBC")
    tid.write_text("\n".join(original) + "\n")

    pair = bad / "meta" / "ijbc_template_pair_label.txt"
    pair_text = pair.read_text()
    pair.write_text(pair_text + "424242 " + str(next(iter(subjects))) + " 0\n")
    with pytest.raises(DataFormatError, match=r"template 424242 .*has no images"):
        ev.read_ijb_meta(bad, "IJBC")
    pair.write_text(pair_text + "1 2\n")
    n_lines = pair_text.count("\n") + 1
    with pytest.raises(DataFormatError, match=rf"ijbc_template_pair_label\.txt:{n_lines}: expected 3 integer columns"):
        ev.read_ijb_meta(bad, "IJBC")
    pair.write_text(pair_text)

    lmk = bad / "meta" / "ijbc_name_5pts_score.txt"
    lmk_text = lmk.read_text()
    lmk.write_text("\n".join(line.rsplit(" ", 1)[0] for line in lmk_text.splitlines()) + "\n")
    with pytest.raises(DataFormatError, match=r"5pts_score\.txt:1: expected 12 columns"):
        ev.read_ijb_meta(bad, "IJBC")
    lmk.write_text(lmk_text)

    probe = bad / "meta" / "ijbc_1N_probe_mixed.csv"
    probe.write_text(probe.read_text() + "777777,1,x.jpg\n")
    with pytest.raises(DataFormatError, match=r"probe_mixed\.csv: template 777777"):
        ev.read_ijb_meta(bad, "IJBC")
    assert ev.read_ijb_meta(bad, "IJBC", one_to_n=False).probes is None

    (bad / "loose_crop" / "1.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"1\.jpg: image listed in the IJB meta files is missing"):
        ev.ijb_image_features(_features, ev.read_ijb_meta(bad, "IJBC", one_to_n=False))
    with pytest.raises(DataFormatError, match="no meta/ directory"):
        ev.read_ijb_meta(tmp_path, "IJBB")


def test_synthetic_ijb_tree_from_the_data_package(tmp_path):
    import marginface as mf

    synth = mf.data.synthetic(
        identities=2, images_per_id=1, pairs_per_set=0, eval_identities=4, ijb_identities=6, root=tmp_path, workers=1
    )
    got = ev.evaluate_ijb(_features, synth.ijb, "IJBC", fars=(0.1, 0.3), return_scores=True)
    templates, scores, labels = _brute_force(synth.ijb, True, True, True)
    assert got["templates"] == len(templates) and got["genuine_pairs"] == int(labels.sum())
    np.testing.assert_allclose(got["scores"], scores, atol=1e-5)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    for far in (0.1, 0.3):
        assert all_levels(got, labels)[far] == pytest.approx(_scan(scores, labels, far), abs=1e-12)
    assert set(got["identification"]) == {"G1", "G2", "mean"}


def test_ijbb_layout_uses_s1_s2_galleries(tmp_path):
    root = tmp_path / "IJBB"
    _build_tree(root, np.random.default_rng(5), target="ijbb")
    got = ev.evaluate_ijb(_features, root, "IJBB", fars=(0.1,), return_scores=True)
    _, scores, labels = _brute_force(root, True, True, True, target="ijbb")
    np.testing.assert_allclose(got["scores"], scores, atol=1e-5)
    assert got["target"] == "IJBB" and set(got["identification"]) == {"S1", "S2", "mean"}


def all_levels(result, labels):
    """Every reported level; those the impostor count does not support (far·N < 10) must be the ones set apart."""
    impostors = int((~np.asarray(labels, bool)).sum())
    few = result.get("tar_at_far_few_impostors", {})
    assert all(far * impostors < 10 for far in few) and all(far * impostors >= 10 for far in result["tar_at_far"])
    return {**result["tar_at_far"], **few}
