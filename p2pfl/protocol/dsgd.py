"""``dsgd``: synchronous decentralised SGD rounds (D-PSGD style).

Theory of operation
-------------------
Round ``r`` (``core.round == r``, ``r`` rounds already done) runs::

    TRAINING ──TrainingFinished──► COLLECTING ──all in / timeout──► merge ──► TRAINING (r+1)
                                                                       └────► DONE (r+1 == rounds)

1. ``StartTraining(vector, local_steps, r)``; ``vector`` is the last merged model.
2. On ``TrainingFinished`` the trained model is sealed once (round ``r``) and the same envelope
   is sent to every connected neighbour (then, with history gossip on, each gets the own
   signed history and one relayed record: :mod:`p2pfl.protocol.histories`). The collection
   deadline is armed at ``now + round_timeout``.
3. The round closes as soon as every *currently connected* neighbour has delivered its round-r
   model (a neighbour that disconnects is no longer waited for; one that connects while the
   core collects is sent this round's envelope and waited for), or at the deadline, whichever
   comes first.
4. Merge: the own trained model with every round-r model received (from neighbours connected
   or not), weights = the senders' sample counts, ``own_weight`` = own sample count. Then
   ``Emit("round", ...)``, ``SaveCheckpoint(r + 1, merged)`` and either training for ``r + 1``
   or ``Stop``.

Models are accepted for rounds ``r .. r + max_rounds_ahead`` at any time, including while the
core trains, one per neighbour per round: an identical copy is ignored, a different second
model for the same round is reported as ``PeerMisbehaved`` (the first is kept). Models of
earlier rounds are ignored, models further ahead dropped; neither is a fault, since a peer
may legitimately be behind or far ahead after a restart.

``core.vector`` is the last merged model: it changes only when a round closes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
from p2pfl.protocol.buffers import Offer, RoundBuffer
from p2pfl.protocol.config import CoreConfig
from p2pfl.protocol.core import ModeTraits, register_protocol_mode
from p2pfl.protocol.messages import ModelUpdate
from p2pfl.protocol.phases import DSGD_TRANSITIONS, Phase
from p2pfl.wire import Envelope


@dataclass(frozen=True, slots=True)
class _Trained:
    """The own model of the round being collected, and what is needed to report it."""

    vector: torch.Tensor
    envelope: Envelope
    loss: float
    steps: int
    trained_at: float
    collect_until: float


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    # One model per round; a neighbour that gives up on this node runs a round at most every
    # round_timeout seconds.
    return float(model_frames), model_frames / config.round_timeout


SHARED_BUFFERED = 2.0
"""Received models a dsgd node holds, counted in a simulation whatever its degree: a model is
decoded once per envelope and shared by all its receivers
(:func:`~p2pfl.protocol.messages.decode_model`), so a buffer references its neighbours'
models, which exist once each: about one per node for the round collected and one for a round
that started early."""


def _buffered(config: CoreConfig, degree: float) -> float:
    return min(degree, SHARED_BUFFERED)


@register_protocol_mode("dsgd", traits=ModeTraits(traffic=_traffic, buffered=_buffered))
class DsgdCore(BaseCore):
    """Synchronous rounds: train, send to all neighbours, wait for theirs or a timeout, merge."""

    TRANSITIONS = DSGD_TRANSITIONS

    def _init_mode(self) -> None:
        self._buffer = RoundBuffer(self.config.max_rounds_ahead)
        self._trained: _Trained | None = None

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        return self._start_training()

    def _on_connected(self, peer: NodeId) -> list[Action]:
        if self._machine.phase is Phase.COLLECTING and self._trained is not None:
            return [Send(peer, self._trained.envelope)]
        return []

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        return self._close_if_complete()

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        offer = self._buffer.offer(update, self.round)
        if offer is Offer.CONFLICT:
            return [PeerMisbehaved(update.sender, f"two different models for round {update.round}")]
        if offer is Offer.ACCEPTED and update.round == self.round:
            return self._close_if_complete()
        return []

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        envelope = self._sealer.seal(trained, self.round)
        self._trained = _Trained(
            vector=trained,
            envelope=envelope,
            loss=loss,
            steps=steps,
            trained_at=self._now,
            collect_until=self._now + self.config.round_timeout,
        )
        self._machine.goto(Phase.COLLECTING)
        recipients = self._peers.connected()
        sends: list[Action] = [Send(peer, envelope) for peer in recipients]
        sends += self._gossip_histories(recipients, trained)
        return sends + self._close_if_complete()

    def _on_deadline(self) -> list[Action]:
        deadline = self._deadline()
        if deadline is not None and self._now >= deadline:
            return self._close_round(timed_out=True)
        return []

    def _deadline(self) -> float | None:
        if self._machine.phase is Phase.COLLECTING and self._trained is not None:
            return self._trained.collect_until
        return None

    # -- the round ----------------------------------------------------------------------

    def _start_training(self) -> list[Action]:
        self._machine.goto(Phase.TRAINING)
        return [StartTraining(self.vector, self.config.local_steps, self.round)]

    def _close_if_complete(self) -> list[Action]:
        if self._machine.phase is not Phase.COLLECTING:
            return []
        connected = self._peers.connected()
        # Fewer models than connected neighbours cannot cover them all: an O(1) answer for
        # every message but the last ones of a round, instead of a walk over the neighbours.
        if self._buffer.count(self.round) < len(connected):
            return []
        if any(not self._buffer.holds(self.round, peer) for peer in connected):
            return []
        return self._close_round(timed_out=False)

    def _close_round(self, *, timed_out: bool) -> list[Action]:
        trained = self._trained
        assert trained is not None, "COLLECTING always has a trained model"
        finished_round = self.round
        expected = set(self._peers.connected()) | self._buffer.senders(finished_round)
        updates = self._buffer.take(finished_round, self._peers.neighbours)
        merged = self._merger.merge(trained.vector, updates, own_round=finished_round)
        self.vector = merged
        self.round = finished_round + 1
        self._trained = None
        record = Emit(
            "round",
            {
                "round": finished_round,
                "loss": trained.loss,
                "steps": trained.steps,
                "received": len(updates),
                "expected": len(expected),
                "neighbours": len(self._peers.neighbours),
                "timed_out": int(timed_out),
                "merge_fallbacks": self._merger.fallbacks,
                "trained_at": trained.trained_at,
                "merged_at": self._now,
            },
        )
        actions: list[Action] = [record, self._checkpoint(self.round, merged)]
        if self.round >= self.config.rounds:
            self._machine.goto(Phase.DONE)
            return [*actions, Stop(f"completed {self.round} rounds")]
        return actions + self._start_training()
