"""A fake network for protocol cores: in-memory links, fake training, virtual time.

Like h11's test helpers, it pushes real traffic through real state machines and nothing
else: every ``Send`` is framed and parsed with :mod:`p2pfl.wire` (so signatures are really
checked) and comes back as ``MessageReceived`` after ``latency`` virtual seconds; every
``StartTraining`` comes back as ``TrainingFinished(train(vector))`` after ``train_time``;
timers fire exactly at ``next_deadline()``. Events wait on one heap ordered by (time, arrival
order), so a run is deterministic.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from p2pfl.identity import Identity, NodeId
from p2pfl.merge import make_merge_rule
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


def identity_of(index: int) -> Identity:
    """A deterministic test identity."""
    return Identity.from_seed(bytes([index + 1]) * 32)


def plus_one(vector: torch.Tensor) -> torch.Tensor:
    """Fake training: every parameter grows by one."""
    return vector + 1.0


@dataclass
class FakeNode:
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
    """Cores on the nodes of a graph, joined by perfect links of fixed latency."""

    def __init__(
        self,
        n: int,
        edges: Iterable[tuple[int, int]],
        config: CoreConfig,
        *,
        vectors: Sequence[torch.Tensor],
        samples: Sequence[int] | None = None,
        merge: str = "mean",
        silent: Iterable[int] = (),
        latency: float = 0.01,
        train_time: float = 1.0,
        train: Callable[[torch.Tensor], torch.Tensor] = plus_one,
        seed: int = 0,
    ) -> None:
        self.latency = latency
        self.train_time = train_time
        self.train = train
        self.now = 0.0
        self.trace: list[tuple[float, int, str, str]] = []
        self._heap: list[tuple[float, int, int, Event]] = []
        self._order = itertools.count()
        self.silent = frozenset(silent)
        adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
        for a, b in edges:
            adjacency[a].add(b)
            adjacency[b].add(a)
        self.adjacency = adjacency
        identities = [identity_of(i) for i in range(n)]
        self.index_of = {ident.node_id: i for i, ident in enumerate(identities)}
        self.nodes: dict[int, FakeNode] = {}
        for i in range(n):
            if i in self.silent:
                continue
            core = make_core(
                config,
                identity=identities[i],
                neighbours=[identities[j].node_id for j in adjacency[i]],
                vector=vectors[i],
                samples=samples[i] if samples is not None else 1,
                merge=make_merge_rule(merge),
                rng=np.random.default_rng([seed, i]),
            )
            self.nodes[i] = FakeNode(i, identities[i], core)

    def node_id(self, index: int) -> NodeId:
        return identity_of(index).node_id

    def schedule(self, at: float, index: int, event: Event) -> None:
        heapq.heappush(self._heap, (at, next(self._order), index, event))

    def start(self) -> None:
        """Connect every node to all its neighbours (silent ones too), then start it."""
        for i in sorted(self.nodes):
            for j in sorted(self.adjacency[i]):
                self.schedule(0.0, i, PeerConnected(self.node_id(j)))
            self.schedule(0.0, i, Started())

    def run(self, *, until: float = 1e9, max_events: int = 100_000) -> None:
        """Deliver events in time order until none are left, ``until`` or ``max_events``."""
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
                self._carry_out(node, action)
            deadline = node.core.next_deadline()
            assert deadline is None or deadline >= at, "deadline in the past"
            if deadline != node.timer_at:
                node.timer_at = deadline
                if deadline is not None:
                    self.schedule(deadline, index, DeadlineReached())
        raise AssertionError(f"still running after {max_events} events")

    def _carry_out(self, node: FakeNode, action: Action) -> None:
        match action:
            case Send(peer=peer, envelope=envelope):
                assert peer != node.identity.node_id, "send to self"
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
    """A stable summary of actions, for comparing two runs."""
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
