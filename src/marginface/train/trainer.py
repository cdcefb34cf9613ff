"""The training loop: backbone + margin head, one CPU to many GPUs, full-state checkpoints, exact resume.

A resumed run on CPU reproduces the uninterrupted one bit for bit: the data order comes from the sampler's
saved position, flips are a pure function of (seed, epoch, index), the DataLoader draws its worker seeds from
its own generator, the LR is a pure function of the step, and every RNG state is in the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginface import heads, models
from marginface.errors import ConfigError, MarginfaceError, NonFiniteLossError
from marginface.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from marginface.train.config import Config, config_from_dict, save_config
from marginface.train.distributed import World, setup, teardown
from marginface.train.optim import build_optimizer, learning_rate, set_learning_rate
from marginface.train.reporting import RunLog, write_json, write_report


class TrainingModule(nn.Module):
    """Backbone and head as one module, so that one DistributedDataParallel wrapper syncs both."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None = None):
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            embeddings = self.backbone(images)
        return self.head(embeddings.float(), labels)  # the head is fp32 whatever the backbone ran in


class IndexedDataset(torch.utils.data.Dataset):
    """Items carry their dataset index, so a skipped step can name the samples that caused it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


@dataclass
class RunState:
    step: int = 0
    images_seen: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: list[int] = field(default_factory=list)
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
    return train_path, expand_pair_paths(pairs)


def expand_pair_paths(paths: list[str]) -> list[str]:
    expanded = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).glob("*.bin"))
            if not found:
                raise ConfigError(f"data.pairs: directory {path} holds no .bin pair files")
            expanded += found
        elif not os.path.exists(path):
            raise ConfigError(f"data.pairs: {path} does not exist (expected a .bin file or a directory of them)")
        else:
            expanded.append(path)
    return expanded


def build_model(config: Config, num_classes: int) -> TrainingModule:
    model_kwargs = dict(config.model.kwargs)
    if config.data.image_size is not None and "input_size" not in model_kwargs and config.model.name == "small_cnn":
        model_kwargs["input_size"] = config.data.image_size
    backbone = models.create(config.model.name, embedding_size=config.model.embedding_size, **model_kwargs)
    head = heads.create(
        config.head.margin, num_classes=num_classes, embedding_size=config.model.embedding_size,
        engine=config.head.engine, **config.head.params,
    )
    return TrainingModule(backbone, head)


def train(config: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured into ``run_dir``; with ``resume``, continue from its latest checkpoint."""
    run_dir = Path(run_dir)
    world = setup(config.train.device)
    try:
        return _train(config, run_dir, resume, progress, world)
    finally:
        teardown(world)


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, world: World) -> dict:
    from marginface.data import DistributedIdentitySampler, open_dataset
    from marginface.eval import evaluate_pairs, load_pairs

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    checkpoints = CheckpointManager(run_dir, keep=config.train.keep_checkpoints)
    if not resume and checkpoints.latest() is not None:
        raise ConfigError(
            f"{run_dir} already holds a training run (checkpoints in {checkpoints.directory}); "
            f"continue it with --resume {run_dir}, or choose another --out"
        )
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.train.seed)

    train_path, pair_paths = resolve_data(config, world, progress)
    dataset = open_dataset(train_path, image_size=config.data.image_size, train=config.data.flip,
                           seed=config.train.seed)
    pair_sets = [load_pairs(path) for path in pair_paths] if world.is_main else []
    module = build_model(config, dataset.num_classes).to(world.device)
    module.head.batch_reduce = world.all_reduce_sum
    optimizer = build_optimizer([module], config.optimizer)
    use_fp16 = config.train.precision == "fp16"
    scaler = torch.amp.GradScaler(world.device.type, enabled=use_fp16)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.precision]

    sampler = DistributedIdentitySampler(len(dataset), seed=config.train.seed, rank=world.rank,
                                         world_size=world.world_size, drop_last=True)
    batch_size = config.train.batch_size
    micro_batches_per_epoch = len(sampler) // batch_size
    steps_per_epoch = micro_batches_per_epoch / config.train.accumulation
    if micro_batches_per_epoch < config.train.accumulation:
        raise ConfigError(
            f"train.batch_size={batch_size} × train.accumulation={config.train.accumulation} is larger than one "
            f"epoch on this process ({len(sampler)} images): lower them"
        )
    total_steps = config.train.max_steps or math.ceil(config.train.epochs * steps_per_epoch)

    state = RunState()
    log = RunLog(run_dir, enabled=world.is_main)
    if resume:
        checkpoint = checkpoints.load_latest()
        module.load_state_dict(checkpoint["module"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        state = RunState(**checkpoint["run_state"])
        set_rng_state(checkpoint["rng"][world.rank % len(checkpoint["rng"])])
        log.truncate_after(state.step)
        if world.is_main:
            print(f"resumed {run_dir} at step {state.step} of {total_steps} (epoch {sampler.epoch})", flush=True)

    model = module
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[world.local_rank] if world.device.type == "cuda" else None
        )
    loader_generator = torch.Generator()

    def save_checkpoint() -> None:
        rngs = world.gather_objects(rng_state())
        if world.is_main:
            checkpoints.save(
                {
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "sampler": sampler.state_dict(),
                    "run_state": vars(state),
                    "rng": rngs,
                    "config": config.to_dict(),
                },
                state.step,
            )
        world.barrier()

    def evaluate() -> dict[str, dict]:
        results = {}
        if world.is_main and pair_sets:
            module.eval()
            for pair_set in pair_sets:
                results[pair_set.name] = evaluate_pairs(module.backbone, pair_set, batch_size=256)
            module.train()
        world.barrier()
        return results

    progress_bar = None
    if progress and world.is_main:
        from tqdm import tqdm

        progress_bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True)

    module.train()
    resumed_mid_epoch = resume
    window_loss, window_count, window_start, window_images = 0.0, 0, time.perf_counter(), 0
    verification: dict[str, dict] = {}
    while state.step < total_steps:
        if not resumed_mid_epoch:
            sampler.set_epoch(sampler.epoch if state.step == 0 else sampler.epoch + 1)
        resumed_mid_epoch = False
        dataset.set_epoch(sampler.epoch)
        loader_generator.manual_seed(config.train.seed * 1_000_003 + sampler.epoch)
        loader = torch.utils.data.DataLoader(
            IndexedDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
            num_workers=config.data.num_workers, generator=loader_generator,
            pin_memory=world.device.type == "cuda", persistent_workers=False,
        )
        batches = iter(loader)
        epoch_done = False
        while state.step < total_steps and not epoch_done:
            step_start = time.perf_counter()
            lr = learning_rate(state.step, total_steps, steps_per_epoch, config.optimizer.lr, config.schedule)
            set_learning_rate(optimizer, lr)
            log_this_step = (state.step + 1) % config.train.log_every == 0 or state.step + 1 == total_steps
            module.head.record_statistics = log_this_step and hasattr(module.head, "last_statistics")
            micro_batches, indices = [], []
            for _ in range(config.train.accumulation):
                try:
                    images, labels, batch_indices = next(batches)
                except StopIteration:
                    epoch_done = True
                    break
                micro_batches.append((images, labels))
                indices += batch_indices.tolist()
                sampler.advance(len(batch_indices))
            if not micro_batches:
                break
            loss_value, nonfinite = optimizer_step(
                model, module, optimizer, scaler, micro_batches, world, autocast_dtype, config.train.grad_clip
            )
            if nonfinite:
                state.nonfinite_in_a_row += 1
                state.skipped_steps.append(state.step)
                gathered = world.gather_objects(indices)
                if world.is_main:
                    message = (f"step {state.step}: non-finite loss or gradient (loss {loss_value}), step skipped; "
                               f"sample indices {sorted(i for part in gathered for i in part)}")
                    print(message, flush=True)
                    log.write({"step": state.step, "skipped": True, "sample_indices": gathered})
                if state.nonfinite_in_a_row >= config.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{state.step}); aborting. Lower optimizer.lr, set train.grad_clip, or check the data "
                        f"(train.max_nonfinite={config.train.max_nonfinite})"
                    )
            else:
                state.nonfinite_in_a_row = 0
            state.step += 1
            state.images_seen += len(indices) * world.world_size
            state.train_seconds += time.perf_counter() - step_start
            window_loss += loss_value
            window_count += 1
            window_images += len(indices) * world.world_size

            if log_this_step:
                elapsed = time.perf_counter() - window_start
                record = {"step": state.step, "epoch": state.step / steps_per_epoch,
                          "train/loss": window_loss / window_count, "train/lr": lr,
                          "train/images_per_second": window_images / max(elapsed, 1e-9)}
                for key, value in getattr(module.head, "last_statistics", {}).items():
                    record[f"margin/{key}"] = value
                log.write(record)
                if progress_bar is not None:
                    postfix = {"loss": f"{record['train/loss']:.3f}", "lr": f"{lr:.3g}",
                               "img/s": f"{record['train/images_per_second']:.0f}"}
                    if "margin/t" in record:
                        postfix["t"] = f"{record['margin/t']:.3f}"
                    progress_bar.set_postfix(postfix, refresh=False)
                window_loss, window_count, window_start, window_images = 0.0, 0, time.perf_counter(), 0
            if progress_bar is not None:
                progress_bar.update(1)
            last = state.step == total_steps
            if (config.train.eval_every and state.step % config.train.eval_every == 0) or last:
                verification = evaluate()
                if verification:
                    record = {"step": state.step}
                    for name, result in verification.items():
                        record[f"verification/{name}/accuracy"] = result["accuracy"]
                        record[f"verification/{name}/std"] = result["std"]
                    log.write(record)
                    if progress_bar is not None:
                        progress_bar.write(f"step {state.step}: " + ", ".join(
                            f"{n} {100 * r['accuracy']:.2f}±{100 * r['std']:.2f}" for n, r in verification.items()))
            if (config.train.checkpoint_every and state.step % config.train.checkpoint_every == 0) or last:
                save_checkpoint()
    if progress_bar is not None:
        progress_bar.close()
    # Evidence that margin state agrees across ranks (CurricularFace's t is updated from all-reduced statistics).
    margin_states = world.gather_objects(
        {k: v.tolist() for k, v in getattr(module.head, "margin", nn.Module()).state_dict().items()}
    )

    metrics = {
        "verification": {name: jsonable(result) for name, result in verification.items()},
        "steps": state.step,
        "epochs": state.step / steps_per_epoch,
        "world_size": world.world_size,
        "images_seen": state.images_seen,
        "train_seconds": state.train_seconds,
        "throughput": {"images_per_second": state.images_seen / max(state.train_seconds, 1e-9)},
        "skipped_steps": state.skipped_steps,
        "margin": dict(getattr(module.head, "last_statistics", {})),
        "margin_state_per_rank": margin_states,
    }
    if world.is_main:
        export_model(module.backbone, run_dir / "model.safetensors")
        write_json(run_dir / "metrics.json", metrics)
        write_report(run_dir, metrics, config.to_dict())
    log.close()
    world.barrier()
    return metrics


def optimizer_step(
    model: nn.Module,
    module: TrainingModule,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> tuple[float, bool]:
    """One optimiser step over accumulated micro-batches; returns (loss, skipped-as-non-finite).

    A non-finite loss or gradient on any rank skips the update on every rank (the decision is all-reduced).
    """
    loss_value = 0.0
    for images, labels in micro_batches:
        images = images.to(world.device, non_blocking=True)
        labels = labels.to(world.device, non_blocking=True)
        loss = model(images, labels, autocast_dtype) / len(micro_batches)
        scaler.scale(loss).backward()
        loss_value += float(loss.detach())
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip else float("inf"))
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


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def export_model(backbone: nn.Module, path: Path) -> None:
    """The deployable artifact: backbone weights in safetensors, with the config that rebuilds the network."""
    from safetensors.torch import save as save_safetensors

    from marginface.train.checkpoint import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    metadata = {"marginface_model": json.dumps(getattr(backbone, "config", {})), "format": "pt"}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))


def load_run_config(run_dir: str | os.PathLike) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise MarginfaceError(f"{run_dir} is not a training run: {path} is missing")
    import yaml

    return config_from_dict(yaml.safe_load(path.read_text()))
