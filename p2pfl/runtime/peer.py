"""One authenticated connection to a peer, and the dialler that keeps one up.

Theory of operation
-------------------
A :class:`PeerConnection` owns a :class:`~p2pfl.runtime.transport.FrameStream` after the
handshake and runs two tasks on it:

- the *sender* drains a bounded queue of envelopes and writes each as a frame. The node
  loop only ever calls :meth:`PeerConnection.enqueue`, which never blocks: when the queue
  is full the *oldest* queued envelope is dropped (newer models supersede older ones) and
  counted, so a slow or stalled peer costs memory bounded by the queue and never delays the
  loop or any other peer;
- the *receiver* reads frames and hands each verified envelope to a callback (the node's
  event channel). A frame that fails verification is reported and skipped, since the stream
  is still in step; an oversized frame or a broken stream ends the connection.

When either task ends, the other is cancelled and the stream closed. :class:`Dialler` keeps a
connection to one configured peer alive: connect, handshake, run, and on failure wait an
exponentially growing, jittered delay before the next attempt.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2pfl.errors import FrameTooLarge, NodeClosedError, TransportBroken, WireError
from p2pfl.identity import NodeId
from p2pfl.runtime.transport import FrameStream
from p2pfl.wire import Envelope

log = logging.getLogger(__name__)

DEFAULT_SEND_QUEUE = 16
"""Frames queued per peer before the oldest is dropped."""

MessageCallback = Callable[[NodeId, Envelope], Awaitable[None]]
WireErrorCallback = Callable[[NodeId, WireError], Awaitable[None]]


class PeerConnection:
    """An authenticated connection: a bounded send queue and a receive loop."""

    def __init__(
        self,
        peer: NodeId,
        frames: FrameStream,
        *,
        queue_capacity: int = DEFAULT_SEND_QUEUE,
        address: str = "",
    ) -> None:
        if queue_capacity < 1:
            raise ValueError("queue_capacity must be >= 1")
        self.peer = peer
        self.frames = frames
        self.address = address
        self.dropped = 0
        self.sent = 0
        self.received = 0
        self._queue_send, self._queue_receive = trio.open_memory_channel[Envelope](queue_capacity)
        self._idle = trio.Event()
        self._idle.set()
        self._writing = False
        self._cancel = trio.CancelScope()
        self.closed = trio.Event()

    def enqueue(self, envelope: Envelope) -> bool:
        """Queue ``envelope`` for sending without ever blocking.

        Returns:
            ``False`` if an envelope had to be dropped (the oldest queued one, or this one
            when the connection is closed).
        """
        if self.closed.is_set():
            self.dropped += 1
            return False
        kept = True
        try:
            self._queue_send.send_nowait(envelope)
        except trio.WouldBlock:
            self._queue_receive.receive_nowait()
            self.dropped += 1
            kept = False
            self._queue_send.send_nowait(envelope)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        return kept

    @property
    def queued(self) -> int:
        """Envelopes waiting to be written."""
        return self._queue_send.statistics().current_buffer_used

    async def wait_flushed(self) -> None:
        """Return once every queued envelope has been written (or the connection closed)."""
        while not self.closed.is_set() and (self.queued or self._writing):
            await self._idle.wait()

    def close(self) -> None:
        """Ask the connection to end; :meth:`run` returns soon after."""
        self._cancel.cancel()

    async def run(
        self,
        on_message: MessageCallback,
        on_wire_error: WireErrorCallback,
    ) -> None:
        """Send and receive until the stream breaks or :meth:`close` is called; then close it."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender, nursery.cancel_scope)
                    nursery.start_soon(
                        self._receiver, on_message, on_wire_error, nursery.cancel_scope
                    )
        finally:
            self.closed.set()
            self._idle.set()
            with trio.CancelScope(shield=True):
                await self.frames.aclose()

    async def _sender(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self.queued:
                    self._idle.set()
                envelope = await self._queue_receive.receive()
                self._writing = True
                await self.frames.send(envelope)
                self._writing = False
                self.sent += 1
        except (TransportBroken, NodeClosedError) as exc:
            log.debug("send to %s ended: %s", self.peer, exc)
        finally:
            self._writing = False
            scope.cancel()

    async def _receiver(
        self,
        on_message: MessageCallback,
        on_wire_error: WireErrorCallback,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                try:
                    envelope = await self.frames.receive()
                except FrameTooLarge as exc:
                    await on_wire_error(self.peer, exc)
                    return
                except WireError as exc:
                    await on_wire_error(self.peer, exc)
                    continue
                if envelope is None:
                    log.debug("%s closed the connection", self.peer)
                    return
                self.received += 1
                await on_message(self.peer, envelope)
        except (TransportBroken, NodeClosedError) as exc:
            log.debug("receive from %s ended: %s", self.peer, exc)
        finally:
            scope.cancel()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential reconnect delays with full jitter: ``U(0.5, 1) * min(cap, base * 2**n)``."""

    base: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before reconnect ``attempt`` (0 for the first retry)."""
        ceiling = min(self.cap, self.base * float(2 ** min(attempt, 32)))
        return ceiling * rng.uniform(0.5, 1.0)
