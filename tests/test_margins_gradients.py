"""Gradients: gradcheck in float64 away from switching points; every margin in training mode, with its state,
against a float64 re-implementation of spec/losses.md written here (autograd and closed-form dL/dc); §6.2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf

GRADCHECK_CASES = [
    ("normface", {}),
    ("cosface", {"m": 0.35}),
    ("arcface", {"m": 0.5}),
    ("arcface", {"m": 0.5, "easy_margin": True}),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("sphereface", {"m": 4, "base": 10.0, "lambda_min": 0.5}),
    ("sphereface", {"m": 1.7, "base": 0.0, "lambda_min": 0.0}),
    ("mv_softmax", {"m": 0.35, "t": 0.2}),
    ("mv_softmax", {"m": 0.5, "t": 0.3, "base": "arc", "adaptive": False}),
    # ArcNegFace's weights and NPCFace's m̃ are detached by design, so finite differences see a dependence that
    # autograd (rightly) does not: gradcheck them where those quantities are constant (σ → ∞; no hard negative),
    # and check the detached forms separately below.
    ("arcnegface", {"sigma": 1e12, "alpha": 1.3}),
    ("curricularface", {}),
    ("npcface", {"mask_margin": 0.2}),
    ("lfs", {"a": -3.0}),
    ("lfs_local", {"a_bins": [-0.5, -2.0, -8.0, -20.0]}),
    ("am_lfs", {"t_params": [[1.2, -0.1], [0.9, -0.3], [1.1, -0.2]], "tau_params": [[0.8, 0.0], [0.9, 0.05]]}),
]


def switch_distance(margin, cos: torch.Tensor, labels: torch.Tensor, norms) -> float:
    """Smallest distance of any input to a point where the margin's piecewise definition switches."""
    target = cos.gather(1, labels[:, None]).squeeze(1)
    negatives = cos.masked_fill(F.one_hot(labels, cos.shape[1]).bool(), float("nan"))
    distances = [(target - math.cos(math.pi - getattr(margin, "m", 0.0))).abs().min()]
    ctx = margin.prepare(target, norms)
    if "threshold" in ctx:
        distances.append((negatives - ctx["threshold"][:, None]).abs().nan_to_num(1.0).min())
    if margin.name == "sphereface":
        steps = margin.m * torch.acos(target) / math.pi
        distances.append((steps - steps.round()).abs().min())
    for table, low, high, values in (
        ("t_params", -1.0, 1.0, target),
        ("tau_params", 0.0, 1.0, None),
        ("a_bins", 0.0, 1.0, None),
    ):
        if hasattr(margin, table):
            if values is None:  # bins of the softmax probability of the target
                values = F.softmax(cos * margin.s, dim=1).gather(1, labels[:, None]).squeeze(1)
            bins = len(getattr(margin, table))
            position = (values - low) / (high - low) * bins
            distances.append((position - position.round()).abs().min() * (high - low) / bins)
    if margin.name in ("npcface", "curricularface", "mv_softmax", "easy") or getattr(margin, "easy_margin", False):
        distances.append(target.abs().min())
    return float(min(distances))


def random_inputs(margin, seed: int, batch: int = 4, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(200):
        cos = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 1.6 - 0.75
        labels = torch.randint(0, classes, (batch,), generator=generator)
        # push the targets up so that both hard and easy negatives occur
        cos.scatter_(1, labels[:, None], torch.rand(batch, 1, generator=generator, dtype=torch.float64) * 0.8 + 0.1)
        norms = torch.rand(batch, generator=generator, dtype=torch.float64) * 2 + 0.5
        if switch_distance(margin, cos, labels, norms) > 1e-3:
            return cos, labels, norms
    raise AssertionError("no input away from the switching points")


@pytest.mark.parametrize("name,params", GRADCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRADCHECK_CASES)])
def test_gradcheck(name, params):
    margin = mf.margins.create(name, **params).double().eval()
    if name == "curricularface":
        margin.t.fill_(0.4)
    cos, labels, norms = random_inputs(margin, seed=len(name))
    if name == "npcface":  # all negatives easy: below cos(θ_y + 0.2) for every target in [0.1, 0.9]
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        cos = torch.where(onehot, cos, cos * 0.3 - 0.6)
        threshold = margin.prepare(cos.gather(1, labels[:, None])[:, 0])["threshold"]
        assert (cos.masked_fill(onehot, -1.0) < threshold[:, None] - 1e-3).all()
    cos.requires_grad_(True)
    if margin.needs_norms:
        norms.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda c, n: F.cross_entropy(margin(c, labels, norms=n), labels), (cos, norms))
    else:
        assert torch.autograd.gradcheck(lambda c: F.cross_entropy(margin(c, labels), labels), (cos,))



# ---------------------------------------------------------------------------------------------------------------
# An independent float64 reference of every margin, written from the formulas of spec/losses.md (§1, §3) and
# nothing of marginface: the margin classes are what it checks. It keeps its own state (CurricularFace's t,
# SphereFace's iteration), updated before use as the spec says, so that training-mode steps can be compared.
# ---------------------------------------------------------------------------------------------------------------

# The reference-code defaults of spec/losses.md §3–§4 (a None is resolved in ReferenceMargin).
SPEC_DEFAULTS = {
    "normface": {"s": 64.0},
    "cosface": {"s": 64.0, "m": 0.35},
    "arcface": {"s": 64.0, "m": 0.5, "easy_margin": False, "fallback": True, "gradient": "exact"},
    "combined": {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2, "gradient": "exact"},
    "sphereface": {"m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
    "mv_softmax": {"s": 32.0, "m": 0.35, "t": 0.2, "base": "am", "adaptive": True, "easy_margin": False,
                   "gradient": "exact"},
    "arcnegface": {"s": 64.0, "m": 0.5, "alpha": 1.2, "sigma": 2.0, "easy_margin": False, "gradient": "exact"},
    "curricularface": {"s": 64.0, "m": 0.5, "t_alpha": 0.01, "gradient": "exact", "update_in_eval": False},
    "npcface": {"s": 64.0, "m0": 0.4, "m1": 0.2, "t": 1.1, "alpha": 0.2, "mask_margin": 0.5, "gradient": "exact"},
    "lfs": {"s": 32.0, "a": None},  # a = −e^{s/3}
    "lfs_local": {"s": 32.0, "a_bins": None},  # 10 × (−e^{s/3})
    "am_lfs": {"s": 64.0, "t_params": None, "tau_params": None},  # 6 identity pieces each
}


def arc(c: torch.Tensor, m, *, fallback: bool = True, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace's T = cos(acos c + m) (§3.5); th/mm fallback c − m·sin m where c <= cos(π − m) (§2.1);
    easy_margin: the margin only where c > 0."""
    value = torch.cos(torch.acos(c) + m)
    if easy_margin:
        return torch.where(c > 0, value, c)
    if fallback:
        return torch.where(c > math.cos(math.pi - m), value, c - m * math.sin(m))
    return value


def straight_through(c: torch.Tensor, value: torch.Tensor, gradient: str) -> torch.Tensor:
    """§2.2: the forward value, the backward of the identity."""
    return c + (value - c).detach() if gradient == "straight_through" else value


def piece(values: torch.Tensor, table: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The row of ``table`` whose equal-width interval of [low, high] holds each value (ends in the end pieces)."""
    index = ((values.detach() - low) / (high - low) * len(table)).floor().clamp(0, len(table) - 1).long()
    return table[index]


class ReferenceMargin:
    """One margin from the spec's formulas: ``loss(cos, labels, norms)`` is the mean loss, differentiable in cos
    and norms; ``last`` keeps what the closed-form gradients need (logits, masks, t, m̃, w, λ)."""

    def __init__(self, name: str, training: bool = True, **params) -> None:
        self.name, self.training = name, training
        self.p = {**SPEC_DEFAULTS[name], **params}
        s = self.p.get("s", 1.0)
        if name == "lfs" and self.p["a"] is None:
            self.p["a"] = -math.exp(s / 3.0)
        if name == "lfs_local" and self.p["a_bins"] is None:
            self.p["a_bins"] = [-math.exp(s / 3.0)] * 10
        if name == "am_lfs":
            self.p["t_params"] = self.p["t_params"] or [[1.0, 0.0]] * 6
            self.p["tau_params"] = self.p["tau_params"] or [[1.0, 0.0]] * 6
        self.t = 0.0  # CurricularFace (§3.9): t^(0) = 0
        self.iteration = 0  # SphereFace (§3.3): the caffe counter, incremented before use
        self.last: dict = {}

    def loss(self, cos: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        p, name = self.p, self.name
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        c_y = cos.gather(1, labels[:, None])[:, 0]
        self.last = {"onehot": onehot}
        if name in ("lfs", "lfs_local", "am_lfs"):
            return self._search_loss(cos, labels, onehot, c_y)
        negatives, scale = cos, p.get("s")
        if name == "normface":
            target = c_y
        elif name == "cosface":
            target = c_y - p["m"]
        elif name == "arcface":
            value = arc(c_y, p["m"], fallback=p["fallback"], easy_margin=p["easy_margin"])
            target = straight_through(c_y, value, p["gradient"])
        elif name == "combined":
            value = torch.cos(p["m1"] * torch.acos(c_y) + p["m2"]) - p["m3"]
            target = straight_through(c_y, value, p["gradient"])
        elif name == "sphereface":
            if self.training:
                self.iteration += 1
            lam = max(p["lambda_min"], p["base"] * (1.0 + p["gamma"] * self.iteration) ** (-p["power"]))
            theta = torch.acos(c_y)
            k = torch.floor(p["m"] * theta.detach() / math.pi)
            psi = (1.0 - 2.0 * torch.remainder(k, 2.0)) * torch.cos(p["m"] * theta) - 2.0 * k
            target = (lam * c_y + psi) / (1.0 + lam)
            scale = norms[:, None]
            self.last.update(lam=lam, k=k)
        elif name == "mv_softmax":
            threshold = (c_y - p["m"] if p["base"] == "am" else torch.cos(torch.acos(c_y) + p["m"])).detach()
            hard = (cos > threshold[:, None]) & ~onehot
            emphasised = (1.0 + p["t"]) * cos + p["t"] if p["adaptive"] else cos + p["t"]
            negatives = torch.where(hard, emphasised, cos)
            if p["base"] == "am":
                target = torch.where(c_y > 0, c_y - p["m"], c_y) if p["easy_margin"] else c_y - p["m"]
            else:
                value = arc(c_y, p["m"], easy_margin=p["easy_margin"])
                target = straight_through(c_y, value, p["gradient"])
            self.last.update(hard=hard)
        elif name == "arcnegface":
            value = arc(c_y, p["m"], easy_margin=p["easy_margin"])
            weight = (p["alpha"] * torch.exp(-((cos - value.detach()[:, None]) ** 2) / p["sigma"])).detach()
            negatives = weight * (cos + 1.0) - 1.0
            target = straight_through(c_y, value, p["gradient"])
            self.last.update(weight=weight)
        elif name == "curricularface":
            if self.training or p["update_in_eval"]:
                self.t = (1.0 - p["t_alpha"]) * self.t + p["t_alpha"] * float(c_y.detach().mean())
            threshold = torch.cos(torch.acos(c_y) + p["m"]).detach()
            hard = (cos > threshold[:, None]) & ~onehot
            negatives = torch.where(hard, cos * (self.t + cos), cos)
            target = straight_through(c_y, arc(c_y, p["m"]), p["gradient"])
            self.last.update(hard=hard, t=self.t)
        elif name == "npcface":
            threshold = torch.cos(torch.acos(c_y) + p["mask_margin"]).detach()
            hard = (cos > threshold[:, None]) & ~onehot
            count = hard.sum(1)
            hard_mean = torch.where(hard, cos, 0.0).sum(1) / count.clamp(min=1)
            margin = torch.where(count > 0, p["m0"] + p["m1"] * hard_mean, torch.full_like(c_y, p["m0"])).detach()
            value = torch.where(c_y > 0, torch.cos(torch.acos(c_y) + margin), c_y)
            target = straight_through(c_y, value, p["gradient"])
            negatives = torch.where(hard, p["t"] * cos + p["alpha"], cos)
            self.last.update(hard=hard, margin=margin)
        else:
            raise AssertionError(f"no reference for {name}")
        logits = torch.where(onehot, target[:, None], negatives) * scale
        self.last["logits"] = logits.detach()
        return F.cross_entropy(logits, labels)

    def _search_loss(self, cos, labels, onehot, c_y):
        """LFS (§3.12): −log(p / (a·p + 1 − a)), p the plain softmax; AM-LFS (§3.11): −log τ(p^t)."""
        p, s = self.p, self.p["s"]
        if self.name in ("lfs", "lfs_local"):
            log_p = F.log_softmax(s * cos, dim=1).gather(1, labels[:, None])[:, 0]
            if self.name == "lfs":
                a = torch.full_like(c_y, p["a"])
            else:
                a = piece(log_p.exp(), torch.tensor(p["a_bins"], dtype=cos.dtype), 0.0, 1.0)
            self.last.update(a=a, p=log_p.exp().detach())
            return -(log_p - torch.log(a * log_p.exp() + 1.0 - a)).mean()
        slope, intercept = piece(c_y, torch.tensor(p["t_params"], dtype=cos.dtype), -1.0, 1.0).unbind(1)
        z_t = s * (slope * c_y + intercept)
        logits = torch.where(onehot, z_t[:, None], s * cos)
        p_t = F.softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        tau_slope, tau_intercept = piece(p_t, torch.tensor(p["tau_params"], dtype=cos.dtype), 0.0, 1.0).unbind(1)
        self.last.update(logits=logits.detach(), t_slope=slope, tau_slope=tau_slope,
                         tau=(tau_slope * p_t + tau_intercept).detach())
        return -torch.log(tau_slope * p_t + tau_intercept).mean()

    def load(self, margin) -> None:
        """Copy a margin's state into the reference (only the state: the parameters are the reference's own)."""
        if self.name == "curricularface":
            self.t = float(margin.t)
        if self.name == "sphereface":
            self.iteration = int(margin.iteration)

    def assert_state(self, margin, label="") -> None:
        if self.name == "curricularface":
            assert float(margin.t) == pytest.approx(self.t, rel=1e-13, abs=1e-15), f"{label}: t"
        if self.name == "sphereface":
            assert int(margin.iteration) == self.iteration, f"{label}: iteration"


def closed_form_gradient(ref: ReferenceMargin, cos: torch.Tensor, labels: torch.Tensor, norms=None):
    """∂(mean L)/∂c from spec §1's generic gradients, −scale·(1 − p_y)·T'(c_y) on the target and
    scale·p_j·N'(c_j) on the negatives (over B), with T' and N' written in closed form (§3.5, §3.7–§3.10, §6.2)
    and p the softmax of the reference's logits of the same step (``ref.loss`` has just run)."""
    p, name, last = ref.p, ref.name, ref.last
    batch = cos.shape[0]
    c_y = cos.gather(1, labels[:, None])[:, 0]
    theta = torch.acos(c_y)
    if name in ("lfs", "lfs_local"):  # §6.2: on the logits z = s·c
        plain = F.softmax(p["s"] * cos, dim=1)
        a, p_y = last["a"][:, None], last["p"][:, None]
        denominator = 1.0 - a * (1.0 - p_y)
        grad = torch.where(last["onehot"], -(1.0 - p_y) * (1.0 - a) / denominator, (1.0 - a) * plain / denominator)
        return grad * p["s"] / batch
    probabilities = F.softmax(last["logits"], dim=1)
    p_y = probabilities.gather(1, labels[:, None])[:, 0]
    if name == "am_lfs":  # L = −log(α_τ·p^t + β_τ): ∂L/∂z_y = −α_τ·p(1 − p)/τ, ∂L/∂z_j = α_τ·p·p_j/τ
        factor = (last["tau_slope"] * p_y / last["tau"])[:, None]
        grad = torch.where(last["onehot"], -factor * (1.0 - p_y[:, None]) * last["t_slope"][:, None],
                           factor * probabilities)
        return grad * p["s"] / batch

    def arc_slope(m, fallback=True, easy_margin=False, gradient="exact"):
        slope = torch.sin(theta + m) / torch.sin(theta)
        if gradient == "straight_through":
            return torch.ones_like(c_y)
        if easy_margin:
            return torch.where(c_y > 0, slope, 1.0)
        if fallback:
            return torch.where(c_y > math.cos(math.pi - m), slope, 1.0)
        return slope

    negative_slope = torch.ones_like(cos)
    scale = p.get("s")
    if name in ("normface", "cosface"):
        target_slope = torch.ones_like(c_y)
    elif name == "arcface":
        target_slope = arc_slope(p["m"], p["fallback"], p["easy_margin"], p["gradient"])
    elif name == "combined":
        target_slope = (p["m1"] * torch.sin(p["m1"] * theta + p["m2"]) / torch.sin(theta)
                        if p["gradient"] == "exact" else torch.ones_like(c_y))
    elif name == "sphereface":  # ψ' = (−1)^k·m·sin(mθ)/sin θ, T' = (λ + ψ')/(1 + λ), every logit × ‖x‖
        sign = 1.0 - 2.0 * torch.remainder(last["k"], 2.0)
        psi_slope = sign * p["m"] * torch.sin(p["m"] * theta) / torch.sin(theta)
        target_slope = (last["lam"] + psi_slope) / (1.0 + last["lam"])
        scale = norms[:, None]
    elif name == "mv_softmax":  # hard negatives: (1 + t)·s·p_j adaptive, s·p_j fixed (§6.3.7)
        target_slope = (torch.ones_like(c_y) if p["base"] == "am"
                        else arc_slope(p["m"], easy_margin=p["easy_margin"], gradient=p["gradient"]))
        negative_slope = torch.where(last["hard"], cos.new_tensor(1.0 + p["t"] if p["adaptive"] else 1.0), 1.0)
    elif name == "arcnegface":  # w detached: ∂N_j/∂c_j = w_j exactly (§6.3.8)
        target_slope = arc_slope(p["m"], easy_margin=p["easy_margin"], gradient=p["gradient"])
        negative_slope = last["weight"]
    elif name == "curricularface":  # hard negatives: M = 2c_j + t (§3.9, §6.2)
        target_slope = arc_slope(p["m"], gradient=p["gradient"])
        negative_slope = torch.where(last["hard"], 2.0 * cos + last["t"], 1.0)
    elif name == "npcface":  # m̃ detached: hard negatives get s·p_j·t (§6.3.10)
        exact = torch.where(c_y > 0, torch.sin(theta + last["margin"]) / torch.sin(theta), 1.0)
        target_slope = exact if p["gradient"] == "exact" else torch.ones_like(c_y)
        negative_slope = torch.where(last["hard"], cos.new_tensor(p["t"]), 1.0)  # (a 0-d tensor keeps float64)
    else:
        raise AssertionError(name)
    row_scale = scale if isinstance(scale, torch.Tensor) else torch.full((batch, 1), float(scale), dtype=cos.dtype)
    grad = torch.where(last["onehot"], -(1.0 - p_y[:, None]) * target_slope[:, None],
                       probabilities * negative_slope)
    return grad * row_scale / batch


def training_batch(seed: int, rows: int = 8, classes: int = 10):
    """Cosines with targets in [0.1, 0.9] and two special rows: one in ArcFace's fallback region (c_y < cos(π −
    0.5)) and one with c_y < 0 (the easy-margin guards); negatives over [−0.9, 0.9], so hard and easy ones occur."""
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, classes, generator=generator, dtype=torch.float64) * 1.8 - 0.9
    labels = torch.randint(0, classes, (rows,), generator=generator)
    targets = torch.rand(rows, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    targets[0], targets[1] = -0.92, -0.3
    cos[torch.arange(rows), labels] = targets
    norms = torch.rand(rows, generator=generator, dtype=torch.float64) * 2 + 0.5
    return cos, labels, norms


# name, params, training mode, initial state ({"t": …} or {"iteration": …})
REFERENCE_CASES = [
    ("normface", {}, True, {}),
    ("normface", {"s": 8.0}, True, {}),
    ("cosface", {}, True, {}),
    ("cosface", {"s": 8.0, "m": 0.4}, True, {}),
    ("arcface", {}, True, {}),
    ("arcface", {"s": 8.0, "m": 0.3, "easy_margin": True}, True, {}),
    ("arcface", {"s": 8.0, "fallback": False}, True, {}),
    ("arcface", {"s": 8.0, "gradient": "straight_through", "fallback": False}, True, {}),
    ("combined", {}, True, {}),
    ("combined", {"s": 8.0, "m1": 0.9, "m2": 0.4, "m3": 0.15}, True, {}),
    ("combined", {"s": 8.0, "gradient": "straight_through"}, True, {}),
    ("sphereface", {}, True, {}),
    ("sphereface", {"base": 10.0, "gamma": 0.5, "lambda_min": 0.5}, True, {}),
    ("sphereface", {"m": 1.7, "base": 2.0, "power": 2.0, "lambda_min": 0.0}, True, {"iteration": 5}),
    ("sphereface", {"base": 10.0, "gamma": 0.5, "lambda_min": 0.5}, False, {"iteration": 3}),
    ("mv_softmax", {}, True, {}),
    ("mv_softmax", {"s": 8.0, "adaptive": False}, True, {}),
    ("mv_softmax", {"s": 8.0, "easy_margin": True}, True, {}),
    ("mv_softmax", {"s": 8.0, "m": 0.5, "t": 0.3, "base": "arc"}, True, {}),
    ("mv_softmax", {"s": 8.0, "m": 0.5, "base": "arc", "gradient": "straight_through"}, True, {}),
    ("arcnegface", {}, True, {}),
    ("arcnegface", {"s": 8.0, "alpha": 1.5, "sigma": 0.5}, True, {}),
    ("arcnegface", {"s": 8.0, "easy_margin": True, "gradient": "straight_through"}, True, {}),
    ("curricularface", {}, True, {}),
    ("curricularface", {"s": 8.0, "t_alpha": 0.3}, True, {"t": 0.4}),
    ("curricularface", {"s": 8.0, "t_alpha": 0.3, "gradient": "straight_through"}, True, {"t": 0.4}),
    ("curricularface", {"s": 8.0, "t_alpha": 0.3}, False, {"t": 0.4}),  # eval: t stays
    ("curricularface", {"s": 8.0, "t_alpha": 0.3, "update_in_eval": True}, False, {"t": 0.4}),  # official
    ("npcface", {}, True, {}),
    ("npcface", {"s": 8.0, "m0": 0.3, "m1": 0.4, "t": 1.3, "alpha": 0.1, "mask_margin": 0.35}, True, {}),
    ("npcface", {"s": 8.0, "gradient": "straight_through"}, True, {}),
    ("lfs", {}, True, {}),
    ("lfs", {"s": 8.0, "a": -3.0}, True, {}),
    ("lfs_local", {}, True, {}),
    ("lfs_local", {"s": 8.0, "a_bins": [-0.5, -2.0, -8.0, -20.0]}, True, {}),
    ("am_lfs", {}, True, {}),
    ("am_lfs", {"s": 8.0, "t_params": [[1.2, -0.1], [0.9, -0.3], [1.1, -0.2]], "tau_params": [[0.8, 0.0], [0.9, 0.05]]},
     True, {}),
]
CASE_IDS = [f"{name}-{i}{'' if training else '-eval'}" for i, (name, _, training, _) in enumerate(REFERENCE_CASES)]


def start(name, params, training, state):
    """The margin under test and its reference, in the same mode and from the same state."""
    margin = mf.margins.create(name, **params).double().train(training)
    if "t" in state:
        margin.t.fill_(state["t"])
    if "iteration" in state:
        margin.iteration.fill_(state["iteration"])
    reference = ReferenceMargin(name, training=training, **params)
    reference.load(margin)
    return margin, reference


def assert_close(actual, expected, tolerance, label):
    scale = float(expected.abs().max().clamp_min(1e-300))
    error = float((actual - expected).abs().max())
    assert error <= tolerance * max(scale, 1.0), f"{label}: differs by {error:.3e} (scale {scale:.3e})"


def test_every_margin_has_a_reference_with_the_spec_defaults():
    """A new margin needs its formula here (and cases below) before it is tested; defaults are the spec's."""
    from test_margins_new_adaptive import CASES as NEW_CASES
    from test_margins_new_adaptive import NEW_SPEC_DEFAULTS  # the adaptive margins' reference lives there

    assert set(SPEC_DEFAULTS) | set(NEW_SPEC_DEFAULTS) == set(mf.margins.available())
    assert set(SPEC_DEFAULTS) == {case[0] for case in REFERENCE_CASES}
    assert set(NEW_SPEC_DEFAULTS) == {case[0] for case in NEW_CASES}
    for name, defaults in {**SPEC_DEFAULTS, **NEW_SPEC_DEFAULTS}.items():
        assert mf.margins.parameters(name) == defaults, name


@pytest.mark.parametrize("name,params,training,state", REFERENCE_CASES, ids=CASE_IDS)
def test_dense_margin_equals_the_float64_reference(name, params, training, state):
    """Loss, ∂L/∂c (and ∂L/∂‖x‖) and state over three steps, against autograd on the spec's formulas."""
    margin, reference = start(name, params, training, state)
    for step in range(3):
        cos, labels, norms = training_batch(100 + step)
        leaves = [cos.clone().requires_grad_(True), norms.clone().requires_grad_(True)]
        uses_norms = margin.needs_norms
        loss = F.cross_entropy(margin(leaves[0], labels, norms=leaves[1] if uses_norms else None), labels)
        grads = torch.autograd.grad(loss, leaves if uses_norms else leaves[:1])
        ref_leaves = [cos.clone().requires_grad_(True), norms.clone().requires_grad_(True)]
        ref_loss = reference.loss(ref_leaves[0], labels, ref_leaves[1])
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves if uses_norms else ref_leaves[:1])
        label = f"{name} {params} step {step}"
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-13), label
        for what, got, expected in zip(("dL/dc", "dL/d|x|"), grads, ref_grads, strict=False):
            assert_close(got, expected, 1e-11, f"{label} {what}")
        reference.assert_state(margin, label)
        if "hard" in reference.last and step == 0:
            hard = reference.last["hard"]
            assert hard.any() and (~hard & ~reference.last["onehot"]).any(), "the batch needs hard and easy ones"


@pytest.mark.parametrize("name,params,training,state", REFERENCE_CASES, ids=CASE_IDS)
def test_dense_margin_gradient_equals_the_closed_form(name, params, training, state):
    """∂L/∂c against spec §1's −s(1 − p_y)·T' and s·p_j·N', with T', N' in closed form and p from the reference."""
    margin, reference = start(name, params, training, state)
    for step in range(3):
        cos, labels, norms = training_batch(200 + step)
        leaf = cos.clone().requires_grad_(True)
        logits = margin(leaf, labels, norms=norms if margin.needs_norms else None)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), leaf)
        reference.loss(cos.clone(), labels, norms)
        expected = closed_form_gradient(reference, cos, labels, norms)
        assert_close(grad, expected, 1e-11, f"{name} {params} step {step}")
        reference.assert_state(margin, f"{name} step {step}")


# -- the worked gradients of spec §6.2 (numbers computed outside this project) ----------------------------------


def spec_gradient(margin, cos, labels):
    leaf = cos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(margin(leaf, labels), labels), leaf)
    return grad[0]


def test_curricularface_worked_gradient(spec_cos, spec_label):
    margin = mf.margins.create("curricularface", s=4.0).double().eval()  # eval: t = 0.3 used as is
    margin.t.fill_(0.3)
    grad = spec_gradient(margin, spec_cos, spec_label)
    torch.testing.assert_close(grad, torch.tensor([-3.72641402, 3.59003791, 0.25052376], dtype=torch.float64),
                               atol=1e-8, rtol=0)
    # (−s(1−p_y)·sin(θ+m)/sin θ, s·p_1·(2c_1 + t), s·p_2), p from the spec's logits (0.1430091063, 0.4, −0.2)·s
    p = F.softmax(4.0 * torch.tensor([math.cos(math.acos(0.6) + 0.5), 0.5 * 0.8, -0.2], dtype=torch.float64), 0)
    factor = math.sin(math.acos(0.6) + 0.5) / 0.8
    expected = 4.0 * torch.stack([-(1 - p[0]) * factor, p[1] * (2 * 0.5 + 0.3), p[2]])
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=0)


def test_curricularface_worked_gradient_in_training(spec_cos, spec_label):
    """Training mode: t moves to 0.01·0.6 + 0.99·0.3 = 0.303 *before* the logits, and the gradient uses it."""
    margin = mf.margins.create("curricularface", s=4.0).double().train()
    margin.t.fill_(0.3)
    grad = spec_gradient(margin, spec_cos, spec_label)
    assert float(margin.t) == pytest.approx(0.303, abs=1e-15)
    t = 0.303
    p = F.softmax(4.0 * torch.tensor([math.cos(math.acos(0.6) + 0.5), 0.5 * (t + 0.5), -0.2],
                                     dtype=torch.float64), 0)
    factor = math.sin(math.acos(0.6) + 0.5) / 0.8
    expected = 4.0 * torch.stack([-(1 - p[0]) * factor, p[1] * (2 * 0.5 + t), p[2]])
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=0)


def test_arcface_straight_through_is_s_times_p_minus_onehot(spec_cos, spec_label):
    exact = mf.margins.create("arcface", s=4.0, m=0.5).double()
    straight = mf.margins.create("arcface", s=4.0, m=0.5, gradient="straight_through", fallback=False).double()
    grad_exact = spec_gradient(exact, spec_cos, spec_label)
    grad_straight = spec_gradient(straight, spec_cos, spec_label)
    torch.testing.assert_close(grad_straight, torch.tensor([-3.26250808, 3.0754875, 0.18702059],
                                                           dtype=torch.float64), atol=1e-8, rtol=0)
    p = F.softmax(4.0 * torch.tensor([0.1430091063, 0.5, -0.2], dtype=torch.float64), 0)
    torch.testing.assert_close(grad_straight, 4.0 * (p - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
                               atol=1e-9, rtol=0)
    assert grad_exact[0].item() / grad_straight[0].item() == pytest.approx(1.237151716, abs=1e-9)
    torch.testing.assert_close(grad_exact[1:], grad_straight[1:], atol=1e-14, rtol=0)


def test_lfs_gradient_on_logits(spec_cos, spec_label):
    # spec §6.2: with a = −1, ∂L/∂z on the plain logits z = s·c
    margin = mf.margins.create("lfs", s=4.0, a=-1.0).double()
    grad = spec_gradient(margin, spec_cos, spec_label)
    torch.testing.assert_close(grad / 4.0, torch.tensor([-0.58714612, 0.55348846, 0.03365767], dtype=torch.float64),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("a", [0.0, -0.3, -5.0, -1e4])
def test_lfs_closed_form_gradient(a):
    generator = torch.Generator().manual_seed(3)
    cos = torch.rand(5, 7, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 7, (5,), generator=generator)
    s = 8.0
    margin = mf.margins.create("lfs", s=s, a=a).double()
    cos_leaf = cos.clone().requires_grad_(True)
    loss = F.cross_entropy(margin(cos_leaf, labels), labels, reduction="sum")
    loss.backward()
    p = F.softmax(s * cos, dim=1)
    p_y = p.gather(1, labels[:, None])
    onehot = F.one_hot(labels, 7).bool()
    denominator = 1 - a * (1 - p_y)
    expected = torch.where(onehot, -(1 - p_y) * (1 - a) / denominator, (1 - a) * p / denominator) * s
    torch.testing.assert_close(cos_leaf.grad, expected, atol=1e-10, rtol=1e-10)
    # and the loss is −log(p / (a·p + 1 − a)) computed directly
    direct = -torch.log(p_y / (a * p_y + 1 - a)).sum()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-10)


def test_npcface_worked_gradient(spec_cos, spec_label):
    """Fixture: c_1 = 0.5 is the only hard negative, m̃ = 0.4 + 0.2·0.5 = 0.5 (detached), N_1 = 1.1·0.5 + 0.2."""
    grad = spec_gradient(mf.margins.create("npcface", s=4.0).double(), spec_cos, spec_label)
    p = F.softmax(4.0 * torch.tensor([0.1430091063, 0.75, -0.2], dtype=torch.float64), 0)
    factor = math.sin(math.acos(0.6) + 0.5) / 0.8
    expected = 4.0 * torch.stack([-(1 - p[0]) * factor, p[1] * 1.1, p[2]])
    torch.testing.assert_close(grad, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("adaptive,logit,factor", [(True, 0.8, 1.2), (False, 0.7, 1.0)])
def test_mv_softmax_worked_gradient(spec_cos, spec_label, adaptive, logit, factor):
    margin = mf.margins.create("mv_softmax", s=4.0, m=0.35, t=0.2, adaptive=adaptive).double()
    grad = spec_gradient(margin, spec_cos, spec_label)
    p = F.softmax(4.0 * torch.tensor([0.25, logit, -0.2], dtype=torch.float64), 0)
    expected = 4.0 * torch.stack([-(1 - p[0]), p[1] * factor, p[2]])
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_arcnegface_worked_gradient(spec_cos, spec_label):
    grad = spec_gradient(mf.margins.create("arcnegface", s=4.0).double(), spec_cos, spec_label)
    target = 0.1430091063
    weights = [1.2 * math.exp(-((c - target) ** 2) / 2.0) for c in (0.5, -0.2)]
    p = F.softmax(4.0 * torch.tensor([target, 0.6888797103, -0.0948454877], dtype=torch.float64), 0)
    factor = math.sin(math.acos(0.6) + 0.5) / 0.8
    expected = 4.0 * torch.stack([-(1 - p[0]) * factor, p[1] * weights[0], p[2] * weights[1]])
    torch.testing.assert_close(grad, expected, atol=1e-9, rtol=0)


def test_cosface_worked_gradient(spec_cos, spec_label):
    grad = spec_gradient(mf.margins.create("cosface", s=4.0, m=0.35).double(), spec_cos, spec_label)
    p = F.softmax(4.0 * torch.tensor([0.25, 0.5, -0.2], dtype=torch.float64), 0)
    torch.testing.assert_close(grad, 4.0 * (p - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
                               atol=1e-14, rtol=0)
