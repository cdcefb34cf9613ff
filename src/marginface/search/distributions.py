"""Sampling distributions of a loss search: a diagonal Gaussian over unconstrained variables, updated by REINFORCE.

The search variables live on the whole real line, so a sample needs no folding or clipping and the
log-probability of the REINFORCE update is taken at exactly the value that was sampled. The space
(`marginface.search.spaces`) maps a sample to a margin, e.g. Search-Softmax's a = −exp(z).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from marginface.errors import ConfigError

REWARD_NORMALISATIONS = ("std", "range", "none")


def normalise_rewards(rewards: Sequence[float] | Tensor, mode: str = "std") -> Tensor:
    """Centre the rewards of one epoch and bring them to a common scale (float64).

    ``std``: (r − mean) / std (population std), as AM-LFS reproductions do; ``range``: 2(r − mean) /
    (max − min + 1e-6), the LFS reference code's; ``none``: r − mean (still centred: the baseline that makes
    REINFORCE's variance bearable). Equal rewards give zeros, i.e. no update.
    """
    if mode not in REWARD_NORMALISATIONS:
        raise ConfigError(
            f"reward normalisation {mode!r} is invalid: expected one of {', '.join(REWARD_NORMALISATIONS)}"
        )
    values = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    centred = values - values.mean()
    if mode == "std":
        spread = values.std(unbiased=False)
        return centred / spread if spread > 0 else torch.zeros_like(values)
    if mode == "range":
        return 2.0 * centred / (values.max() - values.min() + 1e-6)
    return centred


class GaussianPolicy:
    """N(μ, diag σ²) over ``dimension`` search variables with a REINFORCE update by Adam.

    μ is always learned; σ is fixed unless ``learn_sigma`` (then log σ is learned, so σ stays positive). The
    update for samples x_k with rewards R_k is one Adam step on −(1/K)·Σ_k r_k·log N(x_k; μ, σ), with r the
    per-epoch normalised rewards: the mean moves toward samples rewarded above the epoch's average.
    """

    def __init__(
        self,
        mean: Sequence[float] | Tensor,
        sigma: float | Sequence[float] = 1.0,
        learn_sigma: bool = False,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.5, 0.999),
        normalisation: str = "std",
    ) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).clone()
        sigma_values = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(mean).all() or mean.numel() == 0:
            raise ConfigError(f"search distribution mean {mean.tolist()} is invalid: expected finite numbers")
        if not (torch.isfinite(sigma_values).all() and (sigma_values > 0).all()):
            raise ConfigError(f"search sigma={sigma!r} is invalid: expected a number > 0")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"search policy lr={lr!r} is invalid: expected a number > 0")
        if normalisation not in REWARD_NORMALISATIONS:
            raise ConfigError(
                f"reward normalisation {normalisation!r} is invalid: expected one of {', '.join(REWARD_NORMALISATIONS)}"
            )
        self.normalisation = normalisation
        self.learn_sigma = bool(learn_sigma)
        self.mean = mean.requires_grad_(True)
        self.log_sigma = torch.log(sigma_values.expand(mean.numel()).clone()).requires_grad_(self.learn_sigma)
        parameters = [self.mean, self.log_sigma] if self.learn_sigma else [self.mean]
        self.optimizer = torch.optim.Adam(parameters, lr=lr, betas=betas)

    @property
    def dimension(self) -> int:
        return self.mean.numel()

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.detach().exp()

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` independent draws [count, dimension] (float64) from ``generator``."""
        noise = torch.randn(count, self.dimension, generator=generator, dtype=torch.float64)
        return self.mean.detach() + self.sigma * noise

    def log_prob(self, samples: Tensor) -> Tensor:
        """log N(x; μ, σ) of each row, differentiable in μ (and log σ)."""
        samples = torch.as_tensor(samples, dtype=torch.float64).reshape(-1, self.dimension)
        sigma = self.log_sigma.exp()
        z = (samples - self.mean) / sigma
        return (-0.5 * z.square() - self.log_sigma - 0.5 * math.log(2 * math.pi)).sum(dim=1)

    def reinforce_loss(self, samples: Tensor, rewards: Sequence[float] | Tensor) -> Tensor:
        """−(1/K)·Σ_k r_k·log N(x_k; μ, σ) with the normalised rewards r (its gradient is the REINFORCE estimate)."""
        weights = normalise_rewards(rewards, self.normalisation)
        samples = torch.as_tensor(samples, dtype=torch.float64).reshape(-1, self.dimension)
        if samples.shape[0] != weights.numel():
            raise ValueError(f"{samples.shape[0]} samples but {weights.numel()} rewards")
        return -(weights * self.log_prob(samples)).mean()

    def update(self, samples: Tensor, rewards: Sequence[float] | Tensor) -> float:
        """One Adam step of REINFORCE; returns the loss before the step.

        An epoch whose rewards are all equal carries no information: no step is taken (an Adam step on a zero
        gradient would still decay its moments and advance its bias correction).
        """
        if not normalise_rewards(rewards, self.normalisation).any():
            return 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.reinforce_loss(samples, rewards)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def describe(self) -> dict[str, list[float]]:
        """The distribution as JSON-ready lists: mean and σ of every search variable."""
        return {"mean": self.mean.detach().tolist(), "sigma": self.sigma.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.detach().clone(), "log_sigma": self.log_sigma.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mean.copy_(state["mean"])
            self.log_sigma.copy_(state["log_sigma"])
        self.optimizer.load_state_dict(state["optimizer"])
