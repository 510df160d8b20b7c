"""Acceptance: a local attacker floods three honest nodes while they run dsgd rounds.

The attacker opens 1,000 bogus connections (open/close, garbage bytes, stalled handshakes,
a declared length of 2**31, HELLOs with bad signatures, HELLOs from unknown keys) spread
over the three nodes, at most ``ATTACK_CONCURRENCY`` at a time. Before that, a peer that one
node *does* configure authenticates and then misbehaves (an oversized frame, a bad
signature, a burst over its message rate) until its key is banned.

So that the whole flood meets running nodes on any machine, the nodes' last training waits
(in its worker thread) until the flood is over; every earlier round runs during the flood.
The honest nodes must complete every round, keep their connections to each other, and the
process's resident memory may grow by at most ``MEMORY_BOUND`` over the flood: its peak,
sampled every ``RSS_SAMPLE_INTERVAL`` seconds from ``/proc/self/statm`` during the flood,
against the level once all nodes were connected. (RSS, not tracemalloc: tracemalloc halves
the speed of the very code under attack, and RSS also counts memory outside Python's heap.) Two nodes ban the attacker's IP after
``ip_failures_to_ban`` failures; the third never bans IPs, so it faces the whole flood with
only its handshake limit and timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path

import trio

from p2pfl.config import (
    DataConfig,
    LearnerConfig,
    LimitsConfig,
    MergeConfig,
    NodeConfig,
    PeerConfig,
    PeerExchangeConfig,
)
from p2pfl.errors import HandshakeFailed, NodeClosedError, TransportBroken
from p2pfl.identity import Identity, NodeId
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.node import Node
from p2pfl.runtime.status import parse_metrics
from p2pfl.runtime.transport import FrameStream, handshake
from p2pfl.wire import LENGTH_PREFIX, MessageKind, encode_frame, seal
from tests.runtime.support import GatedLearner

BOGUS_CONNECTIONS = 1000
ATTACK_CONCURRENCY = 128
MEMORY_BOUND = 50 * 1024 * 1024
"""Peak resident-memory growth allowed during the flood."""
RSS_SAMPLE_INTERVAL = 0.05
ROUNDS = 30
HANDSHAKE_TIMEOUT = 2.0
HOLD_TIMEOUT = 4.0
"""How long a stalled attacker connection waits for the node to close it."""
TEST_TIMEOUT = 90.0
ATTACKS = ("open_close", "garbage", "stalled", "oversized", "bad_signature", "wrong_key")


def keys() -> tuple[Identity, list[Identity]]:
    """The authenticated attacker (smallest key, so it is the one that dials) and 3 nodes."""
    identities = sorted(
        (Identity.from_seed(bytes([70 + i]) * 32) for i in range(4)), key=lambda i: i.node_id
    )
    return identities[0], identities[1:]


async def make_nodes(
    tmp_path: Path, attacker: NodeId, honest: list[Identity], gate: threading.Event
) -> list[Node]:
    listeners = [await trio.open_tcp_listeners(0, host="127.0.0.1") for _ in honest]
    ports = [int(ls[0].socket.getsockname()[1]) for ls in listeners]
    nodes = []
    for i, identity in enumerate(honest):
        peers = [
            PeerConfig("127.0.0.1", ports[j], honest[j].node_id)
            for j in range(len(honest))
            if j != i
        ]
        if i == 0:
            peers.append(PeerConfig("127.0.0.1", 9, attacker))  # never dialled: smaller key
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=ports[i],
            key_file=tmp_path / f"node{i}.key",
            startup_timeout=30.0,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            status_host="127.0.0.1" if i == 0 else None,
            limits=LimitsConfig(
                max_handshakes=8,
                ip_failures_to_ban=0 if i == 2 else 10,
                ban_interval=300.0,
                peer_message_rate=50.0,
                peer_message_burst=100,
            ),
            peer_exchange=PeerExchangeConfig(interval=1.0),
            peers=tuple(peers),
            data=DataConfig(
                dataset="digits", partition="iid", num_nodes=len(honest), node_index=i, seed=3
            ),
            learner=LearnerConfig(hidden=[32], lr=0.2, batch_size=32),
            protocol=CoreConfig(mode="dsgd", rounds=ROUNDS, local_steps=20, round_timeout=20.0),
            merge=MergeConfig(rule="weighted"),
        )
        learner = GatedLearner(config.build_learner(), gate, ROUNDS - 1)
        nodes.append(Node(config, identity=identity, listeners=listeners[i], learner=learner))
    return nodes


async def drain(stream: trio.abc.ReceiveStream) -> None:
    """Read and discard until the node closes the connection (or the hold time passes)."""
    with trio.move_on_after(HOLD_TIMEOUT), contextlib.suppress(trio.BrokenResourceError, OSError):
        while await stream.receive_some(65536):
            pass


async def bogus_connection(port: int, attack: str, victim: NodeId) -> None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return
    try:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if attack == "open_close":
                return
            if attack == "garbage":
                await stream.send_all(bytes(range(256)) * 4)
            elif attack == "stalled":
                await stream.send_all(b"\x00\x00")  # half a length prefix, then nothing
            elif attack == "oversized":
                await stream.send_all(LENGTH_PREFIX.pack(2**31) + b"\x00" * 64)
            elif attack == "bad_signature":
                stranger = Identity.generate()
                hello = bytearray(
                    encode_frame(
                        seal(stranger, MessageKind.HELLO, seq=1, round=0, payload=b"n" * 32)
                    )
                )
                hello[-1] ^= 1
                await stream.send_all(bytes(hello))
            elif attack == "wrong_key":
                stranger = Identity.generate()
                with contextlib.suppress(HandshakeFailed, NodeClosedError):
                    await handshake(FrameStream(stream), stranger, expected=victim, timeout=3)
            await drain(stream)
    finally:
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.aclose()


async def flood(ports: list[int], victims: list[NodeId], halfway: trio.Event) -> None:
    slots = trio.Semaphore(ATTACK_CONCURRENCY)

    async def one(index: int) -> None:
        try:
            # Interleaved: every attack on every node, and no wave of one kind at a time.
            attack = ATTACKS[index % len(ATTACKS)]
            target = (index // len(ATTACKS)) % len(ports)
            await bogus_connection(ports[target], attack, victims[target])
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for index in range(BOGUS_CONNECTIONS):
            await slots.acquire()  # at most ATTACK_CONCURRENCY connections at once
            if index == BOGUS_CONNECTIONS // 2:
                halfway.set()
            nursery.start_soon(one, index)


async def misbehaving_peer(attacker: Identity, node: Node) -> list[str]:
    """Authenticate as a configured peer and misbehave until banned; returns what happened."""
    assert node.port is not None
    outcomes = []
    for attempt in itertools.count():
        frames = FrameStream(await trio.open_tcp_stream("127.0.0.1", node.port))
        try:
            try:
                await handshake(frames, attacker, expected=node.node_id, timeout=5)
            except (HandshakeFailed, NodeClosedError):
                outcomes.append("refused")
                return outcomes
            outcomes.append("authenticated")
            if attempt == 0:
                # Let node 0 see all its honest peers first, or it would wait for us to start.
                await node._all_connected.wait()
            with contextlib.suppress(TransportBroken, NodeClosedError, trio.BrokenResourceError):
                if attempt == 0:
                    await frames.stream.send_all(LENGTH_PREFIX.pack(2**31))
                else:
                    ping = seal(attacker, MessageKind.KEEPALIVE, seq=1, round=0, payload=b"")
                    bad = bytearray(encode_frame(ping))
                    bad[-5] ^= 1
                    await frames.stream.send_all(bytes(bad))
                    for _ in range(300):  # far above the burst of 100
                        await frames.send(ping)
                await drain(frames.stream)
        finally:
            await frames.aclose()
    raise AssertionError("unreachable")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def scrape(port: int) -> dict[str, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    values = {}
    for name, labels, value in parse_metrics(body.decode()):
        extra = ",".join(f"{k}={v}" for k, v in labels.items() if k != "node")
        values[f"{name}{{{extra}}}" if extra else name] = value
    return values


async def test_flood_leaves_honest_nodes_completing_their_rounds(tmp_path: Path) -> None:
    attacker, honest = keys()
    gate = threading.Event()
    nodes = await make_nodes(tmp_path, attacker.node_id, honest, gate)
    peak = 0
    halfway, scraped_event = trio.Event(), trio.Event()
    scraped: dict[str, float] = {}

    async def scrape_midway() -> None:
        # The status endpoint answers while its node is under attack.
        await halfway.wait()
        assert nodes[0].status_port is not None
        scraped.update(await scrape(nodes[0].status_port))
        scraped_event.set()

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await trio.sleep(RSS_SAMPLE_INTERVAL)

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            ports = [await nursery.start(node.run) for node in nodes]
            # The misbehaving peer connects first: node 0 waits for all its peers.
            outcomes = await misbehaving_peer(attacker, nodes[0])
            for node in nodes:
                await node._all_connected.wait()
            baseline = rss_bytes()
            start = trio.current_time()
            rounds_before = [len(node.history) for node in nodes]
            async with trio.open_nursery() as attack:
                attack.start_soon(sample_rss)
                attack.start_soon(scrape_midway)
                await flood(ports, [node.node_id for node in nodes], halfway)
                await scraped_event.wait()
                peak = max(peak, rss_bytes())
                attack.cancel_scope.cancel()
            flood_seconds = trio.current_time() - start
            rounds_after = [len(node.history) for node in nodes]
            gate.set()
    growth = peak - baseline
    print(
        f"\nflood: {BOGUS_CONNECTIONS} bogus connections in {flood_seconds:.1f} s; "
        f"rounds done when it began {rounds_before} and ended {rounds_after}; "
        f"peak RSS growth {growth / 2**20:.2f} MiB over {baseline / 2**20:.0f} MiB "
        f"(bound {MEMORY_BOUND / 2**20:.0f} MiB)"
    )
    for node in nodes:
        rejected = {
            k.removeprefix("p2pfl_frames_rejected_total{reason=").rstrip("}"): int(v)
            for k, v in parse_metrics_map(node.render_metrics()).items()
            if k.startswith("p2pfl_frames_rejected_total") and v
        }
        print(
            f"node {node.node_id.short()}: rounds {len(node.history)}, "
            f"ip bans {len(node.ip_bans)}, key bans {len(node.key_bans)}, "
            f"handshakes failed {node.stats['handshakes_failed']}, rejected {rejected}"
        )

    assert outcomes == ["authenticated", "authenticated", "refused"]
    for node in nodes:
        assert node.core.finished
        assert [entry["round"] for entry in node.history] == list(range(ROUNDS))
        # Honest links never broke: every round ended with both honest neighbours connected.
        assert all(entry["peers"] >= 2 for entry in node.history), node.history
        assert node.handshakes_in_progress == 0
    assert growth < MEMORY_BOUND
    # Only the misbehaving peer drew strikes: honest traffic stays within every limit.
    assert [node.metrics.get("strikes_total") for node in nodes] == [3, 0, 0]
    # The flood began while every node still had rounds to run.
    assert max(rounds_before) < ROUNDS // 2, rounds_before
    assert scraped["p2pfl_bans_total{kind=key}"] == 1
    assert scraped["p2pfl_peers_connected"] == 2
    metrics = parse_metrics_map(nodes[0].render_metrics())
    assert metrics["p2pfl_bans_total{kind=key}"] == 1
    assert metrics["p2pfl_frames_rejected_total{reason=rate}"] >= 1
    assert metrics["p2pfl_frames_rejected_total{reason=oversized}"] >= 1
    assert metrics["p2pfl_frames_rejected_total{reason=banned_key}"] == 1
    assert metrics["p2pfl_bans_total{kind=ip}"] >= 1
    assert metrics["p2pfl_frames_rejected_total{reason=banned_ip}"] > 0
    unbanned = parse_metrics_map(nodes[2].render_metrics())
    assert unbanned["p2pfl_bans_total{kind=ip}"] == 0
    assert unbanned["p2pfl_handshakes_failed_total"] > 0
    assert unbanned["p2pfl_frames_rejected_total{reason=oversized}"] > 0
    assert unbanned["p2pfl_frames_rejected_total{reason=bad_signature}"] > 0


def parse_metrics_map(text: str) -> dict[str, float]:
    values = {}
    for name, labels, value in parse_metrics(text):
        extra = ",".join(f"{k}={v}" for k, v in labels.items() if k != "node")
        values[f"{name}{{{extra}}}" if extra else name] = value
    return values
