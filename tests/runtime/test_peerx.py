"""Peer exchange: the payload format, its bounds, and the bounded book of learned peers;
between nodes linked in memory, on trio's MockClock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.config import DataConfig, LearnerConfig, NodeConfig, PeerConfig, PeerExchangeConfig
from p2pfl.errors import DecodeError
from p2pfl.identity import Identity, NodeId
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.node import Node
from p2pfl.runtime.peerx import (
    PeerAd,
    PeerBook,
    decode_ads,
    encode_ads,
    parse_address,
    seal_ads,
)
from p2pfl.testing import MemoryLinks, MemoryNetwork
from p2pfl.wire import MessageKind, decode_frame, encode_frame
from tests.runtime.support import GatedLearner

OWN = Identity.from_seed(bytes([1]) * 32)
NEIGHBOUR = Identity.from_seed(bytes([2]) * 32)


def node(i: int) -> NodeId:
    return NodeId(i.to_bytes(32, "big"))


def ads(count: int, start: int = 100) -> list[PeerAd]:
    return [PeerAd(f"10.0.{i // 250}.{i % 250 + 1}:7000", node(start + i)) for i in range(count)]


def test_ads_round_trip_through_a_signed_frame() -> None:
    sent = ads(5)
    envelope = decode_frame(encode_frame(seal_ads(NEIGHBOUR, sent, seq=7)))
    assert envelope.kind is MessageKind.PEER_EXCHANGE
    assert envelope.sender == NEIGHBOUR.node_id
    assert decode_ads(envelope.payload, max_per_message=5, max_payload_bytes=4096) == sent


def test_too_many_entries_is_an_error() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        decode_ads(encode_ads(ads(6)), max_per_message=5, max_payload_bytes=1 << 20)


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="bytes exceeds"):
        decode_ads(b"\x90" + b"x" * 5000, max_per_message=5, max_payload_bytes=4096)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb({"a": 1}),
        msgpack.packb("peers"),
        b"\xc1",
        msgpack.packb([[1] * 10_000]),
        msgpack.packb([msgpack.ExtType(1, b"x")]),
    ],
)
def test_malformed_lists_are_decode_errors(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_ads(payload, max_per_message=8, max_payload_bytes=1 << 20)


def test_bad_entries_are_skipped() -> None:
    good = PeerAd("127.0.0.1:7001", node(5))
    payload = msgpack.packb(
        [
            [good.address, good.node_id.raw],
            ["127.0.0.1:0", node(6).raw],  # port 0
            ["no-port", node(7).raw],
            ["h:1", b"short"],
            ["h:1"],
            "not a pair",
            ["http://x/:80", node(8).raw],
        ],
        use_bin_type=True,
    )
    assert decode_ads(payload, max_per_message=8, max_payload_bytes=4096) == [good]


@given(st.binary(max_size=512))
def test_arbitrary_payloads_raise_only_decode_error(payload: bytes) -> None:
    try:
        result = decode_ads(payload, max_per_message=8, max_payload_bytes=4096)
    except DecodeError:
        return
    assert len(result) <= 8


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7101") == ("127.0.0.1", 7101)
    assert parse_address("[::1]:7101") == ("::1", 7101)
    for bad in ("", ":1", "h:", "h:65536", "h:-1", "h:0", "a b:1", "h:1x", "x" * 300 + ":1"):
        assert parse_address(bad) is None, bad


def test_book_skips_self_advertiser_and_configured_and_keeps_the_first_address() -> None:
    book = PeerBook(max_known=10)
    configured = node(50)
    offered = [
        PeerAd("10.0.0.1:1", OWN.node_id),
        PeerAd("10.0.0.2:1", NEIGHBOUR.node_id),
        PeerAd("10.0.0.3:1", configured),
        PeerAd("10.0.0.4:1", node(51)),
    ]
    new = book.learn(
        offered,
        advertiser=NEIGHBOUR.node_id,
        own=OWN.node_id,
        now=1.0,
        skip=lambda key: key == configured,
    )
    assert new == [offered[3]]
    assert book.rejected == 3
    # A second voice does not move a known peer.
    again = book.learn(
        [PeerAd("6.6.6.6:1", node(51))], advertiser=node(52), own=OWN.node_id, now=2.0
    )
    assert again == []
    learned = book.get(node(51))
    assert learned is not None and learned.ad.address == "10.0.0.4:1"
    assert learned.learned_from == NEIGHBOUR.node_id


def test_book_is_bounded_and_forgets_the_oldest() -> None:
    book = PeerBook(max_known=16)
    for batch in range(100):
        book.learn(ads(10, start=1000 + 10 * batch), advertiser=node(1), own=node(2), now=batch)
        assert len(book) <= 16
    assert book.evicted == 1000 - 16
    assert node(1000 + 999) in book and node(1000) not in book


def test_book_of_size_zero_learns_nothing() -> None:
    book = PeerBook(max_known=0)
    assert book.learn(ads(3), advertiser=node(1), own=node(2), now=0.0) == []
    assert len(book) == 0


# -- between running nodes ------------------------------------------------------------------


async def line_of_nodes(
    tmp_path: Path, network: MemoryNetwork, gate: threading.Event, *, accept_unknown: bool
) -> list[Node]:
    """Three nodes in a line 0 - 1 - 2 on ``network``: the ends know only the middle. Their
    first training waits for ``gate``: peer exchange runs on its own timers, in virtual time."""
    identities = sorted(
        (Identity.from_seed(bytes([90 + i]) * 32) for i in range(3)), key=lambda i: i.node_id
    )
    ports = [7000 + i for i in range(3)]
    edges = {0: [1], 1: [0, 2], 2: [1]}
    nodes = []
    for i, identity in enumerate(identities):
        config = NodeConfig(
            listen_host="127.0.0.1",
            listen_port=ports[i],
            key_file=tmp_path / f"node{i}.key",
            startup_timeout=20.0,
            peer_exchange=PeerExchangeConfig(interval=0.2, accept_unknown_peers=accept_unknown),
            peers=tuple(PeerConfig("127.0.0.1", ports[j], identities[j].node_id) for j in edges[i]),
            data=DataConfig(dataset="digits", num_nodes=3, node_index=i, seed=1),
            learner=LearnerConfig(hidden=[8]),
            protocol=CoreConfig(mode="dsgd", rounds=1000, local_steps=1, round_timeout=30.0),
        )
        learner = GatedLearner(config.build_learner(), gate)
        listeners = [network.listen(ports[i])]
        policy = MemoryLinks(network)
        nodes.append(
            Node(config, identity=identity, listeners=listeners, learner=learner, policy=policy)
        )
    return nodes


async def run_until(nodes: list[Node], done: Callable[[], bool], gate: threading.Event) -> None:
    """Run ``nodes`` until ``done()`` (checked every 50 virtual ms), then stop them.

    The time bound covers the wait only: once the gate opens, the clock would jump to any
    pending deadline while the trainings finish in their threads."""
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        with trio.fail_after(60):
            while not done():
                await trio.sleep(0.05)
        for node in nodes:
            node.request_stop("test over")
        gate.set()


async def test_ends_of_a_line_learn_each_other_but_do_not_connect_by_default(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gate = threading.Event()
    first, middle, last = await line_of_nodes(tmp_path, MemoryNetwork(), gate, accept_unknown=False)
    await run_until(
        [first, middle, last],
        lambda: last.node_id in first.peer_book and first.node_id in last.peer_book,
        gate,
    )
    learned = first.peer_book.get(last.node_id)
    assert learned is not None
    assert learned.learned_from == middle.node_id
    assert learned.ad.address == f"127.0.0.1:{last.port}"
    assert last.node_id not in first.connected_peers
    assert first.metrics.get("peer_exchange_learned_total") == 1
    assert len(middle.peer_book) == 0  # it configures both ends itself


async def test_with_accept_unknown_peers_the_ends_connect(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gate = threading.Event()
    first, middle, last = await line_of_nodes(tmp_path, MemoryNetwork(), gate, accept_unknown=True)
    seen: list[float] = []

    def connected() -> bool:
        seen.append(first.metrics.get("peers_connected"))
        return last.node_id in first.connected_peers and first.node_id in last.connected_peers

    await run_until([first, middle, last], connected, gate)
    # The learned peer is connected (but is not a neighbour of the protocol core).
    assert seen[-1] == 2
    assert first.stats["misbehaviour"] == 0 and last.stats["misbehaviour"] == 0
