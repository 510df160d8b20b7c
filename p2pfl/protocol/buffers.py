"""Where received models wait to be merged: per round (dsgd) or latest per sender (gossip).

Both buffers bound their memory by construction: dsgd keeps at most one model per neighbour
for each of ``max_rounds_ahead + 1`` rounds, gossip at most one model per neighbour. Taking
models out returns them in neighbour-key order, so the merge sees the same input order in
every process.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from p2pfl.identity import NodeId
from p2pfl.protocol.messages import ModelUpdate


class Offer(enum.Enum):
    """What a buffer did with an offered model."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    """The same model was already held; nothing changed."""
    STALE = "stale"
    """Older than what the buffer still wants; dropped."""
    TOO_FAR = "too_far"
    """dsgd: more than ``max_rounds_ahead`` rounds ahead; dropped."""
    CONFLICT = "conflict"
    """dsgd: a different model from the same sender for the same round; the first is kept."""


class RoundBuffer:
    """dsgd: at most one model per (round, sender), for rounds ``current .. current + ahead``.

    Held models are keyed by the sender's raw key: bytes hash in C, a NodeId in Python, and
    the buffer is touched on every message.
    """

    __slots__ = ("_rounds", "ahead")

    def __init__(self, ahead: int) -> None:
        self.ahead = ahead
        self._rounds: dict[int, dict[bytes, ModelUpdate]] = {}

    def offer(self, update: ModelUpdate, current_round: int) -> Offer:
        round_ = update.round
        if round_ < current_round:
            return Offer.STALE
        if round_ > current_round + self.ahead:
            return Offer.TOO_FAR
        held = self._rounds.get(round_)
        if held is None:
            held = self._rounds[round_] = {}
        size = len(held)
        # One lookup: setdefault inserts unless the sender's model is held already.
        previous = held.setdefault(update.sender.raw, update)
        if len(held) != size:
            return Offer.ACCEPTED
        return Offer.DUPLICATE if previous.same_model(update) else Offer.CONFLICT

    def senders(self, round: int) -> frozenset[NodeId]:
        return frozenset(update.sender for update in self._rounds.get(round, {}).values())

    def holds(self, round: int, sender: NodeId) -> bool:
        return sender.raw in self._rounds.get(round, ())

    def count(self, round: int) -> int:
        """How many senders' models of ``round`` are held."""
        return len(self._rounds.get(round, ()))

    def take(self, round: int, order: Sequence[NodeId]) -> list[ModelUpdate]:
        """Remove and return the models of ``round`` in ``order``; forget older rounds too."""
        held = self._rounds.pop(round, {})
        for old in [r for r in self._rounds if r < round]:
            del self._rounds[old]
        if not held:
            return []
        return [held[raw] for raw in (peer.raw for peer in order) if raw in held]

    def __len__(self) -> int:
        return sum(len(held) for held in self._rounds.values())


class LatestBuffer:
    """gossip: the newest model (highest sequence number) of each sender since the last take."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[NodeId, ModelUpdate] = {}

    def offer(self, update: ModelUpdate) -> Offer:
        previous = self._held.get(update.sender)
        if previous is not None and previous.seq > update.seq:
            return Offer.STALE
        self._held[update.sender] = update
        return Offer.ACCEPTED

    def take(self, order: Sequence[NodeId] | None) -> list[ModelUpdate]:
        """Remove and return the held models of the peers in ``order``, in that order; with
        ``order=None`` every held model, in key order."""
        held, self._held = self._held, {}
        if order is None:
            order = sorted(held, key=lambda peer: peer.raw)
        return [held[peer] for peer in order if peer in held]

    def __len__(self) -> int:
        return len(self._held)
