"""AdaFace, AdaCos, ElasticFace and MagFace against a float64 reference written from their formulas, on every engine.

The reference below takes embeddings and class centres (not cosines), keeps its own state, and is differentiated by
autograd, so each check covers the loss and both gradients over two training steps (the adaptive state moves
between them). docs/margins.md has the formulas.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import marginface as mf
from distributed_helpers import run_ranks
from marginface import engines
from marginface.errors import ConfigError

ROWS, CLASSES, DIM = 6, 23, 5  # 23 is prime: no chunk size above 1 divides it

# The official-code defaults (spec/losses.md §3, docs/margins.md); tests/test_margins_gradients.py checks that
# every registered margin has its defaults written down somewhere.
NEW_SPEC_DEFAULTS = {
    "adaface": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "update_in_eval": False},
    "adacos": {"fixed": False},
    "elasticface_arc": {"s": 64.0, "m": 0.5, "std": 0.05, "plus": False, "plus_order": "paper", "fallback": False,
                        "seed": None},
    "elasticface_cos": {"s": 64.0, "m": 0.35, "std": 0.05, "plus": False, "plus_order": "paper", "seed": None},
    "magface": {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 20.0, "easy_margin": True},
}


class Reference:
    """One margin from its formulas on (x, W, labels); ``loss`` is differentiable in x and W."""

    def __init__(self, name: str, training: bool = True, classes: int = CLASSES, **params) -> None:
        self.name, self.training = name, training
        self.p = {**NEW_SPEC_DEFAULTS[name], **params}
        self.mean, self.std = 20.0, 100.0  # AdaFace's EMA start
        self.s = math.sqrt(2.0) * math.log(classes - 1)  # AdaCos's s^(0)
        self.generator = torch.Generator().manual_seed(self.p.get("seed") or 0)  # ElasticFace's own draws
        self.last: dict = {}

    def loss(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p, name = self.p, self.name
        norms = x.norm(dim=1)
        cos = (x / norms[:, None]) @ (weight / weight.norm(dim=1, keepdim=True)).t()
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        c_y = cos[torch.arange(len(labels)), labels]
        extra = 0.0
        if name == "adaface":
            eps = 1e-3
            safe = norms.detach().clamp(0.001, 100.0)
            if self.training:
                self.mean = p["t_alpha"] * float(safe.mean()) + (1 - p["t_alpha"]) * self.mean
                self.std = p["t_alpha"] * float(safe.std()) + (1 - p["t_alpha"]) * self.std
            z = torch.clamp(p["h"] * (safe - self.mean) / (self.std + eps), -1.0, 1.0)
            clamped = cos.clamp(-1 + eps, 1 - eps)
            theta = torch.acos(clamped[torch.arange(len(labels)), labels])
            target = torch.cos(torch.clamp(theta - p["m"] * z, eps, math.pi - eps)) - (p["m"] + p["m"] * z)
            logits = torch.where(onehot, target[:, None], clamped) * p["s"]
            self.last["z"] = z
        elif name == "adacos":
            if self.training and not p["fixed"]:
                b_avg = torch.where(onehot, 0.0, torch.exp(self.s * cos.detach())).sum() / len(labels)
                theta_med = torch.median(torch.acos(c_y.detach().clamp(-1 + 1e-7, 1 - 1e-7)))
                self.s = float(torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))
            logits = self.s * cos
        elif name in ("elasticface_arc", "elasticface_cos"):
            if self.training and p["std"] > 0:
                margin = torch.normal(p["m"], p["std"], (len(labels),), generator=self.generator,
                                      dtype=torch.float64)
                if p["plus"]:  # the paper: the sample of rank k by descending cos θ_y gets the k-th smallest margin
                    rank = torch.argsort(torch.argsort(-c_y.detach(), stable=True), stable=True)
                    margin = torch.sort(margin).values[rank]
            else:
                margin = torch.full_like(c_y, p["m"])
            self.last["margin"] = margin
            target = torch.cos(torch.acos(c_y) + margin) if name == "elasticface_arc" else c_y - margin
            logits = torch.where(onehot, target[:, None], cos) * p["s"]
        elif name == "magface":
            a = norms.clamp(p["l_a"], p["u_a"])
            margin = (p["u_m"] - p["l_m"]) / (p["u_a"] - p["l_a"]) * (a - p["l_a"]) + p["l_m"]
            value = torch.cos(torch.acos(c_y) + margin)
            target = torch.where(c_y > 0, value, c_y) if p["easy_margin"] else value
            logits = torch.where(onehot, target[:, None], cos) * p["s"]
            extra = p["lambda_g"] * (a / p["u_a"] ** 2 + 1.0 / a).mean()
        else:
            raise AssertionError(name)
        return F.cross_entropy(logits, labels) + extra

    def assert_state(self, margin, label: str) -> None:
        if self.name == "adaface":
            assert float(margin.batch_mean) == pytest.approx(self.mean, rel=1e-12), label
            assert float(margin.batch_std) == pytest.approx(self.std, rel=1e-12), label
        if self.name == "adacos":
            assert float(margin.s) == pytest.approx(self.s, rel=1e-12), label


def data(seed=0, rows=ROWS, classes=CLASSES, dim=DIM, low=5.0, high=120.0):
    """Embeddings near their centres with norms spread over [low, high] (MagFace's clamps and AdaFace's ẑ)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    direction = F.normalize(weight[labels] + 0.7 * torch.randn(rows, dim, generator=generator, dtype=torch.float64))
    norms = low + (high - low) * torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    return direction * norms, weight, labels


CASES = [
    ("adaface", {}),
    ("adaface", {"s": 8.0, "h": 1.0, "t_alpha": 0.5}),  # ẑ clips at ±1 and the statistics move a lot
    ("adacos", {}),
    ("adacos", {"fixed": True}),
    ("elasticface_arc", {"s": 8.0}),
    ("elasticface_arc", {"s": 8.0, "std": 0.2, "plus": True, "seed": 7}),
    ("elasticface_cos", {"s": 8.0, "std": 0.1}),
    ("elasticface_cos", {"s": 8.0, "std": 0.1, "plus": True}),
    ("magface", {"s": 8.0}),
    ("magface", {"s": 8.0, "lambda_g": 35.0, "l_m": 0.4, "easy_margin": False}),  # the paper's values
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def engine_runs(engine, name, params, x, weight, labels, steps=2, training=True):
    margin = mf.margins.create(name, **params).double().train(training)
    results = []
    for _ in range(steps):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        statistics: dict[str, float] = {}
        loss = engine.loss(margin, xs, ws, labels, None, statistics)
        results.append((loss.detach(), *torch.autograd.grad(loss, [xs, ws]), statistics))
    return results, margin


def reference_runs(name, params, x, weight, labels, steps=2, training=True):
    reference = Reference(name, training=training, classes=weight.shape[0], **params)
    results = []
    for _ in range(steps):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = reference.loss(xs, ws, labels)
        results.append((loss.detach(), *torch.autograd.grad(loss, [xs, ws])))
    return results, reference


def close(actual, expected, rtol, label):
    scale = float(expected.abs().max().clamp_min(1e-30))
    error = float((actual - expected).abs().max()) / scale
    assert error <= rtol, f"{label}: differs by {error:.2e} (relative)"


ENGINES = [("dense", {}), ("chunked", {"chunk_size": 7, "keep_mb": 0.0}), ("chunked", {"chunk_size": 4}),
           ("partial", {"sample_rate": 1.0, "chunk_size": 5})]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_every_engine_equals_the_float64_reference_over_two_steps(name, params):
    x, weight, labels = data()
    expected, reference = reference_runs(name, params, x, weight, labels)
    for engine_name, options in ENGINES:
        results, margin = engine_runs(engines.create(engine_name, **options), name, params, x, weight, labels)
        for step, ((loss, dx, dw, _), (e_loss, e_dx, e_dw)) in enumerate(zip(results, expected, strict=True)):
            label = f"{name} {params} on {engine_name} {options} step {step}"
            close(loss, e_loss, 1e-11, f"{label} loss")
            close(dx, e_dx, 1e-9, f"{label} dx")
            close(dw, e_dw, 1e-9, f"{label} dW")
        reference.assert_state(margin, f"{name} on {engine_name}")


def test_magface_gradient_reaches_the_feature_norm():
    """The margin m(a) and the regulariser differentiate through ‖x‖: dL/dx has a radial component, which a
    margin of cosines alone (invariant to ‖x‖) would not have."""
    x, weight, labels = data(low=20.0, high=90.0)  # every norm inside [l_a, u_a]
    results, _ = engine_runs(engines.create("chunked", chunk_size=4), "magface", {"s": 8.0}, x, weight, labels, 1)
    dx = results[0][1]
    radial = (dx * F.normalize(x, dim=1)).sum(1)
    assert (radial.abs() > 1e-6).all()
    cosface, _ = engine_runs(engines.create("chunked", chunk_size=4), "cosface", {}, x, weight, labels, 1)
    assert (cosface[0][1] * F.normalize(x, dim=1)).sum(1).abs().max() < 1e-12
    # the regulariser alone: λ_g·mean(a/u_a² + 1/a) has d/da = λ_g·(1/u_a² − 1/a²)/B
    no_ce, _ = engine_runs(engines.create("dense"), "magface", {"s": 1e-9, "l_m": 0.0, "u_m": 0.0}, x, weight,
                           labels, 1)
    a = x.norm(dim=1)
    expected = 20.0 * (1 / 110.0**2 - 1 / a**2) / ROWS
    torch.testing.assert_close((no_ce[0][1] * F.normalize(x, dim=1)).sum(1), expected, rtol=1e-6, atol=1e-9)


def test_norm_statistics_are_reported():
    x, weight, labels = data()
    results, _ = engine_runs(engines.create("chunked"), "magface", {}, x, weight, labels, 1)
    statistics = results[0][3]
    assert statistics["norm_mean"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-12)
    assert statistics["norm_std"] == pytest.approx(float(x.norm(dim=1).std()), rel=1e-12)
    assert statistics["margin_mean"] > 0.45


# -- sharded on two gloo ranks ---------------------------------------------------------------------------------
def sharded_worker(rank, world, cases):
    x, weight, labels = data(rows=ROWS * world)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    out = []
    for name, params in cases:
        engine = engines.create("sharded", chunk_size=3)
        shard = engine.shard(CLASSES)
        results, margin = engine_runs(engine, name, params, x[rows], weight[shard.start : shard.stop], labels[rows])
        out.append(([(loss, dx, dw) for loss, dx, dw, _ in results], shard,
                    {k: v.clone() for k, v in margin.state_dict().items()}))
    return out


def test_sharded_on_two_ranks_equals_the_reference():
    """Norm statistics (AdaFace), B_avg and the median (AdaCos), the draws (ElasticFace) and the norm gradient
    (MagFace) come from the global batch: each rank's loss, dX rows, dW shard and state equal one process's."""
    world = 2
    per_rank = run_ranks(sharded_worker, world, CASES)
    x, weight, labels = data(rows=ROWS * world)
    for index, (name, params) in enumerate(CASES):
        expected, reference = reference_runs(name, params, x, weight, labels)
        for rank, results in enumerate(per_rank):
            steps, shard, state = results[index]
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            for step, ((loss, dx, dw), (e_loss, e_dx, e_dw)) in enumerate(zip(steps, expected, strict=True)):
                label = f"{name} {params} rank {rank} step {step}"
                close(loss, e_loss, 1e-11, f"{label} loss")
                close(dx, e_dx[rows], 1e-9, f"{label} dx")
                close(dw, e_dw[shard.start : shard.stop], 1e-9, f"{label} dW")
            margin = mf.margins.create(name, **params).double()
            margin.load_state_dict(state)
            reference.assert_state(margin, f"{name} rank {rank}")


# -- gradcheck away from the switching points ------------------------------------------------------------------
def gradcheck_inputs(seed=3, rows=4, classes=6):
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, classes, generator=generator, dtype=torch.float64) * 1.4 - 0.7
    labels = torch.arange(rows) % classes
    cos[torch.arange(rows), labels] = torch.rand(rows, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    norms = torch.rand(rows, generator=generator, dtype=torch.float64) * 60 + 30  # inside MagFace's [10, 110]
    return cos, labels, norms


@pytest.mark.parametrize("name,params", [("adaface", {"h": 1.0}), ("adacos", {}), ("elasticface_arc", {"std": 0.1}),
                                         ("elasticface_cos", {"std": 0.1, "plus": True}), ("magface", {})])
def test_gradcheck(name, params):
    margin = mf.margins.create(name, **params).double()
    cos, labels, norms = gradcheck_inputs()
    if name == "adaface":  # eval: ẑ from fixed statistics, chosen so that no ẑ sits at a clip
        margin.eval()
        margin.batch_mean.fill_(45.0)
        margin.batch_std.fill_(40.0)
    elif name == "adacos":
        margin.eval()
        margin.set_num_classes(6)
    state = margin.state_dict()["generator_state"].clone() if margin.uses_generator else None

    def loss(c, n):
        if state is not None:  # the same draws on every evaluation
            margin.generator_state.copy_(state)
        return margin.reference_loss(c, labels, norms=n)

    leaves = (cos.clone().requires_grad_(True), norms.clone().requires_grad_(name == "magface"))
    assert torch.autograd.gradcheck(loss, leaves)


# -- state, eval mode, the draws -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,keys", [("adaface", {"batch_mean", "batch_std"}), ("adacos", {"s"}),
                                       ("elasticface_arc", {"generator_state"})])
def test_state_is_in_the_state_dict_and_eval_leaves_it(name, keys):
    head = mf.heads.create(name, num_classes=CLASSES, embedding_size=DIM).double().train()
    x, _, labels = data()
    before = {k: v.clone() for k, v in head.margin.state_dict().items()}
    assert keys <= set(before)
    head(x, labels)
    after = {k: v.clone() for k, v in head.margin.state_dict().items()}
    assert all(not torch.equal(before[k], after[k]) for k in keys), "training must move the state"
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    restored = mf.heads.create(name, num_classes=CLASSES, embedding_size=DIM).double()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored(x, labels), head(x, labels), rtol=0, atol=0)  # resume is exact
    head.eval()
    frozen = {k: v.clone() for k, v in head.margin.state_dict().items()}
    with torch.no_grad():
        head(x, labels)
    assert all(torch.equal(frozen[k], v) for k, v in head.margin.state_dict().items())


def test_adacos_starts_at_root_two_log_classes():
    head = mf.heads.create("adacos", num_classes=1001, embedding_size=4)
    assert float(head.margin.s) == pytest.approx(math.sqrt(2) * math.log(1000), rel=1e-6)


def test_elasticface_draws_have_the_asked_mean_and_spread():
    margin = mf.margins.create("elasticface_arc", m=0.5, std=0.05, seed=1).double()
    ctx = margin.prepare(torch.zeros(200_000, dtype=torch.float64))
    draws = ctx["margin"]
    # standard errors: 0.05/√n ≈ 1.1e-4 for the mean, 0.05/√(2n) ≈ 7.9e-5 for the std
    assert float(draws.mean()) == pytest.approx(0.5, abs=6e-4)
    assert float(draws.std()) == pytest.approx(0.05, abs=4e-4)
    again = margin.prepare(torch.zeros(5, dtype=torch.float64))["margin"]
    assert not torch.equal(again, draws[:5]), "each step draws afresh"


def test_elasticface_seed_comes_from_the_global_generator_in_a_head():
    torch.manual_seed(5)
    first = mf.heads.create("elasticface_cos", num_classes=10, embedding_size=4).margin.generator_state.clone()
    torch.manual_seed(5)
    second = mf.heads.create("elasticface_cos", num_classes=10, embedding_size=4).margin.generator_state.clone()
    torch.manual_seed(6)
    third = mf.heads.create("elasticface_cos", num_classes=10, embedding_size=4).margin.generator_state.clone()
    assert torch.equal(first, second) and not torch.equal(first, third)
    explicit = mf.heads.create("elasticface_cos", num_classes=10, embedding_size=4, seed=3).margin
    assert torch.equal(explicit.generator_state, torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize("elastic,plain,params", [("elasticface_arc", "arcface", {"fallback": False}),
                                                  ("elasticface_cos", "cosface", {})])
def test_elasticface_with_std_zero_is_arcface_or_cosface_exactly(elastic, plain, params):
    x, weight, labels = data(seed=2)
    for engine_name, options in ENGINES[:2]:
        ours, _ = engine_runs(engines.create(engine_name, **options), elastic, {"std": 0.0}, x, weight, labels)
        theirs, _ = engine_runs(engines.create(engine_name, **options), plain, params, x, weight, labels)
        for (loss, dx, dw, _), (e_loss, e_dx, e_dw, _) in zip(ours, theirs, strict=True):
            assert torch.equal(loss, e_loss) and torch.equal(dx, e_dx) and torch.equal(dw, e_dw)


def test_elasticface_plus_gives_the_hardest_sample_the_largest_margin():
    target = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3], dtype=torch.float64)
    margin = mf.margins.create("elasticface_arc", std=0.1, plus=True).double()
    drawn = margin.prepare(target)["margin"]
    order = torch.argsort(target)  # hardest first
    assert torch.all(drawn[order][:-1] >= drawn[order][1:])
    code = mf.margins.create("elasticface_arc", std=0.1, plus=True, plus_order="code").double()
    values = code.prepare(target)["margin"]
    ascending = torch.sort(values).values
    # the official indexing: row r takes the sorted draw at position argsort(−cos)[r]
    torch.testing.assert_close(values, ascending[torch.argsort(-target)], rtol=0, atol=0)
    assert not torch.equal(values, drawn), "the code's pairing differs from the paper's on this batch"


def test_adaface_extremes_are_arcface_and_cosface():
    """ẑ = −1 gives cos(θ + m), ẑ = 0 gives cos θ − m (spec §6.3)."""
    margin = mf.margins.create("adaface", m=0.4).double().eval()
    c = torch.tensor([0.3, 0.6], dtype=torch.float64)
    arc = margin.target_logit(c, {"norm_scaler": torch.full((2,), -1.0, dtype=torch.float64)})
    torch.testing.assert_close(arc, torch.cos(torch.acos(c) + 0.4))
    cos = margin.target_logit(c, {"norm_scaler": torch.zeros(2, dtype=torch.float64)})
    torch.testing.assert_close(cos, c - 0.4)


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("elasticface_arc", {"std": -0.1}, "std=-0.1"),
        ("elasticface_cos", {"std": -1}, "std=-1"),
        ("elasticface_cos", {"plus_order": "sorted"}, "plus_order='sorted'"),
        ("elasticface_arc", {"seed": -2}, "seed=-2"),
        ("magface", {"l_a": 110.0, "u_a": 10.0}, "l_a=110.0"),
        ("magface", {"l_a": 10.0, "u_a": 10.0}, "l_a=10.0"),
        ("magface", {"l_m": 0.9, "u_m": 0.8}, "l_m=0.9"),
        ("magface", {"lambda_g": -1.0}, "lambda_g=-1.0"),
        ("adaface", {"t_alpha": 2.0}, "t_alpha=2.0"),
        ("adaface", {"h": -0.1}, "h=-0.1"),
        ("adacos", {"fixed": "no"}, "fixed='no'"),
    ],
)
def test_bad_parameters_are_named(name, params, fragment):
    with pytest.raises(ConfigError) as info:
        mf.margins.create(name, **params)
    assert fragment in str(info.value)


def test_adacos_needs_three_classes():
    with pytest.raises(ConfigError, match="at least 3 classes"):
        mf.heads.create("adacos", num_classes=2, embedding_size=4)
