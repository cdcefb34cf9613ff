"""Search spaces: how a vector of search variables becomes a margin config for the trainer's head.

Search-Softmax searches the modulating factor a <= 0 of p_m = p / (a·p + 1 − a) through z = ln(−a), i.e.
a = −exp(z): every real z is a valid a < 0, no folding is needed, and z is (for z >> 0) s times the
equivalent CosFace margin, m = ln(1 + e^z)/s. AM-LFS searches the [slope, intercept] pieces of t(·) (and,
optionally, τ(·)) directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from marginface.errors import ConfigError

# |z| beyond this is outside anything useful (m > 50/s) and would overflow exp in float32 margins.
Z_LIMIT = 50.0


def factor_from_z(z: float) -> float:
    """a = −exp(z), z clamped to ±Z_LIMIT."""
    return -math.exp(max(-Z_LIMIT, min(Z_LIMIT, float(z))))


def equivalent_margin(a: float, s: float) -> float:
    """The CosFace margin with the same loss as modulating factor a: ln(1 − a)/s."""
    return math.log1p(-a) / s


class SearchSpace:
    """A map from search variables x (a float64 vector of ``dimension``) to a margin config."""

    name = ""
    margin = ""
    dimension = 0

    def initial_mean(self) -> list[float]:
        raise NotImplementedError

    def margin_params(self, x: Sequence[float]) -> dict[str, Any]:
        raise NotImplementedError

    def margin_config(self, x: Sequence[float] | Tensor) -> dict[str, Any]:
        """{"margin": name, "params": {...}}: what `marginface.margins.create` and a config's head take."""
        values = torch.as_tensor(x, dtype=torch.float64).reshape(-1).tolist()
        if len(values) != self.dimension:
            raise ValueError(f"search space {self.name} has {self.dimension} variables, got {len(values)}")
        return {"margin": self.margin, "params": self.margin_params(values)}

    def warmup_config(self) -> dict[str, Any]:
        """The fixed loss of the warm-up epochs (the initial mean's)."""
        return self.margin_config(self.initial_mean())

    def describe(self, x: Sequence[float] | Tensor) -> dict[str, Any]:
        """A sample as JSON: the search variables and the margin they give."""
        values = torch.as_tensor(x, dtype=torch.float64).reshape(-1).tolist()
        return {"x": values, **self.margin_config(values)}


class GlobalFactor(SearchSpace):
    """Search-Softmax "global": one factor a = −exp(z) for every sample; the initial mean z = s/3 is the reference
    code's warm-up factor (a = −e^{s/3}, an AM-margin of about 1/3)."""

    name = "global"
    margin = "lfs"
    dimension = 1

    def __init__(self, s: float, initial_z: float | None = None) -> None:
        self.s = float(s)
        self.initial_z = self.s / 3.0 if initial_z is None else float(initial_z)

    def initial_mean(self) -> list[float]:
        return [self.initial_z]

    def margin_params(self, x: Sequence[float]) -> dict[str, Any]:
        return {"s": self.s, "a": factor_from_z(x[0])}

    def describe(self, x: Sequence[float] | Tensor) -> dict[str, Any]:
        described = super().describe(x)
        described["equivalent_margin"] = equivalent_margin(described["params"]["a"], self.s)
        return described


class LocalFactors(GlobalFactor):
    """Search-Softmax "local": one factor a_j = −exp(z_j) per equal-width bin of the plain softmax probability p."""

    name = "local"
    margin = "lfs_local"

    def __init__(self, s: float, bins: int = 10, initial_z: float | None = None) -> None:
        super().__init__(s, initial_z)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ConfigError(f"search bins={bins!r} is invalid: expected an integer >= 1")
        self.dimension = bins

    def initial_mean(self) -> list[float]:
        return [self.initial_z] * self.dimension

    def margin_params(self, x: Sequence[float]) -> dict[str, Any]:
        return {"s": self.s, "a_bins": [factor_from_z(z) for z in x]}

    def describe(self, x: Sequence[float] | Tensor) -> dict[str, Any]:
        described = SearchSpace.describe(self, x)
        described["equivalent_margin"] = [equivalent_margin(a, self.s) for a in described["params"]["a_bins"]]
        return described


class PiecewiseLinear(SearchSpace):
    """AM-LFS: [slope, intercept] of each of M pieces of t(·) on [−1, 1] (and of τ(·) on [0, 1] with ``search_tau``).

    The initial mean is the identity (slope 1, intercept 0), i.e. plain normalised softmax, as in the AM-LFS
    reproductions; τ stays the identity unless searched.
    """

    name = "piecewise"
    margin = "am_lfs"

    def __init__(self, s: float, pieces: int = 6, search_tau: bool = False) -> None:
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
            raise ConfigError(f"search pieces={pieces!r} is invalid: expected an integer >= 1")
        self.s = float(s)
        self.pieces = pieces
        self.search_tau = bool(search_tau)
        self.dimension = 2 * pieces * (2 if self.search_tau else 1)

    def initial_mean(self) -> list[float]:
        return [1.0, 0.0] * (self.dimension // 2)

    def margin_params(self, x: Sequence[float]) -> dict[str, Any]:
        pairs = [[x[2 * i], x[2 * i + 1]] for i in range(len(x) // 2)]
        t_params = pairs[: self.pieces]
        tau_params = pairs[self.pieces:] if self.search_tau else [[1.0, 0.0]] * self.pieces
        return {"s": self.s, "t_params": t_params, "tau_params": tau_params}


SPACES = ("global", "local")


def z_for_margin(m: float, s: float) -> float:
    """The z with equivalent margin m > 0: ln(e^{s·m} − 1), computed without overflow."""
    return s * m + math.log(-math.expm1(-s * m))


def create_space(method: str, s: float, space: str = "global", bins: int = 10, pieces: int = 6,
                 search_tau: bool = False, initial_margin: float | None = None) -> SearchSpace:
    """The space of ``method``: Search-/Random-Softmax in the ``global`` or ``local`` factor space, AM-LFS pieces."""
    if method == "am_lfs":
        return PiecewiseLinear(s, pieces=pieces, search_tau=search_tau)
    initial_z = None if initial_margin is None else z_for_margin(initial_margin, s)
    if space == "global":
        return GlobalFactor(s, initial_z)
    if space == "local":
        return LocalFactors(s, bins=bins, initial_z=initial_z)
    raise ConfigError(f"--space {space!r} is invalid: expected one of {', '.join(SPACES)}")
