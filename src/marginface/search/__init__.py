"""Loss-function search: Search-Softmax (REINFORCE over the LFS modulating factor), Random-Softmax and AM-LFS."""

from marginface.search.controller import (
    METHODS,
    MODES,
    SearchSettings,
    load_found_margin,
    resume_search,
    run_search,
)
from marginface.search.distributions import GaussianPolicy, normalise_rewards
from marginface.search.spaces import GlobalFactor, LocalFactors, PiecewiseLinear, create_space

__all__ = [
    "METHODS", "MODES", "GaussianPolicy", "GlobalFactor", "LocalFactors", "PiecewiseLinear", "SearchSettings",
    "create_space", "load_found_margin", "normalise_rewards", "resume_search", "run_search",
]
