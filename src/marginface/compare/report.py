"""compare.json (every number of the comparison) and report.md (its tables, failures and pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marginface.compare.plan import ComparisonPlan
from marginface.compare.running import RunOutcome
from marginface.compare.scores import PairScores, load_pair_scores
from marginface.compare.statistics import CONFIDENCE, bootstrap_pair_set
from marginface.errors import MarginfaceError
from marginface.fileio import atomic_write_text

SUMMARY_FILE = "compare.json"
REPORT_FILE = "report.md"
FORMAT = "marginface-compare"


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
                        replicates: int, bootstrap_seed: int) -> dict[str, Any]:
    """The bootstrap of one pair set, laid out per margin label (the pair labels must agree between runs)."""
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
                               seed=bootstrap_seed)
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


def summarise(plan: ComparisonPlan, outcomes: list[RunOutcome], replicates: int, bootstrap_seed: int) -> dict:
    """compare.json's content."""
    collected = collect_scores(plan, outcomes)
    finished = sum(o.status == "finished" for o in outcomes)
    return {
        "format": FORMAT,
        "version": 1,
        "identity": plan.identity(),
        "margins": [m.label for m in plan.margins],
        "seeds": list(plan.seeds),
        "baseline": plan.baseline.label,
        "bootstrap": {"replicates": replicates, "seed": bootstrap_seed, "confidence": CONFIDENCE,
                      "method": "seeds, then pairs within each drawn seed; percentile interval (docs/compare.md)"},
        "counts": {"planned": len(outcomes), "finished": finished, "failed": len(outcomes) - finished},
        "runs": [o.to_dict() for o in outcomes],
        "pair_sets": {name: pair_set_statistics(plan, name, collected[name], replicates, bootstrap_seed)
                      for name in sorted(collected)},
        "ijb": "not evaluated: compare scores the configured pair sets only",
    }


def cell(entry: dict, scale: float = 100.0, signed: bool = False) -> str:
    """`62.50 [55.00, 70.00]` (percent), or `—` when the margin has no finished run."""
    if entry["value"] is None:
        return "—"
    sign = "+" if signed else ""
    low = "—" if entry["low"] is None else f"{scale * entry['low']:{sign}.2f}"
    high = "—" if entry["high"] is None else f"{scale * entry['high']:{sign}.2f}"
    return f"{scale * entry['value']:{sign}.2f} [{low}, {high}]"


def pair_set_lines(name: str, table: dict, baseline: str) -> list[str]:
    metrics = table["metrics"]
    heads = ["accuracy (%)", *(f"TAR@FAR={far:g} (%)" for far in table["levels"])]
    lines = [f"## {name}", "", f"{table['pairs']} pairs ({table['impostors']} impostor); mean over the finished "
             "seeds with 95 % bootstrap intervals.", "",
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
        seeds = entry["differences"]["accuracy"]["runs"]
        lines.append(f"| {label} | {seeds} | "
                     + " | ".join(cell(entry["differences"][k], signed=True) for k in metrics) + " |")
    return lines + [""]


def write_report(summary: dict, out: Path, plots: list[tuple[str, Path]]) -> Path:
    """report.md in ``out``: counts, failures, one section per pair set, the pictures."""
    counts = summary["counts"]
    lines = ["# marginface comparison", "",
             f"- margins: {', '.join(f'`{m}`' for m in summary['margins'])}; baseline `{summary['baseline']}`",
             f"- seeds: {', '.join(map(str, summary['seeds']))}; runs: {counts['finished']} of {counts['planned']} "
             f"finished, {counts['failed']} failed (statistics use the finished runs)",
             f"- intervals: {100 * summary['bootstrap']['confidence']:.0f} % percentile bootstrap over seeds, then "
             f"pairs, {summary['bootstrap']['replicates']} replicates, bootstrap seed {summary['bootstrap']['seed']} "
             "(docs/compare.md)", f"- IJB: {summary['ijb']}", ""]
    failed = [run for run in summary["runs"] if run["status"] != "finished"]
    if failed:
        lines += ["## failed runs", ""] + [f"- `{r['margin']}` seed {r['seed']} ({r['directory']}): {r['error']}"
                                           for r in failed] + [""]
    for name, table in summary["pair_sets"].items():
        lines += pair_set_lines(name, table, summary["baseline"])
    if not summary["pair_sets"]:
        lines += ["No run finished: there is nothing to compare yet.", ""]
    for title, path in plots:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    report = out / REPORT_FILE
    atomic_write_text(report, "\n".join(lines))
    return report
