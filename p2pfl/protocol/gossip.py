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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pfl.protocol.actions import Action, Emit, SaveCheckpoint, Send, StartTraining, Stop
from p2pfl.protocol.base import BaseCore
from p2pfl.protocol.buffers import LatestBuffer
from p2pfl.protocol.core import register_protocol_mode
from p2pfl.protocol.messages import ModelUpdate
from p2pfl.protocol.phases import GOSSIP_TRANSITIONS, Phase


@dataclass(frozen=True, slots=True)
class _Outstanding:
    """What the outstanding training started from, for its round record."""

    merged: int
    connected: int
    started_at: float


@register_protocol_mode("gossip")
class GossipCore(BaseCore):
    """Asynchronous push gossip: periodic pushes to random neighbours; merge on receipt."""

    TRANSITIONS = GOSSIP_TRANSITIONS

    def _init_mode(self) -> None:
        self._buffer = LatestBuffer()
        self._push_at: float | None = None
        self._outstanding: _Outstanding | None = None

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        self._push_at = self._now + self._interval()
        return self._train(merged=0)

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        self._buffer.offer(update)
        if self._machine.phase is Phase.WAITING:
            return self._merge_and_train()
        return []

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        outstanding = self._outstanding
        assert outstanding is not None, "TRAINING always has an outstanding record"
        self._outstanding = None
        finished_round = self.round
        self.vector = trained
        self.round = finished_round + 1
        record = Emit(
            "round",
            {
                "round": finished_round,
                "loss": loss,
                "steps": steps,
                "received": outstanding.merged,
                "expected": outstanding.connected,
                "neighbours": len(self._peers.neighbours),
                "timed_out": 0,
                "merge_fallbacks": self._merger.fallbacks,
                "trained_at": self._now,
                "merged_at": outstanding.started_at,
            },
        )
        actions: list[Action] = [record, SaveCheckpoint(self.round, trained)]
        if self.round >= self.config.rounds:
            self._machine.goto(Phase.DONE)
            self._push_at = None
            return [*actions, Stop(f"completed {self.round} trainings")]
        if len(self._buffer):
            return actions + self._merge_and_train()
        self._machine.goto(Phase.WAITING)
        return actions

    def _on_deadline(self) -> list[Action]:
        if self._push_at is None or self._now < self._push_at:
            return []
        self._push_at = self._now + self._interval()
        actions = self._push()
        if self._machine.phase is Phase.WAITING:
            actions += self._train(merged=0)
        return actions

    def _deadline(self) -> float | None:
        return self._push_at

    # -- pushing and learning -----------------------------------------------------------

    def _interval(self) -> float:
        jitter = self.config.period_jitter
        return self.config.period * float(self._rng.uniform(1.0 - jitter, 1.0 + jitter))

    def _push(self) -> list[Action]:
        connected = self._peers.connected()
        count = min(self.config.fanout, len(connected))
        if count == 0:
            return []
        chosen = self._rng.choice(len(connected), size=count, replace=False)
        envelope = self._sealer.seal(self.vector, self.round)
        return [Send(connected[int(index)], envelope) for index in chosen]

    def _merge_and_train(self) -> list[Action]:
        updates = self._buffer.take(self._peers.neighbours)
        self.vector = self._merger.merge(self.vector, updates, own_round=self.round)
        return self._train(merged=len(updates))

    def _train(self, *, merged: int) -> list[Action]:
        self._machine.goto(Phase.TRAINING)
        self._outstanding = _Outstanding(
            merged=merged, connected=len(self._peers.connected()), started_at=self._now
        )
        return [StartTraining(self.vector, self.config.local_steps, self.round)]
