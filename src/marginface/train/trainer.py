"""The training loop: backbone + margin head, one CPU to many GPUs, full-state checkpoints, exact resume.

A resumed run on CPU reproduces the uninterrupted one bit for bit: the data order comes from the sampler's
saved position, flips are a pure function of (seed, epoch, index), the DataLoader draws its worker seeds from
its own generator, the LR is a pure function of the step, and every RNG state is in the checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marginface import engines, heads, models
from marginface.data.bad_records import BadRecordLedger, GuardedItems, worker_message
from marginface.errors import ConfigError, DataFormatError, MarginfaceError, NonFiniteLossError
from marginface.fileio import json_plain
from marginface.models.weights import load_backbone_weights
from marginface.models.weights import save_backbone as export_model  # the search exports through it too
from marginface.train import head_rows
from marginface.train.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from marginface.train.config import Config, config_from_dict, save_config
from marginface.train.distributed import World, scale_gradient, setup, teardown
from marginface.train.optim import build_optimizer, learning_rate, set_learning_rate
from marginface.train.progress import ProgressReporter, SilentReporter
from marginface.train.reporting import RunLog, write_json, write_report


class TrainingModule(nn.Module):
    """Backbone and head as one module, so that one DistributedDataParallel wrapper syncs both.

    With a sharded head only the backbone is wrapped (``embedding_gradient_scale`` = the world size): the head's
    loss is already the mean over the global batch, and DDP's average over ranks would divide its backbone
    gradient by N once more.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, embedding_gradient_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding_gradient_scale = embedding_gradient_scale

    def forward(self, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None = None):
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            embeddings = self.backbone(images)
        if self.embedding_gradient_scale != 1.0:
            embeddings = scale_gradient(embeddings, self.embedding_gradient_scale)
        return self.head(embeddings.float(), labels)  # the head is fp32 whatever the backbone ran in


@dataclass
class RunState:
    step: int = 0
    images_seen: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)  # damaged records left out (data.bad_records=skip)
    train_seconds: float = 0.0


def resolve_data(config: Config, world: World, progress: bool = True) -> tuple[str, list[str]]:
    """The training set path and the pair files: the user's, or the synthetic identities (made on first use)."""
    from marginface.data import synthetic

    pairs = list(config.data.pairs or [])
    train_path = config.data.train
    if train_path is None or config.data.pairs is None:
        params = vars(config.data.synthetic).copy()
        # One rank renders the set, the others then find it in the cache.
        if world.is_main:
            built = synthetic(**params, progress=progress)
        world.barrier()
        if not world.is_main:
            built = synthetic(**params)
        train_path = train_path or str(built.train)
        if config.data.pairs is None:
            pairs = [str(built.pairs[name]) for name in sorted(built.pairs)]
    from marginface.eval.pairs import pair_files

    return train_path, pair_files(pairs, option="data.pairs")


def build_model(config: Config, num_classes: int) -> TrainingModule:
    model_kwargs = dict(config.model.kwargs)
    takes_size = config.model.name in ("small_cnn", "linear")
    if config.data.image_size is not None and "input_size" not in model_kwargs and takes_size:
        model_kwargs["input_size"] = config.data.image_size
    backbone = models.create(config.model.name, embedding_size=config.model.embedding_size, **model_kwargs)
    if config.model.init is not None:
        load_backbone_weights(backbone, config.model.init)  # fine-tuning; a resume then overwrites them
    head = heads.create(
        config.head.margin, num_classes=num_classes, embedding_size=config.model.embedding_size,
        engine=config.head.engine, engine_params=config.head.engine_params, **config.head.params,
        subcenters=config.head.subcenters,
    )
    return TrainingModule(backbone, head)


def check_image_size(config: Config, backbone: nn.Module, stored: tuple[int, int] | None) -> None:
    """A backbone with a fixed input size must get images of that size: say which option fixes a mismatch."""
    expected = getattr(backbone, "input_size", None)
    fed = config.data.image_size if config.data.image_size is not None else stored
    if expected is None or fed is None:
        return
    fed = (fed, fed) if isinstance(fed, int) else tuple(fed)
    if tuple(fed) != tuple(expected):
        source = f"data.image_size={config.data.image_size}" if config.data.image_size is not None else (
            "the dataset's stored size")
        raise ConfigError(
            f"model.name={config.model.name} takes {expected[0]}x{expected[1]} images, but {source} gives "
            f"{fed[0]}x{fed[1]}: set data.image_size={expected[0]}"
            + (" (or data.image_size=null to keep the stored size)" if stored == tuple(expected) else "")
        )


def train(config: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured into ``run_dir``; with ``resume``, continue from its latest checkpoint."""
    run_dir = Path(run_dir)
    world = setup(config.train.device)
    try:
        return _train(config, run_dir, resume, progress, world)
    finally:
        teardown(world)


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, world: World) -> dict:
    trainer = Trainer(config, run_dir, world, resume=resume, progress=progress)
    try:
        trainer.train_until(trainer.total_steps)
        return trainer.finish()
    finally:
        trainer.close()


class Trainer:
    """One training run, step by step: what `train` drives to the end and what a loss search drives epoch by epoch.

    ``state_dict`` / ``load_state_dict`` carry the full state (weights, margin state, optimiser, scaler, sampler
    position, step); a search copies the best candidate's state to the others through them.
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike,
        world: World,
        resume: bool = False,
        progress: bool = True,
        write_outputs: bool = True,
    ) -> None:
        self.config, self.world = config, world
        self.run_dir = Path(run_dir)
        self.write_outputs = write_outputs and world.is_main
        self._write_checkpoints = write_outputs
        self._prepare_run_directory(resume)
        self._open_data(progress)
        self._build_model(resume)
        self._build_optimisation()
        self._plan_steps()
        self.state = RunState()
        self.log = RunLog(self.run_dir, enabled=self.write_outputs)
        self.verification: dict[str, dict] = {}
        self.pair_scores: tuple[int, dict] = (-1, {})  # (step, per-pair scores) of the last evaluation
        self._batches = None  # the iterator of the epoch in progress
        self.bad_records = BadRecordLedger(config.data.bad_records, config.data.max_bad_fraction, len(self.sampler),
                                           str(self.dataset.path), seen=self.state.bad_records)
        self._resumed_mid_epoch = False
        if resume:
            self._resume()
        self.model = self._wrap_for_processes()
        self.progress: ProgressReporter = SilentReporter()
        if world.is_main:
            self.progress = ProgressReporter(self.total_steps, self.state.step, show=progress,
                                             log_path=self.run_dir / "train.log" if self.write_outputs else None)
        self._window = (0.0, 0, time.perf_counter(), 0)  # loss sum, steps, start time, images

    # -- construction, step by step -------------------------------------------------------------------------
    def _prepare_run_directory(self, resume: bool) -> None:
        """Refuse to overwrite a run; write config.yaml; seed the global RNG."""
        config = self.config
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.checkpoints = CheckpointManager(self.run_dir, keep=config.train.keep_checkpoints)
        if self._write_checkpoints and not resume and self.checkpoints.latest() is not None:
            raise ConfigError(
                f"{self.run_dir} already holds a training run (checkpoints in {self.checkpoints.directory}); "
                f"continue it with --resume {self.run_dir}, or choose another --out"
            )
        if self.write_outputs:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
        torch.manual_seed(config.train.seed)

    def _open_data(self, progress: bool) -> None:
        """The training set (made first if synthetic), its sampler, and the pair sets rank 0 validates on."""
        from marginface.data import DistributedIdentitySampler, open_dataset
        from marginface.eval import load_pairs

        config, world = self.config, self.world
        train_path, pair_paths = resolve_data(config, world, progress)
        self.dataset = open_dataset(train_path, image_size=config.data.image_size, train=config.data.flip,
                                    seed=config.train.seed)
        self.pair_sets = [load_pairs(path) for path in pair_paths] if world.is_main else []
        self.sampler = DistributedIdentitySampler(len(self.dataset), seed=config.train.seed, rank=world.rank,
                                                  world_size=world.world_size, drop_last=True)

    def _build_model(self, resume: bool) -> None:
        """Backbone (from model.init when given) and head on the device; the head reduces across ranks."""
        config, world = self.config, self.world
        self.module = build_model(config, self.dataset.num_classes).to(world.device)
        if config.model.init is not None and world.is_main and not resume:
            print(f"backbone initialised from {config.model.init}", file=sys.stderr, flush=True)
        check_image_size(config, self.module.backbone, self.dataset.stored_size)
        self.module.head.batch_reduce = world.all_reduce_sum
        # a sharded head holds only its classes: never under DDP, its rows checkpointed by every rank
        self.sharded_head = bool(getattr(getattr(self.module.head, "engine", None), "uses_process_group", False))

    def _build_optimisation(self) -> None:
        """Optimiser, loss scaler and autocast type for train.precision."""
        config = self.config
        self.optimizer = build_optimizer([self.module], config.optimizer)
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=config.train.precision == "fp16")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.precision]

    def _plan_steps(self) -> None:
        """Steps per epoch and in all, from this process's share of the set and the batch settings."""
        train = self.config.train
        micro_batches_per_epoch = len(self.sampler) // train.batch_size
        if micro_batches_per_epoch < train.accumulation:
            raise ConfigError(
                f"train.batch_size={train.batch_size} × train.accumulation={train.accumulation} is larger than "
                f"one epoch on this process ({len(self.sampler)} images): lower them"
            )
        self.steps_per_epoch = micro_batches_per_epoch / train.accumulation
        self.total_steps = train.max_steps or math.ceil(train.epochs * self.steps_per_epoch)

    def _resume(self) -> None:
        """Load the newest checkpoint that loads and drop the history written after it."""
        self.load_state_dict(self._load_resumable_checkpoint())
        self.log.truncate_after(self.state.step)
        if self.world.is_main:
            print(f"resumed {self.run_dir} at step {self.state.step} of {self.total_steps} "
                  f"(epoch {self.sampler.epoch})", file=sys.stderr, flush=True)

    def _wrap_for_processes(self) -> nn.Module:
        """The module the step runs: itself on one process; under DDP, all of it, or only the backbone when the
        head is sharded (its rows are per rank, its embedding gradient scaled to DDP's mean)."""
        world = self.world
        if not world.distributed:
            return self.module
        device_ids = [world.local_rank] if world.device.type == "cuda" else None
        if self.sharded_head:
            backbone = nn.parallel.DistributedDataParallel(self.module.backbone, device_ids=device_ids)
            return TrainingModule(backbone, self.module.head, embedding_gradient_scale=world.world_size)
        return nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The full state of this process (its RNG included), loadable with weights_only=True."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "run_state": vars(self.state).copy(),
            "rng": [rng_state()],
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.state = RunState(**state["run_state"])
        self.bad_records.records = self.state.bad_records
        set_rng_state(state["rng"][self.world.rank % len(state["rng"])])
        self._batches = None
        # A restored position may sit in the middle of an epoch: continue it rather than start the next one.
        self._resumed_mid_epoch = True

    def save_checkpoint(self) -> None:
        """Every rank writes its head rows (sharded heads), then rank 0 the main file: the checkpoint exists once
        its main file does, so a kill at any moment leaves the previous one whole."""
        state = self.state_dict()
        state["rng"] = self.world.gather_objects(state["rng"][0])  # every process's generators
        state["num_classes"] = self.dataset.num_classes
        if self.sharded_head:
            head = self.module.head
            index = head_rows.parameter_index(self.optimizer, head.weight)
            state["module"], state["optimizer"], rows = head_rows.split_rows(
                state["module"], state["optimizer"], "head.weight", index, len(head.class_range) * head.subcenters)
            if self._write_checkpoints:
                head_rows.write_shard(self.checkpoints.head_directory(self.state.step), head.class_range,
                                      head.num_classes, rows, subcenters=head.subcenters)
            ranges = [[part.start, part.stop] for part in self._head_ranges()]
            state["head_shards"] = {"num_classes": head.num_classes, "ranges": ranges}
            self.world.barrier()
        if self.write_outputs:
            self.checkpoints.save(state, self.state.step)
        self.world.barrier()

    def _load_resumable_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint every rank can load (its head rows re-sharded for this world); a damaged one is
        named and the one before it tried, so that a kill mid-write or a bad disk block costs one interval."""
        tried = []
        for path in reversed(self.checkpoints.checkpoints()):
            state, error = None, None
            try:
                state = self._with_head_rows(load_checkpoint(path), path)
            except MarginfaceError as exc:
                error = str(exc)
            if not self.world.any(error is not None):
                if tried and self.world.is_main:
                    print(f"resuming from {path.name}, the newest checkpoint that loads", file=sys.stderr)
                return state
            tried.append(error or f"{path}: another rank could not load its part")
            if self.world.is_main:
                print(f"{tried[-1]}; trying the checkpoint before it", file=sys.stderr)
        if not tried:
            raise MarginfaceError(f"no checkpoint to resume from in {self.checkpoints.directory} "
                                  "(expected files named step_NNNNNNNNN.pt)")
        raise MarginfaceError("no checkpoint could be loaded: " + "; ".join(tried))

    def _with_head_rows(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """The checkpoint with this process's head rows in place, whatever world size wrote it."""
        saved = state.get("num_classes")
        if saved is None and "head.weight" in state.get("module", {}):
            saved = state["module"]["head.weight"].shape[0] // getattr(self.module.head, "subcenters", 1)
        if saved is not None and saved != self.dataset.num_classes:
            raise ConfigError(f"{path} was trained on {saved} classes, but this training set has "
                              f"{self.dataset.num_classes}: resume with the run's own data")
        head = self.module.head
        if not isinstance(head, heads.MarginHead):
            return state
        index = head_rows.parameter_index(self.optimizer, head.weight)
        wanted, num_classes, k = head.class_range, head.num_classes, head.subcenters
        if "head_shards" in state:
            ranges = [range(start, stop) for start, stop in state["head_shards"]["ranges"]]
            rows = head_rows.read_rows(self.checkpoints.head_directory_of(path), ranges, wanted, num_classes,
                                       subcenters=k)
        elif len(wanted) != num_classes:  # a whole head (one process, or replicated), resumed sharded
            module_state, optimizer_state, rows = head_rows.split_rows(
                state["module"], state["optimizer"], "head.weight", index, num_classes * k)
            state = {**state, "module": module_state, "optimizer": optimizer_state}
            # a class's K sub-centre rows are contiguous (j·K … j·K + K − 1): classes slice as row blocks
            rows = {name: value[wanted.start * k : wanted.stop * k] for name, value in rows.items()}
        else:
            return state
        state["module"], state["optimizer"] = head_rows.join_rows(
            state["module"], state["optimizer"], "head.weight", index, rows)
        return state

    # -- training -------------------------------------------------------------------------------------------
    def _next_micro_batches(self) -> tuple[list, list[int]]:
        """The next step's micro-batches, starting a new epoch when the current one is exhausted."""
        for _ in range(2):
            if self._batches is None:
                self._start_epoch()
            micro_batches, indices = [], []
            for _ in range(self.config.train.accumulation):
                try:
                    images, labels, batch_indices, problems = next(self._batches)
                except StopIteration:
                    break
                except DataFormatError as exc:
                    raise DataFormatError(worker_message(exc)) from None
                self.bad_records.report(list(problems), echo=self._echo)
                micro_batches.append((images, labels))
                indices += batch_indices.tolist()
                self.sampler.advance(len(batch_indices))
            if micro_batches:
                return micro_batches, indices
            self._batches = None  # the epoch ended exactly here
        raise MarginfaceError("the training set yields no batches (is it smaller than one batch per process?)")

    def _start_epoch(self) -> None:
        if not self._resumed_mid_epoch:
            self.sampler.set_epoch(self.sampler.epoch if self.state.step == 0 and self.sampler.consumed == 0
                                   else self.sampler.epoch + 1)
        self._resumed_mid_epoch = False
        self.dataset.set_epoch(self.sampler.epoch)
        # The loader draws its worker seeds from its own generator, not the global one: a resumed run then
        # leaves the global RNG exactly where the uninterrupted run has it.
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.sampler.epoch)
        loader = torch.utils.data.DataLoader(
            GuardedItems(self.dataset), batch_size=self.config.train.batch_size, sampler=self.sampler,
            drop_last=True, num_workers=self.config.data.num_workers, generator=generator,
            pin_memory=self.world.device.type == "cuda", persistent_workers=False,
        )
        self._batches = iter(loader)

    def train_until(self, step: int, evaluate: bool = True, checkpoint: bool = True) -> None:
        """Train until the step counter reaches ``step``, evaluating and checkpointing on their schedules."""
        config, state = self.config, self.state
        step = min(step, self.total_steps)
        self.module.train()
        while state.step < step:
            step_start = time.perf_counter()
            lr = learning_rate(state.step, self.total_steps, self.steps_per_epoch, config.optimizer.lr,
                               config.schedule)
            set_learning_rate(self.optimizer, lr)
            log_this_step = (state.step + 1) % config.train.log_every == 0 or state.step + 1 == self.total_steps
            self.module.head.record_statistics = log_this_step
            micro_batches, indices = self._next_micro_batches()
            loss_value, nonfinite = optimizer_step(
                self.model, self.module, self.optimizer, self.scaler, micro_batches, self.world,
                self.autocast_dtype, config.train.grad_clip, sharded_head=self.sharded_head,
            )
            if nonfinite:
                self._skip(loss_value, indices)
            else:
                state.nonfinite_in_a_row = 0
            state.step += 1
            images = len(indices) * self.world.world_size
            state.images_seen += images
            state.train_seconds += time.perf_counter() - step_start
            loss_sum, count, start, window_images = self._window
            self._window = (loss_sum + loss_value, count + 1, start, window_images + images)
            if log_this_step:
                self._log_step(lr)
            self.progress.update(1)
            last = state.step == self.total_steps
            if evaluate and ((config.train.eval_every and state.step % config.train.eval_every == 0) or last):
                self.evaluate(log=True)
            if checkpoint and ((config.train.checkpoint_every and state.step % config.train.checkpoint_every == 0)
                               or last):
                self.save_checkpoint()

    def _echo(self, line: str) -> None:
        """A line for the user, from any rank (a damaged record is found by the rank that reads it)."""
        if self.world.distributed:
            line = f"rank {self.world.rank}: {line}"
        self.progress.write(line)

    def _skip(self, loss_value: float, indices: list[int]) -> None:
        state, config = self.state, self.config
        state.nonfinite_in_a_row += 1
        state.skipped_steps.append(state.step)
        # Every rank draws the same number of samples per step, so the indices gather as one tensor.
        gathered = self.world.gather_equal(torch.tensor(indices, dtype=torch.int64)).tolist()
        if self.world.is_main:
            self.progress.write(f"step {state.step}: non-finite loss or gradient (loss {loss_value}), step skipped; "
                                f"sample indices {sorted(i for part in gathered for i in part)}")
            self.log.write({"step": state.step, "skipped": True, "sample_indices": gathered})
        if state.nonfinite_in_a_row >= config.train.max_nonfinite:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                f"{state.step}); aborting. Lower optimizer.lr, set train.grad_clip, or check the data "
                f"(train.max_nonfinite={config.train.max_nonfinite})"
            )

    def _log_step(self, lr: float) -> None:
        loss_sum, count, start, images = self._window
        record = {"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
                  "train/loss": loss_sum / max(count, 1), "train/lr": lr,
                  "train/images_per_second": images / max(time.perf_counter() - start, 1e-9)}
        for key, value in getattr(self.module.head, "last_statistics", {}).items():
            record[f"margin/{key}"] = value
        self.log.write(record)
        postfix = {"loss": f"{record['train/loss']:.3f}", "lr": f"{lr:.3g}",
                   "img/s": f"{record['train/images_per_second']:.0f}"}
        if "margin/t" in record:
            postfix["t"] = f"{record['margin/t']:.3f}"
        self.progress.set_postfix(postfix)
        self._window = (0.0, 0, time.perf_counter(), 0)

    def evaluate(self, log: bool = False) -> dict[str, dict]:
        """10-fold verification of the backbone on every pair set (main process; the others wait)."""
        from marginface.eval import evaluate_pairs
        from marginface.eval.score_files import PairScores

        results, scores = {}, {}
        if self.world.is_main and self.pair_sets:
            self.module.eval()
            for pair_set in self.pair_sets:
                results[pair_set.name], pair_scores = evaluate_pairs(self.module.backbone, pair_set,
                                                                     return_scores=True)
                scores[pair_set.name] = PairScores(pair_set.name, np.asarray(pair_scores, dtype=np.float64),
                                                   np.asarray(pair_set.issame, dtype=bool))
            self.module.train()
        self.world.barrier()
        if results:
            # the per-pair scores go with the tables: finish() saves them when they are of the final model
            self.verification, self.pair_scores = results, (self.state.step, scores)
        if log and results:
            record = {"step": self.state.step}
            for name, result in results.items():
                record[f"verification/{name}/accuracy"] = result["accuracy"]
                record[f"verification/{name}/std"] = result["std"]
            self.log.write(record)
            self.progress.write(f"step {self.state.step}: " + ", ".join(
                f"{n} {100 * r['accuracy']:.2f}±{100 * r['std']:.2f}" for n, r in results.items()))
        return results

    def finish(self) -> dict:
        """metrics.json, model.safetensors and report.md; returns the metrics."""
        self.progress.close()
        # Evidence that margin state agrees across ranks (CurricularFace's t comes from all-reduced statistics).
        margin_states = self.world.gather_objects(
            {k: v.tolist() for k, v in getattr(self.module.head, "margin", nn.Module()).state_dict().items()}
        )
        state = self.state
        metrics = {
            "verification": {name: json_plain(result) for name, result in self.verification.items()},
            "steps": state.step,
            "epochs": state.step / self.steps_per_epoch,
            "world_size": self.world.world_size,
            "images_seen": state.images_seen,
            "train_seconds": state.train_seconds,
            "throughput": {"images_per_second": state.images_seen / max(state.train_seconds, 1e-9)},
            "skipped_steps": state.skipped_steps,
            "bad_records": self._bad_records_summary(),
            "margin": dict(getattr(self.module.head, "last_statistics", {})),
            "margin_state_per_rank": margin_states,
        }
        self.export_head()
        if self.write_outputs:
            export_model(self.module.backbone, self.run_dir / "model.safetensors")
            self._save_pair_scores()
            write_json(self.run_dir / "metrics.json", metrics)
            write_report(self.run_dir, metrics, self.config.to_dict())
        self.world.barrier()
        return metrics

    def _save_pair_scores(self) -> None:
        """pair_scores.npz (after the model, so that it is newer) when the last evaluation scored the final model:
        `marginface compare` reads it instead of embedding every pair set again."""
        from marginface.eval.score_files import SCORES_FILE, save_pair_scores

        path = self.run_dir / SCORES_FILE
        step, scores = self.pair_scores
        if scores and step == self.state.step:
            save_pair_scores(path, scores)
        elif path.exists():
            path.unlink()  # a resumed run's old scores are not of this model

    def _bad_records_summary(self) -> dict[str, Any]:
        """The damaged records every rank left out, once each, in rank order."""
        records = [r for part in self.world.gather_objects(self.state.bad_records) for r in part]
        unique = list(dict.fromkeys(records))
        return {"mode": self.config.data.bad_records, "count": len(unique), "records": unique}

    def export_head(self) -> None:
        """``head.safetensors``: the whole classifier [C·K, D] in class order (label ids; with K sub-centres, row
        j·K + k is sub-centre k of class j), however it was sharded; a sharded head is assembled from the last
        checkpoint's parts, one part in memory at a time."""
        head = self.module.head
        if not isinstance(head, heads.MarginHead) or not self.write_outputs:
            return
        k = head.subcenters
        metadata = {"num_classes": str(head.num_classes), "subcenters": str(k),
                    "rows": "class centres in label order" if k == 1 else
                    "sub-centres in label order: row j*K + k is sub-centre k of class j",
                    "margin": head.margin.name, "step": str(self.state.step)}
        path = self.run_dir / "head.safetensors"
        if not self.sharded_head:
            head_rows.write_head_safetensors(path, head.num_classes, [head.weight], metadata, subcenters=k)
            return
        latest = self.checkpoints.latest()
        if latest is None or latest.name != f"step_{self.state.step:09d}.pt":
            return  # no checkpoint of this step to assemble from (a search, or checkpoints turned off)
        ranges = self._head_ranges()
        directory = self.checkpoints.head_directory_of(latest)
        parts = (head_rows.read_rows(directory, ranges, part, head.num_classes, subcenters=k)["weight"]
                 for part in ranges)
        head_rows.write_head_safetensors(path, head.num_classes, parts, metadata, subcenters=k)

    def _head_ranges(self) -> list[range]:
        """Every rank's classes of a sharded head (derived: the split is a function of C and the world size)."""
        return [engines.shard_range(self.module.head.num_classes, rank, self.world.world_size)
                for rank in range(self.world.world_size)]

    def close(self) -> None:
        self.progress.close()
        self.log.close()


def optimizer_step(
    model: nn.Module,
    module: TrainingModule,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    sharded_head: bool = False,
) -> tuple[float, bool]:
    """One optimiser step over accumulated micro-batches; returns (loss, skipped-as-non-finite).

    A non-finite loss or gradient on any rank skips the update on every rank (the decision is all-reduced).
    With a sharded head the gradient norm (clipping, the finiteness test) includes every rank's head rows.
    """
    loss_value = 0.0
    for images, labels in micro_batches:
        images = images.to(world.device, non_blocking=True)
        labels = labels.to(world.device, non_blocking=True)
        loss = model(images, labels, autocast_dtype) / len(micro_batches)
        scaler.scale(loss).backward()
        loss_value += float(loss.detach())
    scaler.unscale_(optimizer)
    grad_norm = global_grad_norm(module, world, sharded_head)
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(module.parameters(), grad_clip, grad_norm)
    finite_loss = not world.any(not math.isfinite(loss_value))
    finite_grad = not world.any(not bool(torch.isfinite(grad_norm)))
    if finite_loss and finite_grad:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # With fp16 loss scaling, an overflowing gradient under a finite loss is the scaler's business: it skips the
    # step and lowers the scale. Anything else non-finite is a real problem for the guard.
    overflow = scaler.is_enabled() and finite_loss and not finite_grad
    return loss_value, not (finite_loss and finite_grad) and not overflow


def global_grad_norm(module: TrainingModule, world: World, sharded_head: bool) -> torch.Tensor:
    """‖∇‖ over every parameter of the model: the backbone's (the same on every rank after DDP) and, for a
    sharded head, the sum of every rank's head-row squares (one all-reduce)."""
    head_weight = getattr(module.head, "weight", None) if sharded_head else None
    grads = [p.grad for p in module.parameters() if p.grad is not None and p is not head_weight]
    squared = torch.nn.utils.get_total_norm(grads).pow(2) if grads else torch.zeros((), device=world.device)
    if head_weight is not None and head_weight.grad is not None:
        own = head_weight.grad.detach().float().pow(2).sum()
        if world.distributed:
            torch.distributed.all_reduce(own)
        squared = squared.float() + own
    return squared.sqrt()


def load_run_config(run_dir: str | os.PathLike) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise MarginfaceError(f"{run_dir} is not a training run: {path} is missing")
    import yaml

    return config_from_dict(yaml.safe_load(path.read_text()))
