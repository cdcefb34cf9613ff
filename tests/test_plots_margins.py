"""Margin pictures: the curves are the margin's own numbers, and the CLI writes a PNG or a clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

import marginface as mf
from marginface.cli import main
from marginface.plots.margins import ANGLES, negative_curve, parse_margin_spec, t_variants, target_curve


def test_target_curve_is_arcface_formula():
    curve = target_curve(mf.margins.create("arcface", m=0.5).double())
    # θ = 0 exactly is excluded: cos θ = 1 is clamped to 1 − 1e-7 there so that the gradient stays finite
    inside = (ANGLES < math.pi - 0.5) & (ANGLES > 0)
    torch.testing.assert_close(curve[inside], torch.cos(ANGLES[inside] + 0.5), atol=1e-9, rtol=0)
    outside = ANGLES > math.pi - 0.5
    torch.testing.assert_close(curve[outside], torch.cos(ANGLES[outside]) - 0.5 * math.sin(0.5), atol=1e-9, rtol=0)


def test_curricular_negative_curve_and_gradient_coefficient():
    margin = mf.margins.create("curricularface", m=0.5).double().eval()
    margin.t.fill_(0.4)
    negative, slope = negative_curve(margin, target_angle=math.radians(60))
    cos = torch.cos(ANGLES)
    hard = cos > math.cos(math.radians(60) + 0.5)
    torch.testing.assert_close(negative[hard], cos[hard] * (0.4 + cos[hard]), atol=1e-12, rtol=0)
    torch.testing.assert_close(slope[hard], 2 * cos[hard] + 0.4, atol=1e-12, rtol=0)  # M = 2cos θ_j + t
    torch.testing.assert_close(negative[~hard], cos[~hard], atol=1e-12, rtol=0)
    torch.testing.assert_close(slope[~hard], torch.ones_like(slope[~hard]), atol=1e-12, rtol=0)


def test_t_variants_do_not_touch_the_original():
    margin = mf.margins.create("curricularface")
    labels = [label for label, _ in t_variants(margin)]
    assert labels == ["t=0", "t=0.3", "t=0.6", "t=0.9"]
    assert margin.t.item() == 0.0
    assert [v.t for _, v in t_variants(mf.margins.create("npcface", t=1.0))] == [0.5, 1.0, 1.5]


def test_parse_margin_spec():
    margin = parse_margin_spec("mv_softmax:t=0.3,base=arc,adaptive=false")
    assert (margin.t, margin.base, margin.adaptive) == (0.3, "arc", False)
    with pytest.raises(ValueError, match="key=value"):
        parse_margin_spec("arcface:m")


def test_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "nested" / "margins.png"
    assert main(["plot", "margins", "arcface:m=0.3", "curricularface", "sphereface", "--out", str(out), "--json"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 300
    report = json.loads(capsys.readouterr().out)
    assert report["margins"][0] == {"name": "arcface", "s": 64.0, "m": 0.3, "easy_margin": False, "fallback": True,
                                    "gradient": "exact"}
    assert not list(out.parent.glob(".*.tmp"))  # no temporary left behind


def test_cli_unknown_margin_is_one_clear_line(tmp_path, capsys):
    assert main(["plot", "margins", "arcfase", "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "unknown margin 'arcfase'" in error and "curricularface" in error and "Traceback" not in error
    assert not (tmp_path / "x.png").exists()
