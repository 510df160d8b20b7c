"""fedavg between runtime nodes: one server and three clients, linked in memory on trio's
virtual clock."""

from __future__ import annotations

from pathlib import Path

import torch
import trio
import trio.testing

from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.protocol.fedavg import FedAvgClient, FedAvgServer
from p2pfl.testing import MemoryNetwork

from .test_nodes import RUN_TIMEOUT, make_nodes


async def test_a_server_and_three_clients_run_fedavg(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    rounds = 10
    server_key = Identity.from_seed(bytes([10]) * 32).node_id.hex()  # make_nodes' node 0
    mode = CoreConfig(mode="fedavg", server=server_key, sample_size=3)
    nodes = await make_nodes(
        tmp_path,
        4,
        rounds=rounds,
        local_steps=30,
        round_timeout=20.0,
        edges=[(0, 1), (0, 2), (0, 3)],
        mode=mode,
        network=MemoryNetwork(),
    )
    server, clients = nodes[0], nodes[1:]
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    assert isinstance(server.core, FedAvgServer)
    assert server.core.finished
    assert [entry["round"] for entry in server.history] == list(range(rounds))
    print("global model accuracy per round:", [e["test_accuracy"] for e in server.history])
    # Dirichlet(0.5) over four shares, the server's unused: 0.79 measured after 10 rounds
    assert server.history[-1]["test_accuracy"] >= 0.75
    assert server.history[-1]["test_accuracy"] >= server.history[0]["test_accuracy"] + 0.4
    for client in clients:
        assert isinstance(client.core, FedAvgClient)
        assert client.core.finished  # the final model reached it
        assert torch.equal(client.core.vector, server.core.vector)
        assert client.history == []  # only the server holds (and checkpoints) the global model
        assert client.stats["misbehaviour"] == 0
