"""Data-path speed: JPEG decode + flip + normalise per core, and RecordIO record reads from the page cache.

Peers run side by side in one process, interleaved round by round after a warm-up; the figure of merit is the
median over rounds of the per-round time ratio (spec/perf.md 7.0). Single thread throughout ("per core").

    .venv/bin/python benchmarks/data.py [--rounds 7] [--images 2000] [--records 20000] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import struct
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from marginface.data.dataset import open_dataset
from marginface.data.decode import decode_rgb, encode_jpeg
from marginface.data.recordio import RecordIOReader, RecordIOWriter, pack_header
from marginface.data.transforms import FaceTransform

LFW_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real" / "small_lfw.bin"


# ----- inputs ---------------------------------------------------------------------------------------------


class _NumpyBytesUnpickler(pickle.Unpickler):
    """Just enough of a restricted unpickler to read the fixture's numpy (n,1) uint8 arrays as bytes."""

    class _Array:
        def __init__(self, *args):
            self.raw = b""

        def __setstate__(self, state):
            self.raw = state[4] if isinstance(state[4], bytes) else bytes(state[4])

    class _DType:
        def __init__(self, *args):
            pass

        def __setstate__(self, state):
            pass

    def find_class(self, module, name):
        if name == "_reconstruct" and module.endswith("multiarray"):
            return lambda cls, shape, dtype: _NumpyBytesUnpickler._Array()
        if (module, name) == ("numpy", "ndarray"):
            return _NumpyBytesUnpickler._Array
        if (module, name) == ("numpy", "dtype"):
            return _NumpyBytesUnpickler._DType
        raise pickle.UnpicklingError(f"{module}.{name} not allowed")


def lfw_jpegs() -> list[bytes]:
    """The 20 real LFW 112x112 JPEGs from the shared fixture, if present."""
    if not LFW_FIXTURE.is_file():
        return []
    with open(LFW_FIXTURE, "rb") as handle:
        bins, _ = _NumpyBytesUnpickler(handle, encoding="bytes").load()
    return [b.raw if hasattr(b, "raw") else bytes(b) for b in bins]


def smooth_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Face-like smooth 112x112 images (low-frequency colour fields plus mild texture), JPEG quality 95."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    out = []
    for _ in range(count):
        image = np.zeros((112, 112, 3))
        for channel in range(3):
            coeffs = rng.normal(0, 1, size=(4, 4))
            field = sum(
                coeffs[i, j] * np.cos(np.pi * i * xx) * np.cos(np.pi * j * yy) for i in range(4) for j in range(4)
            )
            image[..., channel] = 128 + 30 * field
        ellipse = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.55) / 0.4) ** 2 < 1
        image[ellipse] += rng.normal(20, 10, size=3)
        image += rng.normal(0, 4, size=image.shape)
        out.append(encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), 95))
    return out


# ----- decode + flip + normalise peers --------------------------------------------------------------------


def run_marginface(jpegs: list[bytes]) -> None:
    transform = FaceTransform(seed=0)
    for index, data in enumerate(jpegs):
        transform(decode_rgb(data), index=index)


def run_pillow(jpegs: list[bytes]) -> None:
    from PIL import Image

    for index, data in enumerate(jpegs):
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if index & 1:
            image = image[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        tensor.div_(255).sub_(0.5).div_(0.5)


def run_cv2(jpegs: list[bytes]) -> None:
    import cv2

    for index, data in enumerate(jpegs):
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if index & 1:
            image = image[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        tensor.div_(255).sub_(0.5).div_(0.5)


# ----- record-read peers ----------------------------------------------------------------------------------


def naive_read(rec_path: str, offset: int) -> bytes:
    """The reader a first attempt writes: open, seek, read head, read data, close, for every record."""
    with open(rec_path, "rb") as handle:
        handle.seek(offset)
        magic, lrec = struct.unpack("<II", handle.read(8))
        length = lrec & ((1 << 29) - 1)
        return handle.read(length)


def consume(fn, items) -> None:
    """Call fn on every item, dropping results at once (a list of results would make the allocator take
    fresh pages every round, and page faults would then dominate what is measured)."""
    for item in items:
        fn(item)


def interleave(peers: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per peer per round, peers alternating order each round."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in peers}
    for fn in peers.values():
        fn()  # warm-up
    for round_index in range(rounds):
        names = list(peers)
        if round_index % 2:
            names.reverse()  # alternate order so drift does not favour one peer
        for name in names:
            wall, cpu = time.perf_counter(), time.process_time()
            peers[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def summarise(times: dict[str, dict[str, list[float]]], reference: str, items: int) -> dict:
    """Per peer: items per CPU-second (single thread, so per core) and per wall-second, and the median of
    per-round time ratios against `reference` (>1 means slower than the reference)."""
    out = {}
    for name, measured in times.items():
        ratios = {
            kind: [t / r for t, r in zip(measured[kind], times[reference][kind], strict=True)]
            for kind in ("cpu", "wall")
        }
        out[name] = {
            "items_per_cpu_s": items / statistics.median(measured["cpu"]),
            "items_per_wall_s": items / statistics.median(measured["wall"]),
            "cpu_ratio_median": statistics.median(ratios["cpu"]),
            "wall_ratio_median": statistics.median(ratios["wall"]),
            "cpu_ratio_min_max": [min(ratios["cpu"]), max(ratios["cpu"])],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs decoded per peer per round")
    parser.add_argument("--records", type=int, default=20000, help="records read per peer per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The Pillow peer wraps np.asarray(image), which is read-only; torch warns once and shares the memory.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    results: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "load_average_at_start": os.getloadavg()[0],
    }
    sets = {"lfw": lfw_jpegs(), "smooth": smooth_jpegs(100)}
    decoders = {"marginface_simplejpeg": run_marginface, "pillow": run_pillow}
    try:
        import cv2  # noqa: F401

        decoders["cv2"] = run_cv2
    except ImportError:
        pass
    for set_name, base in sets.items():
        if not base:
            continue
        jpegs = (base * (args.images // len(base) + 1))[: args.images]
        peers = {name: (lambda fn=fn, jpegs=jpegs: fn(jpegs)) for name, fn in decoders.items()}
        times = interleave(peers, args.rounds)
        results[f"decode_flip_normalise[{set_name}]"] = {
            "images": len(jpegs),
            "mean_jpeg_bytes": float(np.mean([len(j) for j in base])),
            "peers": summarise(times, "marginface_simplejpeg", len(jpegs)),
        }

    payloads = sets["lfw"] or sets["smooth"]
    with tempfile.TemporaryDirectory() as tmp:
        rec, idx = os.path.join(tmp, "b.rec"), os.path.join(tmp, "b.idx")
        with RecordIOWriter(rec, idx) as writer:
            for key in range(args.records):
                writer.write(key, pack_header(key % 1000, record_id=key) + payloads[key % len(payloads)])
        Path(rec).read_bytes()  # into the page cache
        mapped = RecordIOReader(rec, use_mmap=True)
        preader = RecordIOReader(rec, use_mmap=False)
        keys = np.random.default_rng(0).permutation(args.records).tolist()
        offsets = mapped.offsets
        pairs = [(int(offsets[k]), k) for k in keys]  # idx keys are 0..N-1 in file order
        peers = {
            "marginface_mmap": lambda: consume(mapped.read, keys),
            "marginface_pread": lambda: consume(preader.read, keys),
            "naive_open_seek": lambda: consume(lambda o: naive_read(rec, o), [o for o, _ in pairs]),
        }
        times = interleave(peers, args.rounds)
        results["recordio_random_reads"] = {
            "records": args.records,
            "record_bytes_mean": float(np.mean([len(p) + 24 for p in payloads])),
            "peers": summarise(times, "marginface_mmap", args.records),
        }
        assert (
            mapped.read(keys[0]) == preader.read(keys[0])[:]
            and mapped.read(keys[0])[24:] == naive_read(rec, pairs[0][0])[24:]
        )

        # End to end: FaceDataset items (read + decode + flip + normalise), stored 112 and resized to 56.
        from marginface.data.recordio import write_identity_dataset

        count = min(args.images, args.records)
        write_identity_dataset(
            os.path.join(tmp, "set"), ((0, payloads[i % len(payloads)]) for i in range(count)), num_classes=1
        )
        full = open_dataset(os.path.join(tmp, "set"))
        small = open_dataset(os.path.join(tmp, "set"), image_size=56)
        order = np.random.default_rng(1).permutation(count).tolist()
        peers = {
            "dataset_item_112": lambda: consume(full.__getitem__, order),
            "dataset_item_56": lambda: consume(small.__getitem__, order),
        }
        times = interleave(peers, args.rounds)
        results["dataset_items"] = {"items": count, "peers": summarise(times, "dataset_item_112", count)}

    results["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, block in results.items():
        if not isinstance(block, dict):
            print(f"{name}: {block}")
            continue
        extra = {k: v for k, v in block.items() if k != "peers"}
        print(f"{name} {extra}")
        for peer, st in block["peers"].items():
            print(
                f"  {peer:24s} {st['items_per_cpu_s']:>10,.0f} /cpu-s {st['items_per_wall_s']:>10,.0f} /wall-s   "
                f"time ratio cpu {st['cpu_ratio_median']:.2f} (rounds {st['cpu_ratio_min_max'][0]:.2f}.."
                f"{st['cpu_ratio_min_max'][1]:.2f}), wall {st['wall_ratio_median']:.2f}"
            )


if __name__ == "__main__":
    main()
