"""The one pair scorer: FAR levels follow from the impostor count, and the table's TARs are the floor rule's."""

from __future__ import annotations

import numpy as np
import pytest

from marginface.eval import supported_fars, verification_table


@pytest.mark.parametrize(("impostors", "levels"), [
    (9, ()), (99, ()), (100, (0.1,)), (999, (0.1,)), (1000, (0.01, 0.1)), (3000, (0.01, 0.1)),
    (10_000, (0.001, 0.01, 0.1)), (10_000_000, (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
])
def test_a_level_needs_ten_impostors_below_it(impostors, levels):
    assert supported_fars(impostors) == levels


def scan_tar(scores, issame, far):
    """Independent floor rule: the lowest threshold among the impostor scores that accepts at most
    floor(far · N) impostors (strictly above it), then the share of genuine pairs strictly above."""
    impostor = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * impostor.size))
    threshold = impostor[allowed]
    assert (impostor > threshold).sum() <= allowed
    return float((scores[issame] > threshold).mean())


def test_table_reports_the_supported_levels_with_the_floor_rule():
    rng = np.random.default_rng(0)
    issame = np.r_[np.ones(800, bool), np.zeros(1500, bool)]
    scores = np.where(issame, rng.normal(0.6, 0.2, issame.size), rng.normal(0.0, 0.2, issame.size))
    table = verification_table(scores, issame, xnorm=3.5, name="toy")
    assert table["name"] == "toy" and table["pairs"] == 2300 and table["impostors"] == 1500
    assert set(table["tar_at_far"]) == {0.01, 0.1}
    for far, tar in table["tar_at_far"].items():
        assert tar == pytest.approx(scan_tar(scores, issame, far), abs=1e-12)


def test_table_without_genuine_pairs_has_no_tar():
    table = verification_table(np.linspace(-1, 1, 200), np.zeros(200, bool))
    assert table["tar_at_far"] == {} and table["impostors"] == 200
