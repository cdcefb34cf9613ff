"""Margin pictures: the target logit T(θ_y), the hard-negative modulation N at several t, and its gradient.

Every curve is computed by running the margin itself (its forward and autograd), never redrawn from a formula,
so a picture shows what training will do — in the spirit of the CurricularFace paper's Figures 1 and 2.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from marginface import margins
from marginface.margins.base import Margin
from marginface.plots.common import plt, save_figure

ANGLES = torch.linspace(0.0, math.pi, 721, dtype=torch.float64)
# Values of t to sweep for margins whose negatives depend on a t: a state (CurricularFace's running mean of the
# target cosine goes from 0 towards ~1 during training) or a fixed parameter (around its default).
STATE_T_SWEEP = (0.0, 0.3, 0.6, 0.9)
PARAMETER_T_FACTORS = (0.5, 1.0, 1.5)


def target_curve(margin: Margin, angles: torch.Tensor = ANGLES) -> torch.Tensor:
    """T(θ_y) (unscaled) for a sample whose only negative is easy (cos = −1)."""
    cos = torch.stack([torch.cos(angles), torch.full_like(angles, -1.0)], dim=1)
    labels = torch.zeros(len(angles), dtype=torch.long)
    norms = torch.ones(len(angles), dtype=torch.float64)
    with torch.no_grad():
        logits = margin(cos, labels, norms=norms if margin.needs_norms else None)
    return logits[:, 0] / scale_of(margin)


def negative_curve(
    margin: Margin, target_angle: float, angles: torch.Tensor = ANGLES
) -> tuple[torch.Tensor, torch.Tensor]:
    """N(θ_j) (unscaled) and dN/dcos θ_j (by autograd) for a negative at each angle, the target at target_angle."""
    cos_negative = torch.cos(angles).clone().requires_grad_(True)
    cos = torch.stack([torch.full_like(angles, math.cos(target_angle)), cos_negative], dim=1)
    labels = torch.zeros(len(angles), dtype=torch.long)
    norms = torch.ones(len(angles), dtype=torch.float64)
    logits = margin(cos, labels, norms=norms if margin.needs_norms else None)
    negative = logits[:, 1] / scale_of(margin)
    (slope,) = torch.autograd.grad(negative.sum(), cos_negative)
    return negative.detach(), slope


def scale_of(margin: Margin) -> float:
    return 1.0 if margin.needs_norms else margin.s


def t_variants(margin: Margin) -> list[tuple[str, Margin]]:
    """Copies of the margin at several values of its t (just the margin when it has none)."""
    attribute = margin.t_attribute
    if attribute is None:
        return [("", margin)]
    current = getattr(margin, attribute)
    variants = []
    if isinstance(current, torch.Tensor):
        for value in STATE_T_SWEEP:
            variant = copy.deepcopy(margin)
            getattr(variant, attribute).fill_(value)
            variants.append((f"t={value:g}", variant))
    else:
        for factor in PARAMETER_T_FACTORS:
            variant = copy.deepcopy(margin)
            setattr(variant, attribute, current * factor)
            variants.append((f"t={current * factor:.3g}", variant))
    return variants


def label_of(margin: Margin) -> str:
    shown = {
        k: v
        for k, v in margin.hyperparameters().items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "s"
    }
    details = ", ".join(f"{k}={v:.3g}" for k, v in list(shown.items())[:3])
    return f"{margin.name} ({details})" if details else margin.name


def plot_margins(
    specs: Sequence[str | Margin], out: str | os.PathLike, target_angle_degrees: float = 60.0
) -> Path:
    """Draw T(θ_y), N(θ_j) for hard negatives at several t, and dN/dcos θ_j, for each margin; write a PNG."""
    chosen = [spec if isinstance(spec, Margin) else parse_margin_spec(spec) for spec in specs]
    if not chosen:
        raise ValueError("plot_margins needs at least one margin name")
    target_angle = math.radians(target_angle_degrees)
    degrees = torch.rad2deg(ANGLES).numpy()
    figure, (target_axis, negative_axis, slope_axis) = plt.subplots(1, 3, figsize=(18, 5.4))
    target_axis.plot(degrees, torch.cos(ANGLES).numpy(), color="black", linestyle=":", label="softmax: cos θ")
    negative_axis.plot(degrees, torch.cos(ANGLES).numpy(), color="black", linestyle=":", label="unchanged: cos θ")
    slope_axis.axhline(1.0, color="black", linestyle=":", label="unchanged: 1")
    colours = plt.get_cmap("tab10")
    for index, margin in enumerate(chosen):
        margin = copy.deepcopy(margin).double().eval()
        if hasattr(margin, "iteration"):  # SphereFace: draw the loss at the end of its λ annealing
            margin.iteration.fill_(10**9)
        colour = colours(index % 10)
        target_axis.plot(degrees, target_curve(margin).numpy(), color=colour, label=label_of(margin))
        if margin.identity_negatives:
            continue
        variants = t_variants(margin)
        for position, (t_label, variant) in enumerate(variants):
            negative, slope = negative_curve(variant, target_angle)
            style = dict(color=colour, alpha=0.35 + 0.65 * (position + 1) / len(variants))
            name = f"{margin.name} {t_label}".strip()
            negative_axis.plot(degrees, negative.numpy(), label=name, **style)
            slope_axis.plot(degrees, slope.numpy(), label=name, **style)
    target_axis.set(title="target logit T(θ_y) / s", xlabel="θ_y (degrees)", ylabel="T")
    negative_axis.set(
        title=f"negative logit N(θ_j) / s   (θ_y = {target_angle_degrees:g}°; hard left of the jump)",
        xlabel="θ_j (degrees)",
        ylabel="N",
    )
    slope_axis.set(
        title="dN/dcos θ_j   (CurricularFace: M = 2cos θ_j + t)",
        xlabel="θ_j (degrees)",
        ylabel="dN / dcos θ_j",
    )
    for axis in (target_axis, negative_axis, slope_axis):
        axis.set_xlim(0, 180)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return save_figure(figure, out)


def parse_margin_spec(spec: str) -> Margin:
    """``name`` or ``name:key=value,key=value`` (values parsed as YAML scalars) -> a margin."""
    import yaml

    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"margin spec {spec!r}: expected name:key=value,key=value, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return margins.create(name.strip(), **params)
