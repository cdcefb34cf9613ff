"""`marginface search` end to end on a tiny synthetic set: search.json, sequential == torchrun ranks, resume after
kill -9, `train --margin-from`, and the bad-input errors raised before any training."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import marginface as mf
from marginface.cli import main
from marginface.errors import ConfigError
from marginface.search import SearchSettings, run_search

TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_id=6", "data.synthetic.pairs_per_set=40",
        "train.batch_size=16", "data.num_workers=0", "train.eval_every=0", "train.threads=1"]
SEARCH = ["--candidates", "2", "--epochs", "3", "--warmup-epochs", "1", "--steps-per-epoch", "3", "--sigma", "3",
          "--seed", "0", "--no-progress"]


def search_cli(env, *args, check=True, tiny=True):
    command = [sys.executable, "-m", "marginface", "search", *(TINY if tiny else []), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sequential(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search") / "sequential"
    search_cli(cache, *SEARCH, "--out", str(out))
    return out


def load(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def test_search_json_records_everything(sequential):
    summary = load(sequential)
    assert summary["method"] == "search_softmax" and summary["space"] == "global"
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and [e["warmup"] for e in epochs] == [True, False, False]
    for record in epochs:
        for key in ("distribution_before", "distribution_after", "candidates", "best"):
            assert key in record
        rewards = [c["reward"] for c in record["candidates"]]
        assert record["best"] == rewards.index(max(rewards))
        for candidate in record["candidates"]:
            assert 0.0 <= candidate["reward"] <= 1.0
            # the reward is the mean 10-fold accuracy over the four synthetic pair sets
            assert candidate["reward"] == pytest.approx(sum(candidate["accuracies"].values()) / 4)
            z = candidate["params"]["x"][0]
            assert candidate["params"]["params"]["a"] == pytest.approx(-math.exp(z), rel=1e-12)
    # the distribution after an epoch is the one the next epoch samples from
    for previous, record in zip(epochs[:-1], epochs[1:], strict=True):
        assert record["distribution_before"] == previous["distribution_after"]
    assert len(epochs[0]["candidates"]) == 1 and epochs[0]["candidates"][0]["params"]["x"] == [10.0]  # s/3
    assert all(len(e["candidates"]) == 2 for e in epochs[1:])
    # the samples are N(μ, σ = 3) draws: they differ, and the warm-up factor −e^{s/3} is the initial mean
    assert epochs[1]["candidates"][0]["params"]["x"] != epochs[1]["candidates"][1]["params"]["x"]
    best = summary["best"]
    assert best["margin"] == "lfs" and best["source"] == "distribution_mean"
    assert best["x"] == epochs[-1]["distribution_after"]["mean"]
    assert best["params"]["a"] == pytest.approx(-math.exp(best["x"][0]), rel=1e-12)
    assert {p.name for p in (sequential / "plots").glob("*.png")} == {"rewards.png", "distribution.png"}
    assert (sequential / "model.safetensors").is_file()


def test_sequential_and_ranks_modes_agree(cache, sequential, tmp_path):
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "marginface", "search", *TINY, *SEARCH, "--mode", "ranks", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, env=cache, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load(sequential), load(out)
    assert len(a["epochs"]) == len(b["epochs"]) == 3
    for ra, rb in zip(a["epochs"], b["epochs"], strict=True):
        assert [c["params"]["x"] for c in ra["candidates"]] == [c["params"]["x"] for c in rb["candidates"]]
        assert [c["reward"] for c in ra["candidates"]] == [c["reward"] for c in rb["candidates"]]
        assert ra["distribution_after"] == rb["distribution_after"] and ra["best"] == rb["best"]
    # the search did update the distribution, so the agreement covers the update too
    assert a["epochs"][-1]["distribution_after"]["mean"] != a["epochs"][0]["distribution_after"]["mean"]
    ma, mb = load_file(sequential / "model.safetensors"), load_file(out / "model.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_after_kill_continues_from_the_last_finished_epoch(cache, sequential, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "marginface", "search", *TINY, *SEARCH, "--out", str(out)]
    process = subprocess.Popen(command, env=cache, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail("the search ended before it could be killed")
        try:
            if load(out)["epochs_done"] >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists() and load(out)["epochs_done"] == 2  # it died in epoch 3
    result = search_cli(cache, "--resume", str(out), "--no-progress", "--json", tiny=False)
    assert "resumed" in result.stderr and "after epoch 2 of 3" in result.stderr
    assert json.loads(result.stdout)["best"] == load(sequential)["best"]  # stdout: the JSON and nothing else
    a, b = load(sequential), load(out)
    assert a["epochs"] == b["epochs"] and a["best"] == b["best"]
    ma, mb = load_file(sequential / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_train_margin_from_uses_the_loss_found(cache, sequential, tmp_path):
    out = tmp_path / "retrain"
    command = [sys.executable, "-m", "marginface", "train", "--no-progress", *TINY, "--max-steps", "2",
               "--margin-from", str(sequential / "search.json"), "--out", str(out)]
    result = subprocess.run(command, env=cache, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    head = yaml.safe_load((out / "config.yaml").read_text())["head"]
    best = load(sequential)["best"]
    assert head["margin"] == "lfs" and head["params"] == best["params"]


def test_am_lfs_and_local_space_runs(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINFACE_CACHE", cache["MARGINFACE_CACHE"])
    threads = torch.get_num_threads()
    try:
        config = mf.train.load_config(None, TINY)
        am = run_search(SearchSettings(method="am_lfs", candidates=2, epochs=2, steps_per_epoch=1, pieces=3),
                        config, tmp_path / "am", progress=False)
        local = run_search(SearchSettings(method="random_softmax", space="local", candidates=2, epochs=2,
                                          warmup_epochs=0, steps_per_epoch=1, bins=4), config, tmp_path / "local",
                           progress=False)
    finally:
        torch.set_num_threads(threads)
    assert am["best"]["margin"] == "am_lfs" and len(am["best"]["params"]["t_params"]) == 3
    assert len(am["epochs"][-1]["distribution_after"]["mean"]) == 6
    assert local["best"]["margin"] == "lfs_local" and len(local["best"]["params"]["a_bins"]) == 4
    # Random-Softmax never updates its distribution; the loss it reports is the last epoch's best candidate
    assert all(e["distribution_after"] == e["distribution_before"] for e in local["epochs"])
    last = local["epochs"][-1]
    assert local["best"]["source"] == "last_epoch_best_candidate"
    assert local["best"]["params"] == last["candidates"][last["best"]]["params"]["params"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "lfs_magic"], "--method 'lfs_magic' is invalid: expected one of search_softmax, "
                                    "random_softmax, am_lfs"),
        (["--candidates", "1"], "--candidates=1 is invalid: expected an integer >= 2"),
        (["--epochs", "2", "--warmup-epochs", "2"], "--epochs=2 is invalid with --warmup-epochs=2: expected more "
                                                    "epochs than warm-up epochs"),
        (["--initial-margin", "-0.2"], "--initial-margin=-0.2 is invalid: expected a number > 0"),
        (["--space", "galactic"], "--space 'galactic' is invalid: expected one of global, local"),
        (["--mode", "threads"], "--mode 'threads' is invalid: expected one of sequential, ranks"),
        (["--mode", "ranks"], "--mode ranks runs one process per candidate: launch 4 processes"),
        (["--reward-pairs", "/nonexistent/lfw.bin"], "--reward-pairs: /nonexistent/lfw.bin does not exist"),
    ],
)
def test_bad_input_is_rejected_before_training(args, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["search", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written


def test_unreadable_reward_set_and_margin_from_errors(tmp_path, capsys):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ConfigError, match=r"--reward-pairs: .*broken\.bin cannot be read as a verification pair set"):
        run_search(SearchSettings(reward_pairs=[str(bad)]), mf.train.load_config(None, TINY), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert main(["train", "--margin-from", str(tmp_path / "none.json"), "--out", str(tmp_path / "t")]) == 2
    assert "--margin-from" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"epochs": []}))
    assert main(["train", "--margin-from", str(tmp_path / "other.json"), "--out", str(tmp_path / "t")]) == 2
    assert 'expected a search.json with "best"' in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no search_state.pt there" in capsys.readouterr().err


def test_search_progress_counts_every_candidate_step(cache, tmp_path):
    # 1 warm-up epoch of one candidate + 2 epochs of 2 candidates, 3 steps each: 15 candidate steps in all
    out = tmp_path / "progress"
    result = search_cli(cache, *[a for a in SEARCH if a != "--no-progress"], "--out", str(out))
    assert "step 15/15 (100%)" in result.stderr  # stderr is not a terminal: plain status lines
    log = (out / "search.log").read_text()
    assert "step 15/15 (100%)" in log and log.count("epoch ") >= 3
