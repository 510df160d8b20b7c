"""Cores that talk beyond their neighbours in the trio runtime: ``modest`` with a
``[[bootstrap]]`` list, and membership-sampled ``gossip`` whose addresses come from peer
exchange; non-neighbours are reached through connections dialled on demand. Linked in memory
on trio's virtual clock, except where the pace in real time is the point (over 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from p2pfl.config import (
    DataConfig,
    LearnerConfig,
    MergeConfig,
    NodeConfig,
    PeerConfig,
    PeerExchangeConfig,
)
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.protocol.membership import Status
from p2pfl.protocol.modest import ModestCore
from p2pfl.runtime.node import Node
from p2pfl.testing import MemoryNetwork
from tests.runtime.support import bind_nodes, links_on

RUN_TIMEOUT = 55
N = 6
ROUNDS = 10


async def modest_nodes(
    tmp_path: Path,
    *,
    rounds: int = ROUNDS,
    local_steps: int = 20,
    network: MemoryNetwork | None = None,
) -> list[Node]:
    """N modest nodes on a ring, each knowing everyone's address; on ``network`` if given,
    else over TCP."""
    identities = [Identity.from_seed(bytes([60 + i]) * 32) for i in range(N)]
    ports, listeners = await bind_nodes(N, network, base_port=7500)
    everyone = tuple(PeerConfig("127.0.0.1", ports[i], identities[i].node_id) for i in range(N))
    protocol = CoreConfig(
        mode="modest",
        rounds=rounds,
        local_steps=local_steps,
        sample_size=3,
        aggregators=1,
        min_models=2,
        ping_timeout=1.0,
        aggregation_timeout=3.0,
        ack_timeout=4.0,
        view_entries=8,
    )
    nodes = []
    for i in range(N):
        ring = [(i - 1) % N, (i + 1) % N]
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=ports[i],
            key_file=tmp_path / f"node{i}.key",
            startup_timeout=10.0,
            peers=tuple(everyone[j] for j in ring),
            bootstrap=everyone,  # one shared list: a node skips its own entry
            data=DataConfig(
                dataset="digits",
                partition="dirichlet",
                partition_params={"alpha": 0.5},
                num_nodes=N,
                node_index=i,
                seed=11,
            ),
            learner=LearnerConfig(hidden=[32], lr=0.1, batch_size=32),
            protocol=protocol,
            merge=MergeConfig(rule="mean"),
        )
        nodes.append(
            Node(config, identity=identities[i], listeners=listeners[i], policy=links_on(network))
        )
    return nodes


async def run_until_one_finishes(nodes: list[Node]) -> None:
    """Run every node; stop them all once one finished. Nodes not sampled at the end never
    hold the last model and stay idle, as in MoDeST: once one node finished, the run is over."""
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run(node: Node) -> None:
                await node.run()
                done.set()

            for node in nodes:
                nursery.start_soon(run, node)
            await done.wait()
            for node in nodes:
                node.request_stop("run over")


async def test_six_modest_nodes_learn_through_on_demand_connections(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    nodes = await modest_nodes(tmp_path, network=MemoryNetwork())
    await run_until_one_finishes(nodes)
    history = sorted(
        (entry["round"], entry["test_accuracy"]) for node in nodes for entry in node.history
    )
    rounds_seen = {round_ for round_, _ in history}
    assert rounds_seen == set(range(ROUNDS)), rounds_seen
    first = max(acc for round_, acc in history if round_ == 0)
    last = max(acc for round_, acc in history if round_ == ROUNDS - 1)
    print(f"accuracy after round 0: {first:.3f}, after round {ROUNDS - 1}: {last:.3f}")
    assert last > first + 0.05 and last > 0.6, (first, last)
    assert sum(node.stats["misbehaviour"] for node in nodes) == 0
    assert sum(node.stats["dials_on_demand"] for node in nodes) > 0
    assert any(node.core.finished for node in nodes)


async def test_modest_at_dozens_of_rounds_a_second_draws_no_strikes(tmp_path: Path) -> None:
    """Issue 12: the rate limit fits modest's pace too (one local step: ~50 rounds/s here)."""
    rounds = 150
    nodes = await modest_nodes(tmp_path, rounds=rounds, local_steps=1)
    await run_until_one_finishes(nodes)
    assert any(node.core.round == rounds for node in nodes)
    assert [node.stats["misbehaviour"] for node in nodes] == [0] * N


async def test_membership_gossip_reaches_peers_learnt_by_peer_exchange(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    # a line 0 - 1 - 2 - 3 without bootstrap lists: keys spread with the membership views,
    # addresses with peer exchange, and pushes go beyond the neighbours
    n, rounds = 4, 12
    identities = [Identity.from_seed(bytes([80 + i]) * 32) for i in range(n)]
    network = MemoryNetwork()
    ports, listeners = await bind_nodes(n, network, base_port=7600)
    address = [PeerConfig("127.0.0.1", ports[i], identities[i].node_id) for i in range(n)]
    nodes = []
    for i in range(n):
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=ports[i],
            key_file=tmp_path / f"g{i}.key",
            startup_timeout=10.0,
            peers=tuple(address[j] for j in (i - 1, i + 1) if 0 <= j < n),
            peer_exchange=PeerExchangeConfig(interval=0.2),
            data=DataConfig(dataset="digits", num_nodes=n, node_index=i, seed=3),
            learner=LearnerConfig(hidden=[16], lr=0.1, batch_size=32),
            protocol=CoreConfig(
                mode="gossip",
                rounds=rounds,
                local_steps=5,
                period=0.25,
                fanout=1,
                peer_sampling="membership",
                view_entries=4,
            ),
            merge=MergeConfig(rule="mean"),
        )
        nodes.append(
            Node(config, identity=identities[i], listeners=listeners[i], policy=links_on(network))
        )
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    for node in nodes:
        assert node.core.finished
        assert [entry["round"] for entry in node.history] == list(range(rounds))
        assert node.stats["misbehaviour"] == 0
    assert sum(node.stats["dials_on_demand"] for node in nodes) > 0


async def test_a_node_stopped_gracefully_announces_its_leave_to_its_peers(
    tmp_path: Path,
) -> None:
    """request_stop (what SIGTERM calls) hands the core LeaveRequested and sends its goodbye
    before the connections close: every other node holds the leaver's signed LEAVE and drops
    it from its committees, and the run goes on without it."""
    rounds = 8
    nodes = await modest_nodes(tmp_path, rounds=rounds, local_steps=1)
    leaver = nodes[-1]
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run(node: Node) -> None:
                await node.run()
                if node is not leaver:
                    done.set()

            for node in nodes:
                nursery.start_soon(run, node)
            async with trio.open_nursery() as watchers:
                for node in nodes:  # the run is under way once some node completed a round
                    watchers.start_soon(_first_round, node, watchers.cancel_scope)
            leaver.request_stop("leaving")
            await done.wait()  # another node ran all its rounds
            for node in nodes:
                node.request_stop("run over")
    assert leaver.left and leaver.core.finished and leaver.stop_reason == "leaving"
    assert leaver.core.round < rounds
    leaver_id = leaver.node_id
    for node in nodes[:-1]:
        core = node.core
        assert isinstance(core, ModestCore)
        advert = core.membership.advert(leaver_id)
        assert advert is not None and advert.status is Status.LEAVE
        assert leaver_id not in core.membership.candidates(core.round)
    assert any(node.core.round == rounds for node in nodes[:-1])


async def _first_round(node: Node, scope: trio.CancelScope) -> None:
    await node.wait_rounds(1)
    scope.cancel()
