"""``gossip``: asynchronous push gossip learning (Ormándi, Hegedűs, Jelasity).

Theory of operation
-------------------
Two things happen independently:

*Pushing.* A push timer fires every ``period * U(1 - period_jitter, 1 + period_jitter)``
seconds (drawn from the core's ``rng``; the first one a jittered period after ``Started``).
Each tick seals ``core.vector`` once, with ``round`` = its *age* (the number of trainings
completed, ``core.round``), and sends that envelope to ``min(fanout, connected)`` distinct
neighbours drawn at random (``rng``) among the connected ones.

*Learning.*::

    TRAINING ──TrainingFinished──► models buffered?  yes ─► merge ─► TRAINING
        ▲                                            no  ─► WAITING
        │                                                     │
        └──── a model arrives (merge), or a push tick with nothing received (no merge) ◄┘

Received models are buffered, the newest per sender (highest sequence number). Whenever no
training is outstanding and at least one model is buffered, the own model is merged with the
whole buffer (weights = senders' sample counts, ages in ``MergeContext.rounds``), the buffer is
cleared and the merged model is trained. A node that has received nothing trains its own
model again at the next push tick, so a node whose neighbours are silent or gone keeps
learning instead of stalling. After every training: ``Emit("round", ...)`` and
``SaveCheckpoint``; after ``rounds`` trainings, ``Stop`` (and no more pushes).

``core.vector`` is the newest model the node holds (trained or merged); it is what a push sends.

*Peer sampling.* With ``peer_sampling = "neighbours"`` (the default) push targets are drawn
among the connected neighbours and only neighbours' models are accepted. With
``"membership"`` the node keeps a :class:`~p2pfl.protocol.membership.Membership` view
(started from the neighbours and the driver's ``known_peers``): every model carries a bounded
piggyback of it (``meta["view"]``, records signed by the peers they concern), received
copies are merged (a forged record is ``PeerMisbehaved``), pending joins are applied before a
push, and the ``fanout`` targets are drawn among the view's active candidates for the node's
age (``inactivity_threshold`` trainings), so pushes reach peers beyond the neighbours. Models
from any authenticated peer are accepted (a bounded replay window per sender); a peer whose
connection drops is left out of the candidates until it is heard from at a later age. The
driver must deliver to any key (the simulator does; the runtime dials on demand).

With history gossip on (:mod:`p2pfl.protocol.histories`), each push is followed, for each
target, by the own signed history and one relayed record.

*Time-triggered merging.* With ``merge_trigger = "time"`` the node instead trains back to
back, pushes each trained model, and merges every ``merge_interval`` seconds whatever arrived,
with FedFix-style weights whose expectation is each neighbour's data share whatever its
speed: :mod:`p2pfl.protocol.timed`. The default ``"count"`` is the protocol above, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from p2pfl.errors import RemoteProtocolError
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
from p2pfl.protocol.buffers import LatestBuffer, Offer
from p2pfl.protocol.config import CoreConfig
from p2pfl.protocol.core import ModeTraits, register_protocol_mode
from p2pfl.protocol.events import MessageReceived
from p2pfl.protocol.membership import Membership, parse_records
from p2pfl.protocol.messages import ModelUpdate, parse_model_update
from p2pfl.protocol.phases import GOSSIP_TRANSITIONS, Phase
from p2pfl.protocol.timed import TimedMerging
from p2pfl.wire import MessageKind


@dataclass(frozen=True, slots=True)
class _Outstanding:
    """What the outstanding training started from, for its round record."""

    merged: int
    connected: int
    started_at: float
    start: torch.Tensor | None = None
    """Time-triggered merging: the vector the training started from."""


def _samples_membership(config: CoreConfig) -> bool:
    """Pushes reach peers beyond the neighbours when targets come from the membership view."""
    return config.peer_sampling == "membership"


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    # A push reaches a given neighbour at most once per (shortest) period.
    return 0.0, model_frames / (config.period * (1.0 - config.period_jitter))


GOSSIP_IN_FLIGHT = 4.0
"""Model copies a gossip node keeps alive beyond its ``2 * fanout`` buffered pushes: frames on
their way (the frame's bytes, and the decoded model once one receiver has it) and the pushed
vectors they reference; calibrated on the dense-graph bench (sim.footprint's docstring)."""


def _buffered(config: CoreConfig, degree: float) -> float:
    # About two models per push received while training (2 * fanout), plus pushes in flight.
    return min(degree, 2.0 * config.fanout) + GOSSIP_IN_FLIGHT


@register_protocol_mode(
    "gossip",
    traits=ModeTraits(strangers=_samples_membership, traffic=_traffic, buffered=_buffered),
)
class GossipCore(BaseCore):
    """Asynchronous push gossip: periodic pushes to random neighbours; merge on receipt."""

    TRANSITIONS = GOSSIP_TRANSITIONS

    def _init_mode(self) -> None:
        self._buffer = LatestBuffer()
        self._push_at: float | None = None
        self._outstanding: _Outstanding | None = None
        self.timed: TimedMerging | None = None
        if self.config.merge_trigger == "time":
            self.timed = TimedMerging(self.config.merge_interval)
            self._merged_in_training = 0
            self._last_push: float | None = None
        self.membership: Membership | None = None
        if self.config.peer_sampling == "membership":
            self.membership = Membership(
                self._identity,
                (*self._peers.neighbours, *self._known_peers),
                start_round=self.round,
                counter=self._sealer.next_seq,
                capacity=self.config.view_capacity,
                inactivity_threshold=self.config.inactivity_threshold,
            )

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        if self.timed is not None:
            self.timed.begin(self._now)
            return self._train(merged=0)
        self._push_at = self._now + self._interval()
        return self._train(merged=0)

    def _on_message(self, event: MessageReceived) -> list[Action]:
        membership = self.membership
        if membership is None or event.envelope.kind is not MessageKind.MODEL_UPDATE:
            return super()._on_message(event)
        envelope = event.envelope
        try:
            update = parse_model_update(event, self._peers, self.vector.shape)
            records = parse_records(envelope.meta.get("view"), max_round=envelope.round)
            membership.merge(records)
        except RemoteProtocolError as exc:
            return [PeerMisbehaved(event.peer, str(exc))]
        membership.observe(update.sender, update.round)
        return self._on_update(update)

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        if self.membership is not None:
            self.membership.suspect(peer, self.round)
        return []

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        offer = self._buffer.offer(update)
        if self.timed is not None:
            if offer is Offer.ACCEPTED:
                self.timed.arrived(update)
            return []
        if self._machine.phase is Phase.WAITING:
            return self._merge_and_train()
        return []

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        outstanding = self._outstanding
        assert outstanding is not None, "TRAINING always has an outstanding record"
        self._outstanding = None
        if self.timed is not None:
            return self._timed_trained(outstanding, trained, loss, steps)
        self.vector = trained
        actions = self._record_training(outstanding, loss, steps, received=outstanding.merged)
        if self.finished:
            return actions
        if len(self._buffer):
            return actions + self._merge_and_train()
        self._machine.goto(Phase.WAITING)
        return actions

    def _on_deadline(self) -> list[Action]:
        if self.timed is not None:
            return self._timed_tick(self.timed)
        if self._push_at is None or self._now < self._push_at:
            return []
        self._push_at = self._now + self._interval()
        actions = self._push()
        if self._machine.phase is Phase.WAITING:
            actions += self._train(merged=0)
        return actions

    def _deadline(self) -> float | None:
        if self.timed is not None:
            return self.timed.next_at
        return self._push_at

    # -- pushing and learning -----------------------------------------------------------

    def _interval(self) -> float:
        jitter = self.config.period_jitter
        return self.config.period * float(self._rng.uniform(1.0 - jitter, 1.0 + jitter))

    def _push(self) -> list[Action]:
        membership = self.membership
        pool: Sequence[NodeId]
        if membership is not None:
            membership.set_round(self.round)
            membership.apply_pending()
            pool = tuple(p for p in membership.candidates(self.round) if p != self.node_id)
        else:
            pool = self._peers.connected()
        count = min(self.config.fanout, len(pool))
        if count == 0:
            return []
        chosen = self._rng.choice(len(pool), size=count, replace=False)
        meta: dict[str, object] | None = None
        if membership is not None:
            records = membership.piggyback(self.config.view_entries, self._rng)
            meta = {"view": [record.to_wire() for record in records]}
        envelope = self._sealer.seal(self.vector, self.round, meta=meta)
        targets = [pool[int(index)] for index in chosen]
        actions: list[Action] = [Send(peer, envelope) for peer in targets]
        return actions + self._gossip_histories(targets, self.vector)

    def _merge_and_train(self) -> list[Action]:
        # Every buffered model passed check_sender, so in neighbours mode it is a neighbour's:
        # the held models in key order are the neighbours' order, at O(held), not O(degree).
        updates = self._buffer.take(None)
        self.vector = self._merger.merge(self.vector, updates, own_round=self.round)
        return self._train(merged=len(updates))

    def _train(self, *, merged: int) -> list[Action]:
        self._machine.goto(Phase.TRAINING)
        self._outstanding = _Outstanding(
            merged=merged,
            connected=len(self._peers.connected()),
            started_at=self._now,
            start=self.vector if self.timed is not None else None,
        )
        return [StartTraining(self.vector, self.config.local_steps, self.round)]

    def _record_training(
        self, outstanding: _Outstanding, loss: float, steps: int, *, received: int
    ) -> list[Action]:
        """Count the finished training: its round record and checkpoint of ``core.vector``,
        and ``Stop`` (phase DONE, no more timers) after the last one."""
        finished_round = self.round
        self.round = finished_round + 1
        record = Emit(
            "round",
            {
                "round": finished_round,
                "loss": loss,
                "steps": steps,
                "received": received,
                "expected": outstanding.connected,
                "neighbours": len(self._peers.neighbours),
                "timed_out": 0,
                "merge_fallbacks": self._merger.fallbacks,
                "trained_at": self._now,
                "merged_at": outstanding.started_at,
            },
        )
        actions: list[Action] = [record, self._checkpoint(self.round, self.vector)]
        if self.round >= self.config.rounds:
            self._machine.goto(Phase.DONE)
            self._push_at = None
            if self.timed is not None:
                self.timed.stop()
            actions.append(Stop(f"completed {self.round} trainings"))
        return actions

    # -- time-triggered merging (p2pfl.protocol.timed) ----------------------------------

    def _timed_tick(self, timed: TimedMerging) -> list[Action]:
        if not timed.due(self._now):
            return []
        # Every buffered model passed check_sender; key order is the same in every process.
        updates = self._buffer.take(None)
        if updates:
            weights, own_weight = timed.weights(updates, self._now, self._merger.own_weight)
            self.vector = self._merger.merge(
                self.vector, updates, own_round=self.round, weights=weights, own_weight=own_weight
            )
            self._merged_in_training += len(updates)
        return []

    def _timed_trained(
        self, outstanding: _Outstanding, trained: torch.Tensor, loss: float, steps: int
    ) -> list[Action]:
        timed = self.timed
        assert timed is not None and outstanding.start is not None
        if self.vector is outstanding.start:
            self.vector = trained
        else:
            # Ticks merged into the model while it trained: keep them, add the training's step.
            self.vector = self.vector + (trained - outstanding.start)
        actions = self._record_training(outstanding, loss, steps, received=self._merged_in_training)
        self._merged_in_training = 0
        if self.finished:
            return actions
        # Push the fresh model, no more often than the runtime's rate limits allow.
        quiet = self.config.period * (1.0 - self.config.period_jitter)
        if self._last_push is None or self._now >= self._last_push + quiet:
            self._last_push = self._now
            actions += self._push()
        return actions + self._train(merged=0)
