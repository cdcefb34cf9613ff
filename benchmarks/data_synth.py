"""Synthetic face generation speed: per-core rendering rates and end-to-end set generation with 1 vs 2 workers.

Per spec/perf.md 7.0 the variants run interleaved round-robin in one process, >= 5 rounds after a warm-up, and
the report gives the median per-round ratio to a baseline measured in the same round: here the baseline is
simplejpeg decoding of the same pictures (what the training loader pays per image), so "render+JPEG = 0.05x
decode" reads as "generating a picture costs 20 decodes". Absolute images/s are printed as the median too.

    .venv/bin/python benchmarks/data_synth.py                 # per-core rates (about 1 minute)
    .venv/bin/python benchmarks/data_synth.py --e2e           # plus end-to-end 1 vs 2 workers on a small set
    .venv/bin/python benchmarks/data_synth.py --full          # plus one timed generation of the default set
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from marginface.data.synth import ImageSpec, synthetic
from marginface.data.synth.latents import face_params, identity_latent
from marginface.data.synth.render import render_face
from marginface.data.synth.sample import encode_jpeg, render_jpegs, render_spec, spec_nuisance


def _specs(n: int, round_id: int, loose: bool = False) -> list[ImageSpec]:
    split = "ijb" if loose else "train"
    return [ImageSpec(split, (round_id * n + i) // 2, i % 2, 0, round_id, 0.6, loose=loose) for i in range(n)]


def per_core(rounds: int, n: int) -> dict:
    """Single-process rates of each stage, interleaved; every round uses fresh identities."""
    seed = 0
    jpegs = [encode_jpeg(render_spec(seed, s)[0], 95) for s in _specs(n, 999)]

    def decode() -> None:
        for b in jpegs:
            simplejpeg.decode_jpeg(b)

    def render_only(specs) -> None:
        for s in specs:
            z = identity_latent(seed, s.split, s.family, s.member)
            nz, frame = spec_nuisance(seed, s)
            render_face(face_params(z, nz.age), nz, size=160 if s.loose else 112, frame=frame)

    variants = {
        "decode (simplejpeg, baseline)": lambda r: decode(),
        "render 112 (numpy SDF)": lambda r: render_only(_specs(n, r)),
        "render 112 + JPEG (generator work)": lambda r: render_jpegs(seed, 0.6, _specs(n, r)),
        "render 160 loose crop + JPEG (IJB)": lambda r: render_jpegs(seed, 0.6, _specs(n, r, loose=True)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(r)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:
                times[name].append(dt)
                cpu[name].append(dc)
    base = times["decode (simplejpeg, baseline)"]
    report = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts, strict=True)]
        report[name] = {
            "img_per_s_median": n / statistics.median(ts),
            # Images per second of this process's CPU time: robust to other jobs sharing the cores.
            "img_per_cpu_s_median": n / statistics.median(cpu[name]),
            "img_per_s_best": n / min(ts),
            "ms_per_img_median": 1e3 * statistics.median(ts) / n,
            "speed_vs_decode_median": statistics.median(ratios),
        }
    return report


def end_to_end(rounds: int) -> dict:
    """Small complete set (50 ids x 20, 4 x 100 pairs, 6-subject IJB), workers=1 vs 2, interleaved."""
    params = dict(identities=50, images_per_id=20, pairs_per_set=100, eval_identities=40, ijb_identities=6)
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):
            for workers in (1, 2):
                t0, c0 = time.perf_counter(), _cpu_with_children()
                result = synthetic(**params, root=Path(tmp) / f"r{r}w{workers}", workers=workers)
                dt, dc = time.perf_counter() - t0, _cpu_with_children() - c0
                images = result.manifest["stats"]["images"]
                if r:
                    times[workers].append(dt)
                    cpu[workers].append(dc)
    speedups = [a / b for a, b in zip(times[1], times[2], strict=True)]
    return {
        "images_per_set": images,
        "workers1_img_per_s_median": images / statistics.median(times[1]),
        "workers2_img_per_s_median": images / statistics.median(times[2]),
        "speedup_2_vs_1_median": statistics.median(speedups),
        "workers1_img_per_cpu_s_median": images / statistics.median(cpu[1]),
        "workers2_img_per_cpu_s_median": images / statistics.median(cpu[2]),
    }


def _cpu_with_children() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def full_default() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu_with_children()
        result = synthetic(root=Path(tmp) / "default", workers=2)
        dt, dc = time.perf_counter() - t0, _cpu_with_children() - c0
    return {**result.manifest["stats"], "seconds": dt, "cpu_seconds": dc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=100, help="pictures per variant per round")
    parser.add_argument("--e2e", action="store_true", help="also time a small complete set with 1 vs 2 workers")
    parser.add_argument("--full", action="store_true", help="also time the default set (400 x 20 + pairs + IJB)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out: dict = {"cpu_count": os.cpu_count(), "numpy": np.__version__, "simplejpeg": simplejpeg.__version__}
    out["per_core"] = per_core(args.rounds, args.images)
    if args.e2e:
        out["end_to_end"] = end_to_end(args.rounds)
    if args.full:
        out["default_set"] = full_default()
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    print(f"per core, {args.images} pictures x {args.rounds} rounds (median of rounds):")
    for name, rep in out["per_core"].items():
        print(f"  {name:38s} {rep['img_per_cpu_s_median']:8.0f} img/CPU-s  {rep['img_per_s_median']:8.0f} img/s wall  "
              f"{rep['speed_vs_decode_median']:.3f}x decode speed")
    if "end_to_end" in out:
        e = out["end_to_end"]
        print(f"end to end ({e['images_per_set']} pictures): 1 worker {e['workers1_img_per_s_median']:.0f} img/s, "
              f"2 workers {e['workers2_img_per_s_median']:.0f} img/s, speed-up {e['speedup_2_vs_1_median']:.2f}x")
    if "default_set" in out:
        d = out["default_set"]
        print(f"default set: {d['images']} pictures in {d['seconds']:.1f} s wall, {d['cpu_seconds']:.1f} CPU-s "
              f"({d['images'] / d['cpu_seconds']:.0f} img/CPU-s, 2 workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
