"""`synthetic()`: generate (once) and cache the built-in synthetic face-identity set in the real file formats.

The set is a pure function of its parameters: every picture is seeded from (seed, identity, picture), so any
number of worker processes writes the same files. It is generated into a temporary directory and renamed into
place, under a lock file, so concurrent callers (several torchrun ranks) wait for one writer and reuse its work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from marginface.data.synth.ijb import plan_ijb, write_ijb
from marginface.data.synth.pairs import PAIR_SETS, check_pair_sizes, plan_pair_set, write_pair_bin
from marginface.data.synth.sample import ImageSpec, render_jpegs
from marginface.errors import ConfigError

# Bump whenever the pictures a given set of parameters produces change, so that stale caches are not reused.
GENERATOR_VERSION = 2
CACHE_ENV = "MARGINFACE_CACHE"
MANIFEST = "manifest.json"
IJB_DIR = "synth_ijb"
_BATCH = 24  # pictures per worker task: large enough to amortise IPC, small enough to balance two cores


@dataclass(frozen=True)
class SyntheticSet:
    """Where a generated synthetic set lives. `train` holds train.rec/.idx/property (and the pair `.bin`s,
    as in insightface's layout); `pairs` maps set name to `.bin` path; `ijb` is the IJB-style tree or None."""

    root: Path
    train: Path
    pairs: dict[str, Path]
    ijb: Path | None
    params: dict[str, Any]
    num_classes: int = 0
    num_images: int = 0
    generated: bool = False  # True when this call rendered it, False when it came from the cache
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


def default_cache_dir() -> Path:
    """`$MARGINFACE_CACHE`, else `~/.cache/marginface`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "marginface"


def synthetic_params(
    identities: int = 400,
    images_per_id: int = 20,
    difficulty: float = 0.6,
    seed: int = 0,
    pairs_per_set: int = 600,
    ijb: bool = True,
    *,
    eval_identities: int = 200,
    ijb_identities: int = 24,
    delta: float = 0.6,
) -> dict[str, Any]:
    """Validate the parameters and return them as the dict that keys the cache."""

    def integer(name: str, value: Any, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"synthetic: {name} must be an integer >= {low}, got {value!r}")
        return int(value)

    def number(name: str, value: Any, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
            low <= float(value) <= high
        ):
            raise ConfigError(f"synthetic: {name} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    params = {
        "identities": integer("identities", identities, 2),
        "images_per_id": integer("images_per_id", images_per_id, 1),
        "difficulty": number("difficulty", difficulty, 0.0, 1.0),
        "seed": integer("seed", seed, 0),
        "pairs_per_set": integer("pairs_per_set", pairs_per_set, 0),
        "ijb": bool(ijb),
        "eval_identities": integer("eval_identities", eval_identities, 0),
        "ijb_identities": integer("ijb_identities", ijb_identities, 2),
        "delta": number("delta", delta, 0.0, 1.0),
    }
    check_pair_sizes(params["pairs_per_set"], params["eval_identities"])
    return params


def cache_key(params: dict[str, Any]) -> str:
    """Directory name of a parameter set: readable size plus a hash of everything (and the generator version)."""
    blob = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    return f"synth-v{GENERATOR_VERSION}-{params['identities']}x{params['images_per_id']}-s{params['seed']}-{digest}"


def synthetic(
    identities: int = 400,
    images_per_id: int = 20,
    difficulty: float = 0.6,
    seed: int = 0,
    pairs_per_set: int = 600,
    ijb: bool = True,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    *,
    eval_identities: int = 200,
    ijb_identities: int = 24,
    delta: float = 0.6,
    force: bool = False,
) -> SyntheticSet:
    """Return the synthetic face-identity set for these parameters, generating it first if needed.

    Training: `identities` classes (families of two siblings, spread `delta`) x `images_per_id` 112x112 aligned
    JPEGs with nuisance scaled by `difficulty`, as insightface RecordIO. Evaluation: four `.bin` pair sets of
    `pairs_per_set` pairs from `eval_identities` other identities, and (if `ijb`) an IJB-C-style tree of
    `ijb_identities` subjects. Without `root` the set lives in the cache (`$MARGINFACE_CACHE` or
    `~/.cache/marginface`) under a directory keyed by the parameters; with `root` it is written there. An
    existing complete set with the same parameters is reused unless `force`.
    """
    params = synthetic_params(identities, images_per_id, difficulty, seed, pairs_per_set, ijb,
                              eval_identities=eval_identities, ijb_identities=ijb_identities, delta=delta)
    target = Path(root).expanduser() if root is not None else default_cache_dir() / cache_key(params)
    if not force:
        found = _load(target, params)
        if found is not None:
            return found
    if root is not None and target.exists() and not _is_replaceable(target, force):
        raise FileExistsError(
            f"synthetic: {target} exists and is not a synthetic set with these parameters; choose an empty or "
            f"new directory (or force=True / --force to replace a synthetic set with other parameters)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock") as locked:
        # Another process may have finished it while this one waited for the lock.
        if not force:
            found = _load(target, params)
            if found is not None:
                return found
        # Holding the lock, any temporary directory of this target is a leftover of a killed run.
        for stale in target.parent.glob(f".{target.name}.tmp-*") if locked else ():
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
        try:
            manifest = _generate(tmp, params, workers, progress)
            _install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _from_manifest(target, manifest, generated=True)


def _is_replaceable(target: Path, force: bool) -> bool:
    if target.is_dir() and not any(target.iterdir()):
        return True
    return force and (target / MANIFEST).is_file()


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished set into place; an older set at `target` (force, or an empty dir) is moved away first."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, target)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock (POSIX flock); elsewhere the atomic rename alone keeps the cache consistent."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load(target: Path, params: dict[str, Any]) -> SyntheticSet | None:
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        return None
    return _from_manifest(target, manifest, generated=False)


def _from_manifest(target: Path, manifest: dict[str, Any], generated: bool) -> SyntheticSet:
    pairs = {name: target / info["file"] for name, info in manifest["pairs"].items()}
    ijb = target / manifest["ijb"]["path"] if manifest.get("ijb") else None
    return SyntheticSet(
        root=target, train=target, pairs=pairs, ijb=ijb, params=dict(manifest["params"]),
        num_classes=int(manifest["train"]["classes"]), num_images=int(manifest["train"]["images"]),
        generated=generated, manifest=manifest,
    )


def train_specs(params: dict[str, Any]) -> list[list[ImageSpec]]:
    """One list of specs per training class, in label order: class i is member i % 2 of family i // 2."""
    d, k = params["difficulty"], params["images_per_id"]
    return [
        [ImageSpec("train", label // 2, label % 2, 0, index, d) for index in range(k)]
        for label in range(params["identities"])
    ]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Workers run numpy and simplejpeg only, so fork is safe and starts in milliseconds (spawn would re-import
    # the caller's main module, which breaks scripts without a __main__ guard).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def _generate(out: Path, params: dict[str, Any], workers: int | None, progress: bool) -> dict[str, Any]:
    from marginface.data.recordio import write_identity_dataset

    start = time.perf_counter()
    seed, delta = params["seed"], params["delta"]
    per_class = train_specs(params)
    pair_plans = {
        name: plan_pair_set(name, seed, params["pairs_per_set"], params["eval_identities"], params["difficulty"])
        for name in (PAIR_SETS if params["pairs_per_set"] else ())
    }
    ijb_plan = plan_ijb(seed, params["ijb_identities"], params["difficulty"]) if params["ijb"] else None

    # One flat list of batches, consumed in order: training classes, then each pair set, then the IJB crops.
    batches: list[list[ImageSpec]] = [specs[i:i + _BATCH] for specs in per_class for i in range(0, len(specs), _BATCH)]
    class_batches = [(len(specs) + _BATCH - 1) // _BATCH for specs in per_class]
    pair_specs = {name: [s for a, b, _ in plan for s in (a, b)] for name, plan in pair_plans.items()}
    for specs in pair_specs.values():
        batches += [specs[i:i + _BATCH] for i in range(0, len(specs), _BATCH)]
    ijb_specs = [p.spec for p in ijb_plan.pictures] if ijb_plan else []
    batches += [ijb_specs[i:i + _BATCH] for i in range(0, len(ijb_specs), _BATCH)]
    total = sum(len(b) for b in batches)

    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(batches))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="synthetic faces", dynamic_ncols=True)
    task = partial(render_jpegs, seed, delta)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(_pool_context().Pool(workers))
            results: Iterator[list] = pool.imap(task, batches)
        else:
            results = map(task, batches)

        def take(count: int) -> list:
            got = []
            for _ in range(count):
                part = next(results)
                got += part
                if bar is not None:
                    bar.update(len(part))
            return got

        landmarks: list[np.ndarray] = []

        def samples() -> Iterator[tuple[int, bytes]]:
            for label, nb in enumerate(class_batches):
                for jpeg, lmk, _ in take(nb):
                    landmarks.append(lmk)
                    yield label, jpeg

        info = write_identity_dataset(out, samples(), params["identities"], (112, 112))
        np.save(out / "train_landmarks.npy", np.asarray(landmarks, dtype=np.float32))

        pairs_info: dict[str, Any] = {}
        for name, plan in pair_plans.items():
            rendered = take((len(pair_specs[name]) + _BATCH - 1) // _BATCH)
            write_pair_bin(out / f"{name}.bin", [r[0] for r in rendered], [same for _, _, same in plan])
            pairs_info[name] = {
                "file": f"{name}.bin",
                "pairs": len(plan),
                "positives": sum(same for _, _, same in plan),
                "identities": sorted({s.identity_key for s in pair_specs[name]}),
                "pair_identities": [[x.identity_key, y.identity_key] for x, y, _ in plan],
            }
        ijb_info = None
        if ijb_plan is not None:
            rendered = take((len(ijb_specs) + _BATCH - 1) // _BATCH)
            write_ijb(out / IJB_DIR, ijb_plan, rendered, seed)
            ijb_info = {
                "path": IJB_DIR,
                "subjects": params["ijb_identities"],
                "templates": len(ijb_plan.templates),
                "images": len(ijb_plan.pictures),
                "pairs": len(ijb_plan.pairs),
                "genuine": sum(label for _, _, label in ijb_plan.pairs),
            }
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    manifest = {
        "generator": "marginface.data.synth",
        "version": GENERATOR_VERSION,
        "params": params,
        "train": {
            "images": info["images"],
            "classes": info["classes"],
            "layout": info["layout"],
            "landmarks": "train_landmarks.npy",
            "identities": [f"train/{c // 2}/{c % 2}" for c in range(params["identities"])],
        },
        "pairs": pairs_info,
        "ijb": ijb_info,
        "stats": {
            "seconds": round(seconds, 3),
            "images": total,
            "images_per_s": round(total / seconds, 1),
            "workers": workers,
        },
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)  # written last: its presence marks a complete set
    return manifest
