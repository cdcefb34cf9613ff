"""The search distribution and spaces: REINFORCE moves the mean toward rewarded samples (the official LFS agent
does not), reward normalisation, Adam by hand, and the map from search variables to margins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import marginface as mf
from marginface.errors import ConfigError
from marginface.search import GaussianPolicy, create_space, normalise_rewards


def official_agent_gradient(mu0: float, actions: list[float], rewards: list[float], sigma: float = 0.2) -> float:
    """The LFS reference agent re-implemented (spec §3.12): loc = ReLU(μ), actions a = −|x|, log-prob taken at a
    under N(loc, σ), loss −Σ r·log p averaged over the ranks; returns ∂loss/∂μ."""
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    loc = torch.relu(mu)
    log_probs = Normal(loc, sigma).log_prob(torch.tensor(actions, dtype=torch.float64))
    loss = -(torch.tensor(rewards, dtype=torch.float64) * log_probs).sum() / len(actions)
    loss.backward()
    return float(mu.grad)


def test_official_formulation_is_dead_at_init_and_wrong_way_when_alive():
    # spec §6.3 item 11: zero gradient at μ = 0 (ReLU'(0) = 0) ...
    assert official_agent_gradient(0.0, [-0.05, -0.6], [-1.0, 1.0]) == 0.0
    # ... and from μ = 0.3 the averaged gradient is +6.875: Adam lowers μ, shrinking |a| although the larger |a|
    # (−0.6) was the rewarded action.
    assert official_agent_gradient(0.3, [-0.05, -0.6], [-1.0, 1.0]) == pytest.approx(6.875, abs=1e-12)
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([mu], lr=0.05, betas=(0.5, 0.999))
    mu.grad = torch.tensor(6.875, dtype=torch.float64)
    adam.step()
    assert mu.detach().item() < 0.3


def test_update_moves_the_mean_toward_the_rewarded_sample():
    # The same fixture in our parametrisation a = −exp(z): the rewarded action a = −0.6 has the larger z.
    z = torch.tensor([[math.log(0.05)], [math.log(0.6)]], dtype=torch.float64)
    for start in (0.0, 0.3, -3.0, 2.0):  # wherever the mean is, including beyond both samples
        policy = GaussianPolicy([start], sigma=0.2, lr=0.05)
        policy.update(z, [-1.0, 1.0])
        assert policy.describe()["mean"][0] > start  # |a| grows toward the rewarded −0.6
        policy = GaussianPolicy([start], sigma=0.2, lr=0.05)
        policy.update(z, [1.0, -1.0])
        assert policy.describe()["mean"][0] < start


def test_gradient_and_adam_step_by_hand():
    samples = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.0, 1.5]], dtype=torch.float64)
    rewards = [0.90, 0.95, 0.80]
    mean, sigma, lr, betas = np.array([0.2, 0.1]), 0.7, 0.1, (0.5, 0.999)
    policy = GaussianPolicy(mean.tolist(), sigma=sigma, lr=lr, betas=betas)
    r = np.array(rewards)
    weights = (r - r.mean()) / r.std()
    # ∂/∂μ of −(1/K) Σ w_k log N(x_k; μ, σ) = −(1/K) Σ w_k (x_k − μ)/σ²
    grad = -(weights[:, None] * (samples.numpy() - mean) / sigma**2).mean(axis=0)
    loss = policy.reinforce_loss(samples, rewards)
    loss.backward()
    np.testing.assert_allclose(policy.mean.grad.numpy(), grad, rtol=1e-12)
    policy.optimizer.zero_grad()
    policy.update(samples, rewards)
    # Adam's first step: m̂ = g, v̂ = g², step = lr·g/(|g| + eps)
    expected = mean - lr * grad / (np.abs(grad) + 1e-8)
    np.testing.assert_allclose(policy.describe()["mean"], expected, rtol=1e-12)
    assert policy.describe()["sigma"] == pytest.approx([sigma, sigma])  # fixed σ


def test_log_prob_matches_torch_normal():
    policy = GaussianPolicy([0.3, -2.0, 5.0], sigma=[0.5, 1.0, 2.0])
    x = torch.tensor([[0.1, -1.0, 9.0], [1.3, -2.5, 4.0]], dtype=torch.float64)
    reference = Normal(torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64),
                       torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)).log_prob(x).sum(dim=1)
    torch.testing.assert_close(policy.log_prob(x).detach(), reference)


def test_search_converges_to_the_rewarded_region_and_the_official_agent_does_not():
    generator = torch.Generator().manual_seed(0)
    policy = GaussianPolicy([0.0], sigma=0.5, lr=0.1)
    for _ in range(150):
        x = policy.sample(8, generator)
        policy.update(x, (-(x[:, 0] - 2.0) ** 2).tolist())
    assert abs(policy.describe()["mean"][0] - 2.0) < 0.3

    # Official agent, same task in its own terms (best a = −2): loc = ReLU(μ) from μ = 0, a = −|x|.
    mu = torch.zeros((), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([mu], lr=0.05, betas=(0.5, 0.999))
    for _ in range(150):
        loc = torch.relu(mu)
        actions = -(loc.detach() + 0.2 * torch.randn(8, generator=generator, dtype=torch.float64)).abs()
        rewards = -(actions + 2.0) ** 2
        rewards = 2 * (rewards - rewards.mean()) / (rewards.max() - rewards.min() + 1e-6)
        loss = -(rewards * Normal(loc, 0.2).log_prob(actions)).mean()
        adam.zero_grad()
        loss.backward()
        adam.step()
    assert mu.detach().item() == 0.0


def test_learned_sigma_grows_when_far_samples_win():
    policy = GaussianPolicy([0.0], sigma=1.0, learn_sigma=True, lr=0.1)
    policy.update(torch.tensor([[-3.0], [0.0], [3.0]]), [1.0, 0.0, 1.0])
    assert policy.describe()["sigma"][0] > 1.0 and policy.describe()["mean"][0] == pytest.approx(0.0, abs=1e-9)


def test_reward_normalisation():
    r = np.array([0.91, 0.93, 0.96, 0.90])
    np.testing.assert_allclose(normalise_rewards(r, "std").numpy(), (r - r.mean()) / r.std(), rtol=1e-12)
    np.testing.assert_allclose(normalise_rewards(r, "range").numpy(),
                               2 * (r - r.mean()) / (r.max() - r.min() + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(normalise_rewards(r, "none").numpy(), r - r.mean(), rtol=1e-12)
    assert not normalise_rewards([0.5, 0.5, 0.5]).any()
    # per-epoch normalisation: an affine change of the reward scale leaves the update unchanged
    np.testing.assert_allclose(normalise_rewards(r * 100 + 3).numpy(), normalise_rewards(r).numpy(), rtol=1e-9)
    with pytest.raises(ConfigError, match="expected one of std, range, none"):
        normalise_rewards(r, "zscore")


def test_equal_rewards_take_no_step():
    policy = GaussianPolicy([1.0], sigma=1.0)
    before = policy.state_dict()
    policy.update(torch.tensor([[0.0], [2.0]]), [0.7, 0.7])
    assert policy.describe()["mean"] == [1.0] and policy.optimizer.state_dict()["state"] == before["optimizer"]["state"]


def test_global_space_is_cosface_with_the_equivalent_margin():
    s = 30.0
    space = create_space("search_softmax", s)
    assert space.initial_mean() == [10.0]  # z = s/3: the reference code's warm-up factor −e^{s/3}
    cos = torch.tensor([[0.6, 0.5, -0.2], [0.1, 0.3, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    for z in (-2.0, 0.5, 10.0):
        config = space.margin_config([z])
        assert config["margin"] == "lfs" and config["params"]["a"] == pytest.approx(-math.exp(z), rel=1e-15)
        m = math.log(1 + math.exp(z)) / s  # ln(1 − a)/s, a = −e^z
        lfs = mf.margins.create(config["margin"], **config["params"])(cos, labels)
        cosface = mf.margins.create("cosface", s=s, m=m)(cos, labels)
        torch.testing.assert_close(lfs, cosface, rtol=1e-12, atol=1e-12)
        assert space.describe([z])["equivalent_margin"] == pytest.approx(m, rel=1e-12)


def test_initial_margin_sets_the_initial_factor():
    s, m = 30.0, 0.1
    space = create_space("random_softmax", s, initial_margin=m)
    (z,) = space.initial_mean()
    assert z == pytest.approx(math.log(math.exp(s * m) - 1.0), rel=1e-12)  # a = 1 − e^{s·m} = −exp(z)
    assert space.warmup_config()["params"]["a"] == pytest.approx(1.0 - math.exp(s * m), rel=1e-12)
    local = create_space("search_softmax", s, "local", bins=3, initial_margin=m)
    assert local.initial_mean() == pytest.approx([z] * 3, rel=1e-12)


def test_local_and_am_lfs_spaces():
    local = create_space("search_softmax", 32.0, "local", bins=4)
    config = local.margin_config([0.0, 1.0, 2.0, 3.0])
    assert config["margin"] == "lfs_local"
    np.testing.assert_allclose(config["params"]["a_bins"], -np.exp([0.0, 1.0, 2.0, 3.0]), rtol=1e-15)
    mf.margins.create(config["margin"], **config["params"])  # valid margin parameters

    am = create_space("am_lfs", 30.0, pieces=3)
    assert am.dimension == 6 and am.initial_mean() == [1.0, 0.0] * 3
    cos = torch.tensor([[0.6, 0.5, -0.2]], dtype=torch.float64)
    identity = mf.margins.create(**{"name": "am_lfs", **am.warmup_config()["params"]})(cos, torch.tensor([0]))
    torch.testing.assert_close(identity, 30.0 * cos)  # identity pieces: plain normalised softmax
    shifted = am.margin_config([1.0, -0.2] * 3)["params"]
    assert shifted["t_params"] == [[1.0, -0.2]] * 3 and shifted["tau_params"] == [[1.0, 0.0]] * 3
    assert create_space("am_lfs", 30.0, pieces=3, search_tau=True).dimension == 12
