"""The compressed-updates experiment's arithmetic: target, bytes to it, ratios, the pick."""

from __future__ import annotations

import pytest

from sim.experiments.codecs import summarise


def test_summary_picks_the_most_compressing_codec_within_one_point() -> None:
    # (round, bytes so far, mean accuracy); two seeds each.
    curves = {
        "dense": [[(0, 100, 0.5), (1, 200, 0.8)], [(0, 100, 0.5), (1, 200, 0.8)]],
        "small": [[(0, 100, 0.3), (1, 110, 0.795)], [(0, 100, 0.3), (1, 110, 0.795)]],
        "tiny": [[(0, 10, 0.3), (1, 12, 0.7)], [(0, 10, 0.3), (1, 12, 0.75)]],
    }
    summary = summarise(curves)  # type: ignore[arg-type]
    assert summary["target"] == pytest.approx(0.72)
    rows = {row["codec"]: row for row in summary["rows"]}
    assert rows["small"]["ratio"] == pytest.approx(200 / 110)
    assert rows["small"]["ratio_after_first"] == pytest.approx(10.0)
    assert rows["dense"]["bytes_to_target"] == 200
    # "tiny" reaches the target in one seed only: no mean bytes-to-target for it.
    assert rows["tiny"]["bytes_to_target"] is None
    assert rows["tiny"]["seeds_reaching_target"] == 1
    assert summary["best_within_1pt"]["codec"] == "small"
