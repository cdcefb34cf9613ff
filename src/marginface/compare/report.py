"""compare.json (every number of the comparison) and report.md (its tables, failures and pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marginface.compare.ijb import load_ijb_scores
from marginface.compare.plan import ComparisonPlan
from marginface.compare.running import RunOutcome
from marginface.compare.scores import PairScores, load_pair_scores
from marginface.compare.statistics import CONFIDENCE, bootstrap_pair_set
from marginface.errors import MarginfaceError
from marginface.fileio import atomic_write_text

SUMMARY_FILE = "compare.json"
REPORT_FILE = "report.md"
FORMAT = "marginface-compare"
NOT_EVALUATED = "not evaluated: compare scores the configured pair sets only (give --ijb ROOT to score IJB too)"


def collect_scores(plan: ComparisonPlan, outcomes: list[RunOutcome]) -> dict[str, dict[str, dict[int, PairScores]]]:
    """{pair set: {margin label: {seed: scores}}} of the finished runs."""
    collected: dict[str, dict[str, dict[int, PairScores]]] = {}
    for outcome in outcomes:
        if outcome.status != "finished":
            continue
        for name, scores in load_pair_scores(outcome.run.directory).items():
            collected.setdefault(name, {}).setdefault(outcome.run.spec.label, {})[outcome.run.seed] = scores
    return collected


def pair_set_statistics(plan: ComparisonPlan, name: str, runs: dict[str, dict[int, PairScores]],
                        replicates: int, bootstrap_seed: int, accuracy: bool = True) -> dict[str, Any]:
    """The bootstrap of one pair set, laid out per margin label (the pair labels must agree between runs);
    ``accuracy=False`` for IJB's template pairs (TAR@FAR only)."""
    every = [entry for per_seed in runs.values() for entry in per_seed.values()]
    issame = every[0].issame
    for entry in every[1:]:
        if not np.array_equal(entry.issame, issame):
            raise MarginfaceError(f"pair set {name}: the runs of this comparison scored different pairs (is a "
                                  "pair file changed?); rerun with --force to score them again")
    labels = [m.label for m in plan.margins]
    matrix = [[runs.get(label, {}).get(seed).scores if seed in runs.get(label, {}) else None for seed in plan.seeds]
              for label in labels]
    stats = bootstrap_pair_set(matrix, issame, baseline=labels.index(plan.baseline.label), replicates=replicates,
                               seed=bootstrap_seed, accuracy=accuracy)
    margins = {}
    for m, label in enumerate(labels):
        per_seed = {str(seed): {metric: plain(stats["per_seed"][m, s, k]) for k, metric in enumerate(stats["metrics"])}
                    for s, seed in enumerate(plan.seeds) if matrix[m][s] is not None}
        margins[label] = {"finished_runs": len(per_seed),
                          "estimates": {k: v.to_dict() for k, v in stats["estimates"][m].items()},
                          "differences": {k: v.to_dict() for k, v in stats["differences"][m].items()},
                          "per_seed": per_seed, "seed_std": seed_std(per_seed)}
    return {"pairs": int(issame.size), "impostors": int((~issame).sum()), "levels": stats["levels"],
            "metrics": stats["metrics"], "margins": margins}


def ijb_statistics(plan: ComparisonPlan, outcomes: list[RunOutcome], replicates: int,
                   bootstrap_seed: int) -> dict[str, Any] | str:
    """compare.json's `ijb`: the target, its tree and, per margin, TAR@FAR with intervals and paired differences
    from the runs' template-pair scores (the pair-set bootstrap, template pairs in place of pairs); without
    --ijb the line saying it was not evaluated."""
    spec = plan.ijb
    if spec is None:
        return NOT_EVALUATED
    runs: dict[str, dict[int, PairScores]] = {}
    for outcome in outcomes:
        if outcome.status == "finished":
            runs.setdefault(outcome.run.spec.label, {})[outcome.run.seed] = load_ijb_scores(outcome.run.directory)
    entry: dict[str, Any] = {"title": spec.title, **spec.to_dict(), "far_rule": "floor"}
    if not runs:
        return {**entry, "levels": [], "metrics": [], "margins": {}}
    return {**entry, **pair_set_statistics(plan, spec.title, runs, replicates, bootstrap_seed, accuracy=False)}


def plain(value: float) -> float | None:
    """A number for JSON: NaN (a TAR a pair set cannot give) becomes null."""
    return None if np.isnan(value) else float(value)


def seed_std(per_seed: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Seed-to-seed standard deviation of each metric (ddof=1); empty below two seeds."""
    if len(per_seed) < 2:
        return {}
    metrics = next(iter(per_seed.values())).keys()
    values = {k: [v[k] for v in per_seed.values() if v[k] is not None] for k in metrics}
    return {k: float(np.std(v, ddof=1)) if len(v) >= 2 else None for k, v in values.items()}


def summarise(plan: ComparisonPlan, outcomes: list[RunOutcome], replicates: int, bootstrap_seed: int,
              ijb_replicates: int | None = None) -> dict:
    """compare.json's content (``ijb_replicates``: the IJB bootstrap's, None: ``replicates``)."""
    ijb_replicates = replicates if ijb_replicates is None else ijb_replicates
    collected = collect_scores(plan, outcomes)
    finished = sum(o.status == "finished" for o in outcomes)
    return {
        "format": FORMAT,
        "version": 1,
        "identity": plan.identity(),
        "margins": [m.label for m in plan.margins],
        "seeds": list(plan.seeds),
        "baseline": plan.baseline.label,
        "bootstrap": {"replicates": replicates, "ijb_replicates": ijb_replicates, "seed": bootstrap_seed,
                      "confidence": CONFIDENCE,
                      "method": "seeds, then pairs within each drawn seed; percentile interval (docs/compare.md)"},
        "counts": {"planned": len(outcomes), "finished": finished, "failed": len(outcomes) - finished},
        "runs": [o.to_dict() for o in outcomes],
        "pair_sets": {name: pair_set_statistics(plan, name, collected[name], replicates, bootstrap_seed)
                      for name in sorted(collected)},
        "ijb": ijb_statistics(plan, outcomes, ijb_replicates, bootstrap_seed),
    }


def replicates_text(bootstrap: dict) -> str:
    """'R replicates', or both counts where IJB had its own (compare.json files before it had none)."""
    ijb = bootstrap.get("ijb_replicates", bootstrap["replicates"])
    if ijb == bootstrap["replicates"]:
        return f"{bootstrap['replicates']} replicates"
    return f"{bootstrap['replicates']} replicates ({ijb} for IJB)"


def cell(entry: dict, scale: float = 100.0, signed: bool = False) -> str:
    """`62.50 [55.00, 70.00]` (percent), or `—` when the margin has no finished run."""
    if entry["value"] is None:
        return "—"
    sign = "+" if signed else ""
    low = "—" if entry["low"] is None else f"{scale * entry['low']:{sign}.2f}"
    high = "—" if entry["high"] is None else f"{scale * entry['high']:{sign}.2f}"
    return f"{scale * entry['value']:{sign}.2f} [{low}, {high}]"


def pair_set_lines(name: str, table: dict, baseline: str, what: str = "pairs") -> list[str]:
    """The section of one pair set (or of IJB: ``what="template pairs"``): estimates, then paired differences."""
    metrics = table["metrics"]
    heads = [*(["accuracy (%)"] if "accuracy" in metrics else []), *(f"TAR@FAR={far:g} (%)" for far in table["levels"])]
    lines = [f"## {name}", "", f"{table['pairs']} {what} ({table['impostors']} impostor); mean over the finished "
             f"seeds with 95 % bootstrap intervals (seeds, then {what}).", "",
             "| margin | runs | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for label, entry in table["margins"].items():
        lines.append(f"| {label} | {entry['finished_runs']} | "
                     + " | ".join(cell(entry["estimates"][k]) for k in metrics) + " |")
    lines += ["", f"Paired difference to **{baseline}** (same seed, same resampled pairs), percentage points:", "",
              "| margin | paired seeds | " + " | ".join(f"Δ {h.removesuffix(' (%)')}" for h in heads) + " |",
              "|---|---:|" + "---:|" * len(heads)]
    for label, entry in table["margins"].items():
        if label == baseline:
            continue
        seeds = entry["differences"][metrics[0]]["runs"]
        lines.append(f"| {label} | {seeds} | "
                     + " | ".join(cell(entry["differences"][k], signed=True) for k in metrics) + " |")
    return lines + [""]


def ijb_line(ijb: dict | str) -> str:
    """The IJB item of the report's header: not evaluated, or what was scored and how."""
    if isinstance(ijb, str):
        return ijb
    line = (f"{ijb['title']} from `{ijb['root']}` ({ijb['pairs']} template pairs, {ijb['impostors']} "
            f"impostor; mode {ijb['mode']}, TAR by the floor rule)")
    if not ijb["margins"]:
        return line + ": no finished run"
    if not ijb["metrics"]:
        return line + ": too few impostor pairs for any FAR level (far · impostors >= 10)"
    return line + f": section {ijb['title']} below"


def write_report(summary: dict, out: Path, plots: list[tuple[str, Path]]) -> Path:
    """report.md in ``out``: counts, failures, one section per pair set, the pictures."""
    counts = summary["counts"]
    lines = ["# marginface comparison", "",
             f"- margins: {', '.join(f'`{m}`' for m in summary['margins'])}; baseline `{summary['baseline']}`",
             f"- seeds: {', '.join(map(str, summary['seeds']))}; runs: {counts['finished']} of {counts['planned']} "
             f"finished, {counts['failed']} failed (statistics use the finished runs)",
             f"- intervals: {100 * summary['bootstrap']['confidence']:.0f} % percentile bootstrap over seeds, then "
             f"pairs, {replicates_text(summary['bootstrap'])}, bootstrap seed {summary['bootstrap']['seed']} "
             "(docs/compare.md)", f"- IJB: {ijb_line(summary['ijb'])}", ""]
    failed = [run for run in summary["runs"] if run["status"] != "finished"]
    if failed:
        lines += ["## failed runs", ""] + [f"- `{r['margin']}` seed {r['seed']} ({r['directory']}): {r['error']}"
                                           for r in failed] + [""]
    for name, table in summary["pair_sets"].items():
        lines += pair_set_lines(name, table, summary["baseline"])
    if not summary["pair_sets"]:
        lines += ["No run finished: there is nothing to compare yet.", ""]
    ijb = summary["ijb"]
    if isinstance(ijb, dict) and ijb["margins"] and ijb["metrics"]:
        lines += pair_set_lines(ijb["title"], ijb, summary["baseline"], what="template pairs")
    for title, path in plots:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    report = out / REPORT_FILE
    atomic_write_text(report, "\n".join(lines))
    return report
