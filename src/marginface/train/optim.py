"""Optimisers (SGD with momentum, AdamW) without weight decay on norms and biases, and warm-up LR schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from marginface.train.config import OptimizerConfig, ScheduleConfig


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed) and norm-layer parameters and biases (not decayed)."""
    decayed, plain, seen = [], [], set()
    for module in modules:
        for submodule in module.modules():
            norm_layer = isinstance(submodule, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            for name, parameter in submodule.named_parameters(recurse=False):
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                (plain if norm_layer or name == "bias" or parameter.dim() <= 1 else decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(modules: Iterable[nn.Module], config: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(modules, config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def learning_rate(step: int, total_steps: int, steps_per_epoch: float, base_lr: float, config: ScheduleConfig) -> float:
    """The LR of optimiser step ``step`` (0-based): linear warm-up, then the named decay.

    A pure function of the step, so a resumed run needs no scheduler object to get the same LRs.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return base_lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = base_lr * config.min_lr_ratio
    if config.name == "constant":
        return base_lr
    if config.name == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.name == "poly":
        return floor + (base_lr - floor) * (1.0 - progress) ** config.power
    epoch = step / steps_per_epoch
    passed = sum(1 for milestone in config.milestones if epoch >= milestone)
    return base_lr * config.gamma**passed


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
