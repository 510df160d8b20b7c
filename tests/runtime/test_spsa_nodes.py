"""``spsa`` between real nodes: three nodes over sockets on 127.0.0.1 exchange one-byte
projections and end with bit-identical models."""

from __future__ import annotations

from pathlib import Path

import torch
import trio

from p2pfl.protocol import CoreConfig
from p2pfl.protocol.spsa import SpsaCore, model_digest

from .test_nodes import RUN_TIMEOUT, make_nodes


async def test_three_nodes_run_spsa_to_one_model(tmp_path: Path) -> None:
    steps = 12
    mode = CoreConfig(mode="spsa", spsa_samples=4, spsa_lr=0.05, spsa_clip=4.0)
    nodes = await make_nodes(
        tmp_path, 3, rounds=steps, local_steps=1, round_timeout=20.0, mode=mode
    )
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    cores = [node.core for node in nodes]
    assert all(isinstance(core, SpsaCore) and core.finished for core in cores)
    assert all(torch.equal(core.vector, cores[0].vector) for core in cores)
    # The shared model moved away from the common start.
    start = nodes[0].learner.initial_vector()
    assert not torch.equal(cores[0].vector, start)
    for node in nodes:
        assert [entry["round"] for entry in node.history] == list(range(steps))
        assert node.stats["misbehaviour"] == 0
        core = node.core
        assert isinstance(core, SpsaCore)
        assert core.mismatches == 0
        assert core.digest == model_digest(cores[0].vector)
