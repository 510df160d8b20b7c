"""The public in-memory links for runtime nodes, as the README and the docstring show them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfl.config import DataConfig, LearnerConfig, NodeConfig, PeerConfig
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.node import Node
from p2pfl.testing import MemoryLinks, MemoryNetwork

PEER = Identity.from_seed(bytes([140]) * 32)


async def test_a_connect_reaches_the_listener_on_its_port_or_is_refused() -> None:
    network = MemoryNetwork()
    with pytest.raises(ConnectionRefusedError) as refused:
        network.connect(7001)
    assert refused.value.errno == errno.ECONNREFUSED
    listener = network.listen(7001)
    ours = network.connect(7001)
    theirs = await listener.accept()
    await ours.send_all(b"ping")
    assert await theirs.receive_some(4) == b"ping"
    await theirs.send_all(b"pong")
    assert await ours.receive_some(4) == b"pong"
    await listener.aclose()
    with pytest.raises(ConnectionRefusedError):
        network.connect(7001)  # a closed port refuses, as a node that left
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
    network.listen(7001)  # the port is bound again (a node that joins again)
    network.connect(7001)


async def test_links_dial_through_the_network_and_cut_peers_are_down() -> None:
    network = MemoryNetwork()
    listener = network.listen(7002)
    links = MemoryLinks(network)
    assert links.link_up(PEER.node_id)
    links.cut_peers.add(PEER.node_id)
    assert not links.link_up(PEER.node_id)
    stream = await links.open_stream("any host", 7002)
    await stream.send_all(b"x")
    assert await (await listener.accept()).receive_some(1) == b"x"
    with pytest.raises(ConnectionRefusedError):
        await links.open_stream("any host", 7003)
    assert links.dials == [7002, 7003]


def node_config(
    tmp_path: Path, index: int, port: int, other_port: int, other: Identity
) -> NodeConfig:
    return NodeConfig(
        listen_host="127.0.0.1",
        listen_port=port,
        key_file=tmp_path / f"{index}.key",
        startup_timeout=10.0,
        peers=(PeerConfig("127.0.0.1", other_port, other.node_id),),
        data=DataConfig(dataset="digits", num_nodes=2, node_index=index, seed=1),
        learner=LearnerConfig(hidden=[8]),
        protocol=CoreConfig(mode="dsgd", rounds=3, local_steps=1, round_timeout=30.0),
    )


async def test_readme_example_two_nodes_run_their_rounds_in_virtual_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    a, b = Identity.from_seed(bytes([141]) * 32), Identity.from_seed(bytes([142]) * 32)
    config_a = node_config(tmp_path, 0, 7001, 7002, b)
    config_b = node_config(tmp_path, 1, 7002, 7001, a)
    network = MemoryNetwork()
    nodes = [
        Node(
            config, identity=identity, listeners=[network.listen(port)], policy=MemoryLinks(network)
        )
        for config, identity, port in ((config_a, a, 7001), (config_b, b, 7002))
    ]
    started = trio.current_time()
    with trio.fail_after(60):  # virtual seconds
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    assert all(node.core.finished for node in nodes)
    for node in nodes:
        # every round merged the other node's model: the link carried both ways
        assert [entry["peers"] for entry in node.history] == [1, 1, 1]
    # training takes no virtual time and nothing waited for a timeout
    assert trio.current_time() - started < 30.0
