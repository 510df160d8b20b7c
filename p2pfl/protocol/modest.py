"""``modest``: sampled committees of trainers and aggregators (MoDeST, de Vos et al.).

Theory of operation
-------------------
Every node holds a :class:`~p2pfl.protocol.membership.Membership` view. The committee of
sample index ``r`` is derived from it alone (:mod:`p2pfl.protocol.committee`): candidates
sorted by ``SHA-256(key || r)``; *trainers of round r* = the first ``sample_size`` candidates
of ordering ``r`` that answer an availability ping; *aggregators for the models trained in
round r* = the first ``aggregators`` available in ordering ``r + 1`` (so they belong to the
next sample). ``core.round`` is the round whose starting model the node holds; it only grows.

One round, as seen by its participants::

    trainer (round r)                         aggregator (of sample r+1)
    AGGREGATE(r) adopted ─► StartTraining
    TrainingFinished ─► ping ordering r+1 ─► TRAINED(r) + view ──► buffer; first model arms
                                                                   aggregation_timeout
                         ◄── ACK(r) ◄──────────────────────────── floor(s*sf) models held
                                                                   (or >= min_models at the
                                                                   timeout): merge rule ─►
                                                                   ping ordering r+1 ─►
    trainer (round r+1) ◄── AGGREGATE(r+1) + view ◄──────────────  first s available

- *Start*: at ``Started`` the first ``sample_size`` candidates of ordering ``start_round``
  train without pings (everyone is presumed up); everyone else waits to be sampled.
- *Adopting*: an ``AGGREGATE`` of a round above ``core.round`` is adopted (``SaveCheckpoint``,
  so the simulator records the round for that node; nodes not sampled do not report it) and,
  since its sender picked this node, trained. A training outstanding then is not cancelled
  (at most one is outstanding) but its result is dropped when it comes. Equal or older
  rounds (a co-aggregator's copy) are ignored. An aggregator adopts the model it produced.
- *Merging*: the merge rule (any registered one) gets the received models in key order, the
  first as ``own`` and the rest as ``received``, all with weight 1 (the reference's uniform
  FedAvg).
- *Acks and fail-over*: an aggregator acks each sender when it merges, and acks at once a
  model of a round whose aggregate it already holds. A ``NACK`` (an aggregator leaving) or no
  ack within ``ack_timeout`` makes the trainer suspect that aggregator and send the model to the
  next available candidate of the same ordering. Adopting a later round ends the hand-over.
- *Membership*: every model message carries a bounded piggyback of the sender's view; the
  pending joins are applied right before a model is sent. ``MEMBERSHIP`` messages carry join
  and leave announcements to ``min(10 * sample_size, view)`` random peers (at ``Started`` when
  ``announce_join``, and at ``LeaveRequested``).
- *Stopping*: a node stops once it holds the model of round ``rounds`` and, if it produced that
  model, has sent it on. Nodes never sampled near the end simply stay idle: they arm no timer.

Checks on every message, a peer's fault becoming ``PeerMisbehaved`` and nothing else: the
envelope's sender is the transport peer, its sequence number is fresh (a replay window per
sender, at most ``view_capacity`` of them), the kind is a modest kind, a model has this node's
shape and finite values, the view is well formed and every record in it that is news carries
its subject's valid signature. A sender may be any peer, not only a configured neighbour.

Memory is bounded: at most ``max_rounds_ahead + 1`` rounds are aggregated at once (the oldest
is refused with ``NACK`` when another starts), each holding fewer than ``floor(s*sf)`` models;
ping results are kept for the few latest sample indexes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from p2pfl.errors import RemoteProtocolError, WireError
from p2pfl.identity import NodeId
from p2pfl.protocol.actions import (
    Action,
    Emit,
    PeerMisbehaved,
    Send,
    StartTraining,
    Stop,
)
from p2pfl.protocol.base import BaseCore
from p2pfl.protocol.committee import Selection, ordering
from p2pfl.protocol.config import CoreConfig
from p2pfl.protocol.core import ModeTraits, register_protocol_mode
from p2pfl.protocol.events import MessageReceived
from p2pfl.protocol.membership import Membership, Record, Status, parse_records
from p2pfl.protocol.messages import ModelUpdate, decode_model
from p2pfl.protocol.phases import MODEST_TRANSITIONS, Phase
from p2pfl.wire import Envelope, MessageKind, ReplayWindow

MODEST_KINDS = frozenset(
    {
        MessageKind.MODEST_PING,
        MessageKind.MODEST_PONG,
        MessageKind.MODEST_TRAINED,
        MessageKind.MODEST_AGGREGATE,
        MessageKind.MODEST_ACK,
        MessageKind.MODEST_NACK,
        MessageKind.MODEST_MEMBERSHIP,
    }
)
MODEL_KINDS = frozenset({MessageKind.MODEST_TRAINED, MessageKind.MODEST_AGGREGATE})
ANNOUNCE_FACTOR = 10
"""Join and leave announcements go to ``min(ANNOUNCE_FACTOR * sample_size, view)`` peers."""


@dataclass(slots=True)
class _Outbox:
    """A trainer's model of ``round`` on its way to the aggregators of sample ``round + 1``."""

    round: int
    update: ModelUpdate
    selection: Selection
    envelope: Envelope | None = None
    waiting: dict[NodeId, float] = field(default_factory=dict)
    """Aggregator -> when to give up waiting for its ack."""


@dataclass(slots=True)
class _Aggregation:
    """Models trained in ``round`` held by this node as an aggregator of sample ``round + 1``."""

    round: int
    until: float
    updates: dict[NodeId, ModelUpdate] = field(default_factory=dict)


@dataclass(slots=True)
class _Distribution:
    """The aggregated model starting ``round``, waiting for its trainers to be found."""

    round: int
    vector: torch.Tensor
    selection: Selection


FRAMES_PER_ROUND = 8
"""What one modest peer may send a node per round: ping, pong, trained model, its fail-over
copy, aggregate, ack, nack and a membership announcement."""


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    return float(FRAMES_PER_ROUND), FRAMES_PER_ROUND / config.ping_timeout


def _buffered(config: CoreConfig, degree: float) -> float:
    # An aggregator holds the models of one sample.
    return float(config.sample_size)


@register_protocol_mode(
    "modest",
    traits=ModeTraits(
        strangers=True, traffic=_traffic, buffered=_buffered, model_kinds=MODEL_KINDS
    ),
)
class ModestCore(BaseCore):
    """Per round a sampled committee: ``sample_size`` trainers, ``aggregators`` aggregators."""

    TRANSITIONS = MODEST_TRANSITIONS
    HISTORY_GOSSIP = False

    def _init_mode(self) -> None:
        config = self.config
        self.membership = Membership(
            self._identity,
            (*self._peers.neighbours, *self._known_peers),
            start_round=self.round,
            counter=self._sealer.next_seq,
            capacity=config.view_capacity,
            inactivity_threshold=config.inactivity_threshold,
        )
        self._threshold = max(1, math.floor(config.sample_size * config.success_fraction))
        self._minimum = min(config.min_models, self._threshold)
        self._windows: OrderedDict[NodeId, ReplayWindow] = OrderedDict()
        self._available: dict[int, set[NodeId]] = {}
        self._outboxes: dict[int, _Outbox] = {}
        self._aggregations: dict[int, _Aggregation] = {}
        self._distributions: dict[int, _Distribution] = {}
        self._training_round: int | None = None
        self._train_wanted = False

    # -- hooks --------------------------------------------------------------------------

    def _on_leave(self) -> list[Action]:
        """Announce LEAVE and refuse (``NACK``) every model held for aggregation."""
        self.membership.announce(Status.LEAVE)
        actions = self._advertise()
        for aggregation in self._aggregations.values():
            nack = self._seal(MessageKind.MODEST_NACK, aggregation.round)
            actions += [Send(peer, nack) for peer in aggregation.updates if peer != self.node_id]
        self._aggregations.clear()
        self._outboxes.clear()
        self._distributions.clear()
        self._train_wanted = False
        return actions

    def _on_started(self) -> list[Action]:
        self._machine.goto(Phase.WAITING)
        actions = self._advertise() if self.config.announce_join else []
        first = ordering(self.membership.candidates(self.round), self.round)
        if self.node_id in first[: self.config.sample_size]:
            self._train_wanted = True
        return actions + self._maybe_train()

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        raise AssertionError("modest parses its own messages")  # pragma: no cover

    def _on_message(self, event: MessageReceived) -> list[Action]:
        envelope = event.envelope
        try:
            records, vector = self._check(event)
            self.membership.merge(records)
        except RemoteProtocolError as exc:
            return [PeerMisbehaved(event.peer, str(exc))]
        sender = envelope.sender
        self.membership.observe(sender, envelope.round)
        match envelope.kind:
            case MessageKind.MODEST_PING:
                pong = self._seal(
                    MessageKind.MODEST_PONG, envelope.round, meta={"ping": envelope.seq}
                )
                return [Send(sender, pong)]
            case MessageKind.MODEST_PONG:
                return self._on_pong(sender, envelope.round)
            case MessageKind.MODEST_TRAINED:
                assert vector is not None
                update = ModelUpdate(
                    sender=sender,
                    seq=envelope.seq,
                    round=envelope.round,
                    samples=envelope.spec.samples,
                    degree=0,
                    vector=vector.clone(),
                    digest=bytes(envelope.digest),
                )
                return self._accept_trained(update)
            case MessageKind.MODEST_AGGREGATE:
                assert vector is not None
                if envelope.round <= self.round:
                    return []
                return self._adopt(envelope.round, vector.clone(), train=True, source=sender)
            case MessageKind.MODEST_ACK:
                return self._on_ack(sender, envelope.round, refused=False)
            case MessageKind.MODEST_NACK:
                return self._on_ack(sender, envelope.round, refused=True)
            case _:
                return []

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        trained_round = self._training_round
        self._training_round = None
        self._machine.goto(Phase.WAITING)
        stale = trained_round != self.round
        actions: list[Action] = [self._trained_record(trained_round, loss, steps, stale=stale)]
        if trained_round == self.round and self.round < self.config.rounds:
            actions += self._hand_over(self.round, trained)
        return actions + self._maybe_train() + self._maybe_finish()

    def _on_deadline(self) -> list[Action]:
        now = self._now
        actions: list[Action] = []
        for outbox in list(self._outboxes.values()):
            changed = False
            deadline = outbox.selection.deadline
            if deadline is not None and deadline <= now:
                outbox.selection.expire(now)
                changed = True
            for peer, until in list(outbox.waiting.items()):
                if until <= now:
                    del outbox.waiting[peer]
                    self.membership.suspect(peer, outbox.round + 1)
                    outbox.selection.grow()
                    changed = True
            if changed and self._outboxes.get(outbox.round) is outbox:
                actions += self._pump_outbox(outbox)
        for distribution in list(self._distributions.values()):
            deadline = distribution.selection.deadline
            if deadline is not None and deadline <= now:
                distribution.selection.expire(now)
                if self._distributions.get(distribution.round) is distribution:
                    actions += self._pump_distribution(distribution)
        for aggregation in list(self._aggregations.values()):
            if aggregation.until <= now and aggregation.round in self._aggregations:
                if len(aggregation.updates) >= self._minimum:
                    actions += self._aggregate(aggregation, timed_out=True)
                else:
                    del self._aggregations[aggregation.round]
                    actions.append(
                        Emit(
                            "abandoned",
                            {"round": aggregation.round, "held": len(aggregation.updates)},
                        )
                    )
        return actions + self._maybe_finish()

    def _deadline(self) -> float | None:
        times: list[float] = []
        for outbox in self._outboxes.values():
            if outbox.selection.deadline is not None:
                times.append(outbox.selection.deadline)
            times.extend(outbox.waiting.values())
        for distribution in self._distributions.values():
            if distribution.selection.deadline is not None:
                times.append(distribution.selection.deadline)
        times.extend(aggregation.until for aggregation in self._aggregations.values())
        return min(times) if times else None

    # -- checking messages --------------------------------------------------------------

    def _check(self, event: MessageReceived) -> tuple[list[Record], torch.Tensor | None]:
        """The view records and the model (if any) of a message; the cheap checks first.

        Raises:
            RemoteProtocolError: any defect; the message names it.
        """
        peer, envelope = event.peer, event.envelope
        if envelope.sender != peer:
            raise RemoteProtocolError(f"envelope signed by {envelope.sender}, not by {peer}")
        if peer == self.node_id:
            raise RemoteProtocolError("a message claiming to come from this node itself")
        if envelope.kind not in MODEST_KINDS:
            raise RemoteProtocolError(f"unexpected message kind {envelope.kind.name}")
        window = self._windows.get(peer)
        if window is None:
            window = ReplayWindow(self.config.replay_window)
            self._windows[peer] = window
            while len(self._windows) > self.config.view_capacity:
                self._windows.popitem(last=False)
        self._windows.move_to_end(peer)
        try:
            window.check(envelope.seq)
        except WireError as exc:
            raise RemoteProtocolError(f"replayed message: {exc}") from exc
        vector = None
        if envelope.kind in MODEL_KINDS:
            vector = decode_model(envelope, self.vector.shape)
        elif envelope.payload_bytes:
            raise RemoteProtocolError(f"{envelope.kind.name} with a payload")
        records = parse_records(envelope.meta.get("view"), max_round=envelope.round)
        return records, vector

    # -- sealing ------------------------------------------------------------------------

    def _seal(
        self,
        kind: MessageKind,
        round: int,
        *,
        vector: torch.Tensor | None = None,
        meta: dict[str, object] | None = None,
    ) -> Envelope:
        if vector is not None:
            return self._sealer.seal_vector(kind, vector, round, meta=meta)
        return self._sealer.seal_payload(kind, round, meta=meta)

    def _view(self) -> dict[str, object]:
        records = self.membership.piggyback(self.config.view_entries, self._rng)
        return {"view": [record.to_wire() for record in records]}

    def _advertise(self) -> list[Action]:
        """Send the own (signed) record to ``min(10 s, view)`` random known peers."""
        peers = [
            peer
            for peer in self.membership.peers()
            if (advert := self.membership.advert(peer)) is not None and advert.status is Status.JOIN
        ]
        count = min(ANNOUNCE_FACTOR * self.config.sample_size, len(peers))
        if count == 0:
            return []
        chosen = self._rng.choice(len(peers), size=count, replace=False)
        envelope = self._seal(MessageKind.MODEST_MEMBERSHIP, self.round, meta=self._view())
        return [Send(peers[int(index)], envelope) for index in sorted(chosen)]

    # -- availability -------------------------------------------------------------------

    def _selection(self, index: int, target: int) -> Selection:
        known = self._available.setdefault(index, set())
        while len(self._available) > self.config.max_rounds_ahead + 2:
            del self._available[min(self._available)]
        order = ordering(self.membership.candidates(index), index)
        return Selection(order, target, index=index, own=self.node_id, known_available=known)

    def _pings(self, selection: Selection) -> list[Action]:
        peers = selection.pump(self._now, self.config.ping_timeout)
        if not peers:
            return []
        ping = self._seal(MessageKind.MODEST_PING, selection.index)
        return [Send(peer, ping) for peer in peers]

    def _on_pong(self, sender: NodeId, index: int) -> list[Action]:
        actions: list[Action] = []
        for outbox in list(self._outboxes.values()):
            if outbox.round + 1 == index and outbox.selection.pong(sender):
                self._available.setdefault(index, set()).add(sender)
                if self._outboxes.get(outbox.round) is outbox:
                    actions += self._pump_outbox(outbox)
        distribution = self._distributions.get(index)
        if distribution is not None and distribution.selection.pong(sender):
            self._available.setdefault(index, set()).add(sender)
            actions += self._pump_distribution(distribution)
        return actions + self._maybe_finish()

    # -- trainer side -------------------------------------------------------------------

    def _maybe_train(self) -> list[Action]:
        if not self._train_wanted or self._machine.phase is not Phase.WAITING:
            return []
        self._train_wanted = False
        if self.round >= self.config.rounds:
            return []
        self._training_round = self.round
        self._machine.goto(Phase.TRAINING)
        return [StartTraining(self.vector, self.config.local_steps, self.round)]

    def _hand_over(self, round: int, trained: torch.Tensor) -> list[Action]:
        update = ModelUpdate(
            sender=self.node_id,
            seq=0,
            round=round,
            samples=self.samples,
            degree=0,
            vector=trained,
            digest=b"",
        )
        outbox = _Outbox(round, update, self._selection(round + 1, self.config.aggregators))
        self._outboxes[round] = outbox
        return self._pump_outbox(outbox)

    def _pump_outbox(self, outbox: _Outbox) -> list[Action]:
        actions = self._pings(outbox.selection)
        if not outbox.selection.done:
            return actions
        for aggregator in outbox.selection.take_new():
            if aggregator == self.node_id:
                actions += self._accept_trained(outbox.update)
                continue
            if outbox.envelope is None:
                self.membership.apply_pending()
                outbox.envelope = self._seal(
                    MessageKind.MODEST_TRAINED,
                    outbox.round,
                    vector=outbox.update.vector,
                    meta=self._view(),
                )
            actions.append(Send(aggregator, outbox.envelope))
            outbox.waiting[aggregator] = self._now + self.config.ack_timeout
        if not outbox.waiting and self._outboxes.get(outbox.round) is outbox:
            del self._outboxes[outbox.round]
        return actions

    def _on_ack(self, sender: NodeId, round: int, *, refused: bool) -> list[Action]:
        outbox = self._outboxes.get(round)
        if outbox is None or outbox.waiting.pop(sender, None) is None:
            return []
        if refused:
            self.membership.suspect(sender, round + 1)
            outbox.selection.grow()
        return self._pump_outbox(outbox)

    def _adopt(
        self, round: int, vector: torch.Tensor, *, train: bool, source: NodeId
    ) -> list[Action]:
        previous = self.round
        self.vector = vector
        self.round = round
        self.membership.set_round(round)
        actions: list[Action] = []
        for old in [r for r in self._outboxes if r < round]:
            del self._outboxes[old]
        for old in [r for r in self._aggregations if r < round]:
            aggregation = self._aggregations.pop(old)
            ack = self._seal(MessageKind.MODEST_ACK, old)
            actions += [Send(peer, ack) for peer in aggregation.updates if peer != self.node_id]
        for old in [r for r in self._distributions if r < round]:
            del self._distributions[old]
        for old in [r for r in self._available if r < round]:
            del self._available[old]
        actions += [
            Emit(
                "round",
                {
                    "round": round,
                    "previous": previous,
                    "from": source.short(),
                    "trainer": int(train),
                    "adopted_at": self._now,
                },
            ),
            self._checkpoint(round, vector),
        ]
        self._train_wanted = train and round < self.config.rounds
        return actions + self._maybe_train() + self._maybe_finish()

    # -- aggregator side ----------------------------------------------------------------

    def _accept_trained(self, update: ModelUpdate) -> list[Action]:
        round, sender = update.round, update.sender
        if round < self.round:
            if sender == self.node_id:
                return []
            return [Send(sender, self._seal(MessageKind.MODEST_ACK, round))]
        actions: list[Action] = []
        aggregation = self._aggregations.get(round)
        if aggregation is None:
            limit = self.config.max_rounds_ahead + 1
            while len(self._aggregations) >= limit:
                oldest = self._aggregations.pop(min(self._aggregations))
                nack = self._seal(MessageKind.MODEST_NACK, oldest.round)
                actions += [Send(peer, nack) for peer in oldest.updates if peer != self.node_id]
            aggregation = _Aggregation(round, self._now + self.config.aggregation_timeout)
            self._aggregations[round] = aggregation
        held = aggregation.updates.get(sender)
        if held is not None:
            if held.same_model(update):
                return actions
            return [*actions, PeerMisbehaved(sender, f"two different models for round {round}")]
        aggregation.updates[sender] = update
        if len(aggregation.updates) >= self._threshold:
            actions += self._aggregate(aggregation, timed_out=False)
        return actions

    def _aggregate(self, aggregation: _Aggregation, *, timed_out: bool) -> list[Action]:
        del self._aggregations[aggregation.round]
        senders = sorted(aggregation.updates, key=lambda peer: peer.raw)
        updates = [replace(aggregation.updates[peer], samples=1) for peer in senders]
        self._merger.own_weight = 1.0
        merged = self._merger.merge(updates[0].vector, updates[1:], own_round=aggregation.round)
        ack = self._seal(MessageKind.MODEST_ACK, aggregation.round)
        actions: list[Action] = [Send(peer, ack) for peer in senders if peer != self.node_id]
        actions.append(
            Emit(
                "aggregated",
                {
                    "round": aggregation.round,
                    "models": len(senders),
                    "timed_out": int(timed_out),
                    "merged_at": self._now,
                },
            )
        )
        new_round = aggregation.round + 1
        if new_round <= self.round:
            return actions
        selection = self._selection(new_round, self.config.sample_size)
        distribution = _Distribution(new_round, merged, selection)
        self._distributions[new_round] = distribution
        actions += self._adopt(new_round, merged, train=False, source=self.node_id)
        return actions + self._pump_distribution(distribution)

    def _pump_distribution(self, distribution: _Distribution) -> list[Action]:
        actions = self._pings(distribution.selection)
        if not distribution.selection.done:
            return actions
        del self._distributions[distribution.round]
        trainers = distribution.selection.found()
        self.membership.apply_pending()
        envelope = self._seal(
            MessageKind.MODEST_AGGREGATE,
            distribution.round,
            vector=distribution.vector,
            meta=self._view(),
        )
        actions += [Send(peer, envelope) for peer in trainers if peer != self.node_id]
        if self.node_id in trainers and self.round == distribution.round:
            self._train_wanted = self.round < self.config.rounds
            actions += self._maybe_train()
        actions.append(
            Emit("distributed", {"round": distribution.round, "trainers": len(trainers)})
        )
        return actions + self._maybe_finish()

    # -- the end ------------------------------------------------------------------------

    def _maybe_finish(self) -> list[Action]:
        if (
            self.round >= self.config.rounds
            and self._machine.phase is Phase.WAITING
            and not self._distributions
        ):
            self._machine.goto(Phase.DONE)
            return [Stop(f"holds the model of round {self.round}")]
        return []
