"""A node's connections: accepting, dialling (configured, learned and on-demand peers),
serving an authenticated connection, and sending to a peer.

Theory of operation
-------------------
:class:`Connections` owns the table of authenticated connections (at most one per peer) and
produces the connection events of the pump's channel (``PeerConnected``,
``MessageReceived``, ``PeerDisconnected``). Its tasks run in the node's nursery.

* *Configured peers* (``[[peers]]``): for each pair only the node with the smaller key dials,
  and redials with backoff for as long as the node runs; the other accepts, and only from
  configured peers with a smaller key, so two nodes never hold two connections.
  :attr:`Connections.all_connected` is set once every configured peer is connected; the
  startup gate (:meth:`Connections.startup_gate`) delivers ``Started`` then, or after
  ``startup_timeout``, so the first rounds are not run alone.
* *Learned peers* (:mod:`p2pfl.runtime.peerx`) are dialled, a few times at most, only when
  ``accept_unknown_peers`` is set. For a core with fixed neighbours (``dsgd``, ``gossip``), a
  learned peer's connection carries keep-alives and peer exchange but no models.
* *On demand*: a core whose config ``admits_strangers`` (``modest``, ``gossip`` with
  ``peer_sampling = "membership"``) is told about every authenticated connection and gets
  every peer's protocol messages. When it sends to a peer with no connection, the node dials
  it: the address comes from ``[[peers]]``, ``[[bootstrap]]`` or the peer book, the envelopes
  wait in a bounded queue until the handshake is done, a banned key is never dialled, and
  such connections share the ``max_peers`` slots of learned peers (a send with no address or
  no slot is dropped and counted, as the core's timeouts expect). Either side may dial such a
  peer; when two connections to one peer race, both ends keep the one dialled by the smaller
  key. Such a node also accepts ``[[bootstrap]]`` and peer-book keys (any key with
  ``accept_unknown_peers``), within the same slots.

Every accepted socket goes through the node's :class:`~p2pfl.runtime.defences.Defences`
before its handshake (banned IP, too many concurrent handshakes) and its failure is counted
there; every received frame passes the peer's rate limit. Runtime-level kinds
(``KEEPALIVE``, ``PEER_EXCHANGE``) are handled here and never reach the core. The injected
:class:`~p2pfl.runtime.policy.LinkPolicy` decides which links are up and how to dial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Mapping

import trio

from p2pfl.config import NodeConfig, PeerConfig
from p2pfl.errors import HandshakeFailed, NodeClosedError, WireError
from p2pfl.identity import Identity, NodeId
from p2pfl.protocol.events import Event, MessageReceived, PeerConnected, PeerDisconnected, Started
from p2pfl.runtime.defences import Defences
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.peerx import PeerAd, PeerExchange, parse_address
from p2pfl.runtime.policy import LinkPolicy
from p2pfl.runtime.status import Metrics
from p2pfl.runtime.transport import FrameStream, handshake
from p2pfl.wire import Envelope, Limits, MessageKind, seal

log = logging.getLogger("p2pfl.node")

LEARNED_DIAL_ATTEMPTS = 3
RUNTIME_KINDS = frozenset(
    {MessageKind.HELLO, MessageKind.HELLO_PROOF, MessageKind.KEEPALIVE, MessageKind.PEER_EXCHANGE}
)
"""Kinds the runtime consumes itself; every other kind goes to the protocol core."""
CONNECT_TIMEOUT = 5.0


class Connections:
    """The authenticated connections of one node and the tasks that make them.

    Attributes:
        table: the connection of each connected peer (read it; the methods change it).
        all_connected: set once every configured peer has been connected at the same time.
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        *,
        events: trio.MemorySendChannel[Event],
        defences: Defences,
        exchange: PeerExchange,
        policy: LinkPolicy,
        metrics: Metrics,
        backoff: Backoff,
        jitter: random.Random,
        all_connected: trio.Event,
    ) -> None:
        self.config = config
        self.identity = identity
        self.node_id = identity.node_id
        self.table: dict[NodeId, PeerConnection] = {}
        self.all_connected = all_connected
        self.handshakes = 0
        """Accepted connections still in their handshake."""
        self._events = events
        self._defences = defences
        self._exchange = exchange
        self._policy = policy
        self._metrics = metrics
        self._backoff = backoff
        self._jitter = jitter
        self._frame_limits = Limits(max_frame_bytes=config.limits.max_frame_bytes)
        self._peers_by_id: dict[NodeId, PeerConfig] = {p.node_id: p for p in config.peers}
        self._bootstrap_by_id: dict[NodeId, PeerConfig] = {
            p.node_id: p for p in config.bootstrap if p.node_id != self.node_id
        }
        self._admits_strangers = config.protocol.admits_strangers
        self._pending_sends: dict[NodeId, deque[Envelope]] = {}
        self._learned_dials: set[NodeId] = set()
        self._learned_addresses: dict[NodeId, str] = {}
        self._dial_errors: dict[NodeId, str] = {}
        self._alone = False
        self._nursery: trio.Nursery | None = None

    @property
    def configured(self) -> Mapping[NodeId, PeerConfig]:
        """The configured peers (``[[peers]]``) by key."""
        return self._peers_by_id

    def start(self, nursery: trio.Nursery) -> None:
        """Dial the configured peers this node dials; later dials also run in ``nursery``."""
        self._nursery = nursery
        for peer in self.config.peers:
            if self.node_id < peer.node_id:
                nursery.start_soon(self._dial, peer, name=f"dial {peer.address}")

    def close(self, peer: NodeId) -> None:
        """Close the connection to ``peer``, if there is one."""
        connection = self.table.get(peer)
        if connection is not None:
            connection.close()

    def close_all(self) -> None:
        for connection in list(self.table.values()):
            connection.close()

    async def wait_flushed(self) -> None:
        """Return once every connection's send queue is empty (or closed)."""
        for connection in list(self.table.values()):
            await connection.wait_flushed()

    # -- sending ----------------------------------------------------------------------------

    def send(self, peer: NodeId, envelope: Envelope) -> None:
        """Queue ``envelope`` for ``peer``, dialling on demand when the core admits strangers;
        a send that cannot be queued is dropped and counted."""
        connection = self.table.get(peer)
        if connection is None:
            if not (self._admits_strangers and self._send_on_demand(peer, envelope)):
                self._metrics.inc("sends_unconnected_total")
            return
        if not connection.enqueue(envelope):
            self._metrics.inc("queue_drops_total")
            log.debug("send queue to %s full; dropped the oldest frame", peer)

    def _send_on_demand(self, peer: NodeId, envelope: Envelope) -> bool:
        """Queue ``envelope`` for a peer that is not connected, dialling it if no dial is
        under way; False if it cannot be reached (configured peers redial by themselves)."""
        pending = self._pending_sends.get(peer)
        if pending is not None:
            if len(pending) == pending.maxlen:
                self._metrics.inc("queue_drops_total")
            pending.append(envelope)
            return True
        if peer in self._peers_by_id or self._defences.is_banned(peer) or self._nursery is None:
            return False
        target = self._address_of(peer)
        if target is None or self._learned_slots() <= 0:
            return False
        queue: deque[Envelope] = deque(maxlen=self.config.send_queue)
        queue.append(envelope)
        self._pending_sends[peer] = queue
        self._learned_dials.add(peer)
        self._metrics.inc("dials_on_demand_total")
        host, port, address = target
        self._nursery.start_soon(self._dial_on_demand, peer, host, port, address)
        return True

    def _address_of(self, peer: NodeId) -> tuple[str, int, str] | None:
        """Where to dial ``peer``: ``[[peers]]``, then ``[[bootstrap]]``, then the peer book."""
        config = self._peers_by_id.get(peer) or self._bootstrap_by_id.get(peer)
        if config is not None:
            return config.host, config.port, config.address
        learned = self._exchange.book.get(peer)
        if learned is None:
            return None
        host, port = learned.ad.host_port
        return host, port, learned.ad.address

    # -- dialling ---------------------------------------------------------------------------

    async def _dial(self, peer: PeerConfig) -> None:
        attempt = 0
        while True:
            ban_ends = self._defences.banned_until(peer.node_id)
            if ban_ends is not None:
                await trio.sleep_until(ban_ends)
            if await self._dial_once(peer.node_id, peer.host, peer.port, peer.address):
                attempt = 0
            await trio.sleep(self._backoff.delay(attempt, self._jitter))
            attempt += 1

    async def _dial_on_demand(self, peer: NodeId, host: str, port: int, address: str) -> None:
        """Dial a peer the core wants to reach, a few times at most; serve the connection
        until it ends. Sends queued meanwhile go out once it is up, or are dropped."""
        try:
            await self._dial_a_few_times(peer, host, port, address)
        finally:
            self._learned_dials.discard(peer)
            dropped = self._pending_sends.pop(peer, None)
            if dropped:
                self._metrics.inc("sends_unconnected_total", len(dropped))

    async def _dial_learned(self, ad: PeerAd) -> None:
        """Try a learned peer a few times; forget it if it never answers as itself."""
        host, port = ad.host_port
        try:
            if not await self._dial_a_few_times(ad.node_id, host, port, ad.address):
                self._exchange.book.forget(ad.node_id)
        finally:
            self._learned_dials.discard(ad.node_id)

    async def _dial_a_few_times(self, peer: NodeId, host: str, port: int, address: str) -> bool:
        """Dial ``peer`` up to ``LEARNED_DIAL_ATTEMPTS`` times, with backoff, and serve the
        first connection made; False if every attempt failed."""
        for attempt in range(LEARNED_DIAL_ATTEMPTS):
            if self._defences.is_banned(peer) or peer in self.table:
                return True
            if await self._dial_once(peer, host, port, address):
                return True
            await trio.sleep(self._backoff.delay(attempt, self._jitter))
        return False

    async def _dial_once(self, peer: NodeId, host: str, port: int, address: str) -> bool:
        """Connect, authenticate and serve ``peer`` until the connection ends.

        Returns:
            whether the handshake succeeded.
        """
        if not self._policy.link_up(peer):
            return False
        stream: trio.abc.Stream | None = None
        failure = f"no answer within {CONNECT_TIMEOUT:g} s"
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                stream = await self._policy.open_stream(host, port)
            except OSError as exc:
                log.debug("connecting to %s failed: %s", address, exc)
                failure = f"cannot connect ({_os_reason(exc)})"
        if stream is None:
            self._note_dial(peer, failure)
            return False
        frames = FrameStream(stream, self._frame_limits)
        try:
            try:
                await handshake(
                    frames,
                    self.identity,
                    expected=peer,
                    timeout=self.config.handshake_timeout,
                )
            except HandshakeFailed as exc:
                self._note_dial(peer, str(exc))
                self._metrics.inc("handshakes_failed_total")
                log_event(
                    log,
                    logging.WARNING,
                    "handshake_failed",
                    "handshake with %s failed: %s",
                    address,
                    exc,
                    address=address,
                    reason=str(exc),
                )
                return False
            self._note_dial(peer, None)
            await self._serve(frames, peer, address, outbound=True)
            return True
        finally:
            await frames.aclose()

    def _note_dial(self, peer: NodeId, failure: str | None) -> None:
        """Remember why the last dial of a configured peer failed (for the logs)."""
        if failure is None:
            self._dial_errors.pop(peer, None)
        elif peer in self._peers_by_id:
            self._dial_errors[peer] = failure

    def learned(self, ads: list[PeerAd]) -> None:
        """Peers new in the book: dial them if ``accept_unknown_peers`` (the smaller key
        dials, as for configured peers) and a slot is free."""
        if not self.config.peer_exchange.accept_unknown_peers or self._nursery is None:
            return
        for ad in ads:
            if self.node_id < ad.node_id and self._learned_slots() > 0:
                self._learned_dials.add(ad.node_id)
                self._learned_addresses[ad.node_id] = ad.address
                self._nursery.start_soon(self._dial_learned, ad)

    def advertisable(self) -> list[PeerAd]:
        """Connected peers this node can vouch for and whose listening address it knows."""
        ads: list[PeerAd] = []
        for peer in self.table:
            config = self._peers_by_id.get(peer) or self._bootstrap_by_id.get(peer)
            address = config.address if config is not None else self._learned_addresses.get(peer)
            if address is not None and parse_address(address) is not None:
                ads.append(PeerAd(address, peer))
        return ads

    # -- accepting --------------------------------------------------------------------------

    def _learned_slots(self) -> int:
        """Connections to non-configured peers still allowed (configured peers keep theirs)."""
        allowed = self.config.limits.max_peers - len(self._peers_by_id)
        learned = sum(1 for peer in self.table if peer not in self._peers_by_id)
        return allowed - learned - len(self._learned_dials)

    def refusal(self, peer: NodeId) -> str | None:
        """Why an accepted connection from ``peer`` is refused, or ``None`` to accept it."""
        if not self._policy.link_up(peer):
            return "handshake"
        if self._defences.is_banned(peer):
            return "banned_key"
        # Only the peer with the smaller key dials; refusing the others keeps one connection
        # per pair even if a peer is misconfigured. A core that talks beyond its neighbours
        # is dialled on demand from either side.
        if peer in self._peers_by_id:
            return None if peer < self.node_id else "wrong_direction"
        known = peer in self._bootstrap_by_id or peer in self._exchange.book
        if not (self._admits_strangers and known):
            if not self.config.peer_exchange.accept_unknown_peers:
                return "handshake"
            if not (self._admits_strangers or peer < self.node_id):
                return "handshake"
        if peer in self.table:
            return None  # a reconnect replaces the old connection
        return None if self._learned_slots() > 0 else "peer_limit"

    async def accept(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream: defences, handshake, then the connection."""
        self._metrics.inc("connections_accepted_total")
        frames = FrameStream(stream, self._frame_limits)
        try:
            address = _format_sockname(stream)
            ip = _remote_ip(stream)
            refused = self._defences.refuse_address(ip, self.handshakes)
            if refused is not None:
                self._defences.reject(refused)
                return
            refusals: list[str] = []

            def known(peer: NodeId) -> bool:
                reason = self.refusal(peer)
                if reason is not None:
                    refusals.append(reason)
                return reason is None

            self.handshakes += 1
            try:
                result = await handshake(
                    frames,
                    self.identity,
                    known=known,
                    timeout=self.config.handshake_timeout,
                )
            except HandshakeFailed as exc:
                refusal = refusals[0] if refusals else None
                self._defences.handshake_failed(exc, refusal, address, ip)
                return
            except NodeClosedError:
                return
            finally:
                self.handshakes -= 1
            await self._serve(frames, result.peer, address)
        finally:
            await frames.aclose()

    # -- serving ----------------------------------------------------------------------------

    async def _serve(
        self, frames: FrameStream, peer: NodeId, address: str, *, outbound: bool = False
    ) -> None:
        """Register an authenticated connection, run it, and report its end."""
        limits = self.config.limits
        connection = PeerConnection(
            peer,
            frames,
            queue_capacity=self.config.send_queue,
            address=address,
            idle_timeout=limits.idle_timeout,
            keepalive=self._keepalive,
            metrics=self._metrics,
            outbound=outbound,
        )
        configured = peer in self._peers_by_id
        tells_core = configured or self._admits_strangers
        previous = self.table.get(peer)
        if (
            previous is not None
            and not configured
            and not previous.closed.is_set()
            and self._canonical(previous)
            and not self._canonical(connection)
        ):
            # Both ends dialled at once: keep the connection the smaller key dialled.
            log.debug("%s: keeping the connection dialled by the smaller key", peer)
            return
        self.table[peer] = connection
        if previous is not None:
            for envelope in previous.take_queued():
                connection.enqueue(envelope)
        for envelope in self._pending_sends.pop(peer, ()):
            connection.enqueue(envelope)
        self._defences.open_peer(peer)
        self._exchange.open_peer(peer)
        if previous is not None:
            log.info("%s reconnected; replacing the old connection", peer)
            previous.close()
            if tells_core:
                await self._events.send(PeerDisconnected(peer))
        log_event(
            log,
            logging.INFO,
            "peer_connected",
            "connected to %s at %s",
            peer,
            address,
            peer=peer.hex(),
            address=address,
            configured=configured,
        )
        if configured and self._alone:
            self._alone = False
            log.info("neighbour %s connected; this node no longer trains alone", peer)
        if tells_core:
            await self._events.send(PeerConnected(peer))
        if all(p in self.table for p in self._peers_by_id):
            self.all_connected.set()
        gone = False
        try:
            await connection.run(self._on_message, self._on_wire_error)
        finally:
            if self.table.get(peer) is connection:
                del self.table[peer]
                self._defences.close_peer(peer)
                self._exchange.close_peer(peer)
                gone = True
        if connection.timed_out:
            self._defences.reject("idle")
        if gone:
            log_event(
                log,
                logging.INFO,
                "peer_disconnected",
                "disconnected from %s%s",
                peer,
                " (idle)" if connection.timed_out else "",
                peer=peer.hex(),
                idle=connection.timed_out,
            )
            if tells_core:
                await self._events.send(PeerDisconnected(peer))

    def _canonical(self, connection: PeerConnection) -> bool:
        """Whether ``connection`` was dialled by the smaller of the two keys."""
        return connection.outbound == (self.node_id < connection.peer)

    def _keepalive(self) -> Envelope:
        return seal(
            self.identity, MessageKind.KEEPALIVE, seq=time.time_ns() // 1000, round=0, payload=b""
        )

    async def _on_message(self, peer: NodeId, envelope: Envelope) -> None:
        if not self._defences.admit(peer):
            return
        kind = envelope.kind
        if kind not in RUNTIME_KINDS:
            # Everything else belongs to the protocol core, which judges it; unless the core
            # admits peers beyond its neighbours, learned peers' messages are dropped here.
            if peer not in self._peers_by_id and not self._admits_strangers:
                self._defences.reject("unexpected_kind")
                return
            self._metrics.inc("messages_received_total")
            await self._events.send(MessageReceived(peer, envelope))
            return
        if envelope.sender != peer:
            self._defences.reject("protocol")
            self._defences.strike(peer, f"{kind.name} signed by {envelope.sender}, not by the peer")
            return
        if kind is MessageKind.KEEPALIVE:
            return
        if kind is MessageKind.PEER_EXCHANGE:
            self.learned(self._exchange.receive(peer, envelope))
            return
        self._defences.reject("unexpected_kind")  # a handshake frame after the handshake
        self._defences.strike(peer, f"unexpected {kind.name} after the handshake")

    async def _on_wire_error(self, peer: NodeId, exc: WireError) -> None:
        self._defences.wire_error(peer, exc)

    # -- the start and being alone ----------------------------------------------------------

    async def startup_gate(self, round_now: Callable[[], int]) -> None:
        """Deliver ``Started`` once every configured peer is connected or after
        ``startup_timeout``, saying which peers are missing and why (and at which round,
        ``round_now()``)."""
        if not self.config.peers:
            self.all_connected.set()
        with trio.move_on_after(self.config.startup_timeout):
            await self.all_connected.wait()
        missing = [p.address for p in self.config.peers if p.node_id not in self.table]
        if missing:
            log_event(
                log,
                logging.WARNING,
                "startup_incomplete",
                "starting round %d without %d of %d peers after waiting %g s (%s); peers that "
                "are down or finished their rounds leave this node training alone",
                round_now(),
                len(missing),
                len(self.config.peers),
                self.config.startup_timeout,
                self._missing_reasons(),
                missing=missing,
            )
        await self._events.send(Started())

    def check_alone(self, round_: int) -> None:
        """Say once, clearly, when rounds go on with no configured neighbour connected."""
        if self._alone or not self._peers_by_id or self._admits_strangers:
            return
        if any(peer in self.table for peer in self._peers_by_id):
            return
        self._alone = True
        log_event(
            log,
            logging.WARNING,
            "alone",
            "round %d ran with none of the %d neighbours connected (%s): they are gone or "
            "finished their rounds; this node trains alone until one connects",
            round_,
            len(self._peers_by_id),
            self._missing_reasons(),
            round=round_,
            neighbours=len(self._peers_by_id),
        )

    def _missing_reasons(self) -> str:
        """Each configured peer not connected, with why as far as this node knows."""
        reasons = []
        for peer in self.config.peers:
            if peer.node_id in self.table:
                continue
            if self._defences.is_banned(peer.node_id):
                why = "banned by this node"
            elif self.node_id < peer.node_id:
                why = self._dial_errors.get(peer.node_id, "not reached yet")
            else:
                why = "it did not connect to this node"
            reasons.append(f"{peer.address}: {why}")
        return "; ".join(reasons)


def _os_reason(exc: OSError) -> str:
    """Why a connection failed: trio reports every address it tried as the cause."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            # trio's message repeats the address; the errno's own text is enough here.
            if isinstance(inner, OSError) and inner.errno and inner.errno > 0:
                return os.strerror(inner.errno)
    return exc.strerror or str(exc)  # e.g. a host name that does not resolve


def _remote_ip(stream: trio.abc.Stream) -> str | None:
    """The remote IP of a socket stream (``None`` for other streams, e.g. in memory)."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            return str(stream.socket.getpeername()[0])
    return None


def _format_sockname(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return "?"
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
