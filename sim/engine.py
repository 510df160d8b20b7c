"""The discrete-event engine: many protocol cores in deterministic virtual time.

Theory of operation
-------------------
The engine is a driver, like the trio runtime: it owns no protocol logic. It keeps one heap
of ``(time, sequence, node, item)`` entries; the sequence number makes ties resolve in
insertion order, so a run is a pure function of the scenario and its seed. Popping an entry
turns it into a core event and carries out the actions the core returns. The copies of one
frame that arrive at one instant (every neighbour of a sender, under a constant latency)
are one entry, handed out in the order they were sent: as one entry per copy would be,
since those would have had consecutive sequence numbers and one time.

* ``Send``: the envelope is framed once and checked once per process (every receiver of the
  same envelope shares the bytes and the checked result); its Ed25519 signature is verified
  beside the loop by a verifier process (:mod:`sim.verifier`; in the loop for short runs and
  with ``workers = False``), and a delivery waits for its frame's verdict before the
  receiver sees it. Then the frame is handed to the link model
  (:mod:`sim.network`: serialisation at the link's bandwidth, latency, jitter, FIFO order,
  loss), which says when it arrives, if at all.
* ``StartTraining``: the training is parked and its completion scheduled at
  ``now + steps * step_time / speed`` (the node's compute speed factor). When the first parked
  training's completion comes due, every parked training is computed in one batched call
  (:class:`p2pfl.learn.batched.BatchedLearner`, which keeps each node's optimiser state); a
  training depends only on its inputs at its start, so deferring it
  changes nothing but speed. A *relay* (a node without data) does not train: its training
  takes the same virtual time and returns the vector unchanged (loss NaN), so a relay merges
  and forwards at the pace of the data holders.
* ``DeadlineReached``: after each ``handle`` the engine re-reads ``next_deadline()``; a timer
  entry whose time no longer matches the core's deadline is stale and skipped.
* ``SaveCheckpoint`` marks the end of a node's round for the metrics (with the loss it carries);
  up to 10,000 nodes a completed round is evaluated in a worker thread while the loop goes on
  (see :meth:`Engine.run` and :class:`sim.metrics.MetricsRecorder`).

At time 0 every node gets ``NeighboursConnected`` then ``Started``: one event per node, not one
per neighbour, so a dense graph costs no heap entries per edge. If a disruption at time 0 has
already taken something down, the engine hands the node one ``PeerConnected`` per reachable
neighbour instead, back to back, which the cores treat alike.

Adversaries: when the engine is built with an ``adversary`` (a :class:`SendFilter`, e.g.
:class:`sim.adversaries.Adversary`), every ``Send`` of a node it marks Byzantine is first handed
to ``adversary.forge``, which may return another envelope for that receiver (a model attack,
re-sealed with the sender's own key); honest nodes' sends are untouched.

The world: disruptions
----------------------
The engine is a :class:`sim.world.World`. Every node is *online*, *offline* (suspended: its
core keeps its state but gets no events) or *dead* (forever). A node leaving for good first
says goodbye (:meth:`Engine.farewell`: its core's ``LeaveRequested``), then is taken down once
the goodbye is delivered. Every link is up or down (cut, or split by a partition). The
scenario's timeline (:mod:`sim.disruptions`, handed to the engine when it is built) changes
these states through four primitives: :meth:`Engine.take_down`, :meth:`Engine.bring_up`,
:meth:`Engine.cut_link`, :meth:`Engine.restore_link`, and has itself called back at a virtual
time with :meth:`Engine.schedule`. The cores see only what a real network shows:

* a node that is not online receives nothing: frames, timers and trainings due while it is
  down are dropped; frames in flight on a connection that broke (either end went down, or the
  link was cut, even if it came back since) are lost, as a reset TCP connection loses them;
* a node going down: its neighbours get ``PeerDisconnected`` after ``notify_after`` seconds
  (0 = the connection reset is seen at once; None = never: they notice only by timeouts,
  and frames they keep sending are lost);
* a node coming back: it first gets ``PeerDisconnected`` for every neighbour (its old
  connections are dead), then it and each reachable neighbour get ``PeerConnected``; a node
  that was down before it started gets ``Started``; a training cut short is run again; its
  timers are re-armed (an overdue one fires at once);
* a link going down: both ends get ``PeerDisconnected`` at once; coming back: both get
  ``PeerConnected``.

The state itself (statuses, links down and why, components) is a
:class:`sim.world.NetworkState` (``engine.network``), and the bookkeeping around it a
:class:`sim.world.WorldState`, both shared with live mode. Node and link
state changes are logged (``events_log``, written as ``events.jsonl``) with
their virtual time, so plots can redraw the network at any moment.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from p2pfl.errors import WireError
from p2pfl.learn.batched import BatchedLearner
from p2pfl.protocol import Core
from p2pfl.protocol.actions import (
    Disconnect,
    Emit,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    SpsaProbe,
    StartTraining,
    Stop,
)
from p2pfl.protocol.events import (
    DeadlineReached,
    Event,
    LeaveRequested,
    MessageReceived,
    NeighboursConnected,
    PeerConnected,
    PeerDisconnected,
    Started,
    TrainingFinished,
)
from p2pfl.wire import Envelope, encode_frame, parse_frame
from sim.collector import RunCollector
from sim.metrics import MetricsRecorder
from sim.network import LinkModel
from sim.population import Population
from sim.verifier import VerifierProcess
from sim.world import OFFLINE, ONLINE, ProgressHook, Timeline, WorldState, link_key

VERIFY_ASIDE_AFTER_FRAMES = 1_000
"""Frames a run verifies in the loop's thread before it starts a verifier process
(:mod:`sim.verifier`) for the rest; a run of at least this many nodes starts one at once.

Measured (2 cores, loaded; session 4, with OpenSSL): starting and ending the process costs
the loop 0.7 ms and each frame handed to it 0.5 us, against 107 us to verify one in the loop;
but the child answered its first verdict 50-105 ms after it started, and a delivery may wait
for that. Since session 5 both sides use libsodium (about 55 us a verify, and the child no
longer imports ``cryptography``), which moves both figures about alike: 1,000 frames are
still roughly the child's start-up verified in the loop, so
a run that has framed that many (likely to frame as many again) or frames that many per
round gains from then on, and a short run of a few nodes never pays a start-up."""
WORLD = -1
"""The ``node`` of heap entries that belong to the world (disruptions), not to a core."""
ASIDE_EVALUATION_NODES = 10_000
"""Above this many nodes the rounds are evaluated in the loop's thread. In a worker, a round's
``[n, P]`` stack stays alive beside the loop until it is evaluated: one model per node more
(1 GB at 100,000 nodes of the standard workload, where memory is what limits a run). Measured
at 10,000 nodes: peak RSS 1.19-1.21 GB with the worker, 1.17-1.18 GB without
(docs/benchmarks.md, "Evaluation (session 4)"; before the cheaper evaluation and the heap
trim of :func:`sim.metrics.trim_heap`, the worker cost 0.34 GB there)."""


# The engine's own heap items are built once per event (a delivery: once per frame and
# instant); they are not frozen because a frozen dataclass's __init__ costs four times as much
# (object.__setattr__ per field), on one item per delivery.


@dataclass(slots=True)
class _Timer:
    at: float


@dataclass(slots=True)
class _TrainingDue:
    incarnation: int


@dataclass(slots=True)
class _Delivery:
    """The copies of one sent frame that arrive at one instant, in the order they were sent:
    one heap entry for all of them (see :meth:`Engine._deliver`)."""

    sender: int
    event: MessageReceived
    """What each receiver is handed: one event shared by every receiver of the frame."""
    frame_bytes: int
    ticket: int
    """The frame's ticket at the verifier process (-1: verified in the loop already)."""
    receivers: list[int]
    connections: list[tuple[int, int, int]] | None
    """The connection each copy was sent on (:meth:`Engine._connection`); None: every one
    :data:`_PRISTINE`."""


_PRISTINE = (0, 0, 0)
"""Every connection while nothing has broken in a run (no incarnation or link epoch moved)."""


@dataclass(frozen=True, slots=True)
class WorldItem:
    """A heap entry for the disruption timeline; ``payload`` is the timeline's own
    (see :meth:`Engine.schedule`)."""

    payload: Any


_Item = Event | _Timer | _TrainingDue | _Delivery | WorldItem


class SendFilter(Protocol):
    """Rewrites what Byzantine nodes send (see :class:`sim.adversaries.Adversary`)."""

    @property
    def byzantine(self) -> Sequence[bool]:
        """Whether each node is Byzantine (its sends go through :meth:`forge`)."""
        ...

    def forge(self, node: int, receiver: int, envelope: Envelope) -> Envelope:
        """The envelope ``node`` sends to ``receiver`` instead of ``envelope``."""
        ...


@dataclass(slots=True)
class _ParkedTraining:
    vector: Tensor
    steps: int
    round: int
    probe: SpsaProbe | None = None


def _invalid(exc: WireError) -> AssertionError:
    # Cores seal honestly and an adversary re-seals with the sender's key: a frame that does
    # not check is a bug in the simulator or a core, never an outcome of a scenario.
    return AssertionError(f"an honest core produced an invalid frame: {exc}")


class Engine(WorldState):
    """Runs one population of cores until every core stops or dies, or the horizon passes.

    ``disruptions`` is the scenario's timeline (None: nothing happens to the network);
    ``adversary`` rewrites what Byzantine nodes send (None: every node is honest);
    ``on_round`` is called after every node's round.
    """

    def __init__(
        self,
        population: Population,
        cores: list[Core],
        *,
        links: LinkModel,
        trainer: BatchedLearner,
        step_time: float,
        horizon: float | None = None,
        recorder: MetricsRecorder,
        disruptions: Timeline | None = None,
        adversary: SendFilter | None = None,
        on_round: ProgressHook | None = None,
    ) -> None:
        super().__init__(population, recorder, disruptions=disruptions, on_round=on_round)
        self.cores = cores
        self.links = links
        self.trainer = trainer
        self.step_time = step_time
        self.horizon = horizon
        self.adversary = adversary
        self.link_log: list[tuple[float, int, int, int]] | None = None
        """Set to a list to record every delivered frame as (time, sender, receiver, bytes)."""
        size = len(cores)
        self.trainings_started = [0] * size
        # Keyed by the raw key bytes, whose hash is cached in C (a NodeId's is Python code).
        self._index = {core.node_id.raw: index for index, core in enumerate(cores)}
        self._heap: list[tuple[float, int, int, _Item]] = []
        self._sequence = 0
        self._armed: list[float | None] = [None] * size
        self._parked: dict[int, _ParkedTraining] = {}
        self._trained: dict[int, TrainingFinished] = {}
        """Trainings computed ahead of their completion: the event each node will get."""
        self._outstanding: dict[int, _ParkedTraining] = {}
        self._stopped = [False] * size
        self._finished = 0
        self._started = [False] * size
        self._incarnation = [0] * size
        self._link_epoch: dict[tuple[int, int], int] = {}
        self._broken = False
        """A connection has broken in this run (until then every one is :data:`_PRISTINE`)."""
        self.workers = True
        """Evaluate rounds in a worker thread and verify frame signatures in a verifier
        process (False: both in the loop's thread; the metrics are the same either way)."""
        self.verify_aside_after = VERIFY_ASIDE_AFTER_FRAMES
        """Frames verified in the loop before the verifier process starts (see
        :data:`VERIFY_ASIDE_AFTER_FRAMES`)."""
        self._framed = 0
        self._verifier: VerifierProcess | None = None
        self._verify_aside = False
        self._verified = 0
        """Every frame whose ticket is below this is verified."""
        self.batch_copies = True
        """Copies of a frame that arrive at one instant share one heap entry (False: one
        entry per copy; the order of events is the same either way, which the tests
        check against this)."""
        self.collector = RunCollector()
        """Garbage collection while :meth:`run` runs (:mod:`sim.collector`)."""

    # -- the loop -----------------------------------------------------------------------

    def push(self, at: float, node: int, item: _Item) -> None:
        """Schedule ``item`` for ``node`` (or :data:`WORLD`) at virtual time ``at``."""
        heapq.heappush(self._heap, (at, self._sequence, node, item))
        self._sequence += 1

    def schedule(self, at: float, payload: object) -> None:
        """Hand ``payload`` to the timeline's ``fire`` at virtual time ``at``."""
        self.push(at, WORLD, WorldItem(payload))

    def run(self) -> float:
        """Run to completion; returns the virtual time reached.

        Up to :data:`ASIDE_EVALUATION_NODES` nodes, a worker thread evaluates each completed
        round while the loop goes on (torch kernels release the GIL, so on a second core the
        evaluation costs the loop little). An evaluation is a pure function of a round's
        models and its rows are taken in completion order, so where it runs changes no
        metric.

        The objects the setup built (cores, data, keys) live as long as the run, so they are
        frozen out of the garbage collector's scans for its length (``gc.freeze``: about 5% of
        the loop's thread on the standard workload, docs/benchmarks.md), and the rest is
        collected in full once per doubling (:class:`sim.collector.RunCollector`, ticked once
        per node-round), not on CPython's generational schedule.
        """
        with self.collector:
            return self._run_with_workers()

    def _run_with_workers(self) -> float:
        if not self.workers or self.recorder.executor is not None:
            return self._run()
        if len(self.cores) > ASIDE_EVALUATION_NODES:
            return self._run()
        threads = torch.get_num_threads()
        with ThreadPoolExecutor(
            1,
            thread_name_prefix="p2pfl-sim-eval",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as evaluator:
            self.recorder.executor = evaluator
            try:
                return self._run()
            finally:
                self.recorder.settle()
                self.recorder.executor = None

    def _run(self) -> float:
        # Frames may be verified aside only within the loop (the finally below ends the
        # verifier process on every way out), by one process per engine (its tickets count
        # from 0; later frames are verified in the loop).
        self._verify_aside = self.workers and self._verifier is None
        try:
            if self._verify_aside and len(self.cores) >= self.verify_aside_after:
                # So many nodes frame about as many frames in their first round (every
                # dsgd or gossip node sends each round): start now, while the first
                # trainings run, rather than after a round of verifying in the loop.
                self._start_verifier()
            reached = self._loop()
            if self._verifier is not None:  # every frame's verdict, delivered or not
                self._verdict(self._verifier.submitted - 1)
            self.recorder.flush()
            return reached
        finally:
            self._verify_aside = False
            if self._verifier is not None:
                self._verifier.close()

    def _loop(self) -> float:
        if self.disruptions is not None:
            self.disruptions.start(self)
        for node in range(len(self.cores)):
            self.push(0.0, node, NeighboursConnected())
            self.push(0.0, node, Started())
        size = len(self.cores)
        # Per event, in order of frequency (a delivery, then a training's end; most events
        # return no action); the names below are looked up once, not per event.
        heap, cores, pop = self._heap, self.cores, heapq.heappop
        status = self.network.status  # changed in place, never replaced
        while heap and self._finished < size:
            at, sequence, node, item = pop(heap)
            if self.horizon is not None and at > self.horizon:
                self.now = self.horizon
                break
            self.now = at
            if type(item) is _Delivery:
                self._deliver(at, sequence, item)
                continue
            if node == WORLD:
                assert self.disruptions is not None and isinstance(item, WorldItem)
                self.disruptions.fire(self, item.payload)
                continue
            if status[node] is not ONLINE:
                continue
            if isinstance(item, NeighboursConnected) and not self.network.all_up():
                self._connect_reachable(node)
                continue
            event = self._to_event(node, item)
            if event is None:
                continue
            actions = cores[node].handle(event, now=at)
            if actions:
                self._carry_out(node, actions)
            if status[node] is ONLINE:
                self._rearm(node)
        return self.now

    def _deliver(self, at: float, sequence: int, delivery: _Delivery) -> None:
        """Hand the copies of one frame to their receivers, as the loop would hand one heap
        entry per copy: the copies were scheduled back to back for the same instant, so no
        entry falls between two of them, except one scheduled since for an earlier instant
        (never, as nothing is scheduled in the past) or the run's end; then the copies left
        go back on the heap under the same sequence number."""
        heap, cores, status, armed = self._heap, self.cores, self.network.status, self._armed
        size = len(cores)
        sender, event, ticket = delivery.sender, delivery.event, delivery.ticket
        connections = delivery.connections
        for position, node in enumerate(delivery.receivers):
            if position and (self._finished >= size or (heap and heap[0][0] < at)):
                delivery.receivers = delivery.receivers[position:]
                if connections is not None:
                    delivery.connections = connections[position:]
                heapq.heappush(heap, (at, sequence, delivery.receivers[0], delivery))
                return
            if status[node] is not ONLINE:
                continue
            if self._broken:
                connection = _PRISTINE if connections is None else connections[position]
                if connection != self._connection(sender, node):
                    continue  # the connection broke since: the copy is lost
            if ticket >= self._verified:
                self._verdict(ticket)  # no core sees a frame before its signature checks
            traffic = self.traffic[node]
            traffic.bytes_received += delivery.frame_bytes
            traffic.messages_received += 1
            if self.link_log is not None:
                self.link_log.append((at, sender, node, delivery.frame_bytes))
            core = cores[node]
            actions = core.handle(event, now=at)
            if actions:
                self._carry_out(node, actions)
            if status[node] is ONLINE:
                deadline = core.next_deadline()  # _rearm, inline: once per delivered copy
                if deadline != armed[node]:
                    self._arm(node, deadline)

    def _connect_reachable(self, node: int) -> None:
        """The start's connections when something is down already: one ``PeerConnected``
        per reachable neighbour, handled back to back as one event would be."""
        for neighbour in self.population.neighbours[node]:
            if self.status[node] is not ONLINE:
                return
            if self.network.reachable(node, neighbour):
                peer = self.cores[neighbour].node_id
                self._carry_out(node, self.cores[node].handle(PeerConnected(peer), now=self.now))
                if self.status[node] is ONLINE:
                    self._rearm(node)

    def _to_event(self, node: int, item: _Item) -> Event | None:
        match item:
            case _Timer(at):
                self.collector.tick()  # a stretch without finished rounds still collects
                return DeadlineReached() if self._armed[node] == at else None
            case _TrainingDue(incarnation):
                if incarnation != self._incarnation[node]:
                    return None
                if node not in self._trained:
                    self._train_parked()
                trained = self._trained.pop(node)
                self._outstanding.pop(node, None)
                return trained
            case PeerConnected(peer):
                return item if self.network.reachable(node, self._index[peer.raw]) else None
            case Started():
                self._started[node] = True
                return item
            case _:
                # The loop hands world items to the timeline and deliveries to _deliver.
                assert not isinstance(item, (WorldItem, _Delivery))
                return item

    def _carry_out(self, node: int, actions: list[Any]) -> float | None:
        """Carry out ``node``'s actions; returns when the last frame they sent arrives (None
        if none is delivered)."""
        # Keyed by id(): the entry holds the envelope itself so that no id is reused while the
        # dict lives (an adversary forges a fresh envelope per receiver).
        framed: dict[int, tuple[Envelope, MessageReceived, int, int]] = {}
        last_arrival: float | None = None
        adversary = self.adversary
        forging = adversary is not None and adversary.byzantine[node]
        traffic = self.traffic[node]
        now = self.now
        # Copies of one frame that arrive at one instant, sent back to back, share one heap
        # entry (popped, they are handed out in order: Engine._deliver); the batch goes on
        # the heap when a copy does not join it and before any other action, which may
        # schedule something itself.
        batch: _Delivery | None = None
        batch_at = 0.0
        all_up = self.network.all_up()  # changes only by actions other than Send
        envelope: Envelope | None = None
        received: MessageReceived | None = None
        size = ticket = 0
        for action in actions:
            kind = type(action)
            if kind is Send:  # most actions: ahead of the match's pattern tests
                receiver = self._index.get(action.peer.raw)
                if receiver is None:
                    continue
                sent = action.envelope
                if forging:
                    assert adversary is not None
                    sent = adversary.forge(node, receiver, sent)
                if sent is not envelope:  # a mode sends one envelope to its peers in a row
                    envelope = sent
                    cached = framed.get(id(envelope))
                    if cached is None:
                        verified, size, ticket = self._frame(envelope)
                        peer = self.cores[node].node_id
                        received = MessageReceived(peer=peer, envelope=verified)
                        cached = framed[id(envelope)] = (envelope, received, size, ticket)
                    _, received, size, ticket = cached
                assert received is not None
                traffic.bytes_sent += size
                traffic.messages_sent += 1
                if not all_up and not self.network.reachable(node, receiver):
                    continue  # written into a connection whose other end is gone
                arrival = self.links.transmit(node, receiver, size, now)
                if arrival is None:
                    continue
                if last_arrival is None or arrival > last_arrival:
                    last_arrival = arrival
                if batch is not None:
                    if batch.event is received and arrival == batch_at and self.batch_copies:
                        batch.receivers.append(receiver)
                        if batch.connections is not None:
                            batch.connections.append(self._connection(node, receiver))
                        continue
                    self.push(batch_at, batch.receivers[0], batch)
                connections = [self._connection(node, receiver)] if self._broken else None
                batch = _Delivery(node, received, size, ticket, [receiver], connections)
                batch_at = arrival
                continue
            if kind is Emit:
                # A record a device logs (one per round) changes nothing here, except the
                # report of a mode that checks its peers' model digests (spsa) finding some
                # differ. Logging schedules nothing, so a batch being built stays open.
                if action.name == "digest_mismatch":
                    self.log({"node": node, "event": "digest_mismatch", **action.fields})
                continue
            if batch is not None:
                self.push(batch_at, batch.receivers[0], batch)
                batch = None
            match action:
                case StartTraining(vector, steps, round_, probe):
                    if self.disruptions is not None and not self.disruptions.may_train(self, node):
                        return last_arrival
                    self.trainings_started[node] += 1
                    self._begin_training(node, _ParkedTraining(vector, steps, round_, probe))
                case SaveCheckpoint(round_, vector, loss):
                    self.collector.tick()
                    if vector.requires_grad:  # rare: detach() costs a tensor per round
                        vector = vector.detach()
                    self.record_round(
                        node,
                        round_,
                        at=self.now,
                        loss=loss,
                        vector=vector.clone(),
                        traffic=self.traffic[node],
                    )
                case PeerMisbehaved(peer, reason):
                    self.traffic[node].rejected += 1
                    self.log(
                        {
                            "node": node,
                            "event": "misbehaved",
                            "peer": peer.short(),
                            "reason": reason,
                        }
                    )
                case Disconnect(peer, reason):
                    self.log(
                        {
                            "node": node,
                            "event": "disconnect",
                            "peer": peer.short(),
                            "reason": reason,
                        }
                    )
                case Stop():
                    if not self._stopped[node]:
                        self._stopped[node] = True
                        self._finished += 1
                case _:
                    raise TypeError(f"engine cannot carry out {action!r}")
            all_up = self.network.all_up()
        if batch is not None:
            self.push(batch_at, batch.receivers[0], batch)
        return last_arrival

    def _begin_training(self, node: int, training: _ParkedTraining) -> None:
        self._outstanding[node] = training
        if self.population.relay[node]:
            self._trained[node] = TrainingFinished(training.vector, float("nan"), 0)
        else:
            self._parked[node] = training
        duration = training.steps * self.step_time / self.population.speed[node]
        self.push(self.now + duration, node, _TrainingDue(self._incarnation[node]))

    def _frame(self, envelope: Envelope) -> tuple[Envelope, int, int]:
        """The envelope as a receiver decodes it from its frame, the frame's size, and the
        ticket of its signature check (-1: checked already)."""
        frame = encode_frame(envelope)
        try:
            parsed, signed = parse_frame(frame)
            verifier = self._verifier if self._verify_aside else None
            if verifier is None and self._verify_aside:
                self._framed += 1
                if self._framed > self.verify_aside_after:
                    verifier = self._start_verifier()
            if verifier is None:
                parsed.sender.verify(parsed.signature, signed)
                return parsed, len(frame), -1
            ticket = verifier.submit(parsed.sender.raw, parsed.signature, signed)
        except WireError as exc:
            raise _invalid(exc) from exc
        return parsed, len(frame), ticket

    def _start_verifier(self) -> VerifierProcess | None:
        """Start the verifier process; None (and verify in the loop from now on) if the
        system will not start one (out of processes, memory or file descriptors)."""
        try:
            self._verifier = VerifierProcess()
        except OSError as exc:
            self._verify_aside = False
            self.log({"event": "verifier_unavailable", "reason": str(exc)})
        return self._verifier

    def _verdict(self, ticket: int) -> None:
        """Wait for the verifier process's verdict on ``ticket`` and every earlier one."""
        verifier = self._verifier
        assert verifier is not None
        try:
            verifier.wait(ticket)
        except WireError as exc:
            raise _invalid(exc) from exc
        self._verified = verifier.known

    def _rearm(self, node: int) -> None:
        deadline = self.cores[node].next_deadline()
        if deadline != self._armed[node]:
            self._arm(node, deadline)

    def _arm(self, node: int, deadline: float | None) -> None:
        """``node``'s core now wants ``DeadlineReached`` at ``deadline`` (None: never); an
        entry for an earlier deadline goes stale."""
        self._armed[node] = deadline
        if deadline is not None:
            self.push(max(deadline, self.now), node, _Timer(deadline))

    def _train_parked(self) -> None:
        # One vectorised call per (steps, batch size): nodes with few examples have their
        # batch capped at their data size, and a stacked minibatch needs one size.
        groups: dict[tuple[int, int], list[int]] = {}
        samplers = self.population.samplers
        for node, parked in self._parked.items():
            sampler = samplers[node]
            assert sampler is not None, "relays never park a training"
            if parked.probe is not None:
                # An spsa probe: the node's projections, computed as a device would.
                result = self.trainer.probe(
                    node,
                    parked.vector,
                    self.population.train_sets[node],
                    sampler,
                    parked.probe.seeds,
                    parked.probe.eps,
                )
                self._trained[node] = TrainingFinished(
                    parked.vector, result.loss, parked.steps, result.projections
                )
                continue
            groups.setdefault((parked.steps, sampler.batch_size), []).append(node)
        for (steps, _batch), nodes in sorted(groups.items()):
            nodes.sort()
            trainings = [self._parked[node] for node in nodes]
            trained, losses = self.trainer.train(
                nodes,
                torch.stack([training.vector for training in trainings]),
                self.population.train_shares.select(nodes),
                [sampler for sampler in map(samplers.__getitem__, nodes) if sampler is not None],
                steps,
                [training.round for training in trainings],
            )
            # One unbind and one tolist for the group, not an indexing call per node.
            for node, vector, loss in zip(nodes, trained.unbind(), losses.tolist(), strict=True):
                self._trained[node] = TrainingFinished(vector, loss, steps)
        self._parked.clear()

    # -- the world ----------------------------------------------------------------------

    def is_finished(self, node: int) -> bool:
        """The node's core has stopped (ran all its rounds)."""
        return self._stopped[node]

    def _connection(self, sender: int, receiver: int) -> tuple[int, int, int]:
        """Identifies the connection a frame travels on; it changes whenever it breaks."""
        return (
            self._incarnation[sender],
            self._incarnation[receiver],
            self._link_epoch.get(link_key(sender, receiver), 0),
        )

    def _notify(self, at: float, node: int, event: Event) -> None:
        self.push(at, node, event)

    def farewell(self, node: int) -> float:
        """Tell an online node's core that it leaves for good (``LeaveRequested``) and send
        the goodbye it returns; the time its last goodbye frame arrives (now if none), when
        to take it down, as a leaving runtime node flushes its queues before it closes.

        The core's ``Stop`` does not count the node as finished (it did not run its rounds):
        taking it down, dead, does. Nothing happens to a node that is not online or whose
        core has finished.
        """
        core = self.cores[node]
        if self.status[node] is not ONLINE or core.finished:
            return self.now
        actions = core.handle(LeaveRequested(), now=self.now)
        last = self._carry_out(node, [action for action in actions if not isinstance(action, Stop)])
        self._rearm(node)
        return self.now if last is None else max(last, self.now)

    def take_down(
        self, node: int, *, dead: bool, notify_after: float | None, cause: str, disruption: int
    ) -> bool:
        """Take ``node`` offline (suspended) or kill it; False if it was down already
        (a kill of an offline node still makes it dead)."""
        before = self.network.take_down(node, dead=dead, cause=cause, disruption=disruption)
        if before is None:
            return False
        if dead and not self._stopped[node]:
            self._finished += 1
        if before is OFFLINE:
            return True
        self._incarnation[node] += 1
        self._broken = True
        self._armed[node] = None
        self._parked.pop(node, None)
        self._trained.pop(node, None)
        if dead:
            self._outstanding.pop(node, None)
        self.recorder.set_active(node, False)
        peer_id = self.cores[node].node_id
        for neighbour in self.population.neighbours[node]:
            self.links.reset(node, neighbour)
            self.links.reset(neighbour, node)
            if notify_after is not None and self.network.reachable_if_up(node, neighbour):
                self._notify(self.now + notify_after, neighbour, PeerDisconnected(peer_id))
        return True

    def bring_up(self, node: int, *, cause: str, disruption: int) -> bool:
        """Bring an offline node back; False if it is online already or dead."""
        if not self.network.bring_up(node, cause=cause, disruption=disruption):
            return False
        self.recorder.set_active(node, True)
        own_id = self.cores[node].node_id
        for neighbour in self.population.neighbours[node]:
            self._notify(self.now, node, PeerDisconnected(self.cores[neighbour].node_id))
        for neighbour in self.population.neighbours[node]:
            if self.network.reachable(node, neighbour):
                self._notify(self.now, node, PeerConnected(self.cores[neighbour].node_id))
                self._notify(self.now, neighbour, PeerConnected(own_id))
        if not self._started[node]:
            self.push(self.now, node, Started())
        else:
            outstanding = self._outstanding.get(node)
            if outstanding is not None:
                self._begin_training(node, outstanding)
            self._rearm(node)
        return True

    def cut_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        """Add ``reason`` to the reasons link u-v is down; both ends see a reset if it was up."""
        if not self.network.cut_link(u, v, reason=reason, disruption=disruption):
            return
        key = link_key(u, v)
        self._link_epoch[key] = self._link_epoch.get(key, 0) + 1
        self._broken = True
        self.links.reset(u, v)
        self.links.reset(v, u)
        if self.status[u] is ONLINE and self.status[v] is ONLINE:
            self._notify(self.now, u, PeerDisconnected(self.cores[v].node_id))
            self._notify(self.now, v, PeerDisconnected(self.cores[u].node_id))

    def restore_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        """Remove ``reason``; when no reason is left the link is up and both ends reconnect."""
        if not self.network.restore_link(u, v, reason=reason, disruption=disruption):
            return
        if self.status[u] is ONLINE and self.status[v] is ONLINE:
            self._notify(self.now, u, PeerConnected(self.cores[v].node_id))
            self._notify(self.now, v, PeerConnected(self.cores[u].node_id))
