"""The trio driver of one node: a short pump loop around a sans-IO protocol core.

Theory of operation
-------------------
One task, the *pump*, owns the core. Everything else only produces events into one bounded
channel: connection tasks (``PeerConnected``, ``MessageReceived``, ``PeerDisconnected``),
training tasks (``TrainingFinished``) and the startup gate (``Started``). The pump waits for
the next event or for ``core.next_deadline()``, whichever comes first (``DeadlineReached``),
passes it to ``core.handle(event, now=trio.current_time())`` and carries out the returned
actions, none of which blocks it for long:

=================  ==========================================================================
``Send``           queue on the peer's bounded send queue (oldest dropped when full)
``StartTraining``  ``learner.train`` in a worker thread; its result comes back as an event
``SaveCheckpoint`` atomic checkpoint file, then evaluation (worker thread) and a round log line
``Disconnect``     close that peer's connection
``PeerMisbehaved`` log and count a strike; ``strikes_to_ban`` strikes ban the peer's key
``Emit``           one JSON log line
``Stop``           leave the loop, flush the send queues (bounded), close everything
=================  ==========================================================================

Connections: for each configured pair only the node with the smaller key dials; the other
accepts, and only from configured peers with a smaller key, so two nodes never hold two
connections. ``Started`` is delivered once every configured peer is connected, or after
``startup_timeout``, so the first rounds are not run alone. A node restarts from its
checkpoint (round and model) when one exists.

Defences (see README, "Operate a node"). Before a handshake: a banned remote IP is closed at
once; so is every accepted socket beyond ``max_handshakes`` concurrent handshakes; a failed
handshake counts against the remote IP (``ip_failures_to_ban`` within ``ip_failure_window``
bans it), except the refusal of a key the node knows (banned, no free slot, a configured
peer that should wait to be dialled): honest peers may share the address. After it: a banned
key is refused; each connection has a token bucket sized from the protocol
(:func:`~p2pfl.runtime.limits.peer_allowance`: ``peer_message_rate`` and
``peer_message_burst`` plus what the mode sends, credited per round this node completes)
whose every refused frame is a strike, and an idle watchdog; unusable frames and the core's
``PeerMisbehaved`` are strikes too; ``strikes_to_ban`` strikes ban the key for
``ban_interval`` seconds and close the connection. Runtime-level kinds (``KEEPALIVE``,
``PEER_EXCHANGE``) are handled here and never reach the core; learned peers
(:mod:`p2pfl.runtime.peerx`) are dialled only when ``accept_unknown_peers`` is set. For a
core with fixed neighbours (``dsgd``, ``gossip``), a learned peer's connection carries
keep-alives and peer exchange but no models. Every table is bounded (bans, failure counters,
strikes, the peer book), so bad traffic costs bounded memory. ``status_listen`` serves
:class:`~p2pfl.runtime.status.Metrics` as Prometheus text.

Peers beyond the neighbours. A core whose config ``admits_strangers`` (``modest``, ``gossip``
with ``peer_sampling = "membership"``) is told about every authenticated connection and gets
every peer's protocol messages; it is built knowing the ``[[bootstrap]]`` keys. When it sends
to a peer with no connection, the node *dials on demand*: the address comes from
``[[peers]]``, ``[[bootstrap]]`` or the peer book (peer exchange), the envelopes wait in a
bounded queue until the handshake is done, a banned key is never dialled, and on-demand
connections share the ``max_peers`` slots of learned peers (a send with no address or no slot
is dropped and counted, as the core's timeouts expect). Either side may dial such a peer;
when two connections to one peer race, both ends keep the one dialled by the smaller key.
Such a node also accepts connections from ``[[bootstrap]]`` and peer-book keys (any key with
``accept_unknown_peers``), within the same slots.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, assert_never

import numpy as np
import torch
import trio

from p2pfl.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    prepare_checkpoint_dir,
    save_checkpoint,
    vector_digest,
)
from p2pfl.config import NodeConfig, PeerConfig
from p2pfl.errors import (
    BadSignature,
    ConfigError,
    FrameTooLarge,
    HandshakeFailed,
    NodeClosedError,
    WireError,
)
from p2pfl.identity import Identity, NodeId
from p2pfl.learn.base import Learner
from p2pfl.merge.base import MergeRule
from p2pfl.merge.sybil import uses_history_gossip
from p2pfl.protocol import make_core
from p2pfl.protocol.actions import (
    Action,
    Disconnect,
    Emit,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    StartTraining,
    Stop,
)
from p2pfl.protocol.events import (
    DeadlineReached,
    Event,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    Started,
    TrainingFinished,
)
from p2pfl.runtime.limits import BanList, FailureCounter, PeerAllowance, TokenBucket, peer_allowance
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.peerx import PeerAd, PeerBook, decode_ads, parse_address, seal_ads
from p2pfl.runtime.status import Metrics, serve_status
from p2pfl.runtime.transport import FrameStream, handshake
from p2pfl.wire import Envelope, Limits, MessageKind, seal

log = logging.getLogger("p2pfl.node")

EVENT_QUEUE = 256
STRIKES_TO_DISCONNECT = 3
"""The default of ``node.strikes_to_ban``."""
STRIKE_WINDOW = 600.0
"""Strikes older than this (seconds) are forgotten."""
MAX_STRIKE_ENTRIES = 1024
MAX_IP_ENTRIES = 4096
"""Remote IPs whose handshake failures are counted at once (least recent forgotten)."""
LEARNED_DIAL_ATTEMPTS = 3
RUNTIME_KINDS = frozenset(
    {MessageKind.HELLO, MessageKind.HELLO_PROOF, MessageKind.KEEPALIVE, MessageKind.PEER_EXCHANGE}
)
"""Kinds the runtime consumes itself; every other kind goes to the protocol core."""
KEY_REFUSALS = frozenset({"banned_key", "peer_limit", "wrong_direction"})
"""Refusals of a key the node knows; they never count against the remote IP."""
FLUSH_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0


class Node:
    """One p2pfl node: its core, learner, connections and timers.

    Typical use (the CLI does this)::

        node = Node(load_config("node1.toml"))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.run)

    Attributes:
        core: the protocol core (read it, never drive it from outside).
        history: one dict per completed round: ``round`` (0-based index of the round just
            completed), ``loss`` (its training loss), ``test_loss``, ``test_accuracy``,
            ``peers`` (connected when it ended).
        port: the listening port once :meth:`run` reported it.
        stats: counters (messages, drops, strikes, handshake failures).
        start_round: the round the node started (or resumed) at.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        identity: Identity | None = None,
        learner: Learner | None = None,
        merge: MergeRule | None = None,
        listeners: Sequence[trio.SocketListener] | None = None,
        backoff: Backoff | None = None,
        on_round: Callable[[int, torch.Tensor, float], None] | None = None,
    ) -> None:
        """Build the learner and the core, restoring the checkpoint if there is one.

        Args:
            config: the node's configuration.
            identity: the node's key; loaded from ``config.key_file`` by default.
            learner: the learner; built from the config by default.
            merge: the merge rule; built from the config by default.
            listeners: already bound listeners (tests bind port 0 first so that every node's
                address is known before any node starts); by default ``config.listen``.
            backoff: reconnect delays.
            on_round: called in the trio thread, without blocking, each time a round ends
                (after its checkpoint is written), with the 0-based index of the round just
                completed, the merged vector (do not modify it) and that round's training
                loss (NaN when unknown); the live simulator streams its metrics from it.

        Raises:
            ConfigError: the config is inconsistent (e.g. a peer holds this node's own key),
                the checkpoint directory cannot be written, or the checkpoint belongs to
                another model or node.
            IdentityError: the key file is missing or unsafe.
            DecodeError: the checkpoint file is corrupt.
        """
        self.config = config
        self.identity = identity if identity is not None else Identity.load(config.key_file)
        self.node_id: NodeId = self.identity.node_id
        for index, peer in enumerate(config.peers):
            if peer.node_id == self.node_id:
                raise ConfigError(
                    f"peers[{index}].public_key",
                    peer.node_id.hex(),
                    "another node's key, not this node's own",
                )
        self.learner: Learner = learner if learner is not None else config.build_learner()
        self.merge: MergeRule = merge if merge is not None else config.build_merge()
        self._listeners = list(listeners) if listeners is not None else None
        self._backoff = backoff or Backoff()
        self._on_round = on_round
        self._jitter = random.Random()
        self.port: int | None = None
        self.status_port: int | None = None
        self.history: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {
            "messages_received": 0,
            "frames_dropped": 0,
            "sends_unconnected": 0,
            "dials_on_demand": 0,
            "misbehaviour": 0,
            "handshakes_failed": 0,
            "wire_errors": 0,
        }
        self.resumed_from: int | None = None

        vector = self.learner.initial_vector()
        self.start_round = 0
        self._checkpoint_file = (
            checkpoint_path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        )
        if config.checkpoint_dir is not None:
            # Checked now, not at the first save after a round of work.
            try:
                leftovers = prepare_checkpoint_dir(config.checkpoint_dir)
            except OSError as exc:
                raise ConfigError(
                    "node.checkpoint_dir",
                    str(config.checkpoint_dir),
                    f"a directory this node can create and write ({exc.strerror or exc})",
                ) from None
            for leftover in leftovers:
                log.info("removed %s, left by an interrupted checkpoint save", leftover)
        if self._checkpoint_file is not None and self._checkpoint_file.exists():
            checkpoint = load_checkpoint(
                self._checkpoint_file,
                expected_shape=tuple(vector.shape),
                expected_node=self.node_id.hex(),
            )
            vector = checkpoint.vector
            self.start_round = checkpoint.round
            self.resumed_from = checkpoint.round
        self.initial_digest = vector_digest(vector)
        seed = np.random.SeedSequence(
            [config.data.seed, int.from_bytes(self.node_id.raw[:8], "big")]
        )
        self.core = make_core(
            config.protocol,
            identity=self.identity,
            neighbours=[peer.node_id for peer in config.peers],
            vector=vector,
            samples=self.learner.num_samples,
            merge=self.merge,
            rng=np.random.default_rng(seed),
            start_round=self.start_round,
            seq_start=time.time_ns() // 1000,
            layout=self.learner.layout,
            known_peers=[peer.node_id for peer in config.bootstrap],
        )

        self._peers_by_id: dict[NodeId, PeerConfig] = {p.node_id: p for p in config.peers}
        self._bootstrap_by_id: dict[NodeId, PeerConfig] = {
            p.node_id: p for p in config.bootstrap if p.node_id != self.node_id
        }
        self._admits_strangers = config.protocol.admits_strangers
        self._pending_sends: dict[NodeId, deque[Envelope]] = {}
        self._connections: dict[NodeId, PeerConnection] = {}
        limits = config.limits
        self.limits = limits
        self._frame_limits = Limits(max_frame_bytes=limits.max_frame_bytes)
        self._strikes = FailureCounter[NodeId](MAX_STRIKE_ENTRIES, STRIKE_WINDOW)
        self.key_bans = BanList[NodeId](limits.max_bans)
        self.ip_bans = BanList[str](limits.max_bans)
        self._ip_failures = FailureCounter[str](MAX_IP_ENTRIES, limits.ip_failure_window)
        self._buckets: dict[NodeId, TokenBucket] = {}
        histories = config.protocol.history_gossip
        if histories is None:
            histories = config.protocol.mode != "modest" and uses_history_gossip(self.merge)
        self.allowance: PeerAllowance = peer_allowance(
            config.protocol,
            base_rate=limits.peer_message_rate,
            base_burst=limits.peer_message_burst,
            histories=histories,
            idle_timeout=limits.idle_timeout,
            exchange_interval=(
                config.peer_exchange.interval if config.peer_exchange.enabled else None
            ),
        )
        self._credited_round = self.start_round
        self._alone = False
        self._dial_errors: dict[NodeId, str] = {}
        self._exchange_buckets: dict[NodeId, TokenBucket] = {}
        self._handshakes = 0
        self.peer_book = PeerBook(config.peer_exchange.max_known_peers)
        self._learned_dials: set[NodeId] = set()
        self._learned_addresses: dict[NodeId, str] = {}
        self.metrics = Metrics()
        self._bind_metrics()
        self._train_loss: dict[int, float] = {}
        self._events_send, self._events_receive = trio.open_memory_channel[Event](EVENT_QUEUE)
        self._evals_send, self._evals_receive = trio.open_memory_channel[
            tuple[int, torch.Tensor, int]
        ](math.inf)
        self._all_connected = trio.Event()
        self._pump_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested = False
        self.stop_reason: str | None = None
        self.finished = trio.Event()
        self._history_changed = trio.Event()

    # -- public API -----------------------------------------------------------------------

    @property
    def connected_peers(self) -> list[NodeId]:
        """Peers with an authenticated connection now."""
        return list(self._connections)

    @property
    def handshakes_in_progress(self) -> int:
        """Accepted connections still in their handshake."""
        return self._handshakes

    def render_metrics(self) -> str:
        """The status endpoint's body: every metric in the Prometheus text format."""
        return self.metrics.render(node=self.node_id.short())

    async def wait_rounds(self, count: int) -> None:
        """Return once :attr:`history` holds at least ``count`` rounds (or the node stopped)."""
        while len(self.history) < count and not self.finished.is_set():
            await self._history_changed.wait()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Leave the loop as soon as possible and shut down gracefully (idempotent)."""
        self._stop_requested = True
        self.stop_reason = self.stop_reason or reason
        if self._pump_scope is not None:
            self._pump_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, connect, run the protocol to its end (or until stopped), then shut down.

        Reports the listening port through ``task_status`` (so ``nursery.start`` returns it).

        Raises:
            ConfigError: ``node.listen`` or ``node.status_listen`` cannot be listened on (in
                use, not an address of this machine, a host name that does not resolve).
        """
        listeners = self._listeners
        if listeners is None:
            listeners = await _listen(
                "node.listen", self.config.listen_host, self.config.listen_port
            )
        status_listeners: list[trio.SocketListener] = []
        if self.config.status_host is not None:
            # Bound before anything is logged or started: a failure is one error, no more.
            try:
                status_listeners = await _listen(
                    "node.status_listen", self.config.status_host, self.config.status_port
                )
            except ConfigError:
                if self._listeners is None:
                    with trio.CancelScope(shield=True):
                        for listener in listeners:
                            await listener.aclose()
                raise
            self.status_port = int(status_listeners[0].socket.getsockname()[1])
        self.port = int(listeners[0].socket.getsockname()[1])
        if self.resumed_from is not None:
            log.info(
                "node %s resumed round=%d digest=%s",
                self.node_id,
                self.resumed_from,
                self.initial_digest,
            )
        log.info(
            "node %s listening on %s:%d with %d peers, start round %d",
            self.node_id,
            self.config.listen_host,
            self.port,
            len(self.config.peers),
            self.start_round,
        )
        try:
            async with trio.open_nursery() as nursery:
                if status_listeners:
                    await nursery.start(serve_status, status_listeners, self.render_metrics)
                    log_event(
                        log,
                        logging.INFO,
                        "status_listening",
                        "status endpoint on http://%s:%d/metrics",
                        self.config.status_host,
                        self.status_port,
                        host=self.config.status_host,
                        port=self.status_port,
                    )
                await nursery.start(trio.serve_listeners, self._accept, listeners)
                if self.config.peer_exchange.enabled:
                    nursery.start_soon(self._exchange_peers)
                for peer in self.config.peers:
                    if self.node_id < peer.node_id:
                        nursery.start_soon(self._dial, peer, name=f"dial {peer.address}")
                nursery.start_soon(self._startup_gate)
                evaluator_done = trio.Event()
                nursery.start_soon(self._evaluator, evaluator_done)
                self._nursery = nursery
                task_status.started(self.port)
                self._pump_scope = trio.CancelScope()
                if self._stop_requested:
                    self._pump_scope.cancel()
                with self._pump_scope:
                    await self._pump()
                self._evals_send.close()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await evaluator_done.wait()
                    for connection in list(self._connections.values()):
                        await connection.wait_flushed()
                nursery.cancel_scope.cancel()
        finally:
            for connection in list(self._connections.values()):
                connection.close()
            with trio.CancelScope(shield=True):
                for listener in [*listeners, *status_listeners]:
                    await listener.aclose()
            self.finished.set()
            self._history_changed.set()
            log_event(
                log,
                logging.INFO,
                "stopped",
                "node %s stopped (%s) at round %d; stats %s",
                self.node_id,
                self.stop_reason or "cancelled",
                self.core.round,
                json.dumps(self.stats, sort_keys=True),
                reason=self.stop_reason or "cancelled",
                round=self.core.round,
                **self.stats,
            )

    # -- the pump -------------------------------------------------------------------------

    async def _pump(self) -> None:
        while not self.core.finished:
            deadline = self.core.next_deadline()
            event: Event = DeadlineReached()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                event = await self._events_receive.receive()
            actions = self.core.handle(event, now=trio.current_time())
            self._credit_progress()
            # The core has moved on: its actions (a checkpoint above all) are carried out
            # even if a stop arrives meanwhile, so the round logged at stop is the one saved
            # and resumed. None blocks for long: sends queue, training starts a task.
            with trio.CancelScope(shield=True):
                for action in actions:
                    await self._carry_out(action)

    def _credit_progress(self) -> None:
        """Each round this node completes earns every peer the frames a round lets it send."""
        advanced = self.core.round - self._credited_round
        if advanced <= 0:
            return
        self._credited_round = self.core.round
        tokens = advanced * self.allowance.per_round
        if tokens:
            for bucket in self._buckets.values():
                bucket.credit(tokens)

    async def _carry_out(self, action: Action) -> None:
        match action:
            case Send(peer=peer, envelope=envelope):
                self._send(peer, envelope)
            case StartTraining():
                assert self._nursery is not None
                self._nursery.start_soon(self._train, action)
            case SaveCheckpoint(round=round_, vector=vector):
                await self._save(round_, vector)
            case Disconnect(peer=peer, reason=reason):
                log_event(
                    log,
                    logging.INFO,
                    "disconnect",
                    "disconnecting %s: %s",
                    peer,
                    reason,
                    peer=peer.hex(),
                    reason=reason,
                )
                connection = self._connections.get(peer)
                if connection is not None:
                    connection.close()
            case PeerMisbehaved(peer=peer, reason=reason):
                self.metrics.inc("frames_rejected_total", label="protocol")
                self._strike(peer, reason)
            case Emit(name=name, fields=fields):
                record = {"event": name, "node": self.node_id.short(), **fields}
                log_event(log, logging.INFO, name, "%s", json.dumps(record), **fields)
                if name == "round":
                    self._check_alone(int(fields.get("round", self.core.round)))
            case Stop(reason=reason):
                self.stop_reason = reason
                log_event(
                    log,
                    logging.INFO,
                    "finished",
                    "node %s finished: %s",
                    self.node_id,
                    reason,
                    reason=reason,
                )
            case _:
                assert_never(action)

    def _check_alone(self, round_: int) -> None:
        """Say once, clearly, when rounds go on with no configured neighbour connected."""
        if self._alone or not self._peers_by_id or self._admits_strangers:
            return
        if any(peer in self._connections for peer in self._peers_by_id):
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
            if peer.node_id in self._connections:
                continue
            if self._is_banned(peer.node_id):
                why = "banned by this node"
            elif self.node_id < peer.node_id:
                why = self._dial_errors.get(peer.node_id, "not reached yet")
            else:
                why = "it did not connect to this node"
            reasons.append(f"{peer.address}: {why}")
        return "; ".join(reasons)

    def _send(self, peer: NodeId, envelope: Envelope) -> None:
        connection = self._connections.get(peer)
        if connection is None:
            if not (self._admits_strangers and self._send_on_demand(peer, envelope)):
                self.stats["sends_unconnected"] += 1
            return
        if not connection.enqueue(envelope):
            self.stats["frames_dropped"] += 1
            self.metrics.inc("queue_drops_total")
            log.debug("send queue to %s full; dropped the oldest frame", peer)

    def _send_on_demand(self, peer: NodeId, envelope: Envelope) -> bool:
        """Queue ``envelope`` for a peer that is not connected, dialling it if no dial is
        under way; False if it cannot be reached (configured peers redial by themselves)."""
        pending = self._pending_sends.get(peer)
        if pending is not None:
            if len(pending) == pending.maxlen:
                self.stats["frames_dropped"] += 1
            pending.append(envelope)
            return True
        if peer in self._peers_by_id or self._is_banned(peer) or self._nursery is None:
            return False
        target = self._address_of(peer)
        if target is None or self._learned_slots() <= 0:
            return False
        queue: deque[Envelope] = deque(maxlen=self.config.send_queue)
        queue.append(envelope)
        self._pending_sends[peer] = queue
        self._learned_dials.add(peer)
        self.stats["dials_on_demand"] += 1
        host, port, address = target
        self._nursery.start_soon(self._dial_on_demand, peer, host, port, address)
        return True

    def _address_of(self, peer: NodeId) -> tuple[str, int, str] | None:
        """Where to dial ``peer``: ``[[peers]]``, then ``[[bootstrap]]``, then the peer book."""
        config = self._peers_by_id.get(peer) or self._bootstrap_by_id.get(peer)
        if config is not None:
            return config.host, config.port, config.address
        learned = self.peer_book.get(peer)
        if learned is None:
            return None
        host, port = learned.ad.host_port
        return host, port, learned.ad.address

    async def _dial_on_demand(self, peer: NodeId, host: str, port: int, address: str) -> None:
        """Dial a peer the core wants to reach, a few times at most; serve the connection
        until it ends. Sends queued meanwhile go out once it is up, or are dropped."""
        try:
            for attempt in range(LEARNED_DIAL_ATTEMPTS):
                if self._is_banned(peer) or peer in self._connections:
                    return
                if await self._dial_once(peer, host, port, address):
                    return
                await trio.sleep(self._backoff.delay(attempt, self._jitter))
        finally:
            self._learned_dials.discard(peer)
            dropped = self._pending_sends.pop(peer, None)
            if dropped:
                self.stats["sends_unconnected"] += len(dropped)

    async def _train(self, action: StartTraining) -> None:
        train = functools.partial(
            self.learner.train, action.vector, action.steps, round=action.round
        )
        result = await trio.to_thread.run_sync(train)
        self._train_loss[action.round] = result.loss
        await self._events_send.send(TrainingFinished(result.vector, result.loss, result.steps))

    async def _save(self, round_: int, vector: torch.Tensor) -> None:
        target = self._checkpoint_file
        if target is not None:
            info = {"saved_at": time.time(), "loss": self._train_loss.get(round_ - 1, math.nan)}
            try:
                await trio.to_thread.run_sync(
                    lambda: save_checkpoint(
                        target, round=round_, vector=vector, node=self.node_id.hex(), info=info
                    )
                )
            except OSError as exc:
                # The directory was writable at start (prepare_checkpoint_dir); it no longer
                # is. Going on would lose every round from here on a restart.
                raise ConfigError(
                    "node.checkpoint_dir",
                    str(target.parent),
                    f"a directory this node can write (saving round {round_} failed: "
                    f"{exc.strerror or exc}); the node stopped",
                ) from None
        if self._on_round is not None:
            self._on_round(round_ - 1, vector, self._train_loss.get(round_ - 1, math.nan))
        self._evals_send.send_nowait((round_, vector, len(self._connections)))

    async def _evaluator(self, done: trio.Event) -> None:
        """Evaluate saved models one at a time, in round order, off the pump."""
        try:
            async for round_, vector, peers in self._evals_receive:
                result = await trio.to_thread.run_sync(self.learner.evaluate, vector)
                completed = round_ - 1
                entry: dict[str, Any] = {
                    "round": completed,
                    "loss": self._train_loss.pop(completed, math.nan),
                    "test_loss": result.loss,
                    "test_accuracy": result.accuracy,
                    "peers": peers,
                }
                self.history.append(entry)
                self._history_changed.set()
                self._history_changed = trio.Event()
                self.metrics.set("last_train_loss", entry["loss"])
                self.metrics.set("last_test_loss", result.loss)
                self.metrics.set("last_test_accuracy", result.accuracy)
                log_event(
                    log,
                    logging.INFO,
                    "round",
                    "node %s round=%d loss=%.4f test_loss=%.4f test_accuracy=%.4f peers=%d",
                    self.node_id,
                    completed,
                    entry["loss"],
                    result.loss,
                    result.accuracy,
                    peers,
                    node=self.node_id.short(),
                    **entry,
                )
        finally:
            done.set()

    # -- connections ----------------------------------------------------------------------

    async def _startup_gate(self) -> None:
        if not self.config.peers:
            self._all_connected.set()
        with trio.move_on_after(self.config.startup_timeout):
            await self._all_connected.wait()
        missing = [p.address for p in self.config.peers if p.node_id not in self._connections]
        if missing:
            log_event(
                log,
                logging.WARNING,
                "startup_incomplete",
                "starting round %d without %d of %d peers after waiting %g s (%s); peers that "
                "are down or finished their rounds leave this node training alone",
                self.core.round,
                len(missing),
                len(self.config.peers),
                self.config.startup_timeout,
                self._missing_reasons(),
                missing=missing,
            )
        await self._events_send.send(Started())

    def _bind_metrics(self) -> None:
        metrics = self.metrics
        metrics.bind("round", lambda: float(self.core.round))
        metrics.bind("rounds_total", lambda: float(self.config.protocol.rounds))
        metrics.bind("peers_connected", lambda: float(len(self._connections)))
        metrics.bind("peers_configured", lambda: float(len(self._peers_by_id)))
        metrics.bind("peers_known", lambda: float(len(self.peer_book)))
        metrics.bind("handshakes_in_progress", lambda: float(self._handshakes))
        metrics.bind("bans_active", lambda: float(self.key_bans.active(trio.current_time())), "key")
        metrics.bind("bans_active", lambda: float(self.ip_bans.active(trio.current_time())), "ip")
        for name in ("last_train_loss", "last_test_loss", "last_test_accuracy"):
            metrics.set(name, math.nan)

    def _is_banned(self, peer: NodeId) -> bool:
        return self.key_bans.is_banned(peer, trio.current_time())

    def _learned_connections(self) -> int:
        return sum(1 for peer in self._connections if peer not in self._peers_by_id)

    def _learned_slots(self) -> int:
        """Connections to non-configured peers still allowed (configured peers keep theirs)."""
        allowed = self.limits.max_peers - len(self._peers_by_id)
        return allowed - self._learned_connections() - len(self._learned_dials)

    def _refusal(self, peer: NodeId) -> str | None:
        """Why an accepted connection from ``peer`` is refused, or ``None`` to accept it."""
        if self._is_banned(peer):
            return "banned_key"
        # Only the peer with the smaller key dials; refusing the others keeps one connection
        # per pair even if a peer is misconfigured. A core that talks beyond its neighbours
        # is dialled on demand from either side.
        if peer in self._peers_by_id:
            return None if peer < self.node_id else "wrong_direction"
        known = peer in self._bootstrap_by_id or peer in self.peer_book
        if not (self._admits_strangers and known):
            if not self.config.peer_exchange.accept_unknown_peers:
                return "handshake"
            if not (self._admits_strangers or peer < self.node_id):
                return "handshake"
        if peer in self._connections:
            return None  # a reconnect replaces the old connection
        return None if self._learned_slots() > 0 else "peer_limit"

    def _reject(self, reason: str) -> None:
        self.metrics.inc("frames_rejected_total", label=reason)

    async def _accept(self, stream: trio.SocketStream) -> None:
        self.metrics.inc("connections_accepted_total")
        frames = FrameStream(stream, self._frame_limits)
        try:
            address = _format_sockname(stream)
            ip = _remote_ip(stream)
            if ip is not None and self.ip_bans.is_banned(ip, trio.current_time()):
                self._reject("banned_ip")
                return
            if self._handshakes >= self.limits.max_handshakes:
                self._reject("handshake_limit")
                return
            refusals: list[str] = []

            def known(peer: NodeId) -> bool:
                reason = self._refusal(peer)
                if reason is not None:
                    refusals.append(reason)
                return reason is None

            self._handshakes += 1
            try:
                result = await handshake(
                    frames,
                    self.identity,
                    known=known,
                    timeout=self.config.handshake_timeout,
                )
            except HandshakeFailed as exc:
                self._handshake_failed(exc, refusals[0] if refusals else None, address, ip)
                return
            except NodeClosedError:
                return
            finally:
                self._handshakes -= 1
            await self._serve(frames, result.peer, address)
        finally:
            await frames.aclose()

    def _handshake_failed(
        self, exc: HandshakeFailed, refusal: str | None, address: str, ip: str | None
    ) -> None:
        self.stats["handshakes_failed"] += 1
        self.metrics.inc("handshakes_failed_total")
        if refusal == "wrong_direction":
            self._reject("handshake")  # a configured peer that should wait to be dialled
        else:
            self._reject(refusal or _wire_reason(exc.__cause__, default="handshake"))
        log_event(
            log,
            logging.INFO,
            "handshake_failed",
            "refused connection from %s: %s",
            address,
            exc,
            address=address,
            reason=str(exc),
        )
        threshold = self.limits.ip_failures_to_ban
        if ip is None or threshold == 0 or refusal in KEY_REFUSALS:
            # A key this node refuses by policy (banned, no slot) signed its HELLO: its
            # redials are not failures of the address, which honest peers may share.
            return
        now = trio.current_time()
        if self._ip_failures.record(ip, now) >= threshold:
            self._ip_failures.forget(ip)
            self.ip_bans.ban(ip, now + self.limits.ban_interval, now=now)
            self.metrics.inc("bans_total", label="ip")
            log_event(
                log,
                logging.WARNING,
                "banned",
                "banned IP %s for %g s after %d failed handshakes",
                ip,
                self.limits.ban_interval,
                threshold,
                ip=ip,
                kind="ip",
                seconds=self.limits.ban_interval,
            )

    async def _dial(self, peer: PeerConfig) -> None:
        attempt = 0
        while True:
            ban_ends = self.key_bans.banned_until(peer.node_id, trio.current_time())
            if ban_ends is not None:
                await trio.sleep_until(ban_ends)
            if await self._dial_once(peer.node_id, peer.host, peer.port, peer.address):
                attempt = 0
            await trio.sleep(self._backoff.delay(attempt, self._jitter))
            attempt += 1

    async def _dial_once(self, peer: NodeId, host: str, port: int, address: str) -> bool:
        """Connect, authenticate and serve ``peer`` until the connection ends.

        Returns:
            whether the handshake succeeded.
        """
        stream: trio.SocketStream | None = None
        failure = f"no answer within {CONNECT_TIMEOUT:g} s"
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream(host, port)
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
                self.stats["handshakes_failed"] += 1
                self.metrics.inc("handshakes_failed_total")
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

    async def _dial_learned(self, ad: PeerAd) -> None:
        """Try a learned peer a few times; forget it if it never answers as itself."""
        host, port = ad.host_port
        try:
            for attempt in range(LEARNED_DIAL_ATTEMPTS):
                if self._is_banned(ad.node_id) or ad.node_id in self._connections:
                    return
                if await self._dial_once(ad.node_id, host, port, ad.address):
                    return
                await trio.sleep(self._backoff.delay(attempt, self._jitter))
            self.peer_book.forget(ad.node_id)
        finally:
            self._learned_dials.discard(ad.node_id)

    async def _serve(
        self, frames: FrameStream, peer: NodeId, address: str, *, outbound: bool = False
    ) -> None:
        """Register an authenticated connection, run it, and report its end."""
        now = trio.current_time()
        limits = self.limits
        connection = PeerConnection(
            peer,
            frames,
            queue_capacity=self.config.send_queue,
            address=address,
            idle_timeout=limits.idle_timeout,
            keepalive=self._keepalive,
            metrics=self.metrics,
            outbound=outbound,
        )
        configured = peer in self._peers_by_id
        tells_core = configured or self._admits_strangers
        previous = self._connections.get(peer)
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
        self._connections[peer] = connection
        if previous is not None:
            for envelope in previous.take_queued():
                connection.enqueue(envelope)
        for envelope in self._pending_sends.pop(peer, ()):
            connection.enqueue(envelope)
        self._buckets[peer] = self.allowance.bucket(now)
        interval = self.config.peer_exchange.interval
        self._exchange_buckets[peer] = TokenBucket(2.0 / interval, 2.0, now=now)
        if previous is not None:
            log.info("%s reconnected; replacing the old connection", peer)
            previous.close()
            if tells_core:
                await self._events_send.send(PeerDisconnected(peer))
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
            await self._events_send.send(PeerConnected(peer))
        if all(p in self._connections for p in self._peers_by_id):
            self._all_connected.set()
        gone = False
        try:
            await connection.run(self._on_message, self._on_wire_error)
        finally:
            if self._connections.get(peer) is connection:
                del self._connections[peer]
                self._buckets.pop(peer, None)
                self._exchange_buckets.pop(peer, None)
                gone = True
        if connection.timed_out:
            self._reject("idle")
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
                await self._events_send.send(PeerDisconnected(peer))

    def _canonical(self, connection: PeerConnection) -> bool:
        """Whether ``connection`` was dialled by the smaller of the two keys."""
        return connection.outbound == (self.node_id < connection.peer)

    def _keepalive(self) -> Envelope:
        return seal(
            self.identity, MessageKind.KEEPALIVE, seq=time.time_ns() // 1000, round=0, payload=b""
        )

    async def _on_message(self, peer: NodeId, envelope: Envelope) -> None:
        bucket = self._buckets.get(peer)
        if bucket is not None and not bucket.take(trio.current_time()):
            self._reject("rate")
            self._strike(
                peer,
                f"more frames than the protocol sends ({self.allowance.per_round:g} per round "
                f"and {self.allowance.per_second:g}/s, burst {self.allowance.burst:g})",
            )
            return
        kind = envelope.kind
        if kind not in RUNTIME_KINDS:
            # Everything else belongs to the protocol core, which judges it; unless the core
            # admits peers beyond its neighbours, learned peers' messages are dropped here.
            if peer not in self._peers_by_id and not self._admits_strangers:
                self._reject("unexpected_kind")
                return
            self.stats["messages_received"] += 1
            await self._events_send.send(MessageReceived(peer, envelope))
            return
        if envelope.sender != peer:
            self._reject("protocol")
            self._strike(peer, f"{kind.name} signed by {envelope.sender}, not by the peer")
            return
        if kind is MessageKind.KEEPALIVE:
            return
        if kind is MessageKind.PEER_EXCHANGE:
            self._on_peer_exchange(peer, envelope)
            return
        self._reject("unexpected_kind")  # a handshake frame after the handshake
        self._strike(peer, f"unexpected {kind.name} after the handshake")

    def _on_peer_exchange(self, peer: NodeId, envelope: Envelope) -> None:
        settings = self.config.peer_exchange
        now = trio.current_time()
        bucket = self._exchange_buckets.get(peer)
        if bucket is not None and not bucket.take(now):
            self._reject("rate")
            return
        try:
            ads = decode_ads(
                envelope.payload,
                max_per_message=settings.max_per_message,
                max_payload_bytes=settings.max_per_message * 320 + 16,
            )
        except WireError as exc:
            self._reject("malformed")
            self._strike(peer, f"bad peer list: {exc}")
            return
        new = self.peer_book.learn(
            ads,
            advertiser=peer,
            own=self.node_id,
            now=now,
            skip=lambda key: key in self._peers_by_id or self._is_banned(key),
        )
        if not new:
            return
        self.metrics.inc("peer_exchange_learned_total", len(new))
        log_event(
            log,
            logging.INFO,
            "peers_learned",
            "learned %d peers from %s",
            len(new),
            peer,
            advertiser=peer.hex(),
            peers=[f"{ad.node_id.short()}@{ad.address}" for ad in new],
        )
        if settings.accept_unknown_peers and self._nursery is not None:
            for ad in new:
                # The smaller key dials, as for configured peers.
                if self.node_id < ad.node_id and self._learned_slots() > 0:
                    self._learned_dials.add(ad.node_id)
                    self._learned_addresses[ad.node_id] = ad.address
                    self._nursery.start_soon(self._dial_learned, ad)

    def _advertisement(self) -> list[PeerAd]:
        """Connected peers this node can vouch for and whose listening address it knows."""
        ads: list[PeerAd] = []
        for peer in self._connections:
            config = self._peers_by_id.get(peer) or self._bootstrap_by_id.get(peer)
            address = config.address if config is not None else self._learned_addresses.get(peer)
            if address is not None and parse_address(address) is not None:
                ads.append(PeerAd(address, peer))
        limit = self.config.peer_exchange.max_per_message
        if len(ads) > limit:
            ads = self._jitter.sample(ads, limit)
        return ads

    async def _exchange_peers(self) -> None:
        interval = self.config.peer_exchange.interval
        while True:
            await trio.sleep(interval * self._jitter.uniform(0.8, 1.2))
            ads = self._advertisement()
            if not ads:
                continue
            envelope = seal_ads(self.identity, ads, seq=time.time_ns() // 1000)
            for peer, connection in list(self._connections.items()):
                if len(ads) == 1 and ads[0].node_id == peer:
                    continue
                if not connection.enqueue(envelope):
                    self.metrics.inc("queue_drops_total")

    async def _on_wire_error(self, peer: NodeId, exc: WireError) -> None:
        self.stats["wire_errors"] += 1
        self._reject(_wire_reason(exc, default="malformed"))
        self._strike(peer, f"unusable frame: {exc}")

    def _strike(self, peer: NodeId, reason: str) -> None:
        self.stats["misbehaviour"] += 1
        self.metrics.inc("strikes_total")
        now = trio.current_time()
        needed = self.limits.strikes_to_ban
        strikes = self._strikes.record(peer, now)
        log_event(
            log,
            logging.WARNING,
            "strike",
            "peer %s misbehaved (%d/%d): %s",
            peer,
            strikes,
            needed,
            reason,
            peer=peer.hex(),
            strikes=strikes,
            reason=reason,
        )
        if strikes < needed:
            return
        self._strikes.forget(peer)
        self.key_bans.ban(peer, now + self.limits.ban_interval, now=now)
        self.metrics.inc("bans_total", label="key")
        self.peer_book.forget(peer)
        connection = self._connections.get(peer)
        log_event(
            log,
            logging.WARNING,
            "banned",
            "banned peer %s for %g s after %d strikes",
            peer,
            self.limits.ban_interval,
            needed,
            peer=peer.hex(),
            kind="key",
            seconds=self.limits.ban_interval,
        )
        if connection is not None:
            connection.close()


def _wire_reason(exc: BaseException | None, *, default: str) -> str:
    """The ``frames_rejected_total`` reason for a wire error."""
    if isinstance(exc, FrameTooLarge):
        return "oversized"
    if isinstance(exc, BadSignature):
        return "bad_signature"
    if isinstance(exc, WireError):
        return "malformed"
    return default


async def _listen(key: str, host: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``host:port``, or say which config key names an address that cannot be used.

    Raises:
        ConfigError: naming ``key``: the address is in use, not this machine's, or its host
            name does not resolve.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError(
            key,
            address,
            f"an address of this machine that is free to listen on (cannot listen: "
            f"{exc.strerror or exc}); pick a free port, or a host of this machine such as "
            "127.0.0.1",
        ) from None


def _os_reason(exc: OSError) -> str:
    """Why a connection failed: trio reports every address it tried as the cause."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            # trio's message repeats the address; the errno's own text is enough here.
            if isinstance(inner, OSError) and inner.errno and inner.errno > 0:
                return os.strerror(inner.errno)
    return exc.strerror or str(exc)  # e.g. a host name that does not resolve


def _remote_ip(stream: trio.SocketStream) -> str | None:
    with contextlib.suppress(OSError):
        return str(stream.socket.getpeername()[0])
    return None


async def run_until_signalled(node: Node) -> None:
    """Run ``node`` until it finishes, or until SIGINT/SIGTERM asks it to stop gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("received %s; shutting down", name)
                    node.request_stop(f"received {name}")

            nursery.start_soon(watch)
            await node.run()
            nursery.cancel_scope.cancel()


def _format_sockname(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
