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

- the *watchdog* (when an ``idle_timeout`` is given) ends the connection once no whole frame
  arrived for ``idle_timeout`` seconds, and queues a small signed ``KEEPALIVE`` frame once
  this side sent nothing for ``idle_timeout / 3`` seconds, so an idle but healthy link stays
  up. A peer that trickles a frame byte by byte is dropped too: only whole frames count.

When any task ends, the others are cancelled and the stream closed. The node keeps
connections to configured peers alive by redialling with :class:`Backoff` delays:
exponentially growing and jittered.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2pfl.errors import FrameTooLarge, NodeClosedError, TransportBroken, WireError
from p2pfl.identity import NodeId
from p2pfl.runtime.status import Metrics
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
        idle_timeout: float | None = None,
        keepalive: Callable[[], Envelope] | None = None,
        metrics: Metrics | None = None,
        outbound: bool = False,
    ) -> None:
        """Wrap an authenticated stream; nothing runs until :meth:`run`.

        Args:
            peer: the key the handshake authenticated.
            frames: the stream, after the handshake.
            queue_capacity: envelopes queued before the oldest is dropped.
            address: for logs.
            idle_timeout: seconds without a whole received frame before the connection is
                dropped; ``None`` never.
            keepalive: makes the frame sent on a connection this side left idle for
                ``idle_timeout / 3`` seconds; ``None`` sends none.
            metrics: frame and byte counters to add to.
            outbound: this side dialled (the node keeps the connection dialled by the smaller
                key when two connections to one peer race).

        Raises:
            ValueError: ``queue_capacity`` < 1 or ``idle_timeout`` <= 0.
        """
        if queue_capacity < 1:
            raise ValueError("queue_capacity must be >= 1")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0")
        self.peer = peer
        self.outbound = outbound
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
        self.idle_timeout = idle_timeout
        self._keepalive = keepalive
        self._metrics = metrics
        self.last_received_at = -math.inf
        self.last_sent_at = -math.inf
        self.timed_out = False
        """Whether the watchdog ended the connection (no frame for ``idle_timeout``)."""
        self.keepalives_sent = 0

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

    def take_queued(self) -> list[Envelope]:
        """Remove and return the envelopes not yet written (to move them to a connection
        that replaces this one)."""
        taken: list[Envelope] = []
        while True:
            try:
                taken.append(self._queue_receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return taken

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
        now = trio.current_time()
        self.last_received_at = self.last_sent_at = now
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender, nursery.cancel_scope)
                    nursery.start_soon(
                        self._receiver, on_message, on_wire_error, nursery.cancel_scope
                    )
                    if self.idle_timeout is not None:
                        nursery.start_soon(self._watchdog, self.idle_timeout, nursery.cancel_scope)
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
                before = self.frames.bytes_sent
                await self.frames.send(envelope)
                self._writing = False
                self.sent += 1
                self.last_sent_at = trio.current_time()
                if self._metrics is not None:
                    self._metrics.inc("frames_out_total")
                    self._metrics.inc("bytes_out_total", self.frames.bytes_sent - before)
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
                before = self.frames.bytes_received
                try:
                    envelope = await self.frames.receive()
                except FrameTooLarge as exc:
                    await on_wire_error(self.peer, exc)
                    return
                except WireError as exc:
                    self._count_in(before)
                    await on_wire_error(self.peer, exc)
                    continue
                if envelope is None:
                    log.debug("%s closed the connection", self.peer)
                    return
                self.received += 1
                self._count_in(before)
                await on_message(self.peer, envelope)
        except (TransportBroken, NodeClosedError) as exc:
            log.debug("receive from %s ended: %s", self.peer, exc)
        finally:
            scope.cancel()

    def _count_in(self, before: int) -> None:
        self.last_received_at = trio.current_time()
        if self._metrics is not None:
            self._metrics.inc("frames_in_total")
            self._metrics.inc("bytes_in_total", self.frames.bytes_received - before)

    async def _watchdog(self, idle_timeout: float, scope: trio.CancelScope) -> None:
        keepalive_interval = idle_timeout / 3
        try:
            while True:
                now = trio.current_time()
                if now >= self.last_received_at + idle_timeout:
                    self.timed_out = True
                    log.debug("no frame from %s for %g s; dropping it", self.peer, idle_timeout)
                    return
                send_at = self.last_sent_at + keepalive_interval
                if self._keepalive is not None and now >= send_at:
                    if not self.queued and not self._writing:
                        self.enqueue(self._keepalive())
                        self.keepalives_sent += 1
                    # Whatever is queued or in flight counts as traffic from now on.
                    self.last_sent_at = now
                    send_at = now + keepalive_interval
                wake = self.last_received_at + idle_timeout
                if self._keepalive is not None:
                    wake = min(wake, send_at)
                await trio.sleep_until(wake)
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
