"""``fedavg``: federated averaging with one server and sampled clients (McMahan et al. 2017).

Theory of operation
-------------------
One node is the *server*: the node whose key is ``config.server``. Every other node is a
*client*, and the server must be among its neighbours; the server's neighbours are its
clients (``K`` of them). Both roles speak only ``MODEL_UPDATE`` over the ordinary wire, so a
``p2pfl node`` runs either role as well as the simulator does. Round ``r`` (the server's
``core.round == r``)::

    server                                            sampled client
    sample m connected clients (rng) ─ global(r) ──►  adopt, StartTraining(local_steps)
    COLLECTING, deadline now + round_timeout          TrainingFinished
    buffer ◄──────────────────────────────── model(r) ─┘
    every sampled client in (or gone), or the deadline:
      average (merge rule, sample-weighted) ─► SaveCheckpoint(r + 1) ─► round r + 1
    after the last round: the final global model (round = rounds) to every connected client,
    which adopts it and stops

- *Sampling* (server): ``m = max(1, round(sample_fraction * K))`` when ``sample_fraction``
  is set, else ``sample_size``, drawn without replacement from the core's ``rng`` among the
  clients connected when the round opens (fewer when fewer are connected; a client that is
  down cannot be asked). With no client connected the server waits (``WAITING``) until one
  connects, re-checking every ``round_timeout``.
- *Averaging* (server): the round-r models received, in key order, go through the merge rule
  with the senders' sample counts as weights (the first model as ``own``, weighted by its
  own count): with ``weighted`` (the default) that is FedAvg's
  ``sum_k n_k w_k / sum_k n_k``; a robust rule (``median``, ``krum``...) gives robust FL. A
  round that received nothing, or whose rule had too few inputs, keeps the global model.
- *Stragglers and dropped clients* (server): a sampled client that disconnects is no longer
  waited for; one that reconnects while the round is open is sent the round's model again and
  waited for again. At ``round_timeout`` after the round opened the server averages what it
  has; later models of that round are ignored. A model of the open round from a client that
  was not sampled is accepted too (it was trained on the same global model, e.g. sent before
  a server restart); a second, different model from one client for one round is
  ``PeerMisbehaved``.
- *Clients* train each new round they are sent and send the result to the server (again on
  reconnecting, should the first copy have been lost with the connection). A newer round
  arriving while a training is outstanding is trained next; the outstanding result is
  dropped as stale. A client stops when it receives the final model. Models from anyone but
  the server are ``PeerMisbehaved``.

Memory is bounded by the neighbours: the server holds at most one model per client, for the
open round only; a client holds the global model and its last trained model.

``core.vector`` is the global model: on the server the last average, on a client the last
model received from the server. Only the server checkpoints (``SaveCheckpoint`` after every
round): it alone holds the global model, so the simulator's metrics report it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from p2pfl.errors import ConfigError
from p2pfl.identity import Identity, NodeId
from p2pfl.protocol.actions import (
    Action,
    Emit,
    PeerMisbehaved,
    Send,
    StartTraining,
    Stop,
)
from p2pfl.protocol.base import BaseCore
from p2pfl.protocol.config import CoreConfig
from p2pfl.protocol.core import ModeTraits, register_protocol_mode
from p2pfl.protocol.messages import ModelUpdate
from p2pfl.protocol.phases import FEDAVG_TRANSITIONS, Phase
from p2pfl.wire import Envelope


def clients_per_round(config: CoreConfig, clients: int) -> int:
    """How many of ``clients`` the server samples per round (before capping at those connected)."""
    share = config.sample_fraction
    if share is None:
        return min(config.sample_size, clients)
    return min(max(1, round(share * clients)), clients)


@dataclass(slots=True)
class _Round:
    """The server's open round."""

    round: int
    envelope: Envelope
    sampled: frozenset[NodeId]
    waiting: set[NodeId]
    until: float
    opened_at: float
    updates: dict[NodeId, ModelUpdate] = field(default_factory=dict)


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    # The server sends a client one model per round and a client sends one back; either may
    # send it again after a reconnection. A round closes at the latest after round_timeout.
    frames = 2.0 * model_frames
    return frames, frames / config.round_timeout


@register_protocol_mode("fedavg", traits=ModeTraits(server=True, traffic=_traffic))
class FedAvgCore(BaseCore):
    """Building one gives the server's core if ``identity`` holds ``config.server``, else a
    client's (:func:`p2pfl.protocol.make_core` documents the arguments).

    Raises:
        ConfigError: ``protocol.server`` is missing or not a key; a client does not have the
            server as a neighbour; the server has no neighbours (clients).
    """

    TRANSITIONS = FEDAVG_TRANSITIONS
    HISTORY_GOSSIP = False

    def __new__(
        cls, config: CoreConfig, *args: Any, identity: Identity, **kwargs: Any
    ) -> FedAvgCore:
        # One registered class, so ``make_core`` and the registry need no special case; each
        # node gets the class of its role (a role class built directly keeps its own).
        if cls is not FedAvgCore:
            return super().__new__(cls)
        if not config.server:
            raise ConfigError("protocol.server", "", "the server's public key (64 hex) for fedavg")
        server = NodeId.from_hex(config.server, key="protocol.server")
        role = FedAvgServer if identity.node_id == server else FedAvgClient
        return super().__new__(role)


class FedAvgServer(FedAvgCore):
    """The server: samples clients, sends them the global model, averages what comes back."""

    def _init_mode(self) -> None:
        if not self._peers.neighbours:
            raise ConfigError("neighbours", [], "at least one client for the fedavg server")
        self._open: _Round | None = None
        self._retry_at: float | None = None

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        return self._open_round()

    def _on_connected(self, peer: NodeId) -> list[Action]:
        if self._machine.phase is Phase.WAITING:
            return self._open_round()
        current = self._open
        if current is None or peer not in current.sampled or peer in current.updates:
            return []
        current.waiting.add(peer)
        return [Send(peer, current.envelope)]

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        current = self._open
        if current is None or peer not in current.waiting:
            return []
        current.waiting.discard(peer)
        return [] if current.waiting else self._close(timed_out=False)

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        current = self._open
        if current is None or update.round != current.round:
            return []  # a straggler's model of a closed round, or a round never opened
        held = current.updates.get(update.sender)
        if held is not None:
            if held.same_model(update):
                return []
            return [PeerMisbehaved(update.sender, f"two different models for round {update.round}")]
        current.updates[update.sender] = update
        current.waiting.discard(update.sender)
        return [] if current.waiting else self._close(timed_out=False)

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        raise AssertionError("the server never trains")  # pragma: no cover

    def _on_deadline(self) -> list[Action]:
        if self._open is not None and self._now >= self._open.until:
            return self._close(timed_out=True)
        if self._retry_at is not None and self._now >= self._retry_at:
            return self._open_round()
        return []

    def _deadline(self) -> float | None:
        return self._open.until if self._open is not None else self._retry_at

    # -- the round ----------------------------------------------------------------------

    def _open_round(self) -> list[Action]:
        connected = self._peers.connected()
        if not connected:
            if self._machine.phase is not Phase.WAITING:
                self._machine.goto(Phase.WAITING)
            self._retry_at = self._now + self.config.round_timeout
            return []
        self._retry_at = None
        count = min(clients_per_round(self.config, len(self._peers.neighbours)), len(connected))
        chosen = self._rng.choice(len(connected), size=count, replace=False)
        sampled = sorted(connected[int(index)] for index in chosen)
        envelope = self._sealer.seal(self.vector, self.round)
        self._open = _Round(
            round=self.round,
            envelope=envelope,
            sampled=frozenset(sampled),
            waiting=set(sampled),
            until=self._now + self.config.round_timeout,
            opened_at=self._now,
        )
        self._machine.goto(Phase.COLLECTING)
        return [Send(peer, envelope) for peer in sampled]

    def _close(self, *, timed_out: bool) -> list[Action]:
        current = self._open
        assert current is not None, "only an open round closes"
        self._open = None
        updates = [current.updates[p] for p in self._peers.neighbours if p in current.updates]
        merged = self.vector
        if updates:
            fallbacks = self._merger.fallbacks
            self._merger.own_weight = float(updates[0].samples)
            averaged = self._merger.merge(updates[0].vector, updates[1:], own_round=current.round)
            if self._merger.fallbacks == fallbacks:  # else too few inputs: keep the global
                merged = averaged
        self.vector = merged
        self.round = current.round + 1
        actions: list[Action] = [
            Emit(
                "round",
                {
                    "round": current.round,
                    "sampled": len(current.sampled),
                    "received": len(updates),
                    "timed_out": int(timed_out),
                    "merge_fallbacks": self._merger.fallbacks,
                    "opened_at": current.opened_at,
                    "merged_at": self._now,
                },
            ),
            self._checkpoint(self.round, merged),
        ]
        if self.round < self.config.rounds:
            return actions + self._open_round()
        final = self._sealer.seal(merged, self.round)
        actions += [Send(peer, final) for peer in self._peers.connected()]
        self._machine.goto(Phase.DONE)
        return [*actions, Stop(f"completed {self.round} rounds")]


class FedAvgClient(FedAvgCore):
    """A client: trains each round the server sends it and sends the result back."""

    def _init_mode(self) -> None:
        self.server = NodeId.from_hex(self.config.server, key="protocol.server")
        if not self._peers.is_neighbour(self.server):
            raise ConfigError(
                "protocol.server",
                self.config.server,
                "the key of this node (the server) or of one of its neighbours",
            )
        self._adopted: int | None = None
        """The round of the last model received from the server (None: none yet)."""
        self._training_round: int | None = None
        self._train_wanted = False
        self._final = False
        self._pending: Envelope | None = None
        """The last trained model sent to the server, sent again after a reconnection."""

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        self._machine.goto(Phase.WAITING)
        return self._maybe_train()  # the server's model may have come before Started

    def _on_connected(self, peer: NodeId) -> list[Action]:
        if peer == self.server and self._pending is not None:
            return [Send(peer, self._pending)]
        return []

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        if update.sender != self.server:
            return [PeerMisbehaved(update.sender, "a model from a peer that is not the server")]
        if self._adopted is not None and update.round <= self._adopted:
            return []  # the same round again (sent on reconnection), or an older one
        self._adopted = update.round
        self.vector = update.vector
        self.round = update.round
        self._pending = None
        if update.round >= self.config.rounds:
            self._final = True
            if self._machine.phase is Phase.TRAINING:
                return []  # stops when the outstanding training reports
            self._machine.goto(Phase.DONE)
            return [Stop(f"received the final model of round {update.round}")]
        self._train_wanted = True
        return self._maybe_train()

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        trained_round = self._training_round
        self._training_round = None
        stale = trained_round != self.round or self._final
        actions: list[Action] = [self._trained_record(trained_round, loss, steps, stale=stale)]
        if self._final:
            self._machine.goto(Phase.DONE)
            return [*actions, Stop(f"received the final model of round {self.round}")]
        self._machine.goto(Phase.WAITING)
        if not stale:
            self._pending = self._sealer.seal(trained, self.round)
            if self._peers.is_connected(self.server):
                actions.append(Send(self.server, self._pending))
        return actions + self._maybe_train()

    def _on_deadline(self) -> list[Action]:
        return []

    def _deadline(self) -> float | None:
        return None

    def _maybe_train(self) -> list[Action]:
        if not self._train_wanted or self._machine.phase is not Phase.WAITING:
            return []
        self._train_wanted = False
        self._training_round = self.round
        self._machine.goto(Phase.TRAINING)
        return [StartTraining(self.vector, self.config.local_steps, self.round)]


__all__ = ["FedAvgClient", "FedAvgCore", "FedAvgServer", "clients_per_round"]
