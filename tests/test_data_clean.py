"""`marginface data clean RUN`: a sub-centre run on a set with injected label noise, cleaned; the kept set trains,
the report agrees with an independent recomputation, and bad runs are refused with the file or key named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import marginface as mf
from marginface.data import open_dataset
from marginface.data.clean import clean_by_subcentres, clean_run, embed_dataset, load_subcentre_head
from marginface.data.recordio.dataset import write_identity_dataset
from marginface.errors import ConfigError, MarginfaceError
from marginface.eval.loading import load_model
from marginface.train import head_rows

TINY = ["--no-progress", "data.synthetic.identities=16", "data.synthetic.images_per_id=6",
        "data.synthetic.pairs_per_set=40", "data.num_workers=0", "train.eval_every=0", "train.threads=1",
        "model.name=linear", "model.embedding_size=32", "train.batch_size=16", "--device", "cpu"]
NOISE = 0.15


def marginface(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "marginface", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def noisy(cache, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The tiny synthetic set with 15 % of its labels moved to another class; (its directory, flipped mask in the
    order of the written set)."""
    with pytest.MonkeyPatch.context() as patch:  # the session's private cache, as the subprocesses see it
        patch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])
        source = open_dataset(mf.data.synthetic(identities=16, images_per_id=6, pairs_per_set=40, ijb=False,
                                                seed=0, difficulty=0.6).train, train=False)
    rng = np.random.default_rng(0)
    labels = np.asarray(source.labels).copy()
    flipped = rng.random(len(labels)) < NOISE
    labels[flipped] = (labels[flipped] + rng.integers(1, 16, flipped.sum())) % 16
    order = np.argsort(labels, kind="stable")
    root = tmp_path_factory.mktemp("noisy") / "set"
    write_identity_dataset(root, ((int(labels[i]), source.read_bytes(int(i))[0]) for i in order), 16,
                           image_size=source.stored_size)
    return root, flipped[order]


@pytest.fixture(scope="module")
def run(cache, noisy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean_run") / "run"
    marginface(cache, "train", *TINY, "--margin", "arcface", "head.subcenters=3", f"data.train={noisy[0]}",
               "--max-steps", "40", "--out", str(out))
    return out


def test_clean_writes_a_set_that_trains_and_a_report_that_adds_up(cache, noisy, run, tmp_path):
    out = tmp_path / "cleaned"
    result = marginface(cache, "data", "clean", str(run), "--max-angle", "75", "--out", str(out), "--json")
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "clean_report.json").read_text())
    assert "total" in (out / "clean_report.txt").read_text()

    # the same cleaning, recomputed here from the run's files
    dataset = open_dataset(noisy[0], train=False)
    weight, k = load_subcentre_head(run)
    embeddings = embed_dataset(load_model(run), dataset, progress=False, input_size=56)
    labels = torch.from_numpy(np.asarray(dataset.labels))
    expected = clean_by_subcentres(embeddings, labels, weight, k, 75.0)
    dropped = torch.nonzero(~expected.keep).flatten().tolist()
    assert [d["index"] for d in summary["dropped_samples"]] == dropped
    assert summary["dropped"] == len(dropped) == summary["samples"] - summary["kept"]
    assert [c["dropped"] for c in summary["classes"]] == expected.dropped.tolist()
    assert sum(c["dropped"] for c in summary["classes"]) == summary["dropped"]

    kept = open_dataset(out, train=False)
    assert len(kept) == summary["kept"] and kept.num_classes == 16
    counts = np.bincount(kept.labels, minlength=16)
    assert counts.tolist() == [c["samples"] - c["dropped"] for c in summary["classes"]]
    first_kept = int(torch.nonzero(expected.keep).flatten()[0])
    assert kept.read_bytes(0) == dataset.read_bytes(first_kept)  # bytes copied, not re-encoded

    flipped = noisy[1]
    caught = int(flipped[dropped].sum())
    precision, recall = caught / max(len(dropped), 1), caught / max(int(flipped.sum()), 1)
    print(f"tiny run: dropped {len(dropped)}, precision {precision:.2f}, recall {recall:.2f}")

    retrained = tmp_path / "retrained"
    marginface(cache, "train", *TINY, f"data.train={out}", "--max-steps", "2", "--out", str(retrained))
    assert (retrained / "model.safetensors").is_file()


def test_a_run_without_subcentres_is_refused_saying_what_to_set(cache, run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        shutil.copy(run / name, plain / name)
    head_rows.write_head_safetensors(plain / "head.safetensors", 16, [torch.zeros(16, 32)], {"subcenters": "1"})
    with pytest.raises(ConfigError, match=r"without sub-centres.*head\.subcenters=K"):
        clean_run(plain, progress=False)
    result = marginface(cache, "data", "clean", str(plain), check=False)
    assert result.returncode != 0 and "head.subcenters=K" in result.stderr and "Traceback" not in result.stderr


def test_missing_run_and_files_are_named(run, tmp_path):
    with pytest.raises(MarginfaceError, match="does not exist"):
        clean_run(tmp_path / "nowhere", progress=False)
    for missing in ("config.yaml", "model.safetensors", "head.safetensors"):
        partial = tmp_path / missing
        shutil.copytree(run, partial, ignore=shutil.ignore_patterns("checkpoints"))
        (partial / missing).unlink()
        with pytest.raises(MarginfaceError, match=missing.replace(".", r"\.")):
            clean_run(partial, progress=False)
    with pytest.raises(ConfigError, match="max-angle"):
        clean_run(run, max_angle=0.0, progress=False)
