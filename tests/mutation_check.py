"""Mutation check of the margin tests: each mutant of each margin must make at least one test fail.

    .venv/bin/python tests/mutation_check.py              # every margin × mutation, two pytest runs at a time
    .venv/bin/python tests/mutation_check.py --margin npcface --jobs 1

Mutations (applied to one registered margin class at a time, in a fresh pytest process):

- ``flip_m``: the margin's m enters its math with the opposite sign (cos(θ − m), c + m, …; SphereFace's
  multiplicative m becomes 1/m, LFS's shift ln(1 − a) becomes −ln(1 − a), AM-LFS's intercepts change sign);
- ``drop_hard_negative``: N(t, c) = c, i.e. the hard-negative term is gone (N and its slope);
- ``freeze_state``: the state never moves (CurricularFace's t, SphereFace's iteration).

The file is also the pytest plugin that applies one mutant (``-p mutation_check`` with
``MARGINFACE_MUTATION=margin:mutation``). Before any test is collected it wraps the class's methods, so every path
that goes through the margin contract (the dense forward, the engines, the heads) sees the mutant, while the
margin's stored parameters and ``hyperparameters()`` stay as created: a test fails because the margin *computes*
something else, not because a parameter reads back differently. A mutant that changes nothing on a probe batch
is reported as an error, not as survived or killed. pytest does not collect this file (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ENV = "MARGINFACE_MUTATION"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_FILES = sorted(str(p.relative_to(ROOT)) for p in HERE.glob("test_margins_*.py"))
MUTATIONS = ("flip_m", "drop_hard_negative", "freeze_state")
TITLES = {"flip_m": "flip the sign of m", "drop_hard_negative": "drop the hard-negative term",
          "freeze_state": "freeze the state"}


# -- what each mutation does ------------------------------------------------------------------------------------
def _negate(value):
    return -value


def _reciprocal(value):
    return 1.0 / value


def _flip_lfs(a):
    """a ↦ a/(a − 1): the target shift ln(1 − a) becomes −ln(1 − a) (a margin that helps the target)."""
    return a / (a - 1.0)


def _negate_intercepts(table):
    flipped = table.clone()
    flipped[:, 1] = -flipped[:, 1]
    return flipped


# margin -> (description, {attribute: transform}) for flip_m
FLIP_M: dict[str, tuple[str, dict[str, Callable]]] = {
    "cosface": ("m → −m", {"m": _negate}),
    "arcface": ("m → −m", {"m": _negate}),
    "combined": ("m2, m3 → −m2, −m3", {"m2": _negate, "m3": _negate}),
    "sphereface": ("m → 1/m", {"m": _reciprocal}),
    "mv_softmax": ("m → −m", {"m": _negate}),
    "arcnegface": ("m → −m", {"m": _negate}),
    "curricularface": ("m → −m", {"m": _negate}),
    "npcface": ("m0, m1 → −m0, −m1", {"m0": _negate, "m1": _negate}),
    "lfs": ("ln(1−a) → −ln(1−a)", {"a": _flip_lfs}),
    "lfs_local": ("ln(1−a) → −ln(1−a)", {"a_bins": _flip_lfs}),
    "am_lfs": ("t intercepts → −", {"t_params": _negate_intercepts}),
    "adaface": ("m → −m", {"m": _negate}),
    "elasticface_arc": ("m → −m", {"m": _negate}),
    "elasticface_cos": ("m → −m", {"m": _negate}),
    "magface": ("l_m, u_m → −l_m, −u_m", {"l_m": _negate, "u_m": _negate}),
}
NO_MARGIN = {"normface": "no m", "adacos": "no m"}  # margins with nothing to flip
# Margins whose N is not the identity but has no hard-negative term (AdaFace clamps c to ±(1 − 10⁻³)).
NO_HARD_NEGATIVE = {"adaface": "N is c clamped, no hard-negative term"}
# Parameters of the probe that shows a mutant changes something (defaults otherwise).
PROBE_PARAMS = {"am_lfs": {"t_params": [[1.0, -0.35]] * 6}}
# Methods the wrappers leave alone: they report parameters, they do not compute with them.
UNWRAPPED = {"hyperparameters", "extra_repr"}


def applicable(name: str, mutation: str) -> str | None:
    """None when ``mutation`` applies to the margin ``name``, else why not."""
    from marginface.margins.base import Margin
    from marginface.margins.registry import margin_class

    cls = margin_class(name)
    if mutation == "flip_m":
        if name in NO_MARGIN:
            return NO_MARGIN[name]
        return None if name in FLIP_M else "MISSING: no flip_m defined for this margin in tests/mutation_check.py"
    if mutation == "drop_hard_negative":
        if name in NO_HARD_NEGATIVE:
            return NO_HARD_NEGATIVE[name]
        return "N = c already" if cls.identity_negatives else None
    if mutation == "freeze_state":
        return None if cls.update_state is not Margin.update_state else "stateless"
    raise ValueError(mutation)


def _with_transformed_attributes(function: Callable, transforms: dict[str, Callable]) -> Callable:
    """``function`` run with the attributes transformed for the outermost wrapped call on an instance (methods
    call each other: the flip must apply once), and restored afterwards."""

    @functools.wraps(function)
    def wrapper(self, *args, **kwargs):
        if self.__dict__.get("_mutation_active"):
            return function(self, *args, **kwargs)
        saved = {name: getattr(self, name) for name in transforms}
        self.__dict__["_mutation_active"] = True
        try:
            for name, transform in transforms.items():
                setattr(self, name, transform(saved[name]))
            return function(self, *args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
            self.__dict__["_mutation_active"] = False

    return wrapper


def apply(name: str, mutation: str) -> None:
    """Mutate the registered class of margin ``name`` in this process (its subclasses, none today, too)."""
    import torch
    from torch import nn

    from marginface.margins.registry import margin_class

    cls = margin_class(name)
    reason = applicable(name, mutation)
    if reason is not None:
        raise ValueError(f"mutation {mutation} does not apply to {name}: {reason}")
    if mutation == "flip_m":
        transforms = FLIP_M[name][1]
        done: set[str] = set()
        for klass in cls.__mro__:
            if klass is nn.Module:
                break
            for attr, value in vars(klass).items():
                if attr.startswith("__") or attr in UNWRAPPED or attr in done:
                    continue
                done.add(attr)
                if isinstance(value, property):
                    setattr(cls, attr, property(_with_transformed_attributes(value.fget, transforms)))
                elif inspect.isfunction(value):
                    setattr(cls, attr, _with_transformed_attributes(value, transforms))
    elif mutation == "drop_hard_negative":
        cls.negative_logits = lambda self, cos, ctx: cos.clone()
        cls.negatives_with_slope = lambda self, cos, ctx, scratch=None: (cos.clone(), torch.ones_like(cos))
    elif mutation == "freeze_state":
        cls.update_state = lambda self, stats: None


def probe(name: str) -> float:
    """A loss of margin ``name`` over two training steps on a fixed batch with hard and easy negatives."""
    import torch
    import torch.nn.functional as F

    import marginface as mf

    generator = torch.Generator().manual_seed(0)
    cos = torch.rand(8, 12, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    labels = torch.randint(0, 12, (8,), generator=generator)
    cos[torch.arange(8), labels] = torch.rand(8, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    norms = torch.rand(8, generator=generator, dtype=torch.float64) + 0.5
    margin = mf.margins.create(name, **PROBE_PARAMS.get(name, {})).double().train()
    total = 0.0
    for _ in range(2):
        logits = margin(cos, labels, norms=norms if margin.needs_norms else None)
        total += float(F.cross_entropy(logits, labels))
    return total


# -- the pytest plugin ------------------------------------------------------------------------------------------
def pytest_configure(config):
    import pytest

    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, mutation = spec.partition(":")
    before = probe(name)
    try:
        apply(name, mutation)
    except (ValueError, AttributeError) as exc:
        raise pytest.UsageError(f"mutation {spec}: {exc}") from None
    after = probe(name)
    if after == before:
        raise pytest.UsageError(f"mutation {spec} has no effect on the probe batch (loss {before!r})")
    config.mutation_description = f"mutant {spec}: probe loss {before:.6g} -> {after:.6g}"


def pytest_report_header(config):
    description = getattr(config, "mutation_description", None)
    return [description] if description else []


# -- the driver -------------------------------------------------------------------------------------------------
def run_pytest(files: list[str], mutation: str | None, extra: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop(ENV, None)
    if mutation:
        env[ENV] = mutation
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "mutation_check",
               *extra, *files]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def verdict(returncode: int, output: str) -> tuple[str, list[str]]:
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.M)
    if returncode == 1:
        return "killed", failed
    if returncode == 0:
        return "SURVIVED", []
    tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [f"exit status {returncode}"]
    return "ERROR", tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--margin", action="append", help="a margin to mutate (default: every registered one)")
    parser.add_argument("--mutation", action="append", choices=MUTATIONS, help="default: all of them")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files to run (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at a time (default 2)")
    parser.add_argument("--show", type=int, default=2, help="failing tests to name per mutant (default 2)")
    args, extra = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import marginface as mf

    margins = args.margin or mf.margins.available()
    mutations = args.mutation or list(MUTATIONS)
    print(f"test files: {' '.join(args.files)}", flush=True)
    code, output, seconds = run_pytest(args.files, None, extra)
    if code != 0:
        print(output[-3000:])
        print("the unmutated tests do not pass: fix them first", file=sys.stderr)
        return 2
    print(f"unmutated: pass ({seconds:.1f} s)", flush=True)
    cells: dict[tuple[str, str], str] = {}
    jobs = []
    for name in margins:
        for mutation in mutations:
            reason = applicable(name, mutation)
            if reason is None:
                jobs.append((name, mutation))
            else:
                cells[name, mutation] = f"MISSING ({reason})" if reason.startswith("MISSING") else f"n/a ({reason})"

    def one(job):
        name, mutation = job
        return job, verdict(*run_pytest(args.files, f"{name}:{mutation}", extra)[:2])

    bad = any(cell.startswith("MISSING") for cell in cells.values())
    details = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (name, mutation), (status, tests) in pool.map(one, jobs):
            if status == "killed":
                per_file: dict[str, int] = {}
                for test in tests:
                    short = Path(test.split("::", 1)[0]).stem.removeprefix("test_margins_").removeprefix("test_")
                    per_file[short] = per_file.get(short, 0) + 1
                by_file = ", ".join(f"{f} {n}" for f, n in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0])))
                cells[name, mutation] = f"killed: {len(tests)} ({by_file})"
                details.append(f"{name} {mutation}: " + ", ".join(t.split("::", 1)[-1] for t in tests[: args.show]))
            else:
                bad = True
                cells[name, mutation] = status + (f": {tests[0]}" if tests else "")
            print(f"{name:>15} {mutation:<19} {cells[name, mutation]}", flush=True)
    header = ["margin"] + [TITLES[m] for m in mutations]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in margins:
        row = [f"`{name}`"]
        for mutation in mutations:
            cell = cells[name, mutation]
            if mutation == "flip_m" and name in FLIP_M and cell.startswith("killed"):
                cell += f", {FLIP_M[name][0]}"
            row.append(cell)
        print("| " + " | ".join(row) + " |")
    print()
    print("first failing tests per mutant:")
    for line in sorted(details):
        print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
