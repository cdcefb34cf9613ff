"""Parameter and FLOP counts: recomputed by hand from the architectures, and against published figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marginface as mf
from marginface.errors import ConfigError


def _iresnet_params_by_formula(stage_blocks, embedding_size, feature_map=7 * 7):
    """Count IResNet parameters from the IR design, block by block (BN = 2 per channel, PReLU = 1)."""

    def block(in_ch, ch, shortcut):
        count = 2 * in_ch + 9 * in_ch * ch + 2 * ch + ch + 9 * ch * ch + 2 * ch
        return count + (in_ch * ch + 2 * ch if shortcut else 0)

    total = 3 * 64 * 9 + 2 * 64 + 64  # stem conv, BN, PReLU
    in_ch = 64
    for ch, blocks in zip((64, 128, 256, 512), stage_blocks, strict=True):
        total += block(in_ch, ch, True) + (blocks - 1) * block(ch, ch, False)
        in_ch = ch
    total += 2 * 512  # BN2d before dropout
    total += 512 * feature_map * embedding_size + embedding_size  # fc weight + bias
    total += 2 * embedding_size  # BatchNorm1d (the frozen scale is still a parameter)
    return total


def _mobilefacenet_params_by_formula(embedding_size):
    def conv_bn(c_in, c_out, k, groups=1, act=True):
        return c_in // groups * c_out * k * k + 2 * c_out + (c_out if act else 0)

    total = conv_bn(3, 64, 3) + conv_bn(64, 64, 3, groups=64)
    c_in = 64
    for t, c, n, _ in ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)):
        for _ in range(n):
            hidden = c_in * t
            total += conv_bn(c_in, hidden, 1) + conv_bn(hidden, hidden, 3, groups=hidden)
            total += conv_bn(hidden, c, 1, act=False)
            c_in = c
    total += conv_bn(c_in, 512, 1) + conv_bn(512, 512, 7, groups=512, act=False)
    return total + 512 * embedding_size + 2 * embedding_size


STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


@pytest.mark.parametrize("depth", sorted(STAGES))
def test_iresnet_parameter_count_matches_formula(depth):
    with torch.device("meta"):
        model = mf.models.create(f"iresnet{depth}", embedding_size=512)
    assert mf.models.count_parameters(model) == _iresnet_params_by_formula(STAGES[depth], 512)
    # Only the BatchNorm1d scale (512 elements) is frozen, as in insightface.
    assert mf.models.count_parameters(model) - mf.models.count_parameters(model, trainable_only=True) == 512
    assert not model.features.weight.requires_grad


@pytest.mark.parametrize("depth, published_millions", [(50, 43.59), (100, 65.16)])
def test_iresnet_matches_published_sizes(depth, published_millions):
    with torch.device("meta"):
        model = mf.models.create(f"iresnet{depth}")
    assert mf.models.count_parameters(model) / 1e6 == pytest.approx(published_millions, abs=0.01)


def test_iresnet_fc_follows_input_size():
    with torch.device("meta"):
        model = mf.models.create("iresnet18", embedding_size=128, input_size=(128, 96))
    assert model.fc.in_features == 512 * (128 // 16) * (96 // 16)
    expected = _iresnet_params_by_formula(STAGES[18], 128, feature_map=8 * 6)
    assert mf.models.count_parameters(model) == expected


@pytest.mark.parametrize("embedding_size", [128, 512])
def test_mobilefacenet_parameter_count(embedding_size):
    model = mf.models.create("mobilefacenet", embedding_size=embedding_size)
    assert mf.models.count_parameters(model) == _mobilefacenet_params_by_formula(embedding_size)


def test_mobilefacenet_matches_the_paper():
    # Chen et al. 2018, table 2: 0.99M parameters and 221M MAdds for the 128-d model at 112x112.
    model = mf.models.create("mobilefacenet", embedding_size=128)
    assert mf.models.count_parameters(model) / 1e6 == pytest.approx(0.99, rel=0.02)
    assert mf.models.count_flops(model).macs / 1e6 == pytest.approx(221, rel=0.01)


def test_small_cnn_parameter_count():
    model = mf.models.create("small_cnn", embedding_size=128)  # 56x56: maps 28-14-7-7-4-4
    widths = (3, 32, 64, 64, 128, 128, 128)
    convs = sum(9 * a * b + 3 * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert mf.models.count_parameters(model) == convs + 128 * 4 * 4 * 128 + 128 + 2 * 128


def test_flop_counter_on_a_hand_computed_net():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True),  # 8x8 -> 4x4
        nn.BatchNorm2d(4),
        nn.PReLU(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
        nn.Flatten(),
        nn.Linear(64, 10),
        nn.BatchNorm1d(10),
    )
    count = mf.models.count_flops(net, input_size=8)
    conv1 = 4 * 4 * 4 * (3 * 3 * 3)  # 64 outputs x 27 inputs each = 1728 MACs
    depthwise = 64 * 9  # each output sees its own channel's 3x3 window
    linear = 10 * 64
    assert count.macs == conv1 + depthwise + linear == 2944
    expected_flops = (2 * conv1 + 64) + 2 * 64 + 64 + 2 * depthwise + (2 * linear + 10) + 2 * 10
    assert count.flops == expected_flops
    assert [layer.kind for layer in count.layers] == [
        "Conv2d",
        "BatchNorm2d",
        "PReLU",
        "Conv2d",
        "Linear",
        "BatchNorm1d",
    ]
    assert count.layers[0].output_shape == (4, 4, 4)
    assert net.training  # the training flag is restored


def test_flop_counter_iresnet50_published_figure_on_meta():
    with torch.device("meta"):
        model = mf.models.create("iresnet50")
    # arcface_torch lists 6.3 "GFLOPs" (multiply-accumulates) for R50 at 112x112.
    assert mf.models.count_flops(model).gmacs == pytest.approx(6.3, abs=0.05)


def test_flop_counter_scales_with_input_area():
    def macs(side):
        model = mf.models.create("small_cnn", embedding_size=128, input_size=side, channels=[8, 8], strides=[1, 1])
        return mf.models.count_flops(model).macs

    conv = (3 * 8 + 8 * 8) * 9  # MACs per output pixel of the two stride-1 convolutions
    assert macs(16) == 16 * 16 * conv + 128 * 8 * 16 * 16
    assert macs(32) == 32 * 32 * conv + 128 * 8 * 32 * 32


def test_count_flops_without_input_size():
    with pytest.raises(ConfigError, match="input_size"):
        mf.models.count_flops(nn.Linear(3, 3))
