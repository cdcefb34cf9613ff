"""torch.distributed as torchrun sets it up: one process per device, gloo on CPU and NCCL on GPU.

No home-made launcher: `torchrun --nproc_per_node=N -m marginface train ...` provides RANK, WORLD_SIZE and
LOCAL_RANK (and multi-node rendezvous through its own flags); a plain `marginface train` is a world of one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum each statistic over ranks (one collective for all of them)."""
        if not self.distributed or not stats:
            return dict(stats)
        keys = sorted(stats)
        packed = torch.stack([stats[k].detach().double().reshape(()) for k in keys]).to(self.device)
        dist.all_reduce(packed)
        return {k: packed[i].to(dtype=stats[k].dtype, device=stats[k].device) for i, k in enumerate(keys)}

    def any(self, flag: bool) -> bool:
        """True on every rank when the flag is true on any rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_equal(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor stacked in rank order, [world_size, *shape]; the shapes must agree on every rank
        (a tensor collective: used inside the step, where object collectives would pickle on the host)."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        local = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.stack(parts).to(tensor.device)

    def gather_objects(self, value: Any) -> list[Any]:
        """Python objects from every rank (outside the step only: start, epoch ends and the final summary)."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    return ScaleGradient.apply(tensor, factor)


def wants_cuda(device_request: str) -> bool:
    """Whether train.device ``device_request`` trains on CUDA: `cuda`, or `auto` where a CUDA device is present."""
    return torch.cuda.is_available() if device_request == "auto" else device_request == "cuda"


# Whether this process started a process group (see `exit_process`).
_started_process_group = False


def setup(device_request: str = "auto") -> World:
    """Initialise the process group when launched by torchrun; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = wants_cuda(device_request)
    if use_cuda and not torch.cuda.is_available():
        from marginface.errors import ConfigError

        raise ConfigError("train.device=cuda was asked for, but torch sees no CUDA device (is this the CPU build?)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        global _started_process_group
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _started_process_group = True
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def started_process_group() -> bool:
    """Whether `setup` started a process group in this process (torchrun with more than one rank)."""
    return _started_process_group


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` now, without the interpreter's finalization.

    Why: a process that ran a gloo process group can abort at interpreter exit, after the run has finished,
    written its outputs and destroyed the group: gloo's worker threads are still alive when their objects are
    destroyed, and the C++ runtime prints "terminate called without an active exception" and raises SIGABRT
    (exit code -6; pytorch issue 190489). torchrun then reports the rank as failed and a finished run looks
    crashed. Every output of a run is written atomically and closed before the command returns, so nothing is
    lost by skipping finalization; the streams and logging are flushed here by hand.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to write
            pass
    os._exit(code)
