"""`compare`: plan, claim the directory, train (or reuse) every run, then statistics, compare.json, report and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from marginface.compare import running
from marginface.compare.plan import ComparisonPlan, check_count, claim_directory
from marginface.compare.report import SUMMARY_FILE, collect_scores, summarise, write_report
from marginface.compare.statistics import DEFAULT_BOOTSTRAP_SEED, DEFAULT_REPLICATES
from marginface.fileio import atomic_write_text, json_plain


def compare(plan: ComparisonPlan, parallel: int = 1, force: bool = False, progress: bool = True,
            replicates: int = DEFAULT_REPLICATES, bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED,
            ijb_replicates: int | None = None) -> dict:
    """Run the comparison ``plan`` (resuming what an earlier call left) and write its outputs; returns
    compare.json's content. ``ijb_replicates``: the IJB bootstrap's replicates (None: ``replicates``)."""
    check_count("--bootstrap", replicates, "replicates")
    ijb_replicates = replicates if ijb_replicates is None else check_count("--ijb-bootstrap", ijb_replicates,
                                                                           "replicates")
    check_count("--parallel", parallel, "processes")
    claim_directory(plan, force=force)
    outcomes = running.execute(plan, parallel=parallel, force=force, progress=progress, echo=echo)
    echo(f"statistics: {replicates} bootstrap replicates per pair set")
    if plan.ijb is not None:
        # the one slow statistic: each replicate redraws every template pair of every seed (docs/compare.md)
        echo(f"statistics: {plan.ijb.title}: {ijb_replicates} replicates × {len(plan.seeds)} seeds × "
             f"{plan.ijb.pairs:,} template pairs (--ijb-bootstrap R lowers the replicates)")
    summary = summarise(plan, outcomes, replicates, bootstrap_seed, ijb_replicates)
    plots = write_comparison_plots(plan, outcomes, summary)
    summary["plots"] = [path.relative_to(plan.out).as_posix() for _, path in plots]
    atomic_write_text(plan.out / SUMMARY_FILE, json.dumps(json_plain(summary), indent=2) + "\n")
    report = write_report(summary, plan.out, plots)
    echo(f"wrote {plan.out / SUMMARY_FILE} and {report}")
    return summary


def echo(line: str) -> None:
    """Progress goes to stderr: stdout is kept for --json."""
    print(line, file=sys.stderr, flush=True)


def write_comparison_plots(plan: ComparisonPlan, outcomes: list[running.RunOutcome], summary: dict):
    from marginface.compare.plots import write_plots
    from marginface.train.reporting import read_history

    collected = collect_scores(plan, outcomes)
    curves = {name: {m.label: [(s.scores, s.issame) for _, s in sorted(per_margin.get(m.label, {}).items())]
                     for m in plan.margins} for name, per_margin in collected.items()}
    histories = {m.label: [read_history(o.run.directory) for o in outcomes
                           if o.run.spec == m and o.status == "finished"] for m in plan.margins}
    return write_plots(summary, curves, histories, Path(plan.out) / "plots")
