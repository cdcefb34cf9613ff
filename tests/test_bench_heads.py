"""The head benchmark's memory probe measures its own process, whatever the size of the process that starts it."""

from __future__ import annotations

import pytest
import torch

from marginface.bench import heads


def test_memory_probe_sees_the_steps_growth_even_from_a_larger_parent():
    # Linux's ru_maxrss survives exec: a probe started by a process holding 1 GiB used to report 0 growth.
    parent = torch.ones(2**28)  # 1 GiB, touched
    batch, classes, dim = 64, 40_000, 128
    growth_mb = heads.memory_probe("arcface@chunked", batch, classes, dim)
    weight_grad_mb = classes * dim * 4 / 2**20  # any engine writes W's gradient: 19.5 MB
    assert weight_grad_mb <= growth_mb < weight_grad_mb + 200
    assert parent[0] == 1.0


def test_peak_rss_is_at_least_what_this_process_holds():
    held = torch.ones(2**25)  # 128 MiB
    assert heads.peak_rss_kib() >= held.numel() * 4 // 1024


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_the_variants_of_a_round_share_one_class_centre_matrix():
    # 16 variants each holding W at C = 360k took the recorded benchmark past 24 GiB (killed by the OOM killer)
    batch, classes, dim = 8, 50_000, 512
    weight_mb = classes * dim * 4 / 2**20  # 98 MB
    shared: dict = {}
    before = resident_mb()
    steps = [heads.make_step(name, batch, classes, dim, shared=shared)
             for name in ("arcface@chunked", "curricularface@chunked", "npcface@dense", "cosface@dense")]
    grown = resident_mb() - before
    assert shared["weight"].shape == (classes, dim)
    assert weight_mb * 0.9 < grown < 2 * weight_mb  # one W, not four
    losses = [step() for step in steps]
    assert all(loss > 0 for loss in losses)
    assert shared["weight"].grad is None  # each step lets its gradient go: the next variant starts clean


def test_round_summary_takes_per_round_ratios_their_median_and_quartiles():
    times = {
        heads.FLOOR: [1.0, 2.0, 1.0, 1.0, 4.0],
        "arcface@chunked": [1.0, 2.0, 2.0, 1.0, 4.0],
        "npcface@chunked": [1.1, 1.8, 2.4, 1.3, 4.4],  # per round / ArcFace: 1.1, 0.9, 1.2, 1.3, 1.1
    }
    summary = heads.summarise_rounds(times)
    npc = summary["npcface@chunked"]
    assert npc["ratio_to_arcface"] == pytest.approx(1.1)  # the median of the per-round ratios
    # sorted 0.9, 1.1, 1.1, 1.2, 1.3: inclusive quartiles at positions 1 and 3
    assert npc["ratio_to_arcface_quartiles"] == pytest.approx((1.1, 1.2))
    assert npc["ratio_to_floor"] == pytest.approx(1.1)  # 1.1, 0.9, 2.4, 1.3, 1.1
    assert npc["ratio_to_pml"] is None and npc["best_seconds"] == 1.1
    assert summary[heads.FLOOR]["ratio_to_arcface"] is None
    assert summary["arcface@chunked"]["ratio_to_arcface_quartiles"] == pytest.approx((1.0, 1.0))


def test_repeated_passes_keep_each_variants_fastest_step_per_round(monkeypatch):
    clock = [0.0]
    # each variant's step durations in call order: the warm-up, then round 0's two passes, then round 1's
    durations = {
        heads.FLOOR: iter([9.0, 1.0, 5.0, 3.0, 1.0]),
        "arcface@chunked": iter([9.0, 2.0, 2.0, 2.0, 8.0]),
        "npcface@chunked": iter([9.0, 7.0, 2.2, 2.4, 2.6]),
    }

    def fake_step(name, *args, **kwargs):
        def step() -> float:
            clock[0] += next(durations[name])
            return 1.0
        return step

    monkeypatch.setattr(heads, "make_step", fake_step)
    monkeypatch.setattr(heads.time, "perf_counter", lambda: clock[0])
    summary = heads.run_rounds(list(durations), batch=8, classes=10, dim=4, rounds=2, repeats=2)
    # fastest per round: floor 1.0, 1.0; ArcFace 2.0, 2.0; NPCFace 2.2, 2.4 -> ratios 1.1 and 1.2 to ArcFace
    assert summary["npcface@chunked"]["ratio_to_arcface"] == pytest.approx(1.15)
    assert summary["npcface@chunked"]["ratio_to_floor"] == pytest.approx(2.3)
    assert summary["arcface@chunked"]["ratio_to_floor"] == pytest.approx(2.0)
    assert summary[heads.FLOOR]["best_seconds"] == 1.0
    assert all(next(d, None) is None for d in durations.values())  # warm-up + 2 rounds x 2 passes, no more
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        heads.run_rounds(list(durations), batch=8, classes=10, dim=4, rounds=1, repeats=0)


def test_the_correctness_gate_passes_every_engine_including_the_sampling_one():
    # Partial FC draws its classes per step: the fp32 and float64 heads once drew different ones (error 0.44)
    names = [heads.variant("arcface", engine) for engine in ("chunked", "dense", "partial", "sharded")]
    errors = heads.check_correctness(names, classes=600, dim=32, batch=16)
    assert set(errors) == set(names)
    assert all(error < 1e-5 for error in errors.values())
