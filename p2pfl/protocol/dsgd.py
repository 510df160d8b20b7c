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

Multiple gossip steps (DFedSAM-MGS, Shi et al. 2023)
----------------------------------------------------
With ``gossip_steps = Q > 1`` a round runs Q exchanges after its one training: step 0 sends
and collects the trained models as above; each step ``q = 1 .. Q-1`` seals the previous
step's merged model, sends it to every connected neighbour and collects theirs (same closing
rule, a fresh ``round_timeout`` deadline), then merges again, so a round applies the mixing
matrix Q times (x <- W^Q x on a static graph) for Q times the communication. On the wire, step
``q`` of round ``r`` is numbered ``r * Q + q`` (its *exchange*); ``max_rounds_ahead`` still
counts rounds (exchanges up to the last step of round ``r + max_rounds_ahead`` are buffered). Every node of a run must use
the same Q. ``Q = 1`` is the plain protocol, message for message. The round record sums
``received`` and ``expected`` over the Q steps; ``timed_out`` is 1 if any step timed out.
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

_COLLECTING = Phase.COLLECTING
_ACCEPTED = Offer.ACCEPTED
_CONFLICT = Offer.CONFLICT
"""Bound once: read on every message (an enum member off its class is a slower lookup)."""


@dataclass(slots=True)
class _Trained:
    """The own model of the round being collected, and what is needed to report it.

    Never changed once made (a gossip step makes a new one); not frozen only because a frozen
    dataclass sets each of its eleven fields through ``object.__setattr__``, once a round.
    """

    vector: torch.Tensor
    envelope: Envelope
    loss: float
    steps: int
    trained_at: float
    collect_until: float
    step: int = 0
    """The gossip step being collected (0 .. gossip_steps - 1)."""
    received: int = 0
    expected: int = 0
    timed_out: bool = False
    """Totals of the round's earlier gossip steps."""


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    # One model per gossip step (gossip_steps per round); a neighbour that gives up on this
    # node runs a step at most every round_timeout seconds.
    frames = model_frames * config.gossip_steps
    return float(frames), frames / config.round_timeout


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
        self._steps = self.config.gossip_steps
        # Exchanges up to the last step of round + max_rounds_ahead.
        self._buffer = RoundBuffer((self.config.max_rounds_ahead + 1) * self._steps - 1)
        self._trained: _Trained | None = None
        self._exchange = self.round * self._steps
        self._ready: set[bytes] = set()
        """The raw keys of the connected neighbours whose model of the exchange is held: the
        exchange is complete when they are all the connected neighbours. Kept up to date on
        every accepted model, connection and disconnection, so completeness is a comparison
        of two counts, never a walk over the neighbours."""

    @property
    def exchange(self) -> int:
        """The wire number of the exchange being run or next: ``round * gossip_steps + step``."""
        return self._exchange

    def _set_exchange(self, exchange: int) -> None:
        """Move to ``exchange`` (once per gossip step) and count who delivered it already."""
        self._exchange = exchange
        peers = self._peers
        self._ready = {
            sender.raw
            for sender in self._buffer.senders(exchange)
            if peers.is_connected_neighbour(sender)
        }

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        return self._start_training()

    def _on_connected(self, peer: NodeId) -> list[Action]:
        if self._buffer.holds(self._exchange, peer) and self._peers.is_connected_neighbour(peer):
            self._ready.add(peer.raw)
        if self._machine.phase is Phase.COLLECTING and self._trained is not None:
            return [Send(peer, self._trained.envelope)]
        return []

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        self._ready.discard(peer.raw)
        return self._close_if_complete()

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        exchange = self._exchange
        offer = self._buffer.offer(update, exchange)
        if offer is _ACCEPTED:
            if update.round != exchange:
                return []
            if self._peers.is_connected_neighbour(update.sender):
                self._ready.add(update.sender.raw)
            return self._close_if_complete()
        if offer is _CONFLICT:
            return [PeerMisbehaved(update.sender, f"two different models for round {update.round}")]
        return []

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        envelope = self._sealer.seal(trained, self._exchange)
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
        if self._histories is not None:
            sends += self._gossip_histories(recipients, trained)
        sends += self._close_if_complete()
        return sends

    def _on_deadline(self) -> list[Action]:
        deadline = self._deadline()
        if deadline is not None and self._now >= deadline:
            return self._close_round(timed_out=True)
        return []

    def _deadline(self) -> float | None:
        if self._machine.phase is _COLLECTING and self._trained is not None:
            return self._trained.collect_until
        return None

    # -- the round ----------------------------------------------------------------------

    def _start_training(self) -> list[Action]:
        self._machine.goto(Phase.TRAINING)
        return [StartTraining(self.vector, self.config.local_steps, self.round)]

    def _close_if_complete(self) -> list[Action]:
        # O(1): _ready holds exactly the connected neighbours that delivered this exchange.
        if self._machine.phase is not _COLLECTING:
            return []
        if len(self._ready) < self._peers.connected_count:
            return []
        return self._close_round(timed_out=False)

    def _close_round(self, *, timed_out: bool) -> list[Action]:
        trained = self._trained
        assert trained is not None, "COLLECTING always has a trained model"
        finished_round = self.round
        exchange = self._exchange
        # Expected: the connected neighbours and whoever else delivered; _ready is the
        # overlap of the two.
        expected = self._peers.connected_count + self._buffer.count(exchange) - len(self._ready)
        updates = self._buffer.take(exchange, self._peers.neighbours)
        merged = self._merger.merge(trained.vector, updates, own_round=exchange)
        if trained.step + 1 < self._steps:
            return self._next_gossip_step(
                trained, merged, len(updates), expected, timed_out=timed_out
            )
        self.vector = merged
        self.round = finished_round + 1
        self._trained = None
        self._set_exchange(self.round * self._steps)
        record = Emit(
            "round",
            {
                "round": finished_round,
                "loss": trained.loss,
                "steps": trained.steps,
                "received": trained.received + len(updates),
                "expected": trained.expected + expected,
                "neighbours": len(self._peers.neighbours),
                "timed_out": int(timed_out or trained.timed_out),
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

    def _next_gossip_step(
        self,
        previous: _Trained,
        merged: torch.Tensor,
        received: int,
        expected: int,
        *,
        timed_out: bool,
    ) -> list[Action]:
        """Send the step's merged model as the next gossip step's and collect again."""
        step = previous.step + 1
        envelope = self._sealer.seal(merged, self.round * self._steps + step)
        self._trained = _Trained(
            vector=merged,
            envelope=envelope,
            loss=previous.loss,
            steps=previous.steps,
            trained_at=previous.trained_at,
            collect_until=self._now + self.config.round_timeout,
            step=step,
            received=previous.received + received,
            expected=previous.expected + expected,
            timed_out=previous.timed_out or timed_out,
        )
        self._set_exchange(self.round * self._steps + step)
        sends: list[Action] = [Send(peer, envelope) for peer in self._peers.connected()]
        return sends + self._close_if_complete()
