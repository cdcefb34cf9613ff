"""Tests of the synthetic face-identity generator: determinism, exact landmarks, sibling families, the files it
writes (RecordIO, pair `.bin`s, IJB tree) read back independently, and the parameter-keyed cache."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from skimage.measure import label, regionprops
from skimage.transform import SimilarityTransform

import marginface as mf
from marginface.data.synth import (
    PAIR_SETS,
    ImageSpec,
    Nuisance,
    face_params,
    identity_latent,
    render_face,
    render_spec,
    sample_nuisance,
    synthetic,
)
from marginface.data.synth import build as synth_build
from marginface.data.synth.sample import spec_nuisance
from marginface.errors import ConfigError

TINY = dict(identities=20, images_per_id=5, pairs_per_set=60, eval_identities=40, ijb_identities=6)
ARCFACE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic(**TINY, root=tmp_path_factory.mktemp("synth") / "tiny", workers=2)


def _decode(data) -> np.ndarray:
    return simplejpeg.decode_jpeg(bytes(data), colorspace="RGB")


# --- identities -------------------------------------------------------------------------------------------


def test_latents_are_seeded_and_siblings_correlate_as_designed():
    np.testing.assert_array_equal(identity_latent(3, "train", 7, 1), identity_latent(3, "train", 7, 1))
    assert not np.allclose(identity_latent(3, "train", 7, 0), identity_latent(4, "train", 7, 0))
    assert not np.allclose(identity_latent(3, "train", 7, 0), identity_latent(3, "pairs", 7, 0))
    delta = 0.6
    roots = np.stack([identity_latent(0, "train", f, 0, delta) for f in range(300)])
    sibs = np.stack([identity_latent(0, "train", f, 1, delta) for f in range(300)])
    # z' = sqrt(1 - d^2) z + d eps: correlation with the root sqrt(1 - d^2) = 0.8, unit variance kept.
    assert np.corrcoef(roots.ravel(), sibs.ravel())[0, 1] == pytest.approx(0.8, abs=0.03)
    assert sibs.std() == pytest.approx(1.0, abs=0.03)
    sib_dist = np.linalg.norm(roots - sibs, axis=1).mean()
    rand_dist = np.linalg.norm(roots - np.roll(roots, 1, axis=0), axis=1).mean()
    # Expected squared distances: 2(1 - 0.8) D vs 2 D per dimension.
    assert sib_dist < 0.55 * rand_dist


def test_siblings_look_closer_than_strangers_in_pixels():
    plain = Nuisance()  # same pose, light and background for everyone: only the identity differs
    def pixels(family, member):
        img, _ = render_face(face_params(identity_latent(1, "train", family, member)), plain)
        return img.astype(np.float64).ravel()

    fams = range(24)
    sib = [np.linalg.norm(pixels(f, 0) - pixels(f, 1)) for f in fams]
    stranger = [np.linalg.norm(pixels(f, 0) - pixels((f + 1) % 24, 1)) for f in fams]
    assert np.mean(sib) < 0.8 * np.mean(stranger)
    assert np.median(np.array(sib) < np.array(stranger)) == 1.0  # most pairs individually too


# --- rendering --------------------------------------------------------------------------------------------


def test_rendering_is_a_pure_function_of_seed_and_spec():
    spec = ImageSpec("train", 5, 1, 0, 3, 0.8)
    a_img, a_lmk, _ = render_spec(11, spec)
    b_img, b_lmk, _ = render_spec(11, spec)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lmk, b_lmk)
    c_img, c_lmk, _ = render_spec(12, spec)
    assert np.abs(a_img.astype(int) - c_img).mean() > 5
    d_img, _, _ = render_spec(11, replace(spec, index=4))
    assert np.abs(a_img.astype(int) - d_img).mean() > 5
    assert a_img.shape == (112, 112, 3) and a_img.dtype == np.uint8


def _eye_centroids(open_img: np.ndarray, closed_img: np.ndarray) -> np.ndarray:
    """Centres of the two largest regions that change when the eyes close, ordered left to right."""
    diff = np.abs(open_img.astype(np.float64) - closed_img.astype(np.float64)).sum(axis=2)
    regions = regionprops(label(diff > 30), intensity_image=diff)
    two = sorted(regions, key=lambda r: r.area, reverse=True)[:2]
    assert len(two) == 2
    centres = np.array([r.centroid_weighted[::-1] for r in two])  # (row, col) -> (x, y)
    return centres[np.argsort(centres[:, 0])]


def _blink_pair(seed: int, spec: ImageSpec, size: int, frame=None):
    z = identity_latent(seed, spec.split, spec.family, spec.member)
    nz, loose_frame = spec_nuisance(seed, spec)
    nz = replace(nz, occluder=None, sunglasses=False, blink=0.0)
    face = replace(face_params(z, nz.age), glasses=False)
    frame = loose_frame if frame is None else frame
    open_img, lmk = render_face(face, nz, size=size, frame=frame)
    closed_img, lmk2 = render_face(face, replace(nz, blink=1.0), size=size, frame=frame)
    np.testing.assert_array_equal(lmk, lmk2)
    return open_img, closed_img, lmk


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("yaw", [None, 0.0])
def test_eye_landmarks_sit_on_the_rendered_eyes(index, yaw):
    spec = ImageSpec("train", index, index % 2, 0, index, 0.8, yaw=yaw)
    open_img, closed_img, lmk = _blink_pair(7, spec, 112)
    centres = _eye_centroids(open_img, closed_img)
    # A turned head foreshortens the eye unevenly, which moves its 2-D centroid off the centre point a little.
    np.testing.assert_allclose(centres, lmk[:2], atol=1.0 if yaw == 0.0 else 2.0)


@pytest.mark.parametrize("index", range(4))
def test_loose_crops_align_onto_the_arcface_template(index):
    spec = ImageSpec("ijb", index, 0, 9, index, 0.6, loose=True)
    open_img, closed_img, lmk = _blink_pair(3, spec, 160)
    assert open_img.shape == (160, 160, 3)
    aligned_open = mf.data.align(open_img, lmk)
    aligned_closed = mf.data.align(closed_img, lmk)
    # Where the landmarks go, by an independent similarity fit (skimage's Umeyama).
    if hasattr(SimilarityTransform, "from_estimate"):  # skimage >= 0.26
        fit = SimilarityTransform.from_estimate(lmk, ARCFACE)
    else:
        fit = SimilarityTransform()
        fit.estimate(lmk, ARCFACE)
    mapped = fit(lmk)
    centres = _eye_centroids(aligned_open, aligned_closed)
    np.testing.assert_allclose(centres, mapped[:2], atol=1.5)
    # Identities vary around the template, but an aligned face lands close to it.
    np.testing.assert_allclose(mapped, ARCFACE, atol=5.0)


def test_nuisance_scales_with_difficulty():
    rng = np.random.default_rng(0)
    easy = [sample_nuisance(rng, 0.0) for _ in range(200)]
    hard = [sample_nuisance(rng, 1.0) for _ in range(400)]
    assert all(n.yaw == 0 and n.rotation == 0 and n.occluder is None and n.blur == 0 for n in easy)
    assert np.std([n.yaw for n in hard]) == pytest.approx(0.35, rel=0.15)
    assert np.degrees(np.std([n.rotation for n in hard])) == pytest.approx(6.0, rel=0.15)
    assert np.mean([n.occluder is not None for n in hard]) == pytest.approx(0.25, abs=0.07)
    assert all(90 <= n.jpeg_quality <= 95 for n in hard)


# --- files ------------------------------------------------------------------------------------------------


def test_training_rec_reads_back_through_open_dataset(tiny):
    ds = mf.data.open_dataset(tiny.train, train=False)
    assert len(ds) == 20 * 5 and ds.num_classes == 20
    np.testing.assert_array_equal(np.bincount(np.asarray(ds.labels), minlength=20), np.full(20, 5))
    assert (tiny.train / "property").read_text().splitlines()[0] == "20,112,112"
    lmk = np.load(tiny.train / "train_landmarks.npy")
    assert lmk.shape == (100, 5, 2)
    # Training faces are aligned up to the nuisance: landmarks scatter around the template, inside the crop.
    assert np.abs(np.median(lmk, axis=0) - ARCFACE).max() < 3.0
    # The stored pictures are the ones the specs describe (same pixels before JPEG, up to JPEG error).
    from marginface.data.recordio import RecordIOReader, unpack_header

    reader = RecordIOReader(tiny.train / "train.rec", tiny.train / "train.idx")
    header, payload = unpack_header(reader.read(1 + 7))  # class 1, picture 2 (5 per class, keys from 1)
    expected, expected_lmk, _ = render_spec(0, ImageSpec("train", 0, 1, 0, 2, 0.6))
    assert np.abs(_decode(payload).astype(int) - expected).mean() < 3.0
    np.testing.assert_allclose(lmk[7], expected_lmk, atol=1e-4)


def test_pair_sets_are_balanced_per_tenth_and_disjoint_from_training(tiny):
    manifest = json.loads((tiny.root / "manifest.json").read_text())
    train_ids = set(manifest["train"]["identities"])
    assert set(tiny.pairs) == set(PAIR_SETS)
    for name, path in tiny.pairs.items():
        raw = path.read_bytes()
        assert raw[:2] == b"\x80\x04"  # pickle protocol 4
        bins, issame = pickle.loads(raw)
        assert len(issame) == 60 and len(bins) == 120
        assert all(isinstance(b, bytes) and b[:3] == b"\xff\xd8\xff" for b in bins)
        assert all(type(s) is bool for s in issame)
        assert _decode(bins[0]).shape == (112, 112, 3)
        for fold in range(10):
            assert sum(issame[6 * fold:6 * fold + 6]) == 3, (name, fold)
        info = manifest["pairs"][name]
        assert not set(info["identities"]) & train_ids
        for (a, b), same in zip(info["pair_identities"], issame, strict=True):
            fa, fb = a.split("/")[1], b.split("/")[1]
            if same:
                assert a == b
            elif name == "synth_hard":
                assert fa == fb and a != b  # sibling negatives
            else:
                assert fa != fb
    # Disjoint as people, not only as names: no evaluation latent equals a training latent.
    train_z = np.stack([identity_latent(0, "train", c // 2, c % 2) for c in range(20)])
    for key in manifest["pairs"]["synth_lfw"]["identities"]:
        split, fam, mem = key.split("/")
        z = identity_latent(0, split, int(fam), int(mem))
        assert np.linalg.norm(train_z - z, axis=1).min() > 1.0


def test_cfp_fp_pairs_a_frontal_face_with_a_turned_one(tiny):
    from marginface.data.synth.pairs import plan_pair_set

    plan = plan_pair_set("synth_cfp_fp", 0, 60, 40, 0.6)
    for first, second, _ in plan:
        assert spec_nuisance(0, first)[0].yaw == 0.0
        assert 0.5 <= abs(spec_nuisance(0, second)[0].yaw) <= 0.8
    hard = plan_pair_set("synth_hard", 0, 60, 40, 0.6)
    assert all(a.difficulty == pytest.approx(1.6 * 0.6) for a, _, _ in hard)


def test_ijb_tree_follows_the_ijbc_layout(tiny):
    meta = tiny.ijb / "meta"
    tid_mid = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    pts = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    crops = sorted(p.name for p in (tiny.ijb / "loose_crop").glob("*.jpg"))
    assert len(tid_mid) == len(pts) == len(crops) > 0
    assert [r[0] for r in tid_mid] == [r[0] for r in pts]
    assert all(len(r) == 3 for r in tid_mid) and all(len(r) == 12 for r in pts)
    for row in pts[:10]:
        img = _decode((tiny.ijb / "loose_crop" / row[0]).read_bytes())
        assert img.shape == (160, 160, 3)
        xy = np.array(row[1:11], dtype=float).reshape(5, 2)
        assert (xy > 0).all() and (xy < 160).all()
        assert xy[0, 0] < xy[1, 0] and xy[3, 0] < xy[4, 0] and xy[0, 1] < xy[2, 1] < xy[3, 1]
        assert 0.5 <= float(row[11]) <= 1.0

    def csv(name):
        lines = (meta / name).read_text().splitlines()
        assert lines[0] == "TEMPLATE_ID,SUBJECT_ID,FILENAME"
        return {int(r.split(",")[0]): int(r.split(",")[1]) for r in lines[1:]}

    g1, g2, probe = csv("ijbc_1N_gallery_G1.csv"), csv("ijbc_1N_gallery_G2.csv"), csv("ijbc_1N_probe_mixed.csv")
    assert not set(g1.values()) & set(g2.values())
    assert set(probe.values()) == set(g1.values()) | set(g2.values())
    subject = {**g1, **g2, **probe}
    assert set(subject) == {int(r[1]) for r in tid_mid}
    pairs = [tuple(map(int, line.split())) for line in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()]
    assert len(pairs) == len(set(pairs))
    for t1, t2, lab in pairs:
        assert lab == int(subject[t1] == subject[t2])
    assert sum(lab for _, _, lab in pairs) == 6 * 3  # every pair of a subject's three templates


# --- cache, workers, CLI ----------------------------------------------------------------------------------

SMALL = dict(identities=6, images_per_id=3, pairs_per_set=20, eval_identities=40, ijb=False)


def test_worker_count_does_not_change_the_files(tmp_path):
    one = synthetic(**SMALL, root=tmp_path / "one", workers=1)
    two = synthetic(**SMALL, root=tmp_path / "two", workers=2)
    for name in ["train.rec", "train.idx", "property", "train_landmarks.npy", *(f"{s}.bin" for s in PAIR_SETS)]:
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes(), name
    other = synthetic(**{**SMALL, "seed": 1}, root=tmp_path / "other", workers=2)
    assert (one.root / "train.rec").read_bytes() != (other.root / "train.rec").read_bytes()


def test_cache_is_reused_and_keyed_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINFACE_CACHE", str(tmp_path / "cache"))
    first = synthetic(**SMALL, workers=1)
    assert first.generated and first.root.parent == tmp_path / "cache"
    stamp = (first.root / "train.rec").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("a cached set was rendered again")

    monkeypatch.setattr(synth_build, "render_jpegs", boom)
    again = synthetic(**SMALL, workers=1)
    assert not again.generated and again.root == first.root
    via_package = mf.data.synthetic(**SMALL)  # the lazy `marginface.data` entry point reaches the same cache
    assert not via_package.generated and via_package.root == first.root
    assert (again.root / "train.rec").stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="rendered again"):
        synthetic(**{**SMALL, "difficulty": 0.3}, workers=1)
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # the failed attempt left nothing behind
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1


def _generate_in_child(cache: str, queue) -> None:
    import os

    os.environ["MARGINFACE_CACHE"] = cache
    result = synthetic(**SMALL, workers=1)
    queue.put((str(result.root), result.generated))


def test_concurrent_callers_share_one_generation(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_generate_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][0] == results[1][0]
    assert sorted(g for _, g in results) == [False, True]  # one rendered, the other waited and reused it
    root = Path(results[0][0])
    assert (root / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [root.name]


def test_bad_parameters_are_rejected_with_their_names(tmp_path):
    with pytest.raises(ConfigError, match="difficulty"):
        synthetic(difficulty=1.5, root=tmp_path / "x")
    with pytest.raises(ConfigError, match="pairs_per_set"):
        synthetic(pairs_per_set=50, root=tmp_path / "x")
    with pytest.raises(ConfigError, match="identities"):
        synthetic(identities=0, root=tmp_path / "x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        synthetic(**SMALL, root=taken)
    assert (taken / "notes.txt").read_text() == "mine"


def test_cli_writes_a_set(tmp_path, capsys):
    from marginface.cli import main

    out = tmp_path / "cli_set"
    argv = ["data", "synth", str(out), "--identities", "6", "--images-per-id", "3", "--difficulty", "0.4",
            "--seed", "2", "--pairs-per-set", "20", "--eval-identities", "40", "--no-ijb", "--workers", "1", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated"] and summary["classes"] == 6 and summary["images"] == 18
    assert summary["params"]["difficulty"] == 0.4 and summary["ijb"] is None
    assert sorted(Path(p).name for p in summary["pairs"].values()) == sorted(f"{s}.bin" for s in PAIR_SETS)
    assert mf.data.open_dataset(out, train=False).num_classes == 6
    assert main(argv) == 0  # same options again: reused, not rewritten
    assert json.loads(capsys.readouterr().out)["generated"] is False
    assert main(["data", "synth", str(out), "--difficulty", "2"]) == 2
    assert "difficulty" in capsys.readouterr().err


def test_the_evaluators_read_what_the_generator_writes(tiny):
    """Integration: the safe `.bin` loader and the IJB-C evaluator take the synthetic files as they are."""
    from marginface.eval.ijb import evaluate_ijb
    from marginface.eval.pairs import load_pair_sets

    sets = load_pair_sets(tiny.root)
    assert sorted(sets) == sorted(PAIR_SETS)
    assert all(len(s.issame) == 60 for s in sets.values())

    def pixels(images):  # a stand-in "model": coarse pixels of the aligned crops
        return np.asarray(images, dtype=np.float32)[:, ::8, ::8].reshape(len(images), -1)

    result = evaluate_ijb(pixels, tiny.ijb, "IJBC")
    meta = tiny.manifest["ijb"]
    assert (result["images"], result["templates"], result["pairs"], result["genuine_pairs"]) == (
        meta["images"], meta["templates"], meta["pairs"], meta["genuine"])
    assert set(result["identification"]) >= {"G1", "G2"}
