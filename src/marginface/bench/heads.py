"""The head benchmark: forward + backward of margin heads on each engine, interleaved with a 3-GEMM floor and PML.

Variants are ``HEAD@ENGINE`` (e.g. ``arcface@chunked``), pytorch-metric-learning's ArcFaceLoss (when installed) and
the floor (the three GEMMs any head must do: logits, dX, dW, and nothing else). All run interleaved, round-robin,
in one process: absolute times on a shared machine drift by 2x, ratios measured in the same round do not.
``marginface bench heads`` and benchmarks/heads.py (the recorded figures of docs/benchmarks.md) both run this.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from marginface import heads as margin_heads

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

FLOOR, PML = "3-GEMM floor", "PML ArcFaceLoss"
DEFAULT_HEADS = ["arcface", "cosface", "combined", "mv_softmax", "arcnegface", "curricularface", "npcface"]


def variant(head: str, engine: str) -> str:
    return f"{head}@{engine}"


def make_step(
    name: str, batch: int, classes: int, dim: int, seed: int = 0, device: str = "cpu", dtype: str = "float32",
    shared: dict[str, torch.nn.Parameter] | None = None,
) -> Callable[[], float]:
    """A closure running one forward + backward of variant ``name``; returns the loss (forces completion).

    ``dtype`` is the embeddings' precision; bfloat16/float16 run the head under autocast, as a mixed-precision
    backbone would (the floor then multiplies in that precision). ``shared``: where the variants of one round
    keep their common class centres (``"weight"``). The steps never update W, so one [C, D] matrix serves every
    head: at C = 360k that is 0.7 GB instead of 0.7 GB per variant, which took 16 variants past 24 GiB.
    """
    generator = torch.Generator().manual_seed(seed)
    low_precision = dtype in ("bfloat16", "float16")
    embeddings = torch.randn(batch, dim, generator=generator).to(device=device, dtype=DTYPES[dtype])
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    if name == FLOOR:
        weight = (torch.randn(classes, dim, generator=generator) * 0.01).to(device=device, dtype=DTYPES[dtype])
        upstream = torch.randn(batch, classes, generator=generator).to(device=device, dtype=DTYPES[dtype])

        def floor() -> float:
            logits = embeddings @ weight.t()  # forward
            grad_x = upstream @ weight  # backward, input
            grad_w = upstream.t() @ embeddings  # backward, weight
            return float(logits[0, 0] + grad_x[0, 0] + grad_w[0, 0])  # float() waits for the device

        return floor
    if name == PML:
        from pytorch_metric_learning.losses import ArcFaceLoss

        module = ArcFaceLoss(classes, dim, margin=math.degrees(0.5), scale=64)
    else:
        head, _, engine = name.partition("@")
        module = margin_heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None)
    module.to(device).train()
    if shared is not None and name != PML:
        common = shared.setdefault("weight", module.weight)
        if common.shape == module.weight.shape:  # sub-centre heads hold K rows per class: their own
            module.weight = common

    def step() -> float:
        x = embeddings.clone().requires_grad_(True)
        with torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype], enabled=low_precision):
            loss = module(x if name != PML else x.float(), labels)
        loss.backward()
        value = loss.detach().item()
        for parameter in module.parameters():  # variants run side by side: none may hold a [C, D] gradient
            parameter.grad = None
        return value

    return step


def check_correctness(names: list[str], classes: int = 4000, dim: int = 512, batch: int = 64) -> dict[str, float]:
    """Relative error of each head's fp32 loss and gradients against the same head in float64."""
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    errors = {}
    for name in names:
        head, _, engine = name.partition("@")
        head64 = margin_heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None)
        head64 = head64.double().eval()
        head32 = margin_heads.create(head, num_classes=classes, embedding_size=dim, engine=engine or None).eval()
        head32.load_state_dict({k: v.float() for k, v in head64.state_dict().items()})
        results = []
        for head, x in ((head64, embeddings.clone()), (head32, embeddings.float())):
            x.requires_grad_(True)
            # the same draw of classes for both precisions (Partial FC samples per step), the caller's RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(2)
                loss = head(x, labels)
            loss.backward()
            results.append((loss.double(), x.grad.double(), head.weight.grad.double()))
        pairs = zip(results[1], results[0], strict=True)
        worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in pairs)
        errors[name] = worst
        if not worst < 1e-4:
            raise SystemExit(f"correctness gate failed: {name} fp32 vs float64 relative error {worst:.2e} >= 1e-4")
    return errors


def run_rounds(
    names: list[str], batch: int, classes: int, dim: int, rounds: int, device: str = "cpu", dtype: str = "float32",
    repeats: int = 1,
) -> dict[str, dict[str, float | None]]:
    """Time ``rounds`` interleaved rounds of every variant; their ``summarise_rounds``.

    With ``repeats`` > 1 a round passes over all variants that many times and keeps each variant's fastest step:
    a neighbour's burst on a shared VM only ever adds time, so the minimum of a few close-together steps is the
    step's own cost, and one disturbed step no longer decides that round's ratio.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    shared: dict[str, torch.nn.Parameter] = {}
    steps = {name: make_step(name, batch, classes, dim, device=device, dtype=dtype, shared=shared) for name in names}
    for step in steps.values():  # warm-up round: allocator, oneDNN kernels, lazy imports
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]  # rotate who goes first
        fastest = {name: float("inf") for name in names}
        for _ in range(repeats):
            for name in order:
                start = time.perf_counter()
                steps[name]()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
        for name in names:
            times[name].append(fastest[name])
    return summarise_rounds(times)


def summarise_rounds(times: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """Per variant, from its step times round by round: the median over rounds of its time divided by the
    floor's, PML's and ArcFace's (same engine) in the same round, the quartiles of the ratio to ArcFace, and its
    best time.

    The quartiles say how far one round's ratio strays: on a shared 2-core VM they span ±5–10 %, so a median of
    5 rounds moves by as much as a 1.1× gate allows, and deciding such a gate takes 15–25 rounds.
    """
    def ratios(name: str, reference: str) -> list[float] | None:
        if reference not in times:
            return None
        return [t / r for t, r in zip(times[name], times[reference], strict=True)]

    def median(values: list[float] | None) -> float | None:
        return None if values is None else statistics.median(values)

    summary: dict[str, dict[str, float | None]] = {}
    for name, measured in times.items():
        engine = name.partition("@")[2]
        to_arcface = ratios(name, variant("arcface", engine)) if engine else None
        quartiles = None
        if to_arcface is not None and len(to_arcface) > 1:
            low, _, high = statistics.quantiles(to_arcface, n=4, method="inclusive")
            quartiles = (low, high)
        summary[name] = {
            "ratio_to_floor": median(ratios(name, FLOOR)),
            "ratio_to_pml": median(ratios(name, PML)),
            "ratio_to_arcface": median(to_arcface),
            "ratio_to_arcface_quartiles": quartiles,
            "best_seconds": min(measured),
        }
    return summary


def fresh_process_probe(name: str, batch: int, classes: int, dim: int, device: str, dtype: str, measure: str) -> float:
    """Build variant ``name`` in a fresh interpreter, run ``measure`` (code around two steps) and return its number.

    ``measure`` sees ``step`` and prints one number: a fresh process per variant keeps one variant's allocations
    out of the next one's peak.
    """
    code = (
        "import torch; import marginface.bench.heads as h;"
        f"step = h.make_step({name!r}, {batch}, {classes}, {dim}, device={device!r}, dtype={dtype!r});" + measure
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def peak_rss_kib() -> int:
    """This process's peak resident set (KiB) since it started its program.

    Linux's ``ru_maxrss`` survives ``exec``: a probe started from a large parent (the benchmark holding every
    variant) would report the parent's peak and hide its own growth, so /proc's VmHWM (reset by exec) comes first.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # POSIX only, as is every memory figure of this benchmark

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (elsewhere, bytes on macOS)


def memory_probe(name: str, batch: int, classes: int, dim: int, device: str = "cpu", dtype: str = "float32") -> float:
    """Peak memory growth (MB) of two steps of ``name`` in a fresh interpreter, over its inputs and parameters.

    On CPU the growth of peak RSS; on CUDA the peak allocated memory over what was allocated before the steps.
    """
    if device != "cpu":
        measure = ("torch.cuda.synchronize(); before = torch.cuda.memory_allocated(); step(); step();"
                   "print((torch.cuda.max_memory_allocated() - before) / 2**20)")
    else:
        measure = "before = h.peak_rss_kib(); step(); step(); print((h.peak_rss_kib() - before) / 1024)"
    return fresh_process_probe(name, batch, classes, dim, device, dtype, measure)


def peak_rss_mb(name: str, batch: int, classes: int, dim: int) -> float:
    """Peak RSS (MB) of a fresh interpreter that builds ``name`` and trains two steps: everything a run holds."""
    measure = "step(); step(); print(h.peak_rss_kib() / 1024)"
    return fresh_process_probe(name, batch, classes, dim, "cpu", "float32", measure)


def largest_classes(name: str, batch: int, dim: int, budget_gib: float, probes: tuple[int, int]) -> dict:
    """The largest C whose step fits ``budget_gib``: peak RSS is linear in C, fitted on two measured class counts."""
    small, large = probes
    low, high = peak_rss_mb(name, batch, small, dim), peak_rss_mb(name, batch, large, dim)
    per_class = (high - low) / (large - small)
    fixed = low - per_class * small
    estimate = int((budget_gib * 1024 - fixed) / per_class)
    return {"probe_classes": list(probes), "probe_peak_mb": [low, high], "mb_per_1k_classes": per_class * 1000,
            "largest_classes": estimate}


def print_table(summary: dict[str, dict[str, float | None]], batch: int, classes: int, dim: int, rounds: int,
                memory: bool, dtype: str = "float32", repeats: int = 1) -> None:
    """The markdown table of docs/benchmarks.md."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    def spread(quartiles: tuple[float, float] | None) -> str:
        return "" if quartiles is None else f" [{quartiles[0]:.2f}, {quartiles[1]:.2f}]"

    passes = f", each variant's fastest of {repeats} passes" if repeats > 1 else ""
    print(f"\nB = {batch}, C = {classes:,}, D = {dim}, {dtype}, forward + backward, "
          f"median of {rounds} interleaved rounds{passes}")
    memory_column = " extra memory (MB) |" if memory else ""
    print("| variant | time / floor | time / PML ArcFaceLoss | time / ArcFace (same engine) [quartiles] | best (s) |"
          + memory_column)
    print(f"|---|---:|---:|---:|---:|{'---:|' if memory else ''}")
    for name, row in summary.items():
        extra = f" {row['extra_rss_mb']:.0f} |" if memory else ""
        print(f"| {name} | {cell(row['ratio_to_floor'])} | {cell(row['ratio_to_pml'])} | "
              f"{cell(row['ratio_to_arcface'])}{spread(row.get('ratio_to_arcface_quartiles'))} | "
              f"{row['best_seconds']:.3f} |{extra}")




def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True
