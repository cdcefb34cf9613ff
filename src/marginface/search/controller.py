"""The loss-search epoch loop: K candidates sample a loss, train one epoch from the same state, are scored by
10-fold verification accuracy; the distribution takes a REINFORCE step and the best candidate's full state goes
to every candidate. Candidates run in turn in one process ("sequential") or one per torchrun rank ("ranks").
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from marginface.errors import ConfigError, MarginfaceError
from marginface.search.distributions import REWARD_NORMALISATIONS, GaussianPolicy
from marginface.search.spaces import SPACES, SearchSpace, create_space

if TYPE_CHECKING:  # annotations only: the training layer is imported where it runs, not with this module
    from marginface.eval.pairs import PairSet
    from marginface.train.config import Config
    from marginface.train.distributed import World
    from marginface.train.trainer import Trainer

# Whether the method updates its distribution, and its default σ and Adam learning rate on the search variables.
METHODS: dict[str, dict[str, Any]] = {
    "search_softmax": {"update": True, "sigma": 1.0, "policy_lr": 0.1},
    "random_softmax": {"update": False, "sigma": 1.0, "policy_lr": 0.1},
    "am_lfs": {"update": True, "sigma": math.sqrt(0.2), "policy_lr": 0.05},
}
MODES = ("sequential", "ranks")
SEARCH_JSON = "search.json"
STATE_FILE = "search_state.pt"
STATE_FORMAT = 1


@dataclass
class SearchSettings:
    """What a search does; every field is validated by `validate` before any training starts."""

    method: str = "search_softmax"
    candidates: int = 4
    epochs: int = 6
    steps_per_epoch: int | None = None  # None: one pass over the training set
    space: str = "global"  # global | local (Search-/Random-Softmax)
    warmup_epochs: int = 1
    mode: str = "sequential"
    seed: int | None = None  # None: the training config's train.seed
    sigma: float | None = None  # None: the method's default
    learn_sigma: bool = False
    policy_lr: float | None = None
    normalisation: str = "std"  # std | range | none
    reward_pairs: list[str] | None = None  # .bin files or directories; None: the training config's pair sets
    bins: int = 10  # local space
    pieces: int = 6  # AM-LFS
    search_tau: bool = False  # AM-LFS
    initial_margin: float | None = None  # Search-/Random-Softmax: equivalent margin of the initial mean (None: ~1/3)

    def validate(self) -> None:
        """Raise a ConfigError naming the option for the first invalid setting."""
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is invalid: expected one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r} is invalid: expected one of {', '.join(MODES)}")
        if self.space not in SPACES:
            raise ConfigError(f"--space {self.space!r} is invalid: expected one of {', '.join(SPACES)}")
        if self.normalisation not in REWARD_NORMALISATIONS:
            raise ConfigError(f"--normalisation {self.normalisation!r} is invalid: expected one of "
                              f"{', '.join(REWARD_NORMALISATIONS)}")
        check_int("--candidates", self.candidates, 2, "a search compares at least 2 candidates per epoch")
        check_int("--warmup-epochs", self.warmup_epochs, 0, "warm-up epochs train with the fixed initial loss")
        check_int("--epochs", self.epochs, 1, "")
        if self.seed is not None:
            check_int("--seed", self.seed, 0, "")
        if self.epochs <= self.warmup_epochs:
            raise ConfigError(f"--epochs={self.epochs} is invalid with --warmup-epochs={self.warmup_epochs}: expected "
                              "more epochs than warm-up epochs (the search happens after the warm-up)")
        if self.steps_per_epoch is not None:
            check_int("--steps-per-epoch", self.steps_per_epoch, 1, "")
        for name, value in (("--sigma", self.sigma), ("--policy-lr", self.policy_lr),
                            ("--initial-margin", self.initial_margin)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value!r} is invalid: expected a number > 0")

    @property
    def updates(self) -> bool:
        """Whether the method learns its distribution (Random-Softmax does not)."""
        return METHODS[self.method]["update"]

    def resolved(self, name: str) -> float:
        """The setting `name` (sigma, policy_lr), or the method's default where it is None."""
        value = getattr(self, name)
        return METHODS[self.method][name] if value is None else value


def check_int(option: str, value: Any, minimum: int, why: str) -> None:
    """Raise a ConfigError unless `value` is an integer (not a bool) >= `minimum`; `why` explains the bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{option}={value!r} is invalid: expected an integer >= {minimum}{reason}")


def load_reward_pairs(paths: list[str]) -> list[PairSet]:
    """Read the reward pair sets up front: an unreadable one is an error before any training."""
    from marginface.eval import load_pairs
    from marginface.eval.pairs import pair_files

    expanded = pair_files(list(paths), option="--reward-pairs")
    sets = []
    for path in expanded:
        try:
            sets.append(load_pairs(path))
        except (MarginfaceError, ValueError, OSError) as exc:
            raise ConfigError(f"--reward-pairs: {path} cannot be read as a verification pair set ({exc})") from None
    return sets


def sample_generator(seed: int, epoch: int) -> torch.Generator:
    """The samples of an epoch depend on (seed, epoch) alone: every mode and every rank draws the same ones."""
    state = np.random.SeedSequence([seed, epoch, 0x5EA5C4]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def to_cpu(tree: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples) with every tensor detached and on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_cpu(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(to_cpu(v) for v in tree)
    return tree


class Candidates:
    """Trains a set of candidate losses for one epoch from a common state; sequential or one per rank."""

    def __init__(self, trainer: Trainer, global_world: World | None = None) -> None:
        self.trainer = trainer
        self.global_world = global_world  # None: sequential

    @property
    def is_main(self) -> bool:
        """Whether this process writes the search's outputs."""
        return self.global_world is None or self.global_world.is_main

    def set_margin(self, margin_config: dict[str, Any]) -> None:
        """Give the trainer's head the margin of `margin_config` ({"margin", "params"})."""
        from marginface import margins

        margin = margins.create(margin_config["margin"], **margin_config["params"])
        self.trainer.module.head.margin = margin.to(self.trainer.world.device)

    def train_one(self, start_state: dict, margin_config: dict, steps: int) -> tuple[float, dict[str, float]]:
        """Train one candidate `steps` steps from `start_state`; (reward, accuracy of each pair set)."""
        trainer = self.trainer
        trainer.load_state_dict(copy.deepcopy(start_state))  # the optimiser would alias the state's tensors
        self.set_margin(margin_config)  # after loading: the state holds the previous candidate's margin buffers
        trainer.train_until(trainer.state.step + steps, evaluate=False, checkpoint=False)
        results = trainer.evaluate()
        accuracies = {name: float(result["accuracy"]) for name, result in results.items()}
        reward = float(np.mean(list(accuracies.values()))) if accuracies else float("nan")
        return reward, accuracies

    def run_epoch(self, margin_configs: list[dict], steps: int) -> tuple[list[float], list[dict], int]:
        """Train each candidate from the current state; leave the best one's state in the trainer."""
        start_state = copy.deepcopy(self.trainer.state_dict())
        if self.global_world is None:
            rewards, accuracies, best, best_state = [], [], -1, None
            for margin_config in margin_configs:
                reward, accuracy = self.train_one(start_state, margin_config, steps)
                rewards.append(reward)
                accuracies.append(accuracy)
                if best < 0 or reward > rewards[best]:  # ties go to the lowest index, as argmax does
                    best, best_state = len(rewards) - 1, copy.deepcopy(self.trainer.state_dict())
        else:
            import torch.distributed as dist

            rank = self.global_world.rank
            # In a warm-up every rank trains the one fixed loss (the same run); rank 0's state is the reference.
            own = margin_configs[rank] if len(margin_configs) > 1 else margin_configs[0]
            reward, accuracy = self.train_one(start_state, own, steps)
            gathered = self.global_world.gather_objects((reward, accuracy))
            if len(margin_configs) == 1:
                gathered = gathered[:1]
            rewards = [g[0] for g in gathered]
            accuracies = [g[1] for g in gathered]
            best = int(np.argmax(rewards))
            box = [to_cpu(self.trainer.state_dict()) if rank == best else None]
            dist.broadcast_object_list(box, src=best)
            best_state = box[0]
        self.trainer.load_state_dict(best_state)
        self.set_margin(margin_configs[best])
        return rewards, accuracies, best


def prepare_config(config: Config, settings: SearchSettings, space: SearchSpace) -> Config:
    """The training config of the search: the head starts with the warm-up loss (so saved states load back)."""
    from marginface.train.config import config_from_dict

    raw = config.to_dict()
    warmup = space.warmup_config()
    raw["head"] = {**raw["head"], "margin": warmup["margin"], "params": warmup["params"]}
    if settings.seed is not None:
        raw["train"]["seed"] = settings.seed
    return config_from_dict(raw)


def search_space_for(settings: SearchSettings, config: Config) -> SearchSpace:
    """The search space of the settings' method, at the head's scale s."""
    s = float(config.head.params.get("s", 32.0))
    return create_space(settings.method, s, settings.space, bins=settings.bins, pieces=settings.pieces,
                        search_tau=settings.search_tau, initial_margin=settings.initial_margin)


def run_search(settings: SearchSettings, config: Config, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Run a new search into ``out_dir`` (or continue it: see `resume_search`); returns search.json's content."""
    settings.validate()
    out_dir = Path(out_dir)
    if (out_dir / STATE_FILE).exists():
        raise ConfigError(f"{out_dir} already holds a search ({STATE_FILE}); continue it with --resume {out_dir}, "
                          "or choose another --out")
    return _run(settings, config, out_dir, None, progress)


def resume_search(out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Continue the search in ``out_dir`` from its last finished epoch, with its saved settings and config."""
    from marginface.train.checkpoint import load_checkpoint
    from marginface.train.config import config_from_dict

    out_dir = Path(out_dir)
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {out_dir}: no {STATE_FILE} there (the search saves it after each epoch)")
    state = load_checkpoint(path)
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path}: unknown search state format {state.get('format')!r}, expected {STATE_FORMAT}")
    settings = SearchSettings(**state["settings"])
    settings.validate()
    return _run(settings, config_from_dict(state["config"]), out_dir, state, progress)


@dataclass
class SearchRun:
    """What the epoch loop works with: the search, its training config and trainer, and where it writes."""

    settings: SearchSettings
    config: Config  # as prepared by `prepare_config`, spanning the whole search with its schedule
    out_dir: Path
    space: SearchSpace
    trainer: Trainer
    steps: int  # training steps of each candidate in each epoch
    global_world: World | None  # None: sequential
    progress: bool

    @property
    def is_main(self) -> bool:
        """Whether this process writes the search's outputs."""
        return self.global_world is None or self.global_world.is_main


def _run(settings: SearchSettings, config: Config, out_dir: Path, saved: dict | None, progress: bool) -> dict:
    """Set up the world and the trainer, run the epochs, and tear them down whatever happens."""
    from marginface.train.distributed import World, setup, teardown
    from marginface.train.trainer import Trainer

    space = search_space_for(settings, config)
    config = prepare_config(config, settings, space)
    reward_sets = load_reward_pairs(settings.reward_pairs) if settings.reward_pairs else None

    if settings.mode == "ranks":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size != settings.candidates:
            raise ConfigError(
                f"--mode ranks runs one process per candidate: launch {settings.candidates} processes, e.g. "
                f"torchrun --nproc_per_node={settings.candidates} -m marginface search ... (found {world_size})"
            )
        global_world = setup(config.train.device)
        local_world = World(rank=0, world_size=1, local_rank=global_world.local_rank, device=global_world.device)
    else:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--mode sequential trains the candidates in one process; under torchrun use --mode ranks")
        global_world = None
        local_world = setup(config.train.device)
    try:
        trainer = Trainer(config, out_dir / "trainer", local_world, progress=False, write_outputs=False)
        try:
            if reward_sets is not None:
                trainer.pair_sets = reward_sets
            if not trainer.pair_sets:
                raise ConfigError("the search has no reward pair sets: set data.pairs or --reward-pairs")
            steps = settings.steps_per_epoch or max(1, int(trainer.steps_per_epoch))
            # The learning rate is a function of (step, total steps): span the whole search with the schedule.
            trainer.total_steps = settings.epochs * steps
            config.train.max_steps = trainer.total_steps
            run = SearchRun(settings, config, out_dir, space, trainer, steps, global_world, progress)
            return _epochs(run, saved)
        finally:
            trainer.close()
    finally:
        teardown(global_world if global_world is not None else local_world)


def _epochs(run: SearchRun, saved: dict | None) -> dict:
    """Run the search's remaining epochs (all of them, or those after the `saved` state); return its summary."""
    policy, candidates, records, start_epoch = _start(run, saved)
    _show_progress(run, start_epoch)
    for epoch in range(start_epoch, run.settings.epochs):
        record, best_margin = _search_epoch(run, policy, candidates, epoch)
        records.append(record)
        if run.is_main:
            _record_epoch(run, policy, records, best_margin)
    run.trainer.progress.close()
    return _finish(run, policy, records)


def _show_progress(run: SearchRun, start_epoch: int) -> None:
    """One bar (plain lines outside a terminal, and `search.log`) over every candidate training step of the
    search on this process; the trainer advances it step by step as it trains each candidate."""
    if not (run.progress and run.is_main):
        return
    from marginface.train.progress import ProgressReporter

    def candidate_steps(epoch: int) -> int:  # in "ranks" mode each process trains one candidate an epoch
        one = run.global_world is not None or epoch < run.settings.warmup_epochs
        return run.steps * (1 if one else run.settings.candidates)

    total = sum(candidate_steps(epoch) for epoch in range(run.settings.epochs))
    done = sum(candidate_steps(epoch) for epoch in range(start_epoch))
    run.trainer.progress.close()
    run.trainer.progress = ProgressReporter(total, done, show=True, log_path=run.out_dir / "search.log")


def _start(run: SearchRun, saved: dict | None) -> tuple[GaussianPolicy, Candidates, list[dict], int]:
    """The initial policy, candidates, epoch records and first epoch: fresh, or restored from `saved`."""
    settings = run.settings
    policy = GaussianPolicy(run.space.initial_mean(), sigma=settings.resolved("sigma"),
                            learn_sigma=settings.learn_sigma, lr=settings.resolved("policy_lr"),
                            normalisation=settings.normalisation)
    candidates = Candidates(run.trainer, run.global_world)
    records: list[dict] = []
    start_epoch = 0
    if saved is not None:
        policy.load_state_dict(saved["policy"])
        run.trainer.load_state_dict(saved["trainer"])
        candidates.set_margin(json.loads(saved["margin"]))
        records = json.loads(saved["records"])
        start_epoch = int(saved["epoch"])
        if run.is_main:  # always said, as `marginface train --resume` does
            print(f"resumed {run.out_dir} after epoch {start_epoch} of {settings.epochs}", file=sys.stderr, flush=True)
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    return policy, candidates, records, start_epoch


def _search_epoch(
    run: SearchRun, policy: GaussianPolicy, candidates: Candidates, epoch: int
) -> tuple[dict, dict[str, Any]]:
    """Sample the epoch's losses, train them, keep the best and update the policy; (record, best margin config)."""
    before = policy.describe()
    warmup = epoch < run.settings.warmup_epochs
    samples = _epoch_samples(run, policy, epoch, warmup)
    margin_configs = [run.space.margin_config(x) for x in samples]
    # Leaves the best candidate's state (broadcast from its rank in "ranks" mode) in the trainer.
    rewards, accuracies, best = candidates.run_epoch(margin_configs, run.steps)
    if not warmup and run.settings.updates:
        policy.update(samples, rewards)
    record = {
        "epoch": epoch,
        "warmup": warmup,
        "distribution_before": before,
        "distribution_after": policy.describe(),
        "candidates": [{"params": run.space.describe(x), "reward": r, "accuracies": a}
                       for x, r, a in zip(samples, rewards, accuracies, strict=True)],
        "best": best,
        "step": run.trainer.state.step,
    }
    return record, margin_configs[best]


def _epoch_samples(run: SearchRun, policy: GaussianPolicy, epoch: int, warmup: bool) -> torch.Tensor:
    """The epoch's candidate points of the search space: the initial mean alone in a warm-up, else K draws."""
    if warmup:
        return torch.tensor([run.space.initial_mean()], dtype=torch.float64)
    return policy.sample(run.settings.candidates, sample_generator(run.config.train.seed, epoch))


def _record_epoch(run: SearchRun, policy: GaussianPolicy, records: list[dict], best_margin: dict[str, Any]) -> None:
    """Save the resumable state after the last epoch of `records`, then search.json, then the progress line."""
    from marginface.train.checkpoint import atomic_write_bytes

    record = records[-1]
    state = {
        "format": STATE_FORMAT,
        "epoch": record["epoch"] + 1,
        "settings": dataclasses.asdict(run.settings),
        "config": run.config.to_dict(),
        "policy": policy.state_dict(),
        "trainer": to_cpu(run.trainer.state_dict()),
        "margin": json.dumps(best_margin),
        "records": json.dumps(records),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run.out_dir / STATE_FILE, buffer.getvalue())
    # search.json after the state: it never shows an epoch that a resume would not start after
    summary = build_summary(run.settings, run.config, run.space, policy, records, run.steps)
    write_json(run.out_dir / SEARCH_JSON, summary, atomic_write_bytes)
    if run.progress:
        run.trainer.progress.write(epoch_line(record, run.settings.epochs))


def _finish(run: SearchRun, policy: GaussianPolicy, records: list[dict]) -> dict:
    """The final summary; the main process also exports the model, draws the plots and writes search.json."""
    summary = build_summary(run.settings, run.config, run.space, policy, records, run.steps)
    if run.is_main:
        from marginface.train.checkpoint import atomic_write_bytes
        from marginface.train.trainer import export_model

        export_model(run.trainer.module.backbone, run.out_dir / "model.safetensors")
        summary["model"] = str(run.out_dir / "model.safetensors")
        from marginface.search.plots import plot_search  # after the export: a plotting failure keeps the model

        summary["plots"] = [str(p) for p in plot_search(summary, run.out_dir / "plots")]
        write_json(run.out_dir / SEARCH_JSON, summary, atomic_write_bytes)
    return summary


def found_margin(settings: SearchSettings, space: SearchSpace, policy: GaussianPolicy, records: list[dict]) -> dict:
    """The loss the search found: the learned distribution's mean, or (Random-Softmax, which learns nothing) the
    loss of the last epoch's best candidate, which trained the final model."""
    if settings.updates:
        return {**space.describe(policy.mean.detach()), "source": "distribution_mean"}
    last = records[-1]
    return {**last["candidates"][last["best"]]["params"], "source": "last_epoch_best_candidate"}


def build_summary(settings: SearchSettings, config: Config, space: SearchSpace, policy: GaussianPolicy,
                  records: list[dict], steps: int) -> dict:
    """search.json's content after the epochs in `records` (the caller adds the model and plots at the end)."""
    last = records[-1]
    return {
        "method": settings.method,
        "space": space.name,
        "settings": dataclasses.asdict(settings),
        "steps_per_epoch": steps,
        "epochs_done": len(records),
        "epochs": records,
        "best": found_margin(settings, space, policy, records),
        "final_reward": last["candidates"][last["best"]]["reward"],
        "final_accuracies": last["candidates"][last["best"]]["accuracies"],
        "config": config.to_dict(),
    }


def write_json(path: Path, value: Any, atomic_write_bytes: Callable[[Path, bytes], None]) -> None:
    """Write `value` as indented JSON through `atomic_write_bytes`, so a reader never sees half a file."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def epoch_line(record: dict, epochs: int) -> str:
    """The one-line progress report of an epoch: its rewards, best candidate and the distribution's mean."""
    rewards = ", ".join(f"{100 * c['reward']:.2f}" for c in record["candidates"])
    best = record["candidates"][record["best"]]["params"]
    margin = best.get("equivalent_margin")
    shown = f" m={margin:.3f}" if isinstance(margin, float) else ""
    kind = "warm-up" if record["warmup"] else "search"
    mean = record["distribution_after"]["mean"]
    return (f"epoch {record['epoch'] + 1}/{epochs} ({kind}): rewards [{rewards}] best #{record['best']}{shown}; "
            f"mean {', '.join(f'{v:.3f}' for v in mean[:4])}{' ...' if len(mean) > 4 else ''}")


def load_found_margin(path: str | os.PathLike) -> dict[str, Any]:
    """{"margin", "params"} of the loss a search found, from its search.json (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SEARCH_JSON
    try:
        summary = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--margin-from {path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--margin-from {path}: not valid JSON ({exc})") from None
    best = summary.get("best") if isinstance(summary, dict) else None
    if not (isinstance(best, dict) and isinstance(best.get("margin"), str) and isinstance(best.get("params"), dict)):
        raise ConfigError(f"--margin-from {path}: expected a search.json with \"best\": {{\"margin\", \"params\"}}")
    return {"margin": best["margin"], "params": best["params"]}
