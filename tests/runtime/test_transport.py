"""Framing, the nonce handshake and per-peer send queues, over in-memory trio streams."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from p2pfl.errors import (
    BadSignature,
    FrameTooLarge,
    HandshakeFailed,
    NodeClosedError,
    TransportBroken,
    WireError,
)
from p2pfl.identity import Identity, NodeId
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.transport import NONCE_BYTES, FrameStream, handshake
from p2pfl.wire import (
    LENGTH_PREFIX,
    Envelope,
    Limits,
    MessageKind,
    PayloadSpec,
    encode_frame,
    seal,
)

TIMEOUT = 10

A = Identity.from_seed(bytes([1]) * 32)
B = Identity.from_seed(bytes([2]) * 32)
C = Identity.from_seed(bytes([3]) * 32)


def update(identity: Identity, seq: int, size: int = 8) -> Envelope:
    payload = bytes(range(size))
    return seal(
        identity,
        MessageKind.MODEL_UPDATE,
        seq=seq,
        round=seq,
        payload=payload,
        spec=PayloadSpec(codec="raw", dtype="uint8", shape=(size,), samples=1),
    )


class Outcome:
    """What one side of a concurrent handshake produced."""

    def __init__(self) -> None:
        self.peer: NodeId | None = None
        self.error: BaseException | None = None


async def run_side(outcome: Outcome, coro: Callable[[], Awaitable[NodeId]]) -> None:
    try:
        outcome.peer = await coro()
    except (HandshakeFailed, NodeClosedError) as exc:
        outcome.error = exc


async def both_sides(
    left: Callable[[FrameStream], Awaitable[NodeId]],
    right: Callable[[FrameStream], Awaitable[NodeId]],
) -> tuple[Outcome, Outcome]:
    """Run two handshake sides over a memory stream pair; a failing side closes its end."""
    stream_l, stream_r = trio.testing.memory_stream_pair()
    frames_l, frames_r = FrameStream(stream_l), FrameStream(stream_r)
    out_l, out_r = Outcome(), Outcome()

    async def side(
        outcome: Outcome, frames: FrameStream, fn: Callable[[FrameStream], Awaitable[NodeId]]
    ) -> None:
        await run_side(outcome, lambda: fn(frames))
        if outcome.error is not None:
            await frames.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, out_l, frames_l, left)
            nursery.start_soon(side, out_r, frames_r, right)
    return out_l, out_r


def dialler(identity: Identity, expected: NodeId) -> Callable[[FrameStream], Awaitable[NodeId]]:
    async def run(frames: FrameStream) -> NodeId:
        return (await handshake(frames, identity, expected=expected, timeout=5)).peer

    return run


def acceptor(identity: Identity, known: set[NodeId]) -> Callable[[FrameStream], Awaitable[NodeId]]:
    async def run(frames: FrameStream) -> NodeId:
        return (await handshake(frames, identity, known=known, timeout=5)).peer

    return run


# -- framing --------------------------------------------------------------------------------


async def test_frames_round_trip_and_payload_is_a_fresh_buffer() -> None:
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = FrameStream(left), FrameStream(right)
    with trio.fail_after(TIMEOUT):
        await sender.send(update(A, 1))
        await sender.send(update(A, 2, size=0))
        first = await receiver.receive()
        second = await receiver.receive()
    assert first is not None and second is not None
    assert (first.seq, second.seq) == (1, 2)
    assert bytes(first.payload) == bytes(range(8))
    assert isinstance(first.payload, memoryview) and not first.payload.readonly
    assert first.sender == A.node_id


async def test_oversize_length_prefix_is_refused_before_the_body_is_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = FrameStream(right, Limits(max_frame_bytes=1024))
    trailing = b"x" * 100
    with trio.fail_after(TIMEOUT):
        await left.send_all(LENGTH_PREFIX.pack(1 << 30) + trailing)
        with pytest.raises(FrameTooLarge):
            await receiver.receive()
        # Only the 4-byte prefix was consumed: every body byte is still in the stream.
        rest = b""
        while len(rest) < len(trailing):
            rest += await right.receive_some()
    assert rest == trailing


async def test_bad_signature_consumes_exactly_one_frame() -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = FrameStream(right)
    corrupt = bytearray(encode_frame(update(A, 1)))
    corrupt[-1] ^= 0xFF
    with trio.fail_after(TIMEOUT):
        await left.send_all(bytes(corrupt) + encode_frame(update(A, 2)))
        with pytest.raises(BadSignature):
            await receiver.receive()
        following = await receiver.receive()
    assert following is not None and following.seq == 2


async def test_eof_between_frames_is_none_and_inside_a_frame_is_broken() -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = FrameStream(right)
    frame = encode_frame(update(A, 1))
    with trio.fail_after(TIMEOUT):
        await left.send_all(frame)
        await left.send_all(frame[: len(frame) // 2])
        await left.aclose()
        assert await receiver.receive() is not None
        with pytest.raises(TransportBroken):
            await receiver.receive()

    left, right = trio.testing.memory_stream_pair()
    await left.aclose()
    with trio.fail_after(TIMEOUT):
        assert await FrameStream(right).receive() is None


async def test_using_a_stream_this_side_closed_is_node_closed() -> None:
    left, _right = trio.testing.memory_stream_pair()
    frames = FrameStream(left)
    await frames.aclose()
    with pytest.raises(NodeClosedError):
        await frames.send(update(A, 1))
    with pytest.raises(NodeClosedError):
        await frames.receive()


# -- handshake ------------------------------------------------------------------------------


async def test_handshake_authenticates_both_sides() -> None:
    out_a, out_b = await both_sides(dialler(A, B.node_id), acceptor(B, {A.node_id}))
    assert out_a.error is None and out_b.error is None
    assert out_a.peer == B.node_id
    assert out_b.peer == A.node_id


async def test_wrong_configured_key_fails_the_handshake() -> None:
    out_a, out_b = await both_sides(dialler(A, C.node_id), acceptor(B, {A.node_id}))
    assert isinstance(out_a.error, HandshakeFailed)
    assert "expected peer" in str(out_a.error)
    assert isinstance(out_b.error, HandshakeFailed)


async def test_unknown_key_is_refused_by_the_acceptor() -> None:
    out_a, out_b = await both_sides(dialler(A, B.node_id), acceptor(B, {C.node_id}))
    assert isinstance(out_b.error, HandshakeFailed)
    assert "not a configured peer" in str(out_b.error)
    assert isinstance(out_a.error, HandshakeFailed)


async def test_own_key_is_refused() -> None:
    out_1, out_2 = await both_sides(acceptor(A, {A.node_id}), acceptor(A, {A.node_id}))
    assert isinstance(out_1.error, HandshakeFailed)
    assert isinstance(out_2.error, HandshakeFailed)


class Recorder(trio.abc.Stream):
    """Wraps a stream and keeps a copy of every byte sent through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_replayed_handshake_of_an_earlier_connection_is_refused() -> None:
    # Record everything B sends in a genuine handshake with A ...
    stream_a, stream_b = trio.testing.memory_stream_pair()
    recorder = Recorder(stream_b)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acceptor(A, {B.node_id}), FrameStream(stream_a))
            nursery.start_soon(dialler(B, A.node_id), FrameStream(recorder))
    recorded = bytes(recorder.sent)
    assert len(recorded) > 2 * NONCE_BYTES

    # ... then replay B's bytes verbatim to A on a new connection: A's fresh nonce differs.
    stream_a, attacker = trio.testing.memory_stream_pair()
    await attacker.send_all(recorded)
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeFailed, match="nonce"):
        await handshake(FrameStream(stream_a), A, known={B.node_id}, timeout=5)


async def test_proof_signing_the_wrong_nonce_is_refused() -> None:
    stream_a, attacker = trio.testing.memory_stream_pair()
    attacker_frames = FrameStream(attacker)

    async def impostor() -> None:
        await attacker_frames.send(seal(B, MessageKind.HELLO, seq=1, round=0, payload=b"n" * 32))
        hello = await attacker_frames.receive()
        assert hello is not None
        # Signs a nonce, but not the one A just sent.
        await attacker_frames.send(
            seal(B, MessageKind.HELLO_PROOF, seq=2, round=0, payload=b"w" * NONCE_BYTES)
        )

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor)
            with pytest.raises(HandshakeFailed, match="nonce"):
                await handshake(FrameStream(stream_a), A, known={B.node_id}, timeout=5)


async def test_proof_from_another_key_than_the_hello_is_refused() -> None:
    stream_a, attacker = trio.testing.memory_stream_pair()
    attacker_frames = FrameStream(attacker)

    async def impostor() -> None:
        # Claims to be B, but can only sign as C.
        await attacker_frames.send(seal(B, MessageKind.HELLO, seq=1, round=0, payload=b"n" * 32))
        hello = await attacker_frames.receive()
        assert hello is not None
        await attacker_frames.send(
            seal(C, MessageKind.HELLO_PROOF, seq=2, round=0, payload=bytes(hello.payload))
        )

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor)
            with pytest.raises(HandshakeFailed, match="proof from"):
                await handshake(FrameStream(stream_a), A, known={B.node_id}, timeout=5)


async def test_silent_peer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    stream_a, _silent = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(HandshakeFailed, match="within 10 s"):
        await handshake(FrameStream(stream_a), A, expected=B.node_id, timeout=10)
    assert trio.current_time() - start == pytest.approx(10)


async def test_oversized_frame_during_handshake_is_refused() -> None:
    stream_a, attacker = trio.testing.memory_stream_pair()
    big = seal(B, MessageKind.HELLO, seq=1, round=0, payload=b"x" * 100_000)
    await attacker.send_all(encode_frame(big))
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeFailed, match="exceeds"):
        await handshake(FrameStream(stream_a), A, known={B.node_id}, timeout=5)


# -- per-peer send queues -------------------------------------------------------------------


async def ignore_wire_error(peer: NodeId, exc: WireError) -> None:
    raise AssertionError(f"unexpected wire error from {peer}: {exc}")


async def test_slow_peer_does_not_block_sending_to_another_peer() -> None:
    capacity = 4
    # lockstep: send_all blocks until the other side reads, and the slow side never reads.
    slow_local, _slow_remote = trio.testing.lockstep_stream_pair()
    fast_local, fast_remote = trio.testing.memory_stream_pair()
    slow = PeerConnection(C.node_id, FrameStream(slow_local), queue_capacity=capacity)
    fast = PeerConnection(B.node_id, FrameStream(fast_local), queue_capacity=capacity)
    fast_reader = FrameStream(fast_remote)
    total = 50

    async def discard(peer: NodeId, envelope: Envelope) -> None:
        raise AssertionError("nothing is sent to this side")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.run, discard, ignore_wire_error)
            nursery.start_soon(fast.run, discard, ignore_wire_error)
            received: list[int] = []
            for seq in range(total):
                envelope = update(A, seq)
                slow.enqueue(envelope)  # never blocks, whatever the slow peer does
                fast.enqueue(envelope)
                got = await fast_reader.receive()
                assert got is not None
                received.append(got.seq)
            assert received == list(range(total))
            # The slow peer holds at most one frame in flight plus a full queue.
            assert slow.queued == capacity
            assert slow.dropped >= total - capacity - 1
            assert fast.dropped == 0
            nursery.cancel_scope.cancel()


async def test_full_queue_drops_the_oldest_frame() -> None:
    local, _remote = trio.testing.lockstep_stream_pair()
    connection = PeerConnection(B.node_id, FrameStream(local), queue_capacity=2)
    assert connection.enqueue(update(A, 1))
    assert connection.enqueue(update(A, 2))
    assert not connection.enqueue(update(A, 3))
    assert connection.dropped == 1
    kept = [connection._queue_receive.receive_nowait().seq for _ in range(2)]
    assert kept == [2, 3]


async def test_connection_reports_frames_and_ends_when_the_peer_closes() -> None:
    local, remote = trio.testing.memory_stream_pair()
    connection = PeerConnection(B.node_id, FrameStream(local))
    peer_side = FrameStream(remote)
    got: list[int] = []
    errors: list[WireError] = []

    async def on_message(peer: NodeId, envelope: Envelope) -> None:
        assert peer == B.node_id
        got.append(envelope.seq)

    async def on_wire_error(peer: NodeId, exc: WireError) -> None:
        errors.append(exc)

    corrupt = bytearray(encode_frame(update(B, 2)))
    corrupt[-1] ^= 1
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run, on_message, on_wire_error)
            await peer_side.send(update(B, 1))
            await remote.send_all(bytes(corrupt))
            await peer_side.send(update(B, 3))
            await peer_side.aclose()
        await connection.closed.wait()
    assert got == [1, 3]
    assert len(errors) == 1 and isinstance(errors[0], BadSignature)


def test_backoff_grows_exponentially_within_bounds() -> None:
    backoff = Backoff(base=0.2, cap=5.0)
    rng = random.Random(0)
    delays = [backoff.delay(attempt, rng) for attempt in range(12)]
    assert 0.1 <= delays[0] <= 0.2
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert all(2.5 <= d <= 5.0 for d in delays[6:])
    assert backoff.delay(10_000, rng) <= 5.0
