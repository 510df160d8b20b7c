"""Compressed updates between real nodes: three trio nodes over 127.0.0.1 with sparse deltas."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pfl.protocol import CoreConfig
from tests.runtime.test_nodes import RUN_TIMEOUT, make_nodes


async def test_three_nodes_finish_with_topk_deltas(tmp_path: Path) -> None:
    rounds = 6
    config = CoreConfig(mode="dsgd", codec="topk", codec_fraction=0.1, keyframe_every=3)
    nodes = await make_nodes(
        tmp_path, 3, rounds=rounds, local_steps=20, round_timeout=20.0, mode=config
    )
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    for node in nodes:
        assert node.core.finished
        assert [entry["round"] for entry in node.history] == list(range(rounds))
        assert node.stats["misbehaviour"] == 0
        # Both neighbours' delta chains were followed to the end (keyframes every 3 links).
        assert len(node.core._chains) == 2
        assert node.history[-1]["test_accuracy"] >= 0.6
