"""One shard of a live run: some of a scenario's nodes as trio runtime nodes over real TCP.

Theory of operation
-------------------
A :class:`Shard` owns one trio event loop, run in a thread of its own, hosting runtime
:class:`~p2pfl.runtime.node.Node` objects for the node indices it was given. Everything the
driver (:mod:`sim.live`) does goes through five thread-safe calls:

=============  ============================================================================
``bind``       start the loop; bind one listener per node on ``host``, port 0; return the
               addresses (phase one: every shard of a run binds before any node starts)
``start``      the address book of *all* nodes: build the nodes and run them (phase two)
``poll``       drain the per-node per-round records, with every node's traffic counters
               and which nodes are *idle* (see below)
``command``    ``stop`` (a crash: the node ends for good), ``leave`` (the node ends, its
               checkpoint kept), ``depart`` (the node leaves for good, saying goodbye: its
               core is told ``LeaveRequested``), ``join`` (a left node starts again from its checkpoint, on
               the same port), ``cut`` / ``restore`` (a link: close the connection and refuse
               it until restored)
``close``      ask every node to stop, wait (bounded), then cancel the loop
=============  ============================================================================

A node here is the one ``p2pfl node`` runs, configured programmatically from the scenario: the
deterministic simulated identity, the data share of the same :class:`~p2pfl.learn.Federation`
(same seed), its neighbours from the same graph, the scenario's protocol and merge rule. So a
live run and a virtual run of one scenario train the same nodes on the same data; only the
clock, the network and the thread scheduling differ. A *relay* (a node without data) gets a
learner that returns the vector it is given unchanged.

The shard keeps records as plain data (ints, floats, ``bytes`` of float32 vectors), so a Ray
actor can return them as they are and the JSON-lines process (``python -m sim.live shard``)
can encode them. The clock of a record is wall seconds since the driver's ``started_at``
(``time.time()`` on the driver: hosts of one run should keep their clocks in sync, e.g. NTP).

Live nodes share one IP per shard, so per-IP bans are off (``ip_failures_to_ban = 0``), and
the per-peer rate limit is raised: every peer is honest here, the defences are tested
elsewhere (tests/runtime/test_flood.py).

Protocols whose cores talk beyond their neighbours (``CoreConfig.admits_strangers``:
``modest``, membership-sampled ``gossip``) get the whole address book as the node's
``bootstrap`` list (every node's address and key; the runtime dials them on demand and
accepts them) and ``max_peers`` of at least the population, so a connection to every sampled
peer fits. In ``modest`` the nodes not sampled near the end never finish: they wait, with no
timer, like the virtual engine's nodes with no event left. ``poll`` therefore reports the
running nodes that are *idle* (``Core.idle``: no training outstanding and no timer armed,
nothing will happen to them unless a message comes), and the driver ends a run once a node has finished and every
other node is finished, dead or idle (:func:`sim.live._drive`).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from p2pfl.config import (
    DataConfig,
    LimitsConfig,
    MergeConfig,
    NodeConfig,
    PeerConfig,
    PeerExchangeConfig,
)
from p2pfl.identity import NodeId
from p2pfl.learn import TorchLearner
from p2pfl.learn.base import EvalResult, TrainResult
from p2pfl.merge import make_merge_rule
from p2pfl.params import ParamLayout
from p2pfl.runtime.node import Node
from p2pfl.runtime.peer import Backoff
from p2pfl.runtime.policy import OpenLinks
from p2pfl.runtime.status import REJECT_REASONS
from sim.population import Population, build_population
from sim.run import core_config
from sim.scenario import Scenario

log = logging.getLogger("sim.live")

STARTUP_TIMEOUT = 20.0
"""Seconds a live node waits for all its neighbours before its first round."""
REJOIN_STARTUP_TIMEOUT = 3.0
"""The same for a node that joins again (neighbours may have finished meanwhile)."""
RECONNECT = Backoff(base=0.1, cap=1.0)
"""Redial delays: a neighbour that joins again is found within about a second."""
PEER_MESSAGE_RATE = 1000.0
PEER_MESSAGE_BURST = 1000
BIND_TIMEOUT = 60.0
COMMANDS = ("stop", "leave", "depart", "join", "cut", "restore")

Record = dict[str, Any]
"""``round``, ``node``, ``time``, ``loss``, ``vector`` (float32 bytes), ``traffic`` (5 ints)."""


class RelayLearner:
    """The learner of a relay: it never trains; it evaluates like any node."""

    def __init__(self, inner: TorchLearner, samples: int) -> None:
        self._inner = inner
        self._samples = samples

    @property
    def layout(self) -> ParamLayout:
        return self._inner.layout

    @property
    def num_samples(self) -> int:
        return self._samples

    def initial_vector(self) -> torch.Tensor:
        return self._inner.initial_vector()

    def train(self, vector: torch.Tensor, steps: int, *, round: int | None = None) -> TrainResult:
        return TrainResult(vector=vector.clone(), loss=math.nan, samples=0, steps=0)

    def evaluate(self, vector: torch.Tensor) -> EvalResult:
        return self._inner.evaluate(vector)


class CutLinks(OpenLinks):
    """The live driver's view of a node's links, the node's
    :class:`~p2pfl.runtime.policy.LinkPolicy`: TCP dials, some links cut.

    While a link is cut, the node neither dials that peer nor accepts it (refused as a failed
    handshake); the shard closes the open connection when it cuts (``Node.close_link``).
    """

    def __init__(self) -> None:
        self.cut_peers: set[NodeId] = set()

    def link_up(self, peer: NodeId) -> bool:
        return peer not in self.cut_peers


def traffic_of(node: Node) -> tuple[int, int, int, int, int]:
    """(bytes sent, bytes received, frames sent, frames received, rejected) of ``node``."""
    metrics = node.metrics
    rejected = sum(metrics.get("frames_rejected_total", reason) for reason in REJECT_REASONS)
    return (
        int(metrics.get("bytes_out_total")),
        int(metrics.get("bytes_in_total")),
        int(metrics.get("frames_out_total")),
        int(metrics.get("frames_in_total")),
        int(rejected),
    )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(slots=True)
class _Slot:
    """One node of the shard across its incarnations (a left node joins as a new Node)."""

    index: int
    listeners: list[trio.SocketListener] = field(default_factory=list)
    port: int = 0
    node: Node | None = None
    links: CutLinks = field(default_factory=CutLinks)
    running: bool = False
    finished: bool = False
    dead: bool = False
    rejoin: bool = False
    incarnation: int = 0
    base_traffic: tuple[int, ...] = (0, 0, 0, 0, 0)
    """Traffic of the node's earlier incarnations (the counters of :func:`traffic_of`)."""


class Shard:
    """Some nodes of one live run, on one trio loop in a thread (see the module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        nodes: list[int],
        host: str,
        *,
        checkpoints: bool = False,
        population: Population | None = None,
    ) -> None:
        """Prepare the shard's nodes' data; nothing is bound or started yet.

        Raises:
            ConfigError, TopologyError: the scenario is invalid.
            ValueError: a node index is not a node of the scenario.
        """
        self.scenario = scenario
        self.population = population or build_population(scenario)
        if any(not 0 <= node < self.population.size for node in nodes):
            raise ValueError(f"nodes {nodes} are not all in 0..{self.population.size - 1}")
        self.nodes = sorted(nodes)
        self.host = host
        self.protocol = core_config(scenario, self.population)
        self.strangers = self.protocol.admits_strangers
        """The cores talk beyond their neighbours: every node gets the whole address book."""
        self._checkpoint_root = (
            Path(tempfile.mkdtemp(prefix="p2pfl-live-")) if checkpoints else None
        )
        self._slots = {node: _Slot(node) for node in self.nodes}
        self._book: dict[int, tuple[str, int]] = {}
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._errors: list[str] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._bound = threading.Event()
        self._go: trio.Event | None = None
        self._closing: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._done = threading.Event()
        self._holder_index = self._holder_indices()

    # -- the driver's calls (any thread) ----------------------------------------------------

    def bind(self, timeout: float = BIND_TIMEOUT) -> dict[int, str]:
        """Start the loop and bind every node's listener; returns ``{node: "host:port"}``.

        Raises:
            RuntimeError: binding failed or took longer than ``timeout`` seconds.
        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._thread_main, name=f"p2pfl-live-shard-{self.nodes[:1]}", daemon=True
            )
            self._thread.start()
        if not self._bound.wait(timeout) or self._errors:
            raise RuntimeError(f"shard {self.nodes} could not bind: {self._errors or 'timeout'}")
        return {node: _format(self.host, slot.port) for node, slot in sorted(self._slots.items())}

    def start(self, book: dict[int, str], started_at: float) -> None:
        """Phase two: every node's address is known; build and run this shard's nodes.

        Raises:
            KeyError: a neighbour of a node here is missing from ``book``.
        """
        self._book = {int(node): split_address(address) for node, address in book.items()}
        if self.strangers:
            missing = sorted(set(range(self.population.size)) - set(self._book))
            if missing:
                raise KeyError(f"address book lacks nodes {missing} (the cores talk to anyone)")
        for node in self.nodes:
            for neighbour in self.population.neighbours[node]:
                if neighbour not in self._book:
                    raise KeyError(f"address book lacks node {neighbour}, a neighbour of {node}")
        self._started_at = started_at
        self._call(self._begin)

    def poll(self) -> dict[str, Any]:
        """Records since the last poll and the shard's state.

        Returns:
            ``records`` (list of :data:`Record`), ``traffic`` (``{node: 5 ints}`` now),
            ``running``, ``finished`` and ``idle`` (node lists; idle: running, the core
            ``idle``), ``done`` (the loop ended), ``errors``.
        """
        idle = self._idle()
        with self._lock:
            records, self._records = self._records, []
            errors = list(self._errors)
        traffic: dict[int, list[int]] = {}
        running: list[int] = []
        finished: list[int] = []
        for node, slot in self._slots.items():
            current = traffic_of(slot.node) if slot.node is not None else (0, 0, 0, 0, 0)
            traffic[node] = [a + b for a, b in zip(slot.base_traffic, current, strict=True)]
            if slot.running:
                running.append(node)
            if slot.finished:
                finished.append(node)
        return {
            "records": records,
            "traffic": traffic,
            "running": running,
            "finished": finished,
            "idle": idle,
            "done": self._done.is_set(),
            "errors": errors,
        }

    def command(self, name: str, node: int, peer: int | None = None) -> None:
        """Apply a disruption primitive to ``node`` (one of this shard's nodes).

        ``cut`` / ``restore`` name the other end of the link as ``peer``.

        Raises:
            ValueError: unknown command, or ``node`` is not in this shard.
        """
        if name not in COMMANDS:
            raise ValueError(f"unknown command {name!r}; one of {', '.join(COMMANDS)}")
        if node not in self._slots:
            raise ValueError(f"node {node} is not in this shard ({self.nodes})")
        self._call(lambda: self._command(name, node, peer))

    def close(self, timeout: float = 10.0) -> None:
        """Stop every node, wait up to ``timeout`` s for the loop, then cancel it (bounded)."""
        if self._thread is not None and self._token is not None and not self._done.is_set():
            try:
                self._call(self._stop_all)
                if not self._done.wait(timeout):
                    self._call(self._cancel)
                    self._done.wait(timeout)
            except (trio.RunFinishedError, RuntimeError):
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if self._checkpoint_root is not None:
            shutil.rmtree(self._checkpoint_root, ignore_errors=True)

    def _idle(self) -> list[int]:
        """The running nodes whose core is idle (read in the loop's thread)."""
        if self._token is None or self._done.is_set():
            return []
        idle: list[int] = []

        def collect() -> None:
            for node, slot in self._slots.items():
                if slot.running and slot.node is not None and slot.node.core.idle:
                    idle.append(node)

        try:
            self._call(collect)
        except (trio.RunFinishedError, RuntimeError):
            return []
        return sorted(idle)

    # -- inside the loop ----------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        if self._token is None:
            raise RuntimeError("the shard is not bound")
        trio.from_thread.run_sync(fn, trio_token=self._token)

    def _thread_main(self) -> None:
        torch.set_num_threads(1)
        try:
            trio.run(self._main)
        except BaseException:  # reported to the driver, never lost
            with self._lock:
                self._errors.append(traceback.format_exc())
        finally:
            self._bound.set()
            self._done.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._go = trio.Event()
        self._closing = trio.Event()
        for slot in self._slots.values():
            slot.listeners = list(await trio.open_tcp_listeners(0, host=self.host))
            slot.port = int(slot.listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._bound.set()
            # Nodes run in this nursery; the loop lives on until close(), so that a node
            # that left can still join after all the others have finished.
            await self._closing.wait()
        for slot in self._slots.values():
            for listener in slot.listeners:
                await listener.aclose()

    def _begin(self) -> None:
        assert self._go is not None
        for node in self.nodes:
            self._launch(self._slots[node])
        self._go.set()

    def _launch(self, slot: _Slot) -> None:
        assert self._nursery is not None
        node = self._build(slot)
        slot.node = node
        slot.running = True
        self._nursery.start_soon(self._run_node, slot, node)

    async def _run_node(self, slot: _Slot, node: Node) -> None:
        try:
            await node.run()
        except Exception:
            with self._lock:
                self._errors.append(f"node {slot.index}: {traceback.format_exc()}")
        finally:
            slot.running = False
            slot.finished = slot.finished or (node.core.finished and not node.left)
            slot.listeners = []  # Node.run closed them
        if slot.rejoin and not slot.dead and not slot.finished:
            slot.rejoin = False
            self._restart(slot)

    def _build(self, slot: _Slot) -> Node:
        index = slot.index
        population = self.population
        scenario = self.scenario
        identity = population.identities[index]
        peers = tuple(
            PeerConfig(*self._book[peer], population.identities[peer].node_id)
            for peer in population.neighbours[index]
        )
        bootstrap = (
            tuple(
                PeerConfig(*self._book[peer], population.identities[peer].node_id)
                for peer in range(population.size)
                if peer != index
            )
            if self.strangers
            else ()
        )
        checkpoint_dir = (
            self._checkpoint_root / f"node{index}" if self._checkpoint_root is not None else None
        )
        config = NodeConfig(
            listen_host=self.host,
            listen_port=slot.port,
            key_file=Path(f"simulated-node{index}.key"),  # never read: the identity is given
            checkpoint_dir=checkpoint_dir,
            startup_timeout=STARTUP_TIMEOUT if slot.incarnation == 0 else REJOIN_STARTUP_TIMEOUT,
            limits=LimitsConfig(
                max_peers=max(32, len(peers), len(bootstrap)),
                peer_message_rate=PEER_MESSAGE_RATE,
                peer_message_burst=PEER_MESSAGE_BURST,
                ip_failures_to_ban=0,
            ),
            peer_exchange=PeerExchangeConfig(peer_exchange=False),  # by its [node] key name
            peers=peers,
            bootstrap=bootstrap,
            data=DataConfig(
                dataset=scenario.data.dataset,
                params=scenario.data.params,
                partition=scenario.data.partition,
                partition_params=scenario.data.partition_params,
                num_nodes=population.federation.num_nodes,
                node_index=self._holder_index.get(index, 0),
                seed=scenario.seed,
                test_fraction=scenario.data.test_fraction,
            ),
            protocol=self.protocol,
            merge=MergeConfig(rule=scenario.merge.rule, params=scenario.merge.params),
        )
        return Node(
            config,
            identity=identity,
            learner=self._learner(index),
            merge=make_merge_rule(scenario.merge.rule, **scenario.merge.params),
            listeners=slot.listeners or None,
            backoff=RECONNECT,
            on_round=lambda round_, vector, loss: self._on_round(slot, round_, vector, loss),
            policy=slot.links,
        )

    def _learner(self, index: int) -> TorchLearner | RelayLearner:
        federation = self.population.federation
        learner = self.scenario.learner
        optimizer = learner.optimizer_settings(self.scenario.rounds)
        part = self._holder_index.get(index)
        if part is not None:
            return federation.learner(part, batch_size=learner.batch_size, optimizer=optimizer)
        inner = TorchLearner(
            federation.build_model(),
            federation.test,
            federation.test,
            batch_size=learner.batch_size,
            optimizer=optimizer,
            seed=0,
        )
        return RelayLearner(inner, self.population.samples[index])

    def _holder_indices(self) -> dict[int, int]:
        holders = [node for node in range(self.population.size) if not self.population.relay[node]]
        return {node: part for part, node in enumerate(holders)}

    def _on_round(self, slot: _Slot, round_: int, vector: torch.Tensor, loss: float) -> None:
        assert slot.node is not None
        current = traffic_of(slot.node)
        record: Record = {
            "round": round_,
            "node": slot.index,
            "time": time.time() - self._started_at,
            "loss": float(loss),
            "vector": vector.detach().to(torch.float32).contiguous().numpy().tobytes(),
            "traffic": [a + b for a, b in zip(slot.base_traffic, current, strict=True)],
        }
        with self._lock:
            self._records.append(record)

    def _command(self, name: str, index: int, peer: int | None) -> None:
        slot = self._slots[index]
        node = slot.node
        match name:
            case "stop" | "leave" | "depart":
                slot.dead = slot.dead or name != "leave"
                slot.rejoin = False
                if node is not None and slot.running:
                    # Only a departure says goodbye (the core's LeaveRequested): a crash says
                    # nothing, and a node that leaves to join again later is only suspended.
                    node.request_stop(f"live disruption: {name}", leave=name == "depart")
            case "join":
                if slot.dead or slot.finished or node is None:
                    return
                if slot.running:  # still leaving: start again once it has stopped
                    slot.rejoin = node.stop_reason is not None
                    return
                self._restart(slot)
            case "cut" | "restore":
                assert peer is not None
                peer_id = self.population.identities[peer].node_id
                if name == "cut":
                    slot.links.cut_peers.add(peer_id)
                    if node is not None:
                        node.close_link(peer_id)
                else:
                    slot.links.cut_peers.discard(peer_id)

    def _restart(self, slot: _Slot) -> None:
        assert slot.node is not None and self._nursery is not None
        slot.base_traffic = tuple(
            a + b for a, b in zip(slot.base_traffic, traffic_of(slot.node), strict=True)
        )
        self._nursery.start_soon(self._rejoin, slot)

    async def _rejoin(self, slot: _Slot) -> None:
        """Start a left node again: same port, resumed from its checkpoint."""
        slot.listeners = list(await trio.open_tcp_listeners(slot.port, host=self.host))
        slot.incarnation += 1
        self._launch(slot)

    def _stop_all(self) -> None:
        for slot in self._slots.values():
            slot.dead = True
            if slot.node is not None and slot.running:
                slot.node.request_stop("live run ends", leave=False)
        if self._closing is not None:
            self._closing.set()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
