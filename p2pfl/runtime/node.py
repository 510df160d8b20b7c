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
``PeerMisbehaved`` log and count; the third strike closes the connection and bans the peer
``Emit``           one JSON log line
``Stop``           leave the loop, flush the send queues (bounded), close everything
=================  ==========================================================================

Connections: for each configured pair only the node with the smaller key dials; the other
accepts, and only from configured peers with a smaller key, so two nodes never hold two
connections. ``Started`` is delivered once every configured peer is connected, or after
``startup_timeout``, so the first rounds are not run alone. A node restarts from its
checkpoint (round and model) when one exists.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from collections.abc import Sequence
from typing import Any, assert_never

import numpy as np
import torch
import trio

from p2pfl.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, vector_digest
from p2pfl.config import NodeConfig, PeerConfig
from p2pfl.errors import ConfigError, HandshakeFailed, NodeClosedError, WireError
from p2pfl.identity import Identity, NodeId
from p2pfl.learn.base import Learner
from p2pfl.merge.base import MergeRule
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
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.transport import FrameStream, handshake
from p2pfl.wire import Envelope

log = logging.getLogger("p2pfl.node")

EVENT_QUEUE = 256
STRIKES_TO_DISCONNECT = 3
BAN_INTERVAL = 60.0
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

        Raises:
            ConfigError: the config is inconsistent (e.g. a peer holds this node's own key),
                or the checkpoint belongs to another model or node.
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
        self._jitter = random.Random()
        self.port: int | None = None
        self.history: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {
            "messages_received": 0,
            "frames_dropped": 0,
            "sends_unconnected": 0,
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
        )

        self._peers_by_id: dict[NodeId, PeerConfig] = {p.node_id: p for p in config.peers}
        self._connections: dict[NodeId, PeerConnection] = {}
        self._strikes: dict[NodeId, int] = {}
        self._banned_until: dict[NodeId, float] = {}
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
            OSError: the listening address cannot be bound.
        """
        listeners = self._listeners
        if listeners is None:
            listeners = await trio.open_tcp_listeners(
                self.config.listen_port, host=self.config.listen_host
            )
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
                await nursery.start(trio.serve_listeners, self._accept, listeners)
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
                for listener in listeners:
                    await listener.aclose()
            self.finished.set()
            self._history_changed.set()
            log.info(
                "node %s stopped (%s) at round %d; stats %s",
                self.node_id,
                self.stop_reason or "cancelled",
                self.core.round,
                json.dumps(self.stats, sort_keys=True),
            )

    # -- the pump -------------------------------------------------------------------------

    async def _pump(self) -> None:
        while not self.core.finished:
            deadline = self.core.next_deadline()
            event: Event = DeadlineReached()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                event = await self._events_receive.receive()
            actions = self.core.handle(event, now=trio.current_time())
            for action in actions:
                await self._carry_out(action)

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
                log.info("disconnecting %s: %s", peer, reason)
                connection = self._connections.get(peer)
                if connection is not None:
                    connection.close()
            case PeerMisbehaved(peer=peer, reason=reason):
                self._strike(peer, reason)
            case Emit(name=name, fields=fields):
                log.info(json.dumps({"event": name, "node": self.node_id.short(), **fields}))
            case Stop(reason=reason):
                self.stop_reason = reason
                log.info("node %s finished: %s", self.node_id, reason)
            case _:
                assert_never(action)

    def _send(self, peer: NodeId, envelope: Envelope) -> None:
        connection = self._connections.get(peer)
        if connection is None:
            self.stats["sends_unconnected"] += 1
            return
        if not connection.enqueue(envelope):
            self.stats["frames_dropped"] += 1
            log.debug("send queue to %s full; dropped the oldest frame", peer)

    async def _train(self, action: StartTraining) -> None:
        result = await trio.to_thread.run_sync(self.learner.train, action.vector, action.steps)
        self._train_loss[action.round] = result.loss
        await self._events_send.send(TrainingFinished(result.vector, result.loss, result.steps))

    async def _save(self, round_: int, vector: torch.Tensor) -> None:
        target = self._checkpoint_file
        if target is not None:
            info = {"saved_at": time.time(), "loss": self._train_loss.get(round_ - 1, math.nan)}
            await trio.to_thread.run_sync(
                lambda: save_checkpoint(
                    target, round=round_, vector=vector, node=self.node_id.hex(), info=info
                )
            )
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
                log.info(
                    "node %s round=%d loss=%.4f test_loss=%.4f test_accuracy=%.4f peers=%d",
                    self.node_id,
                    completed,
                    entry["loss"],
                    result.loss,
                    result.accuracy,
                    peers,
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
            log.warning(
                "starting without %d peers after %gs: %s",
                len(missing),
                self.config.startup_timeout,
                ", ".join(missing),
            )
        await self._events_send.send(Started())

    def _is_banned(self, peer: NodeId) -> bool:
        return self._banned_until.get(peer, -math.inf) > trio.current_time()

    def _may_accept(self, peer: NodeId) -> bool:
        # Only peers with a smaller key dial us; refusing the others keeps one connection
        # per pair even if a peer is misconfigured.
        return peer in self._peers_by_id and peer < self.node_id and not self._is_banned(peer)

    async def _accept(self, stream: trio.SocketStream) -> None:
        frames = FrameStream(stream)
        try:
            address = _format_sockname(stream)
            try:
                result = await handshake(
                    frames,
                    self.identity,
                    known=self._may_accept,
                    timeout=self.config.handshake_timeout,
                )
            except HandshakeFailed as exc:
                self.stats["handshakes_failed"] += 1
                log.warning("refused connection from %s: %s", address, exc)
                return
            except NodeClosedError:
                return
            await self._serve(frames, result.peer, address)
        finally:
            await frames.aclose()

    async def _dial(self, peer: PeerConfig) -> None:
        attempt = 0
        while True:
            ban_ends = self._banned_until.get(peer.node_id, -math.inf)
            if ban_ends > trio.current_time():
                await trio.sleep_until(ban_ends)
            stream: trio.SocketStream | None = None
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    stream = await trio.open_tcp_stream(peer.host, peer.port)
                except OSError as exc:
                    log.debug("connecting to %s failed: %s", peer.address, exc)
            if stream is not None:
                frames = FrameStream(stream)
                try:
                    try:
                        await handshake(
                            frames,
                            self.identity,
                            expected=peer.node_id,
                            timeout=self.config.handshake_timeout,
                        )
                    except HandshakeFailed as exc:
                        self.stats["handshakes_failed"] += 1
                        log.warning("handshake with %s failed: %s", peer.address, exc)
                    else:
                        attempt = 0
                        await self._serve(frames, peer.node_id, peer.address)
                finally:
                    await frames.aclose()
            await trio.sleep(self._backoff.delay(attempt, self._jitter))
            attempt += 1

    async def _serve(self, frames: FrameStream, peer: NodeId, address: str) -> None:
        """Register an authenticated connection, run it, and report its end."""
        connection = PeerConnection(
            peer, frames, queue_capacity=self.config.send_queue, address=address
        )
        previous = self._connections.get(peer)
        self._connections[peer] = connection
        if previous is not None:
            log.info("%s reconnected; replacing the old connection", peer)
            previous.close()
            await self._events_send.send(PeerDisconnected(peer))
        log.info("connected to %s at %s", peer, address)
        await self._events_send.send(PeerConnected(peer))
        if len(self._connections) == len(self._peers_by_id):
            self._all_connected.set()
        gone = False
        try:
            await connection.run(self._on_message, self._on_wire_error)
        finally:
            if self._connections.get(peer) is connection:
                del self._connections[peer]
                gone = True
        if gone:
            log.info("disconnected from %s", peer)
            await self._events_send.send(PeerDisconnected(peer))

    async def _on_message(self, peer: NodeId, envelope: Envelope) -> None:
        self.stats["messages_received"] += 1
        await self._events_send.send(MessageReceived(peer, envelope))

    async def _on_wire_error(self, peer: NodeId, exc: WireError) -> None:
        self.stats["wire_errors"] += 1
        self._strike(peer, f"unusable frame: {exc}")

    def _strike(self, peer: NodeId, reason: str) -> None:
        self.stats["misbehaviour"] += 1
        strikes = self._strikes.get(peer, 0) + 1
        log.warning("peer %s misbehaved (%d/%d): %s", peer, strikes, STRIKES_TO_DISCONNECT, reason)
        if strikes < STRIKES_TO_DISCONNECT:
            self._strikes[peer] = strikes
            return
        self._strikes.pop(peer, None)
        self._banned_until[peer] = trio.current_time() + BAN_INTERVAL
        connection = self._connections.get(peer)
        if connection is not None:
            log.warning("disconnecting %s after %d strikes", peer, STRIKES_TO_DISCONNECT)
            connection.close()


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
