"""A distributed, per-epoch shuffling sampler that can save and restore its exact position inside an epoch.

The epoch order is a permutation drawn from (seed, epoch) alone; rank r takes every world_size-th index of
what remains. Position is counted in samples consumed by the training loop (`advance`), not in indices
handed out, because DataLoader workers prefetch ahead of what was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from marginface.errors import ConfigError


class DistributedIdentitySampler(Sampler[int]):
    """Shuffle `num_samples` indices per epoch and split them across ranks, resumably.

    - `set_epoch(e)` selects the permutation (a new epoch starts at its beginning).
    - `advance(n)` records that this rank trained on `n` more samples (all ranks advance alike).
    - `state_dict()` / `load_state_dict()` save and restore (epoch, position); iterating after a restore
      yields exactly the indices the interrupted run had not trained on, in the same order. Restoring with
      a different world size re-splits the remaining indices of the epoch across the new ranks.

    With `drop_last=True` the tail that does not divide evenly among ranks is dropped; otherwise the order
    is padded with its own first indices so every rank gets the same count.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        if int(num_samples) <= 0:
            raise ConfigError(f"DistributedIdentitySampler: num_samples must be positive, got {num_samples}")
        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"DistributedIdentitySampler: rank {rank} / world_size {world_size}; expected 0 <= rank < world_size"
            )
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        if self.drop_last and self.num_samples < self.world_size:
            raise ConfigError(
                f"DistributedIdentitySampler: {self.num_samples} samples cannot give each of "
                f"{self.world_size} ranks one with drop_last=True"
            )
        self.epoch = 0
        self.consumed = 0  # global samples consumed in this epoch, over all ranks
        self._cache: tuple[int, np.ndarray] | None = None

    # -- epoch order ---------------------------------------------------------------------------------------
    @property
    def total_size(self) -> int:
        """Indices per epoch over all ranks (after dropping or padding)."""
        if self.drop_last:
            return self.num_samples // self.world_size * self.world_size
        return -(-self.num_samples // self.world_size) * self.world_size

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The global index order of `epoch` (default: the current one), before splitting across ranks."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            order = rng.permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.total_size
        if total > len(order):
            order = np.resize(order, total)  # repeats the start of the order to pad
        order = order[:total].astype(np.int64)
        self._cache = (epoch, order)
        return order

    def remaining_indices(self) -> np.ndarray:
        """This rank's indices from the current position to the end of the epoch."""
        order = self.epoch_order()
        remaining = order[self.consumed :]
        per_rank = len(remaining) // self.world_size
        return remaining[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.remaining_indices().tolist())

    def __len__(self) -> int:
        """Indices left for this rank in the current epoch (what iterating now yields)."""
        return (self.total_size - self.consumed) // self.world_size

    @property
    def epoch_length(self) -> int:
        """Indices per rank in a whole epoch, wherever the current position is."""
        return self.total_size // self.world_size

    # -- position ------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a no-op if it is already the current epoch)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, n_samples: int) -> None:
        """Record that this rank trained on `n_samples` more samples (e.g. its batch size) this epoch."""
        if n_samples < 0:
            raise ConfigError(f"DistributedIdentitySampler.advance: n_samples must be >= 0, got {n_samples}")
        self.consumed = min(self.total_size, self.consumed + int(n_samples) * self.world_size)

    @property
    def offset(self) -> int:
        """Samples this rank has consumed in the current epoch."""
        return self.consumed // self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` (from a run with the same data and seed)."""
        for name in ("seed", "num_samples", "shuffle"):
            if name in state and state[name] != getattr(self, name):
                raise ConfigError(
                    f"DistributedIdentitySampler.load_state_dict: saved {name}={state[name]!r} but this sampler "
                    f"has {name}={getattr(self, name)!r}; resuming would show a different order"
                )
        self.epoch = int(state["epoch"])
        if "consumed" in state:
            consumed = int(state["consumed"])
        else:
            consumed = int(state["offset"]) * int(state.get("world_size", self.world_size))
        self.consumed = max(0, min(consumed, self.total_size))
