"""Loss-search benchmark: Search-Softmax vs Random-Softmax vs fixed CosFace vs fixed CurricularFace, several seeds.

Budget: every method's final model follows a trajectory of the same length (E epochs × N steps, the same
learning-rate schedule); the searches additionally train K−1 discarded candidates per search epoch (their extra
compute is reported). Rewards are scored on pair sets of *other* synthetic identities (a second synthetic set,
seed 1000 + seed), so the final 10-fold accuracies reported on the training set's own pair sets (synth_hard and
synth_lfw, never seen by any selection) are not inflated by best-of-K selection. The methods run one after
another for each seed in one process; the machine may be shared, which changes times but not accuracies.

    python benchmarks/search.py                       # 3 seeds, K=3, 4 epochs (1 warm-up), small synthetic set
    python benchmarks/search.py --seeds 0 1 2 3 4 --candidates 4 --epochs 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import marginface as mf
from marginface.search import SearchSettings, run_search
from marginface.train import load_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--images-per-id", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--s", type=float, default=30.0)
    parser.add_argument("--policy-lr", type=float, help="Adam lr of Search-Softmax's distribution (default 0.1)")
    parser.add_argument("--initial-margin", type=float, help="Search-/Random-Softmax initial margin (default 1/3)")
    parser.add_argument("--cosface-margin", type=float, default=0.35)
    parser.add_argument("--methods", nargs="+", choices=("search_softmax", "random_softmax", "cosface",
                                                         "curricularface"),
                        default=["search_softmax", "random_softmax", "cosface", "curricularface"])
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args()

    base = [f"data.synthetic.identities={args.identities}", f"data.synthetic.images_per_id={args.images_per_id}",
            f"data.synthetic.pairs_per_set={args.pairs}", f"train.batch_size={args.batch}", "data.num_workers=0",
            f"train.threads={args.threads}", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1000",
            "schedule.warmup_steps=0"]
    probe = load_config(None, base)
    built = mf.data.synthetic(**vars(probe.data.synthetic))
    steps = len(mf.data.open_dataset(str(built.train))) // args.batch
    total = args.epochs * steps
    print(f"{args.identities} identities x {args.images_per_id} images, batch {args.batch}: {steps} steps/epoch, "
          f"{total} steps per final model; K={args.candidates}, {args.warmup_epochs} warm-up epoch(s)", flush=True)
    methods = {
        "search_softmax": None,
        "random_softmax": None,
        f"cosface (m={args.cosface_margin})": ("cosface", {"s": args.s, "m": args.cosface_margin}),
        "curricularface (m=0.5)": ("curricularface", {"s": args.s, "m": 0.5}),
    }
    methods = {name: value for name, value in methods.items() if name.split()[0] in args.methods}
    results: dict[str, list[dict]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(prefix="mf-search-bench-") as scratch:
        for seed in args.seeds:
            held_out = mf.data.synthetic(identities=4, images_per_id=2, pairs_per_set=args.pairs, ijb=False,
                                         seed=1000 + seed, difficulty=probe.data.synthetic.difficulty)
            reward_pairs = [str(held_out.pairs[name]) for name in sorted(held_out.pairs)]
            for name, fixed in methods.items():
                start = time.perf_counter()
                out = Path(scratch) / f"{name.split()[0]}-{seed}"
                if fixed is None:
                    config = load_config(None, [*base, f"head.params.s={args.s}"])
                    settings = SearchSettings(method=name, candidates=args.candidates, epochs=args.epochs,
                                              steps_per_epoch=steps, warmup_epochs=args.warmup_epochs, seed=seed,
                                              reward_pairs=reward_pairs, initial_margin=args.initial_margin,
                                              policy_lr=args.policy_lr if name == "search_softmax" else None)
                    summary = run_search(settings, config, out, progress=False)
                    trainer_steps = steps * (args.warmup_epochs + (args.epochs - args.warmup_epochs) * args.candidates)
                    # the final model scored on the training set's own pair sets (never used for selection)
                    accuracies = score(out / "model.safetensors", built)
                    found = summary["best"]
                    extra = {"found_equivalent_margin": found.get("equivalent_margin"),
                             "reward": summary["final_reward"]}
                else:
                    margin, params = fixed
                    config = load_config(None, [*base, f"train.seed={seed}", f"train.max_steps={total}",
                                                f"head.margin={margin}"])
                    config.head.params = dict(params)
                    metrics = train(config, out, progress=False)
                    trainer_steps = total
                    accuracies = {k: v["accuracy"] for k, v in metrics["verification"].items()}
                    extra = {}
                row = {"seed": seed, "hard": accuracies["synth_hard"], "lfw": accuracies["synth_lfw"],
                       "all": accuracies, "steps_trained": trainer_steps,
                       "seconds": time.perf_counter() - start, **extra}
                results[name].append(row)
                print(f"seed {seed} {name:24s} hard {100 * row['hard']:.2f}  lfw {100 * row['lfw']:.2f}  "
                      f"steps {trainer_steps}  {row['seconds']:.0f}s"
                      + (f"  found m={extra['found_equivalent_margin']:.3f}" if extra.get("found_equivalent_margin")
                         else ""), flush=True)

    print(f"\nsearch --policy-lr {args.policy_lr or 'default'}, --initial-margin {args.initial_margin or 'default'}")
    print(f"\n| method | synth_hard 10-fold acc. (mean ± std over seeds {args.seeds}) | synth_lfw | "
          "steps trained per seed |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        hard = [100 * r["hard"] for r in rows]
        lfw = [100 * r["lfw"] for r in rows]
        print(f"| {name} | {statistics.mean(hard):.2f} ± {stdev(hard):.2f} | {statistics.mean(lfw):.2f} ± "
              f"{stdev(lfw):.2f} | {rows[0]['steps_trained']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def score(model_path: Path, built) -> dict[str, float]:
    """10-fold accuracy of an exported backbone on the training set's pair sets."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(model_path), "pt") as handle:
        model_config = json.loads(handle.metadata()["marginface_model"])
    backbone = mf.models.create(**model_config)
    backbone.load_state_dict(load_file(str(model_path)))
    backbone.eval()
    return {name: mf.eval.evaluate_pairs(backbone, mf.eval.load_pairs(path), batch_size=256)["accuracy"]
            for name, path in sorted(built.pairs.items())}


def stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
