"""The injected link policy: a down link is neither dialled nor accepted, a link brought up
again is redialled, and a world that cuts a link closes its connection. Two nodes linked in
memory, on trio's MockClock; their first training waits for a gate, so only the
connection timers run."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from p2pfl.config import DataConfig, LearnerConfig, NodeConfig, PeerConfig
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.node import Node
from p2pfl.testing import MemoryLinks, MemoryNetwork
from tests.runtime.support import GatedLearner

DIALLER_PORT, ACCEPTOR_PORT = 7100, 7200
WAIT = 60.0
"""Virtual seconds a condition may take."""


def pair(tmp_path: Path, gate: threading.Event) -> tuple[Node, MemoryLinks, Node, MemoryLinks]:
    """(dialler, its links, acceptor, its links): configured peers; the smaller key dials."""
    a, b = sorted(
        (Identity.from_seed(bytes([120 + i]) * 32) for i in range(2)), key=lambda i: i.node_id
    )
    network = MemoryNetwork()
    built = []
    for identity, port, other, other_port in (
        (a, DIALLER_PORT, b, ACCEPTOR_PORT),
        (b, ACCEPTOR_PORT, a, DIALLER_PORT),
    ):
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=port,
            key_file=tmp_path / f"{port}.key",
            startup_timeout=5.0,
            peers=(PeerConfig("127.0.0.1", other_port, other.node_id),),
            data=DataConfig(dataset="digits", num_nodes=2, node_index=len(built) // 2, seed=1),
            learner=LearnerConfig(hidden=[8]),
            protocol=CoreConfig(mode="dsgd", rounds=10, local_steps=1, round_timeout=30.0),
        )
        links = MemoryLinks(network)
        node = Node(
            config,
            identity=identity,
            learner=GatedLearner(config.build_learner(), gate),
            listeners=[network.listen(port)],
            policy=links,
        )
        built += [node, links]
    dialler, dialler_links, acceptor, acceptor_links = built
    assert isinstance(dialler, Node) and isinstance(dialler_links, MemoryLinks)
    assert isinstance(acceptor, Node) and isinstance(acceptor_links, MemoryLinks)
    return dialler, dialler_links, acceptor, acceptor_links


@asynccontextmanager
async def running(nodes: list[Node], gate: threading.Event) -> AsyncIterator[None]:
    """Run ``nodes`` for the body, then stop them and open the gate of their trainings."""
    async with trio.open_nursery() as nursery:
        try:
            for node in nodes:
                await nursery.start(node.run)
            yield
            for node in nodes:
                node.request_stop("test over")
        finally:
            gate.set()  # a training still waiting would hold the nursery open


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.01)


async def test_a_down_link_is_not_dialled_until_it_is_up_and_a_cut_closes_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gate = threading.Event()
    dialler, links, acceptor, _ = pair(tmp_path, gate)
    links.cut_peers.add(acceptor.node_id)
    async with running([dialler, acceptor], gate):
        await trio.sleep(30.0)  # virtual: the dial loop's backoff runs many times over
        assert links.dials == []
        assert dialler.connected_peers == [] and acceptor.connected_peers == []

        links.cut_peers.clear()  # the world brings the link up: the dial loop reaches it
        await until(lambda: dialler.connected_peers == [acceptor.node_id])
        assert links.dials == [ACCEPTOR_PORT]
        await until(lambda: acceptor.connected_peers == [dialler.node_id])

        links.cut_peers.add(acceptor.node_id)  # and cuts it again
        dialler.close_link(acceptor.node_id)
        await until(lambda: acceptor.connected_peers == [])
        await trio.sleep(30.0)
        assert dialler.connected_peers == [] and links.dials == [ACCEPTOR_PORT]


async def test_a_down_link_is_refused_by_the_acceptor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gate = threading.Event()
    dialler, dialler_links, acceptor, acceptor_links = pair(tmp_path, gate)
    acceptor_links.cut_peers.add(dialler.node_id)
    async with running([dialler, acceptor], gate):
        await until(lambda: acceptor.metrics.get("handshakes_failed_total") >= 2)
        assert acceptor.connected_peers == [] and dialler.connected_peers == []
        assert acceptor.metrics.get("frames_rejected_total", "handshake") >= 2
        assert acceptor.metrics.get("strikes_total") == 0
        assert len(dialler_links.dials) >= 2  # the dialler kept trying, with backoff
        acceptor_links.cut_peers.clear()
        await until(lambda: acceptor.connected_peers == [dialler.node_id])
