"""The head benchmark's memory probe measures its own process, whatever the size of the process that starts it."""

from __future__ import annotations

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
