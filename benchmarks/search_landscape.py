"""Loss search against its own landscape, on the tournament's benchmark (configs/compare_synthetic.yaml).

1. The landscape: a grid of fixed LFS factors a = 1 − e^{s·m} (CosFace-like margins m), every one trained for
   every seed by `marginface compare` (OUT/grid, a comparison directory: resumable, with its own report).
2. The searches: Search-Softmax, Random-Softmax and AM-LFS, each started from the grid's worst region (Search-
   and Random-Softmax at the worst grid margin; AM-LFS from its fixed start, plain softmax), K candidates per
   epoch, no warm-up and the fixed runs' epochs and steps per epoch: K fixed runs' worth of training steps. The
   rewards are 10-fold accuracies on pair sets of other synthetic identities (seed 1000 + seed), so the final
   models are scored on the benchmark's own pair sets, which no selection saw.
3. One table and one figure: every grid margin and every search's final model with 95 % intervals (the
   two-stage bootstrap of `marginface compare`, docs/compare.md) and the paired difference to the grid's best
   margin; each search's margin, epoch by epoch, drawn over the landscape.

    python benchmarks/search_landscape.py --out runs/search-landscape          # 6 margins x 3 seeds, K = 3
    python benchmarks/search_landscape.py --out DIR --seeds 2 --margins 0.05 0.3 0.6 --methods search_softmax

Rerunning the command reuses everything that finished (the grid's runs, each search directory under
OUT/search) and continues a search from its last finished epoch. Writes OUT/landscape.json, OUT/landscape.md
and OUT/landscape.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import marginface as mf
from marginface.compare.comparison import compare
from marginface.compare.plan import make_plan, run_config
from marginface.compare.plots import interval_bars
from marginface.compare.scores import compute_pair_scores, load_pair_scores, scores_are_current
from marginface.compare.spec import MarginSpec
from marginface.compare.statistics import bootstrap_pair_set
from marginface.search import SearchSettings, resume_search, run_search
from marginface.search.spaces import equivalent_margin, factor_from_z
from marginface.train import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "compare_synthetic.yaml"
METHODS = ("search_softmax", "random_softmax", "am_lfs")
HEADLINE = "synth_hard"  # the pair set on which the margins differ (docs/results.md)


def lfs_factor(m: float, s: float) -> float:
    """The LFS modulating factor with CosFace margin m: a = 1 − e^{s·m}."""
    return -math.expm1(s * m)


def am_lfs_margin(t_params: list[list[float]]) -> float:
    """AM-LFS's t(·) as one number: the mean of c − t(c) over target cosines c in [0, 1] (CosFace(m) gives m)."""
    table = np.asarray(t_params, dtype=np.float64)
    c = np.linspace(0.0, 1.0, 201)
    piece = np.clip(np.floor((c + 1.0) / 2.0 * len(table)), 0, len(table) - 1).astype(int)
    return float(np.mean(c - (table[piece, 0] * c + table[piece, 1])))


def candidate_margin(params: dict) -> float:
    """The equivalent CosFace margin of one sampled loss (a search.json candidate's ``params``)."""
    if "equivalent_margin" in params:
        return float(params["equivalent_margin"])
    return am_lfs_margin(params["params"]["t_params"])


def trajectory(summary: dict, s: float) -> dict[str, list[float]]:
    """Per epoch: the margin of the candidate whose model went on, and the distribution's mean after the update."""
    best, mean = [], []
    for record in summary["epochs"]:
        best.append(candidate_margin(record["candidates"][record["best"]]["params"]))
        x = record["distribution_after"]["mean"]
        if summary["method"] == "am_lfs":
            pairs = [[x[2 * i], x[2 * i + 1]] for i in range(len(x) // 2)]
            mean.append(am_lfs_margin(pairs))
        else:
            mean.append(equivalent_margin(factor_from_z(x[0]), s))
    return {"best": best, "mean": mean, "found": candidate_margin(summary["best"])}


def run_grid(args, base, margins: list[float]) -> tuple[dict, dict]:
    """Train (or reuse) the grid with `marginface compare`; ({m: {seed: scores}}, compare.json's summary)."""
    s = float(base.head.params.get("s", 30.0))
    specs = {m: MarginSpec("lfs", {"a": lfs_factor(m, s)}) for m in margins}
    plan = make_plan(args.out / "grid", base, list(specs.values()), args.seeds)
    summary = compare(plan, parallel=args.parallel, replicates=args.bootstrap)
    scores = {m: {seed: load_pair_scores(run_config_dir(plan, spec, seed)) for seed in plan.seeds}
              for m, spec in specs.items()}
    return scores, summary


def run_config_dir(plan, spec: MarginSpec, seed: int) -> Path:
    return next(run.directory for run in plan.runs if run.spec == spec and run.seed == seed)


def whole_epochs(base) -> int:
    epochs = float(base.train.epochs)
    if epochs != int(epochs) or epochs < 1:
        raise SystemExit(f"train.epochs={epochs:g}: a search epoch is one pass, so the config needs whole epochs")
    return int(epochs)


def run_one_search(args, base, method: str, seed: int, start_margin: float, steps: int) -> tuple[dict, dict]:
    """Run (or resume, or reuse) one search; (search.json's content, its final model's pair scores)."""
    out = args.out / "search" / f"{method}{'-' + args.tag if args.tag else ''}-seed{seed}"
    config = run_config(base, MarginSpec("cosface", {}), seed)  # the search replaces the margin; s stays
    summary_path = out / "search.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("model"):  # finished: its model is exported
        return summary, final_scores(out, config)
    if (out / "search_state.pt").exists():
        return resume_search(out, progress=False), final_scores(out, config)
    held_out = mf.data.synthetic(identities=4, images_per_id=2, pairs_per_set=args.reward_pairs, ijb=False,
                                 seed=1000 + seed, difficulty=base.data.synthetic.difficulty)
    settings = SearchSettings(method=method, candidates=args.candidates, epochs=whole_epochs(base),
                              steps_per_epoch=steps, warmup_epochs=0, seed=seed,
                              reward_pairs=[str(held_out.pairs[name]) for name in sorted(held_out.pairs)],
                              initial_margin=None if method == "am_lfs" else start_margin,
                              policy_lr=args.policy_lr if method == "search_softmax" else None,
                              sigma=args.sigma)
    return run_search(settings, config, out, progress=False), final_scores(out, config)


def final_scores(out: Path, config) -> dict:
    """The search's final model scored on the benchmark's pair sets (computed once, then read)."""
    return load_pair_scores(out) if scores_are_current(out) else compute_pair_scores(out, config)


def statistics(names: list[str], scores: dict[str, dict[int, dict]], seeds: tuple[int, ...], baseline: str,
               replicates: int, only: str | None = None) -> dict[str, dict]:
    """Per pair set (or only the set ``only``): the bootstrap of every grid margin and search against
    ``baseline`` (the grid's best)."""
    first_run = next(iter(next(iter(scores.values())).values()))  # every run scored the same pair sets
    pair_sets = [only] if only else sorted(first_run)
    result = {}
    for pair_set in pair_sets:
        first = first_run[pair_set]
        table = [[scores[name][seed][pair_set].scores if seed in scores[name] else None for seed in seeds]
                 for name in names]
        stats = bootstrap_pair_set(table, first.issame, baseline=names.index(baseline), replicates=replicates)
        result[pair_set] = {name: {"estimate": stats["estimates"][i]["accuracy"].to_dict(),
                                   "difference": stats["differences"][i]["accuracy"].to_dict(),
                                   "per_seed": [None if math.isnan(v) else float(v)
                                                for v in stats["per_seed"][i, :, 0]]}
                            for i, name in enumerate(names)}
    return result


def best_region(grid: list[float], stats: dict, best: str) -> list[float]:
    """The grid margins not distinguishable from the best: the paired difference's interval holds 0."""
    region = []
    for m in grid:
        difference = stats[grid_name(m)]["difference"]
        if grid_name(m) == best or (difference["low"] is not None and difference["low"] <= 0 <= difference["high"]):
            region.append(m)
    return region


def grid_name(m: float) -> str:
    return f"m={m:g}"


def write_figure(path: Path, grid: list[float], stats: dict, searches: dict, region: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=[3, 2])
    values = [100 * stats[grid_name(m)]["estimate"]["value"] for m in grid]
    lows = [100 * stats[grid_name(m)]["estimate"]["low"] for m in grid]
    highs = [100 * stats[grid_name(m)]["estimate"]["high"] for m in grid]
    top.fill_between(grid, lows, highs, color="0.85", label="fixed margin, 95 % interval")
    top.plot(grid, values, "o-", color="0.3", label="fixed margin (grid), mean over seeds")
    palette = {"search_softmax": "tab:blue", "random_softmax": "tab:orange", "am_lfs": "tab:green"}
    colours = {label: palette.get(label.split("-")[0], "tab:purple") for label in searches}
    for method, runs in searches.items():
        estimate = stats[method]["estimate"]
        found = float(np.mean([run["trajectory"]["found"] for run in runs]))
        interval_bars(top, [found], [100 * estimate["low"]], [100 * estimate["high"]], color=colours.get(method),
                      capsize=4)
        top.plot([found], [100 * estimate["value"]], "s", color=colours.get(method),
                 label=f"{method}: final model at its found margin (mean over seeds)")
        for k, run in enumerate(runs):
            path_m = run["trajectory"]["best"]
            bottom.plot(path_m, range(1, len(path_m) + 1), "o-", color=colours.get(method), alpha=0.8,
                        label=method if k == 0 else None)
    for axes in (top, bottom):
        if region:
            axes.axvspan(min(region), max(region), color="tab:green", alpha=0.08)
    top.set_ylabel(f"{HEADLINE} 10-fold accuracy (%)")
    top.set_title("Fixed-margin landscape and where each search ends (shaded: the grid's best region)")
    top.legend(fontsize=7, loc="lower right")
    bottom.set_xlabel("equivalent CosFace margin m  (LFS factor a = 1 − e^{s·m})")
    bottom.set_ylabel("search epoch (margin that trained on)")
    bottom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cell(entry: dict) -> str:
    if entry["value"] is None:
        return "failed"
    return f"{100 * entry['value']:.2f} [{100 * entry['low']:.2f}, {100 * entry['high']:.2f}]"


def signed(entry: dict) -> str:
    if entry["value"] is None:
        return ""
    return f"{100 * entry['value']:+.2f} [{100 * entry['low']:+.2f}, {100 * entry['high']:+.2f}]"


def write_report(path: Path, result: dict) -> None:
    pair_sets = list(result["statistics"])
    lines = [f"# Loss search over its landscape ({result['seeds']} seeds, K = {result['candidates']})", "",
             f"Grid best on {HEADLINE}: {result['best']}; best region {result['region']}; searches start at "
             f"m = {result['start_margin']:g} (the grid's worst on {HEADLINE}; AM-LFS from plain softmax).", "",
             "| loss | margin found (per seed) | " + " | ".join(f"{p} acc. [95 % CI]" for p in pair_sets)
             + f" | {HEADLINE} − grid best | minutes |", "|---|---|" + "---:|" * (len(pair_sets) + 2)]
    for name in result["names"]:
        found = result["found"].get(name)
        margins = ", ".join(f"{m:.3f}" for m in found) if found else "(fixed)"
        row = [name, margins, *(cell(result["statistics"][p][name]["estimate"]) for p in pair_sets),
               signed(result["statistics"][HEADLINE][name]["difference"]), f"{result['minutes'].get(name, 0):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Total wall time {result['total_minutes']:.1f} min."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.05, 0.15, 0.25, 0.35, 0.45, 0.6])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--start-margin", type=float, help="the searches' initial margin (default: the grid's worst)")
    parser.add_argument("--policy-lr", type=float, help="Search-Softmax's Adam learning rate (default 0.1)")
    parser.add_argument("--sigma", type=float, help="the searches' sampling spread (default: each method's)")
    parser.add_argument("--tag", help="a name for searches with changed settings: their directories and outputs "
                                      "(landscape-TAG.*) get it, the grid is shared")
    parser.add_argument("--reward-pairs", type=int, default=1000, help="pairs per held-out reward set")
    parser.add_argument("--parallel", type=int, default=1, help="grid runs in parallel processes")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    args = parser.parse_args()

    start = time.perf_counter()
    base = load_config(args.config, [])
    minutes: dict[str, float] = {}
    grid_scores, _ = run_grid(args, base, args.margins)
    minutes["grid"] = (time.perf_counter() - start) / 60
    names = [grid_name(m) for m in args.margins]
    scores = {grid_name(m): grid_scores[m] for m in args.margins}
    seeds = tuple(sorted(next(iter(grid_scores.values()))))
    grid_stats = statistics(names, scores, seeds, names[0], args.bootstrap, only=HEADLINE)[HEADLINE]
    ranked = sorted(args.margins, key=lambda m: grid_stats[grid_name(m)]["estimate"]["value"])
    worst, best = ranked[0], grid_name(ranked[-1])
    start_margin = worst if args.start_margin is None else args.start_margin
    built = mf.data.synthetic(**vars(base.data.synthetic))
    steps = len(mf.data.open_dataset(str(built.train))) // base.train.batch_size
    print(f"grid done ({minutes['grid']:.1f} min): best {best}, worst m={worst:g}; searches start at "
          f"m={start_margin:g}, K={args.candidates}, {whole_epochs(base)} epochs x {steps} steps", flush=True)

    s = float(base.head.params.get("s", 30.0))
    searches: dict[str, list[dict]] = {}
    labels = {method: f"{method}-{args.tag}" if args.tag else method for method in args.methods}
    for method, label in labels.items():
        began = time.perf_counter()
        scores[label] = {}
        searches[label] = []
        for seed in seeds:
            summary, pair_scores = run_one_search(args, base, method, seed, start_margin, steps)
            scores[label][seed] = pair_scores
            searches[label].append({"seed": seed, "trajectory": trajectory(summary, s),
                                    "final_reward": summary["final_reward"]})
            path_m = ", ".join(f"{m:.3f}" for m in searches[label][-1]["trajectory"]["best"])
            print(f"{label} seed {seed}: margin per epoch {path_m}", flush=True)
        minutes[label] = (time.perf_counter() - began) / 60
    names += list(labels.values())
    stats = statistics(names, scores, seeds, best, args.bootstrap)
    region = best_region(args.margins, stats[HEADLINE], best)
    result = {"config": args.config, "seeds": len(seeds), "candidates": args.candidates, "margins": args.margins,
              "names": names, "best": best, "region": region, "start_margin": start_margin,
              "steps_per_epoch": steps, "epochs": whole_epochs(base), "statistics": stats,
              "found": {method: [run["trajectory"]["found"] for run in runs] for method, runs in searches.items()},
              "searches": searches, "minutes": minutes, "total_minutes": (time.perf_counter() - start) / 60}
    stem = f"landscape-{args.tag}" if args.tag else "landscape"
    result["settings"] = {"policy_lr": args.policy_lr, "sigma": args.sigma, "tag": args.tag}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_figure(args.out / f"{stem}.png", args.margins, stats[HEADLINE], searches, region)
    write_report(args.out / f"{stem}.md", result)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
