"""Frames over a trio byte stream, and the nonce handshake that authenticates a peer.

Theory of operation
-------------------
A :class:`FrameStream` reads and writes the frames of :mod:`p2pfl.wire` on any
``trio.abc.Stream`` (a TCP socket in production, ``trio.testing.memory_stream_pair`` in
tests). A read takes the 4-byte prefix first and checks the declared size against the
limits (``wire.read_length``) before it allocates or reads the body; the body goes into a
fresh ``bytearray`` that the decoded envelope's payload then views, so payloads are never
copied again and never shared between frames. ``wire.decode_body`` verifies the signature
and the payload digest before anything is returned. A write sends the header and then the
payload straight from the tensor's memory (``wire.frame_parts``).

The handshake is symmetric, so dialler and acceptor run the same code::

    A -> B  HELLO(nonce_a)             B -> A  HELLO(nonce_b)
    A -> B  HELLO_PROOF(nonce_b)       B -> A  HELLO_PROOF(nonce_a)

Each nonce is 32 fresh random bytes. A ``HELLO_PROOF`` carries the *peer's* nonce, and its
signature (over a header that binds the payload digest) proves that whoever sent it holds
the private key of its sender id, now: a proof recorded from an earlier connection names an
old nonce and is refused. Each side checks that the proof names its own nonce, that the
proof and the ``HELLO`` come from the same key, that the key is not its own, and that the key
is the one it expected (dialled peers) or one it knows (accepted peers). Any failure, and a
handshake that outlasts its timeout, raises :class:`~p2pfl.errors.HandshakeFailed`.

Errors follow trio's split: ``NodeClosedError`` when this side closed the stream,
``TransportBroken`` when the network broke it (reset, EOF in the middle of a frame).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import trio

from p2pfl.errors import HandshakeFailed, NodeClosedError, TransportBroken, WireError
from p2pfl.identity import Identity, NodeId
from p2pfl.wire import (
    DEFAULT_LIMITS,
    LENGTH_PREFIX,
    Envelope,
    Limits,
    MessageKind,
    decode_body,
    frame_parts,
    read_length,
    seal,
)

NONCE_BYTES = 32
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_LIMITS = Limits(max_frame_bytes=4096, max_header_bytes=2048, max_elements=NONCE_BYTES)
"""Handshake frames are tiny; anything larger before authentication is refused."""


class FrameStream:
    """Signed frames over a ``trio.abc.Stream``; one reader task and one writer task at most."""

    __slots__ = ("bytes_received", "bytes_sent", "limits", "stream")

    def __init__(self, stream: trio.abc.Stream, limits: Limits = DEFAULT_LIMITS) -> None:
        self.stream = stream
        self.limits = limits
        self.bytes_received = 0
        """Bytes of whole frames read (prefix included), whether they verified or not."""
        self.bytes_sent = 0
        """Bytes of whole frames written."""

    async def send(self, envelope: Envelope) -> None:
        """Write one frame: prefix and header, then the payload from its own memory.

        Raises:
            NodeClosedError: this side closed the stream.
            TransportBroken: the connection broke.
        """
        head, payload = frame_parts(envelope)
        try:
            await self.stream.send_all(head)
            if payload.nbytes:
                await self.stream.send_all(payload)
            self.bytes_sent += len(head) + payload.nbytes
        except trio.ClosedResourceError as exc:
            raise NodeClosedError("the connection was closed by this node") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportBroken(f"sending failed: {exc}") from exc

    async def receive(self, limits: Limits | None = None) -> Envelope | None:
        """Read and verify one frame; ``None`` when the peer closed cleanly between frames.

        Raises:
            FrameTooLarge: the declared size exceeds the limits (the body was not read; the
                stream is no longer in step and must be closed).
            WireError: the frame is malformed or its signature or digest does not verify
                (the whole frame was consumed; the stream is still in step).
            NodeClosedError: this side closed the stream.
            TransportBroken: the connection broke or ended in the middle of a frame.
        """
        active = self.limits if limits is None else limits
        prefix = await self._read_exactly(LENGTH_PREFIX.size, eof_ok=True)
        if prefix is None:
            return None
        body = await self._read_exactly(read_length(prefix, active), eof_ok=False)
        assert body is not None
        self.bytes_received += LENGTH_PREFIX.size + len(body)
        return decode_body(body, active)

    async def aclose(self) -> None:
        """Close the underlying stream (idempotent, never raises for a broken stream)."""
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await self.stream.aclose()

    async def _read_exactly(self, size: int, *, eof_ok: bool) -> bytearray | None:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            try:
                chunk = await self.stream.receive_some(size - filled)
            except trio.ClosedResourceError as exc:
                raise NodeClosedError("the connection was closed by this node") from exc
            except (trio.BrokenResourceError, OSError) as exc:
                raise TransportBroken(f"receiving failed: {exc}") from exc
            if not chunk:
                if eof_ok and filled == 0:
                    return None
                raise TransportBroken(f"connection ended after {filled} of {size} bytes")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return buffer


@dataclass(frozen=True, slots=True)
class Handshake:
    """Who the handshake authenticated."""

    peer: NodeId


async def handshake(
    frames: FrameStream,
    identity: Identity,
    *,
    expected: NodeId | None = None,
    known: Collection[NodeId] | Callable[[NodeId], bool] = (),
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    nonce: bytes | None = None,
) -> Handshake:
    """Run the symmetric nonce handshake on ``frames`` (see the module docstring).

    Args:
        frames: a fresh stream on which nothing was sent or received yet.
        identity: this node's key, which signs the handshake frames.
        expected: the key a dialled peer must prove; ``None`` when accepting.
        known: when ``expected`` is ``None``, the keys allowed to connect (a collection or a
            predicate); unknown keys are refused.
        timeout: seconds the whole handshake may take.
        nonce: this side's nonce; fresh random bytes unless a test fixes it.

    Raises:
        HandshakeFailed: the peer sent something unexpected, failed a check, or was too slow.
        NodeClosedError: this side closed the stream meanwhile.
    """
    own_nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    if len(own_nonce) != NONCE_BYTES:
        raise ValueError(f"a handshake nonce is {NONCE_BYTES} bytes")
    with trio.move_on_after(timeout) as scope:
        try:
            return await _handshake(frames, identity, own_nonce, expected, known)
        except HandshakeFailed:
            raise
        except (WireError, TransportBroken) as exc:
            raise HandshakeFailed(f"handshake failed: {exc}") from exc
    assert scope.cancelled_caught
    raise HandshakeFailed(f"handshake did not complete within {timeout:g} s")


async def _handshake(
    frames: FrameStream,
    identity: Identity,
    own_nonce: bytes,
    expected: NodeId | None,
    known: Collection[NodeId] | Callable[[NodeId], bool],
) -> Handshake:
    await frames.send(_handshake_frame(identity, MessageKind.HELLO, own_nonce))
    hello = await _receive_kind(frames, MessageKind.HELLO)
    peer = hello.sender
    _check_peer(peer, identity.node_id, expected, known)
    if memoryview(hello.payload).nbytes != NONCE_BYTES:
        raise HandshakeFailed(f"HELLO from {peer} carries no {NONCE_BYTES}-byte nonce")
    peer_nonce = bytes(hello.payload)
    if peer_nonce == own_nonce:
        raise HandshakeFailed(f"HELLO from {peer} echoes this node's own nonce")
    await frames.send(_handshake_frame(identity, MessageKind.HELLO_PROOF, peer_nonce))
    proof = await _receive_kind(frames, MessageKind.HELLO_PROOF)
    if proof.sender != peer:
        raise HandshakeFailed(f"HELLO came from {peer} but the proof from {proof.sender}")
    if not secrets.compare_digest(bytes(proof.payload), own_nonce):
        raise HandshakeFailed(f"proof from {peer} does not sign this connection's nonce")
    return Handshake(peer=peer)


def _check_peer(
    peer: NodeId,
    own: NodeId,
    expected: NodeId | None,
    known: Collection[NodeId] | Callable[[NodeId], bool],
) -> None:
    if peer == own:
        raise HandshakeFailed("the peer presented this node's own key")
    if expected is not None:
        if peer != expected:
            raise HandshakeFailed(f"expected peer {expected} but {peer} answered")
        return
    allowed = known(peer) if callable(known) else peer in known
    if not allowed:
        raise HandshakeFailed(f"peer {peer} is not a configured peer")


async def _receive_kind(frames: FrameStream, kind: MessageKind) -> Envelope:
    envelope = await frames.receive(HANDSHAKE_LIMITS)
    if envelope is None:
        raise HandshakeFailed(f"the peer closed the connection before its {kind.name}")
    if envelope.kind is not kind:
        raise HandshakeFailed(f"expected {kind.name}, got {envelope.kind.name}")
    return envelope


def _handshake_frame(identity: Identity, kind: MessageKind, nonce: bytes) -> Envelope:
    # Handshake frames never reach a protocol core or its replay windows; freshness comes
    # from the nonce. A wall-clock sequence number keeps them distinct in captures.
    return seal(identity, kind, seq=time.time_ns() // 1000, round=0, payload=nonce)
