"""Compressed updates in the simulator: the links, the metrics and the footprint count them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from p2pfl.errors import ConfigError
from sim.footprint import estimate
from sim.run import build_engine, summarise
from sim.scenario import parse_scenario

SmallDocument = Callable[..., dict[str, Any]]


def _run(document: dict[str, Any]) -> tuple[int, int, float, int]:
    """(bytes sent, bytes delivered over the links, mean final accuracy, rejected)."""
    scenario = parse_scenario(document)
    engine = build_engine(scenario)
    engine.link_log = []
    engine.run()
    sent = sum(traffic.bytes_sent for traffic in engine.traffic)
    on_links = sum(size for _, _, _, size in engine.link_log)
    summary = summarise(scenario, engine, engine.now, 0.0)
    return sent, on_links, summary["mean_test_accuracy"], summary["rejected"]


def _document(small_document: SmallDocument, **protocol: Any) -> dict[str, Any]:
    # A wider model than the fixture's, so payloads outweigh the ~200-byte headers.
    return small_document(
        rounds=4,
        learner={"hidden": [256], "lr": 0.1, "batch_size": 16, "local_steps": 5},
        protocol={"mode": "dsgd", **protocol},
    )


def test_int8_sends_under_30_percent_of_dense_and_learns_alike(
    small_document: SmallDocument,
) -> None:
    dense = _run(_document(small_document))
    int8 = _run(_document(small_document, codec="int8"))
    assert int8[0] <= 0.3 * dense[0], (int8, dense)
    assert int8[1] == int8[0] and dense[1] == dense[0]  # every frame delivered, as counted
    assert abs(int8[2] - dense[2]) <= 0.05
    assert int8[3] == dense[3] == 0


@pytest.mark.parametrize("codec", ["topk", "fedzip"])
def test_sparse_delta_codecs_run_without_rejections(
    small_document: SmallDocument, codec: str
) -> None:
    dense = _run(_document(small_document))
    sparse = _run(_document(small_document, codec=codec, codec_fraction=0.05, keyframe_every=0))
    # One keyframe per node, then 5% deltas: well under half of dense over 4 rounds.
    assert sparse[0] < 0.5 * dense[0], (sparse, dense)
    assert sparse[3] == 0


def test_delta_codecs_are_refused_with_adversaries(small_document: SmallDocument) -> None:
    document = _document(small_document, codec="topk")
    document["adversaries"] = [{"attack": "sign_flip", "count": 1}]
    with pytest.raises(ConfigError, match="protocol.codec") as refused:
        parse_scenario(document)
    assert ": adversaries = [" in str(refused.value)  # the key, not "(table)"


def test_the_footprint_counts_the_codec_state(small_document: SmallDocument) -> None:
    sizes = {
        codec: estimate(parse_scenario(_document(small_document, codec=codec))).models  # type: ignore[union-attr]
        for codec in ("dense", "int8", "topk")
    }
    assert sizes["dense"] < sizes["int8"] < sizes["topk"]
