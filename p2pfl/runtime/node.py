"""One p2pfl node: the trio driver around a sans-IO protocol core.

Theory of operation
-------------------
:class:`Node` builds a node's parts from its config and runs them in one nursery; each part
is a module of this package, with its own docstring:

=================================  ==========================================================
:mod:`~p2pfl.runtime.pump`         the one task that owns the core: events in, actions out
:mod:`~p2pfl.runtime.connections`  accepting, dialling (configured, learned, on demand),
                                   serving connections, sending
:mod:`~p2pfl.runtime.defences`     strikes, bans of keys and addresses, per-peer rates
:mod:`~p2pfl.runtime.peerx`        peer exchange: lists of peers, the peer book
:mod:`~p2pfl.runtime.reporting`    checkpoints, evaluation, history, the round record
:mod:`~p2pfl.runtime.status`       the one :class:`~p2pfl.runtime.status.Metrics` object
                                   of the node, served as Prometheus text
:mod:`~p2pfl.runtime.policy`       the injected :class:`~p2pfl.runtime.policy.LinkPolicy`:
                                   which links are up, how to dial
=================================  ==========================================================

A node restarts from its checkpoint (round and model) when one exists. :meth:`Node.run`
listens (``status_listen`` too, bound before anything is logged so that its failure is the
only line), starts the connection, peer-exchange, startup-gate and evaluator tasks, runs the
pump until the core stops or :meth:`Node.request_stop` is called (a graceful stop, e.g.
SIGTERM, then tells the core ``LeaveRequested`` and sends its goodbye), then flushes the send
queues and the evaluations (bounded by ``FLUSH_TIMEOUT``), closes everything, and logs one
``stopped`` record with the node's counters.

Defences are described in the README, "Operate a node", and in
:mod:`~p2pfl.runtime.defences`; every table is bounded (bans, failure counters, strikes, the
peer book), so bad traffic costs bounded memory.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import trio

from p2pfl.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    prepare_checkpoint_dir,
    vector_digest,
)
from p2pfl.config import NodeConfig
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity, NodeId
from p2pfl.learn.base import Learner
from p2pfl.merge.base import MergeRule
from p2pfl.protocol import make_core
from p2pfl.protocol.events import Event
from p2pfl.runtime.connections import Connections
from p2pfl.runtime.defences import STRIKES_TO_DISCONNECT, Defences
from p2pfl.runtime.limits import BanList, PeerAllowance, peer_allowance
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.peer import Backoff
from p2pfl.runtime.peerx import PeerBook, PeerExchange
from p2pfl.runtime.policy import LinkPolicy, OpenLinks
from p2pfl.runtime.pump import EVENT_QUEUE, Pump
from p2pfl.runtime.reporting import Reporting
from p2pfl.runtime.status import Metrics, serve_status

log = logging.getLogger("p2pfl.node")

__all__ = ["STRIKES_TO_DISCONNECT", "Node", "run_until_signalled"]

FLUSH_TIMEOUT = 5.0
STATS = {
    "messages_received": "messages_received_total",
    "frames_dropped": "queue_drops_total",
    "sends_unconnected": "sends_unconnected_total",
    "dials_on_demand": "dials_on_demand_total",
    "misbehaviour": "strikes_total",
    "handshakes_failed": "handshakes_failed_total",
    "wire_errors": "wire_errors_total",
}
"""The counters of :attr:`Node.stats` (and the ``stopped`` record) and the metric each reads."""


class Node:
    """One p2pfl node: its core, learner, connections and timers.

    Typical use (the CLI does this)::

        node = Node(load_config("node1.toml"))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.run)

    Attributes:
        core: the protocol core (read it, never drive it from outside).
        metrics: every counter and gauge of the node (the status endpoint serves them).
        port: the listening port once :meth:`run` reported it.
        start_round: the round the node started (or resumed) at.
        key_bans: banned peer keys; ``ip_bans``: banned remote IPs.
        peer_book: peers learned through peer exchange.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        identity: Identity | None = None,
        learner: Learner | None = None,
        merge: MergeRule | None = None,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
        backoff: Backoff | None = None,
        on_round: Callable[[int, torch.Tensor, float], None] | None = None,
        policy: LinkPolicy | None = None,
    ) -> None:
        """Build the learner and the core, restoring the checkpoint if there is one.

        Args:
            config: the node's configuration.
            identity: the node's key; loaded from ``config.key_file`` by default.
            learner: the learner; built from the config by default.
            merge: the merge rule; built from the config by default.
            listeners: already bound listeners (tests bind port 0 first so that every node's
                address is known before any node starts, or listen in memory); by default
                ``config.listen``. The port reported is a socket listener's own, else
                ``config.listen_port``.
            backoff: reconnect delays.
            on_round: called in the trio thread, without blocking, each time a round ends
                (after its checkpoint is written), with the 0-based index of the round just
                completed, the merged vector (do not modify it) and that round's training
                loss (NaN when unknown); the live simulator streams its metrics from it.
            policy: which links are up and how to dial (:mod:`p2pfl.runtime.policy`); by
                default every link is up and dials are TCP connections.

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
        self.port: int | None = None
        self.status_port: int | None = None
        self.resumed_from: int | None = None

        vector = self.learner.initial_vector()
        self.start_round = 0
        checkpoint_file = (
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
        if checkpoint_file is not None and checkpoint_file.exists():
            checkpoint = load_checkpoint(
                checkpoint_file,
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

        limits = config.limits
        self.limits = limits
        self.allowance: PeerAllowance = peer_allowance(
            config.protocol,
            base_rate=limits.peer_message_rate,
            base_burst=limits.peer_message_burst,
            histories=self.core.gossips_histories,
            idle_timeout=limits.idle_timeout,
            exchange_interval=(
                config.peer_exchange.interval if config.peer_exchange.enabled else None
            ),
        )
        jitter = random.Random()
        self.metrics = Metrics()
        self._events_send, events_receive = trio.open_memory_channel[Event](EVENT_QUEUE)
        self._all_connected = trio.Event()
        self.defences = Defences(limits, self.allowance, self.metrics, on_ban=self._on_ban)
        self.exchange = PeerExchange(
            self.identity,
            config.peer_exchange,
            self.defences,
            configured={peer.node_id for peer in config.peers},
            jitter=jitter,
        )
        self.connections = Connections(
            config,
            self.identity,
            events=self._events_send,
            defences=self.defences,
            exchange=self.exchange,
            policy=policy if policy is not None else OpenLinks(),
            metrics=self.metrics,
            backoff=backoff or Backoff(),
            jitter=jitter,
            all_connected=self._all_connected,
        )
        self.reporting = Reporting(
            self.node_id,
            self.learner,
            self.metrics,
            checkpoint_file=checkpoint_file,
            peers=lambda: len(self.connections.table),
            on_round=on_round,
        )
        self.pump = Pump(
            self.core,
            self.node_id,
            self.learner,
            events=(self._events_send, events_receive),
            connections=self.connections,
            defences=self.defences,
            reporting=self.reporting,
            start_round=self.start_round,
        )
        self._bind_metrics()
        self._pump_scope: trio.CancelScope | None = None
        self._stop_requested = False
        self._leave = False
        self._left = False
        self._stop_reason: str | None = None
        self.finished = trio.Event()

    # -- public API -----------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per completed round: ``round`` (0-based index of the round just
        completed), ``loss`` (its training loss), ``test_loss``, ``test_accuracy``, ``peers``
        (connected when it ended)."""
        return self.reporting.history

    @property
    def stats(self) -> dict[str, int]:
        """A few counters of :attr:`metrics` under their short names (``STATS``), as the
        ``stopped`` record logs them."""
        return {name: int(self.metrics.get(metric)) for name, metric in STATS.items()}

    @property
    def key_bans(self) -> BanList[NodeId]:
        return self.defences.key_bans

    @property
    def ip_bans(self) -> BanList[str]:
        return self.defences.ip_bans

    @property
    def peer_book(self) -> PeerBook:
        return self.exchange.book

    @property
    def connected_peers(self) -> list[NodeId]:
        """Peers with an authenticated connection now."""
        return list(self.connections.table)

    @property
    def handshakes_in_progress(self) -> int:
        """Accepted connections still in their handshake."""
        return self.connections.handshakes

    @property
    def stop_reason(self) -> str | None:
        """Why the node stopped (or is stopping): the stop request's reason, if one came
        before the core finished, else the core's."""
        return self._stop_reason or self.pump.stop_reason

    @property
    def left(self) -> bool:
        """Whether the node left before its core finished: stopped gracefully, the core was
        told ``LeaveRequested`` (so ``core.finished`` holds, but not all rounds ran)."""
        return self._left

    def render_metrics(self) -> str:
        """The status endpoint's body: every metric in the Prometheus text format."""
        return self.metrics.render(node=self.node_id.short())

    async def wait_rounds(self, count: int) -> None:
        """Return once :attr:`history` holds at least ``count`` rounds (or the node stopped)."""
        await self.reporting.wait_rounds(count)

    def request_stop(self, reason: str = "stop requested", *, leave: bool = True) -> None:
        """Leave the loop as soon as possible and shut down gracefully (idempotent).

        Args:
            reason: logged as the stop reason (unless the core had finished already).
            leave: tell the core it leaves for good (``LeaveRequested``) and send the goodbye
                it returns (``modest``'s LEAVE announcement) before closing; False ends the
                node as a crash would, saying nothing.
        """
        self._stop_requested = True
        if not self.core.finished and self._stop_reason is None:
            self._stop_reason = reason
            self._leave = leave
        if self._pump_scope is not None:
            self._pump_scope.cancel()

    def close_link(self, peer: NodeId) -> None:
        """Close the connection to ``peer`` if there is one (a world whose policy took the
        link down calls this; the node redials by its own rules once the link is up)."""
        self.connections.close(peer)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, connect, run the protocol to its end (or until stopped), then shut down.

        Reports the listening port through ``task_status`` (so ``nursery.start`` returns it).

        Raises:
            ConfigError: ``node.listen`` or ``node.status_listen`` cannot be listened on (in
                use, not an address of this machine, a host name that does not resolve), or
                the checkpoint directory can no longer be written.
        """
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = self._listeners
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
        first = listeners[0]
        self.port = (
            int(first.socket.getsockname()[1])
            if isinstance(first, trio.SocketListener)
            else self.config.listen_port
        )
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
                await nursery.start(trio.serve_listeners, self.connections.accept, listeners)
                if self.config.peer_exchange.enabled:
                    nursery.start_soon(
                        self.exchange.run, self.connections.table, self.connections.advertisable
                    )
                self.connections.start(nursery)
                nursery.start_soon(self.connections.startup_gate, lambda: self.core.round)
                evaluator_done = trio.Event()
                nursery.start_soon(self.reporting.evaluate, evaluator_done)
                task_status.started(self.port)
                self._pump_scope = trio.CancelScope()
                if self._stop_requested:
                    self._pump_scope.cancel()
                with self._pump_scope:
                    await self.pump.run(nursery)
                if self._leave:
                    self._left = await self.pump.leave()
                self.reporting.close()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await evaluator_done.wait()
                    await self.connections.wait_flushed()
                nursery.cancel_scope.cancel()
        finally:
            self.connections.close_all()
            with trio.CancelScope(shield=True):
                for listener in [*listeners, *status_listeners]:
                    await listener.aclose()
            self.finished.set()
            self.reporting.stopped()
            stats = self.stats
            log_event(
                log,
                logging.INFO,
                "stopped",
                "node %s stopped (%s) at round %d; stats %s",
                self.node_id,
                self.stop_reason or "cancelled",
                self.core.round,
                json.dumps(stats, sort_keys=True),
                reason=self.stop_reason or "cancelled",
                round=self.core.round,
                **stats,
            )

    # -- wiring ---------------------------------------------------------------------------

    def _on_ban(self, peer: NodeId) -> None:
        """A key was banned: forget where it listens and close its connection."""
        self.exchange.book.forget(peer)
        self.connections.close(peer)

    def _bind_metrics(self) -> None:
        metrics = self.metrics
        connections, defences = self.connections, self.defences
        metrics.bind("round", lambda: float(self.core.round))
        metrics.bind("rounds_total", lambda: float(self.config.protocol.rounds))
        metrics.bind("peers_connected", lambda: float(len(connections.table)))
        metrics.bind("peers_configured", lambda: float(len(connections.configured)))
        metrics.bind("peers_known", lambda: float(len(self.exchange.book)))
        metrics.bind("handshakes_in_progress", lambda: float(connections.handshakes))
        metrics.bind(
            "bans_active", lambda: float(defences.key_bans.active(trio.current_time())), "key"
        )
        metrics.bind(
            "bans_active", lambda: float(defences.ip_bans.active(trio.current_time())), "ip"
        )


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
