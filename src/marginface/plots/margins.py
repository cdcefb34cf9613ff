"""Margin pictures: the target logit T(θ_y), the hard-negative modulation N at several t, and its gradient.

Every curve is computed by running the margin itself (its forward and autograd), never redrawn from a formula,
so a picture shows what training will do — in the spirit of the CurricularFace paper's Figures 1 and 2.
"""

from __future__ import annotations

import copy
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from marginface import margins
from marginface.margins.base import Margin
from marginface.plots.common import plt, save_figure

ANGLES = torch.linspace(0.0, math.pi, 721, dtype=torch.float64)
# Values of t to sweep for margins whose negatives depend on a t: a state (CurricularFace's running mean of the
# target cosine goes from 0 towards ~1 during training) or a fixed parameter (around its default).
STATE_T_SWEEP = (0.0, 0.3, 0.6, 0.9)
PARAMETER_T_FACTORS = (0.5, 1.0, 1.5)
END_OF_ANNEALING = 10**9  # SphereFace's iteration counter when drawn: λ has reached lambda_min
LEGEND_WIDTH = 60  # characters per legend line (a panel is 6 inches wide)
TITLE_WIDTH = 58
# Line styles and markers per margin, so coinciding curves stay distinguishable (":" is the reference's).
LINESTYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MARK_EVERY, MARK_OFFSET = 60, 8  # of the 721 angles: a marker every 15°, each margin's shifted by 2°
COINCIDE_SHARE = 0.5  # two curves equal over at least this share of the angles get a note
# The slope panel's formulas, for the margins plotted that have a closed form worth naming.
FORMULAS = {"curricularface": "CurricularFace: M = 2cos θ_j + t", "npcface": "NPCFace: t"}


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


def _format_value(value: object) -> str:
    """A parameter as a margin spec writes it: 0.35, true, arc, [-4.29e+04]×10."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = [_format_value(item) for item in value]
        if len(items) > 1 and len(set(items)) == 1:  # ten equal bins read better as one value and a count
            return f"[{items[0]}]×{len(items)}"
        return "[" + ", ".join(items) + "]"
    return str(value)


def drawn_lambda(margin: Margin) -> float | None:
    """SphereFace's λ at the state plot_margins draws (the end of its annealing); None for other margins."""
    if not hasattr(margin, "current_lambda"):
        return None
    drawn = copy.deepcopy(margin)
    drawn.iteration.fill_(END_OF_ANNEALING)
    return float(drawn.current_lambda)


def label_of(margin: Margin, width: int = LEGEND_WIDTH) -> str:
    """The margin's name and every one of its parameters (wrapped), and SphereFace's λ as drawn."""
    details = [f"{key}={_format_value(value)}" for key, value in margin.hyperparameters().items()]
    lam = drawn_lambda(margin)
    if lam is not None:
        details.insert(0, f"λ={lam:.4g} drawn (end of annealing)")
    text = f"{margin.name} ({', '.join(details)})" if details else margin.name
    return "\n".join(textwrap.wrap(text, width=width, subsequent_indent="    ", break_on_hyphens=False))


def short_labels(chosen: Sequence[Margin]) -> list[str]:
    """A name per margin for the negative and slope panels: the name, plus the parameters that tell apart
    margins of the same name (two mv_softmax with base=am and base=arc)."""
    labels = []
    for margin in chosen:
        same = [other.hyperparameters() for other in chosen if other.name == margin.name]
        own = margin.hyperparameters()
        differing = [k for k in own if any(_format_value(h.get(k)) != _format_value(own[k]) for h in same)]
        details = ", ".join(f"{k}={_format_value(own[k])}" for k in differing)
        labels.append(f"{margin.name} ({details})" if details else margin.name)
    return labels


def coinciding(curves: Sequence[tuple[str, torch.Tensor]], reference: torch.Tensor, atol: float = 1e-9) -> list[str]:
    """Notes like "arcface = combined over 83% of the angles" for curves that lie on one another, so a
    reader knows a hidden line is there. Only angles where one of the two leaves the reference count: every
    negative curve equals cos θ right of its jump, and that is no news."""
    notes = []
    for first in range(len(curves)):
        for second in range(first + 1, len(curves)):
            (name_a, a), (name_b, b) = curves[first], curves[second]
            moved = ((a - reference).abs() > atol) | ((b - reference).abs() > atol)
            if not bool(moved.any()):
                continue
            same = ((a - b).abs() <= atol) & moved
            share = float(same.sum()) / float(moved.sum())
            if share >= COINCIDE_SHARE:
                where = "everywhere" if share == 1.0 else f"over {100 * share:.0f}% of the angles"
                notes.append(f"{name_a} = {name_b} {where}")
    return notes


def _note(axis, notes: Sequence[str]) -> None:
    """The coincidence notes as legend lines without a handle: in the legend below the panel they hide
    no curve, as a box inside it would."""
    if notes:
        axis.plot([], [], linestyle="none", label="coincide (each drawn in its own line style and markers):")
    for note in notes:
        axis.plot([], [], linestyle="none", label=f"    {note}")


def _title(*parts: str) -> str:
    """A panel title wrapped to the panel's width: it names every margin drawn in the panel."""
    return "\n".join(line for part in parts if part for line in textwrap.wrap(part, width=TITLE_WIDTH))


def _style(index: int) -> dict:
    """Colour, line style and marker of the index-th margin: curves that coincide still show each one (the
    markers of each margin sit at other angles, so both sets stay visible on a shared line)."""
    return dict(
        color=plt.get_cmap("tab10")(index % 10),
        linestyle=LINESTYLES[index % len(LINESTYLES)],
        marker=MARKERS[index % len(MARKERS)],
        markevery=(MARK_OFFSET * (index % 7), MARK_EVERY),
        markersize=4,
        markerfacecolor="none",
    )


def plot_margins(
    specs: Sequence[str | Margin], out: str | os.PathLike, target_angle_degrees: float = 60.0
) -> Path:
    """Draw T(θ_y), N(θ_j) for hard negatives at several t, and dN/dcos θ_j, for each margin; write a PNG."""
    return save_figure(margins_figure(specs, target_angle_degrees), out)


def margins_figure(specs: Sequence[str | Margin], target_angle_degrees: float = 60.0) -> Figure:
    """The figure of `plot_margins`: three panels, every legend entry with every parameter of its margin."""
    chosen = [spec if isinstance(spec, Margin) else parse_margin_spec(spec) for spec in specs]
    if not chosen:
        raise ValueError("plot_margins needs at least one margin name")
    target_angle = math.radians(target_angle_degrees)
    degrees = torch.rad2deg(ANGLES).numpy()
    cos = torch.cos(ANGLES).double()
    names = short_labels(chosen)
    unchanged = [name for name, margin in zip(names, chosen, strict=True) if margin.identity_negatives]
    modulated = [name for name, margin in zip(names, chosen, strict=True) if not margin.identity_negatives]
    figure, (target_axis, negative_axis, slope_axis) = plt.subplots(1, 3, figsize=(18, 5.4))
    target_axis.plot(degrees, cos.numpy(), color="black", linestyle=":", label="softmax: cos θ")
    unchanged_text = f" ({', '.join(unchanged)})" if unchanged else ""
    negative_axis.plot(degrees, cos.numpy(), color="black", linestyle=":", label=f"unchanged: cos θ{unchanged_text}")
    slope_axis.axhline(1.0, color="black", linestyle=":", label=f"unchanged: 1{unchanged_text}")
    targets, negatives, slopes = [], [], []
    for index, (margin, name) in enumerate(zip(chosen, names, strict=True)):
        margin = copy.deepcopy(margin).double().eval()
        if hasattr(margin, "iteration"):  # SphereFace: draw the loss at the end of its λ annealing
            margin.iteration.fill_(END_OF_ANNEALING)
        style = _style(index)
        target = target_curve(margin)
        targets.append((name, target))
        target_axis.plot(degrees, target.numpy(), label=label_of(margin), **style)
        if margin.identity_negatives:
            continue
        variants = t_variants(margin)
        for position, (t_label, variant) in enumerate(variants):
            negative, slope = negative_curve(variant, target_angle)
            shade = dict(style, alpha=0.35 + 0.65 * (position + 1) / len(variants))
            label = f"{name} {t_label}".strip()
            negatives.append((label, negative))
            slopes.append((label, slope))
            negative_axis.plot(degrees, negative.numpy(), label=label, **shade)
            slope_axis.plot(degrees, slope.numpy(), label=label, **shade)
    _note(target_axis, coinciding(targets, cos))
    _note(negative_axis, coinciding(negatives, cos))
    _note(slope_axis, coinciding(slopes, torch.ones_like(cos)))
    plotted = ", ".join(modulated) if modulated else "no margin plotted changes its negatives"
    formulas = [FORMULAS[m.name] for m in chosen if m.name in FORMULAS and not m.identity_negatives]
    target_axis.set(title=_title(f"target logit T(θ_y) / s: {', '.join(names)}"), xlabel="θ_y (degrees)",
                    ylabel="T / s")
    negative_axis.set(
        title=_title(f"negative logit N(θ_j) / s: {plotted}",
                     f"(θ_y = {target_angle_degrees:g}°; hard negatives left of the jump)"),
        xlabel="θ_j (degrees)",
        ylabel="N / s",
    )
    slope_axis.set(
        title=_title(f"dN/dcos θ_j: {plotted}", f"({'; '.join(dict.fromkeys(formulas))})" if formulas else ""),
        xlabel="θ_j (degrees)",
        ylabel="dN / dcos θ_j",
    )
    for axis in (target_axis, negative_axis, slope_axis):
        axis.set_xlim(0, 180)
        axis.grid(alpha=0.3)
    figure.tight_layout()  # before the legends: laid out with them, the panels shrink to strips
    for axis in (target_axis, negative_axis, slope_axis):
        # below the panel: a legend with every parameter is long, and inside it would hide curves
        axis.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    return figure


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
