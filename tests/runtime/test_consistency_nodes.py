"""DFedSAM-MGS and time-triggered gossip on three real nodes (127.0.0.1): the same cores and
learner settings the simulator runs, over the runtime."""

from __future__ import annotations

from pathlib import Path

from p2pfl.protocol.gossip import GossipCore

from .test_loopback_rates import RoundRecords, loopback_nodes, round_records, run_all

__all__ = ["round_records"]  # the fixture, imported for this module's tests


async def test_sam_with_three_gossip_steps_a_round(
    tmp_path: Path, round_records: RoundRecords
) -> None:
    rounds = 4
    nodes = await loopback_nodes(
        tmp_path, rounds, "\ngossip_steps = 3", learner='\noptimizer = "sam"\nrho = 0.05'
    )
    assert all(node.learner.optimizer.name == "sam" for node in nodes)
    await run_all(nodes)
    for node in nodes:
        assert node.core.finished and node.stats["misbehaviour"] == 0, node.stats
        own = round_records.rounds[node.node_id.short()]
        assert [r["round"] for r in own] == list(range(rounds))
        # every round: 3 exchanges, each closed by both neighbours' models
        assert all(r["received"] == 6 and r["timed_out"] == 0 for r in own), own


async def test_time_triggered_gossip(tmp_path: Path) -> None:
    protocol = '\nperiod = 0.005\nmerge_trigger = "time"\nmerge_interval = 0.02'
    nodes = await loopback_nodes(tmp_path, 60, protocol, mode="gossip")
    await run_all(nodes)
    for node in nodes:
        core = node.core
        assert isinstance(core, GossipCore) and core.timed is not None
        assert core.finished and node.stats["misbehaviour"] == 0, node.stats
        assert core.timed.ticks > 0
        # both neighbours' models were merged with a positive weight
        assert len(core.timed.applied) == 2 and min(core.timed.applied.values()) > 0
