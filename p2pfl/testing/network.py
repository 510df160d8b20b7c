"""An in-memory network for protocol cores: perfect links, fake training, virtual time.

The third driver of the sans-IO cores (beside the trio runtime and the simulator), for
testing a protocol mode or a merge rule, ours or yours, on many nodes in milliseconds. It
pushes real traffic through real state machines and nothing else: every ``Send`` is framed
and parsed with :mod:`p2pfl.wire` (so signatures and sizes are really checked) and comes back
as ``MessageReceived`` after ``latency`` virtual seconds; every ``StartTraining`` comes back
as ``TrainingFinished(train(vector))`` after ``train_time``; timers fire exactly at the
core's ``next_deadline()``. Events wait on one heap ordered by (time, arrival order), so a
run is deterministic: two runs with the same arguments give the same :attr:`FakeNetwork.trace`.

Needs nothing beyond the core install (torch, numpy), though the package
:mod:`p2pfl.testing` itself imports Hypothesis. Example, three nodes averaging on a
triangle::

    import torch
    from p2pfl.protocol import CoreConfig
    from p2pfl.testing import FakeNetwork

    config = CoreConfig(mode="dsgd", rounds=3, local_steps=1)
    vectors = [torch.full((4,), float(i)) for i in range(3)]
    net = FakeNetwork(3, [(0, 1), (1, 2), (0, 2)], config, vectors=vectors, merge="mean")
    net.start()
    net.run()
    assert all(node.core.finished for node in net.nodes.values())
    assert all(not node.misbehaved for node in net.nodes.values())

Each :class:`FakeNode` keeps what its core asked for (``Emit`` records, checkpoints,
misbehaviour reports, disconnects, the time it stopped). To count or alter traffic,
subclass :class:`FakeNetwork` and override :meth:`FakeNetwork.carry_out`, calling
``super().carry_out`` for the default handling.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from p2pfl.identity import Identity, NodeId
from p2pfl.merge import MergeRule, make_merge_rule
from p2pfl.protocol import (
    Action,
    Core,
    CoreConfig,
    DeadlineReached,
    Disconnect,
    Emit,
    Event,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    Started,
    StartTraining,
    Stop,
    TrainingFinished,
    make_core,
)
from p2pfl.wire import decode_frame, encode_frame

__all__ = ["FakeNetwork", "FakeNode", "identity_of", "plus_one", "repr_actions"]


def identity_of(index: int) -> Identity:
    """The deterministic identity :class:`FakeNetwork` gives node ``index`` by default.

    Raises:
        ValueError: ``index`` is outside 0..254 (pass ``identities`` for larger networks).
    """
    if not 0 <= index < 255:
        raise ValueError(f"identity_of: index {index} is outside 0..254")
    return Identity.from_seed(bytes([index + 1]) * 32)


def plus_one(vector: torch.Tensor) -> torch.Tensor:
    """Fake training, the default: every parameter grows by one."""
    return vector + 1.0


@dataclass
class FakeNode:
    """One node of a :class:`FakeNetwork`: its core and what the core asked for."""

    index: int
    identity: Identity
    core: Core
    timer_at: float | None = None
    stopped_at: float | None = None
    records: list[dict[str, float | int | str]] = field(default_factory=list)
    misbehaved: list[PeerMisbehaved] = field(default_factory=list)
    disconnects: list[Disconnect] = field(default_factory=list)
    checkpoints: list[SaveCheckpoint] = field(default_factory=list)
    sent: int = 0


class FakeNetwork:
    """Cores on the nodes of a graph, joined by perfect links of fixed latency.

    Args:
        n: number of nodes, indexed 0..n-1.
        edges: undirected links as index pairs; a node's neighbours are its linked nodes.
        config: the protocol settings every core is built with.
        vectors: each node's initial flat model (``n`` of them).
        samples: each node's training-set size (default 1 each).
        merge: a registered merge-rule name, or a factory called once per node (rules may
            keep per-node state, so they are never shared).
        silent: nodes that have no core: they never answer, and messages to them are lost
            (a crashed or absent peer).
        latency: virtual seconds from a ``Send`` to its ``MessageReceived``.
        train_time: virtual seconds from ``StartTraining`` to ``TrainingFinished``.
        train: the fake training applied to the vector (default :func:`plus_one`).
        seed: seeds each node's random stream as ``[seed, index]``.
        identities: the nodes' keys (default :func:`identity_of` each index, up to 255).
        announce_links: whether :meth:`start` tells each node its links are up
            (``PeerConnected``) before ``Started``; modes that reach any known peer without
            a connection step (``modest``) may be tested without it.

    Raises:
        ConfigError: ``config`` or ``merge`` is invalid.
        ValueError: ``vectors``, ``samples`` or ``identities`` do not have ``n`` entries, or
            an edge names a node outside 0..n-1.
    """

    def __init__(
        self,
        n: int,
        edges: Iterable[tuple[int, int]],
        config: CoreConfig,
        *,
        vectors: Sequence[torch.Tensor],
        samples: Sequence[int] | None = None,
        merge: str | Callable[[], MergeRule] = "mean",
        silent: Iterable[int] = (),
        latency: float = 0.01,
        train_time: float = 1.0,
        train: Callable[[torch.Tensor], torch.Tensor] = plus_one,
        seed: int = 0,
        identities: Sequence[Identity] | None = None,
        announce_links: bool = True,
    ) -> None:
        if identities is None:
            identities = [identity_of(i) for i in range(n)]
        for name, given in (("vectors", vectors), ("samples", samples), ("identities", identities)):
            if given is not None and len(given) != n:
                raise ValueError(f"FakeNetwork: {name} has {len(given)} entries, not n={n}")
        self.latency = latency
        self.train_time = train_time
        self.train = train
        self.announce_links = announce_links
        self.now = 0.0
        # (time, node index, event type, summary of the actions): compare two runs with it
        self.trace: list[tuple[float, int, str, str]] = []
        self._heap: list[tuple[float, int, int, Event]] = []
        self._order = itertools.count()
        self.silent = frozenset(silent)
        adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
        for a, b in edges:
            if a not in adjacency or b not in adjacency:
                raise ValueError(f"FakeNetwork: edge ({a}, {b}) is outside 0..{n - 1}")
            adjacency[a].add(b)
            adjacency[b].add(a)
        self.adjacency = adjacency
        self.ids = [identity.node_id for identity in identities]
        self.index_of = {node_id: i for i, node_id in enumerate(self.ids)}
        self.nodes: dict[int, FakeNode] = {}
        for i in range(n):
            if i in self.silent:
                continue
            rule = make_merge_rule(merge) if isinstance(merge, str) else merge()
            core = make_core(
                config,
                identity=identities[i],
                neighbours=[self.ids[j] for j in sorted(adjacency[i])],
                vector=vectors[i],
                samples=samples[i] if samples is not None else 1,
                merge=rule,
                rng=np.random.default_rng([seed, i]),
            )
            self.nodes[i] = FakeNode(i, identities[i], core)

    def node_id(self, index: int) -> NodeId:
        """The id of node ``index``."""
        return self.ids[index]

    def schedule(self, at: float, index: int, event: Event) -> None:
        """Deliver ``event`` to node ``index`` at virtual time ``at``."""
        heapq.heappush(self._heap, (at, next(self._order), index, event))

    def start(self) -> None:
        """Connect every node to all its neighbours (silent ones too), then start it."""
        for i in sorted(self.nodes):
            if self.announce_links:
                for j in sorted(self.adjacency[i]):
                    self.schedule(0.0, i, PeerConnected(self.node_id(j)))
            self.schedule(0.0, i, Started())

    def run(self, *, until: float = 1e9, max_events: int = 100_000) -> None:
        """Deliver events in time order until none are left or the next is after ``until``.

        Raises:
            AssertionError: ``max_events`` were delivered and events are still waiting (a
                protocol that never settles), or a core broke a driver contract (a deadline
                in the past, a send to itself).
        """
        for _ in range(max_events):
            if not self._heap or self._heap[0][0] > until:
                return
            at, _, index, event = heapq.heappop(self._heap)
            node = self.nodes[index]
            if isinstance(event, DeadlineReached) and at != node.timer_at:
                continue  # a timer that was re-armed since
            self.now = at
            actions = node.core.handle(event, now=at)
            self.trace.append((at, index, type(event).__name__, repr_actions(actions)))
            for action in actions:
                self.carry_out(node, action)
            deadline = node.core.next_deadline()
            if deadline is not None and deadline < at:
                raise AssertionError(f"node {index}: deadline {deadline} before now {at}")
            if deadline != node.timer_at:
                node.timer_at = deadline
                if deadline is not None:
                    self.schedule(deadline, index, DeadlineReached())
        raise AssertionError(f"still running after {max_events} events")

    def carry_out(self, node: FakeNode, action: Action) -> None:
        """Do what ``node``'s core asked for; override to observe or alter actions.

        Raises:
            AssertionError: the core sent to itself.
        """
        match action:
            case Send(peer=peer, envelope=envelope):
                if peer == node.identity.node_id:
                    raise AssertionError(f"node {node.index} sent to itself")
                node.sent += 1
                target = self.index_of[peer]
                if target in self.nodes:
                    received = decode_frame(bytearray(encode_frame(envelope)))
                    event = MessageReceived(node.identity.node_id, received)
                    self.schedule(self.now + self.latency, target, event)
            case StartTraining(vector=vector, steps=steps):
                trained = TrainingFinished(self.train(vector), loss=0.5, steps=steps)
                self.schedule(self.now + self.train_time, node.index, trained)
            case Emit(fields=fields):
                node.records.append(dict(fields))
            case SaveCheckpoint():
                node.checkpoints.append(action)
            case PeerMisbehaved():
                node.misbehaved.append(action)
            case Disconnect():
                node.disconnects.append(action)
            case Stop():
                node.stopped_at = self.now

    def disconnect_at(self, at: float, a: int, b: int) -> None:
        """Both ends of link a–b see it go down at ``at`` (a silent end sees nothing)."""
        for x, y in ((a, b), (b, a)):
            if x in self.nodes:
                self.schedule(at, x, PeerDisconnected(self.node_id(y)))


def repr_actions(actions: Sequence[Action]) -> str:
    """A stable one-line summary of actions, for comparing two runs."""
    parts = []
    for action in actions:
        match action:
            case Send(peer=peer, envelope=envelope):
                parts.append(f"Send({peer.short()},{envelope.seq},{envelope.digest.hex()[:16]})")
            case StartTraining(vector=vector, round=round_):
                parts.append(f"Train({round_},{vector.sum().item():.6f})")
            case _:
                parts.append(type(action).__name__)
    return ";".join(parts)
