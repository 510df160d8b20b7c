"""Several nodes in one trio run: linked in memory on trio's virtual clock
(:class:`p2pfl.testing.MemoryNetwork`), or over real sockets on 127.0.0.1 where a test needs
what only sockets have (the remote IP of a connection)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from p2pfl.checkpoint import checkpoint_path, load_checkpoint
from p2pfl.config import (
    DataConfig,
    LearnerConfig,
    LimitsConfig,
    MergeConfig,
    NodeConfig,
    PeerConfig,
)
from p2pfl.errors import HandshakeFailed, TransportBroken
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.node import STRIKES_TO_DISCONNECT, Node
from p2pfl.runtime.transport import FrameStream, handshake
from p2pfl.testing import MemoryNetwork
from p2pfl.wire import MessageKind, encode_frame, seal
from tests.runtime.support import bind_nodes, links_on

RUN_TIMEOUT = 90


async def make_nodes(
    tmp_path: Path,
    n: int,
    *,
    rounds: int,
    local_steps: int,
    round_timeout: float,
    edges: list[tuple[int, int]] | None = None,
    mode: CoreConfig | None = None,
    network: MemoryNetwork | None = None,
) -> list[Node]:
    """``n`` nodes on ports bound now, so every address is known before any node runs; their
    protocol is dsgd, or ``mode``'s with the given rounds, steps and timeout. On ``network``
    if given (ports 7400 + i), else on TCP sockets."""
    identities = [Identity.from_seed(bytes([10 + i]) * 32) for i in range(n)]
    ports, listeners = await bind_nodes(n, network, base_port=7400)
    pairs = edges if edges is not None else list(itertools.combinations(range(n), 2))
    neighbours: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in pairs:
        neighbours[a].append(b)
        neighbours[b].append(a)
    nodes = []
    for i in range(n):
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=ports[i],
            key_file=tmp_path / f"node{i}.key",
            checkpoint_dir=tmp_path / f"state{i}",
            startup_timeout=20.0,
            peers=tuple(
                PeerConfig("127.0.0.1", ports[j], identities[j].node_id) for j in neighbours[i]
            ),
            data=DataConfig(
                dataset="digits",
                partition="dirichlet",
                partition_params={"alpha": 0.5},
                num_nodes=n,
                node_index=i,
                seed=7,
            ),
            learner=LearnerConfig(hidden=[32], lr=0.2, batch_size=32),
            protocol=(mode or CoreConfig(mode="dsgd")).replace(
                rounds=rounds,
                local_steps=local_steps,
                round_timeout=round_timeout,
            ),
            merge=MergeConfig(rule="weighted"),
        )
        nodes.append(
            Node(config, identity=identities[i], listeners=listeners[i], policy=links_on(network))
        )
    return nodes


async def test_four_nodes_learn_digits_together(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    rounds = 10
    nodes = await make_nodes(
        tmp_path, 4, rounds=rounds, local_steps=30, round_timeout=20.0, network=MemoryNetwork()
    )
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds: training takes none
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)
    accuracies = []
    for node in nodes:
        assert node.core.finished
        assert [entry["round"] for entry in node.history] == list(range(rounds))
        assert node.history[0]["peers"] == 3  # Started waited for every peer
        accuracies.append(node.history[-1]["test_accuracy"])
        saved = load_checkpoint(checkpoint_path(node.config.checkpoint_dir or tmp_path))
        assert saved.round == rounds
        assert torch.equal(saved.vector, node.core.vector)
        assert node.stats["misbehaviour"] == 0
    print("final test accuracies:", [f"{a:.4f}" for a in accuracies])
    assert min(accuracies) >= 0.80, accuracies
    assert max(accuracies) - min(accuracies) <= 0.05, accuracies


async def test_others_finish_when_one_node_is_killed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    rounds = 8
    nodes = await make_nodes(
        tmp_path, 4, rounds=rounds, local_steps=5, round_timeout=3.0, network=MemoryNetwork()
    )
    victim, survivors = nodes[1], [nodes[0], *nodes[2:]]
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds
        async with trio.open_nursery() as nursery:
            victim_scope = trio.CancelScope()

            async def run_victim() -> None:
                with victim_scope:
                    await victim.run()

            nursery.start_soon(run_victim)
            for node in survivors:
                nursery.start_soon(node.run)
            # Kill the victim abruptly once it has completed two rounds.
            await victim.wait_rounds(2)
            victim_scope.cancel()
    assert not victim.core.finished
    for node in survivors:
        assert node.core.finished
        assert [entry["round"] for entry in node.history] == list(range(rounds))


async def node_with_one_dialling_peer(
    tmp_path: Path,
    seed: int,
    limits: LimitsConfig | None = None,
    network: MemoryNetwork | None = None,
) -> tuple[Identity, Identity, Node]:
    """(peer, own identity, node): a node configured with one peer, which has the smaller
    key (so the peer dials) and an address nothing listens on; on ``network`` if given."""
    a, b = Identity.from_seed(bytes([seed]) * 32), Identity.from_seed(bytes([seed + 1]) * 32)
    peer, own = (a, b) if a.node_id < b.node_id else (b, a)
    [node] = await make_nodes(
        tmp_path, 1, rounds=3, local_steps=1, round_timeout=60.0, network=network
    )
    config = dataclasses.replace(
        node.config,
        peers=(PeerConfig("127.0.0.1", 9, peer.node_id),),
        startup_timeout=60.0,
        limits=limits or node.config.limits,
    )
    return (
        peer,
        own,
        Node(config, identity=own, listeners=node._listeners, policy=links_on(network)),
    )


async def test_peer_sending_bad_frames_is_disconnected_after_three_strikes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, threads_inline: None
) -> None:
    network = MemoryNetwork()
    attacker, victim, node = await node_with_one_dialling_peer(tmp_path, 30, network=network)
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.run)
            frames = FrameStream(network.connect(port))
            await handshake(frames, attacker, expected=victim.node_id)
            bad = bytearray(
                encode_frame(seal(attacker, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"x"))
            )
            bad[-1] ^= 1
            for _ in range(STRIKES_TO_DISCONNECT):
                await frames.stream.send_all(bytes(bad))
            # The node closes the connection: reads end (after the model it sent us, if any).
            with contextlib.suppress(TransportBroken):
                while await frames.receive() is not None:
                    pass
            assert node.stats["wire_errors"] == STRIKES_TO_DISCONNECT
            assert node.stats["misbehaviour"] == STRIKES_TO_DISCONNECT
            node.request_stop("test over")
        await frames.aclose()
    assert node.stop_reason == "test over"


async def test_redials_of_a_banned_key_never_ban_the_ip_it_shares(tmp_path: Path) -> None:
    """A banned peer redialling is refused as a key; the address, which honest peers on the
    same host share, is banned only for failures of unauthenticated connections."""
    limits = LimitsConfig(ip_failures_to_ban=3)
    banned, victim, node = await node_with_one_dialling_peer(tmp_path, 32, limits=limits)
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.run)
            now = trio.current_time()
            node.key_bans.ban(banned.node_id, now + 300.0, now=now)
            for _ in range(3 * limits.ip_failures_to_ban):
                frames = FrameStream(await trio.open_tcp_stream("127.0.0.1", port))
                with pytest.raises(HandshakeFailed):
                    await handshake(frames, banned, expected=victim.node_id, timeout=5)
                await frames.aclose()
            assert len(node.ip_bans) == 0
            assert node.metrics.get("frames_rejected_total", "banned_key") == 9
            # Failures of unauthenticated connections still ban the address.
            for _ in range(limits.ip_failures_to_ban):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"\x00\x00\x00\x05garbage")
                with contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(65536):
                        pass
                await stream.aclose()
            assert node.ip_bans.is_banned("127.0.0.1", trio.current_time())
            node.request_stop("test over")
