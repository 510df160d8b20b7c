"""What every protocol mode shares: construction checks, the clock, event dispatch.

Theory of operation
-------------------
:class:`BaseCore.handle` is the single entry point. It checks ``now`` (finite, never
decreasing), then dispatches the event with ``match``:

- ``PeerConnected`` / ``PeerDisconnected`` update the :class:`~p2pfl.protocol.peers.PeerSet`
  (a connection from a peer the core does not *admit* is answered with ``Disconnect``: only
  configured neighbours, unless the config's ``admits_strangers`` holds, as for ``modest``
  and membership-sampled ``gossip``, which take any authenticated peer), then tell the mode;
  ``NeighboursConnected`` is one ``PeerConnected`` per neighbour in key order, at O(1) for
  a mode that does not override ``_on_connected``;
- ``MessageReceived`` goes to ``_on_message``, by default
  :func:`~p2pfl.protocol.messages.parse_model_update` (or, for ``HISTORY`` when history
  gossip is on, :class:`~p2pfl.protocol.histories.HistoryGossip`); a peer's fault becomes
  ``PeerMisbehaved`` there, so no mode can let one escape; a valid update is handed to the
  mode (``modest`` overrides ``_on_message`` for its own message kinds);
- ``Started``, ``TrainingFinished`` are checked against the phase (misuse raises
  :class:`~p2pfl.errors.LocalProtocolError` before any state changes) and handed to the mode;
- ``DeadlineReached`` is handed to the mode, which acts only on timers that are due, so an
  early or repeated wake-up is harmless;
- ``LeaveRequested``: the mode says goodbye (``_on_leave``: ``modest`` announces LEAVE and
  refuses the models it holds), then the core is ``DONE`` and returns ``Stop``; a training
  outstanding then may still be reported, and is dropped.

Modes implement the ``_on_*`` hooks and ``_deadline``; they own their buffers and timers and
move their :class:`~p2pfl.protocol.phases.PhaseMachine` along their table. What the base
class owns, a mode uses rather than repeats: every envelope is sealed by ``self._sealer``
(:class:`~p2pfl.protocol.messages.Sealer`, the one owner of the sequence counter); a
checkpoint is ``self._checkpoint(round, vector)`` (it carries the latest training's loss);
``idle`` and ``finished`` follow from the phase and ``_deadline``; ``_on_leave`` (optional)
is the goodbye. What a mode needs from its population it declares in its
:class:`~p2pfl.protocol.core.ModeTraits`, never by name elsewhere.

History gossip (SybilWall, :mod:`p2pfl.protocol.histories`) is on when
``config.history_gossip`` says so, or, when it is ``None``, when the merge rule implements
:class:`~p2pfl.merge.base.HistoryHook` (the SybilWall variants), through which the rule learns
the distant histories; a mode calls :meth:`BaseCore._gossip_histories` right after it sends
its model.

The driver learns its neighbours' reachability only through events: every configured
neighbour starts *not connected*, and a driver reports ``PeerConnected`` for each neighbour it
reaches (the simulator reports ``NeighboursConnected`` before ``Started``). Tensors in actions
are shared with the core: a driver must treat them as read-only.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, assert_never

import numpy as np
import torch

from p2pfl.checks import check_int
from p2pfl.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from p2pfl.identity import Identity, NodeId
from p2pfl.merge.base import MergeRule, Probe, history_hook
from p2pfl.params import ParamLayout
from p2pfl.protocol.actions import (
    Action,
    Disconnect,
    Emit,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    Stop,
)
from p2pfl.protocol.compression import Chains, MissingBase, make_compressor
from p2pfl.protocol.config import CoreConfig
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
from p2pfl.protocol.histories import HistoryGossip, seal_history
from p2pfl.protocol.merging import Merger
from p2pfl.protocol.messages import ModelUpdate, Sealer, check_sender, parse_model_update
from p2pfl.protocol.peers import PeerSet
from p2pfl.protocol.phases import Phase, PhaseMachine, Transitions
from p2pfl.wire import Envelope, MessageKind

# Members read on every message, bound once: reading an enum member off its class costs
# three times a global's lookup (an IntEnum's, eight).
_DONE = Phase.DONE
_HISTORY = MessageKind.HISTORY
_FLOAT32 = torch.float32


class BaseCore(abc.ABC):
    """Shared state and dispatch; a mode subclasses it and fills in the hooks."""

    TRANSITIONS: ClassVar[Transitions]
    HISTORY_GOSSIP: ClassVar[bool] = True
    """Whether the mode can run SybilWall history gossip (it has neighbours to gossip with)."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        identity: Identity,
        neighbours: Collection[NodeId],
        vector: torch.Tensor,
        samples: int,
        merge: MergeRule,
        rng: np.random.Generator,
        start_round: int = 0,
        seq_start: int = 0,
        layout: ParamLayout | None = None,
        probe: Probe | None = None,
        known_peers: Collection[NodeId] = (),
    ) -> None:
        """Build the core; :func:`p2pfl.protocol.make_core` documents the arguments.

        Raises:
            ConfigError: a config field or argument is invalid (the message names it).
        """
        if vector.ndim != 1 or not vector.is_floating_point():
            raise ConfigError("vector", tuple(vector.shape), "a 1-D floating-point tensor")
        if layout is not None and layout.size != vector.numel():
            raise ConfigError("layout", layout.size, f"a layout of {vector.numel()} elements")
        samples = check_int("samples", samples, 0)
        start_round = check_int("start_round", start_round, 0)
        seq_start = check_int("seq_start", seq_start, 0)
        self.config = config
        self.node_id = identity.node_id
        self._identity = identity
        self.round = start_round
        self.vector = vector.detach().to(device="cpu", dtype=torch.float32).clone()
        self._shape = self.vector.shape
        """The model's shape, which no mode changes: read on every message and training."""
        self.samples = samples
        self._rng = rng
        self._peers = PeerSet(
            identity.node_id,
            neighbours,
            window_size=config.replay_window,
            strangers=config.view_capacity if config.admits_strangers else 0,
        )
        self._known_peers = tuple(sorted(set(known_peers) - {identity.node_id}))
        degree = len(self._peers.neighbours)
        self._sealer = Sealer(
            identity,
            wire_dtype=config.wire_dtype,
            samples=samples,
            seq_start=seq_start,
            degree=degree,
            compressor=make_compressor(config, layout),
        )
        self._chains = Chains()
        self._merger = Merger(
            merge,
            own_weight=float(samples),
            layout=layout,
            degree=degree,
            total_rounds=config.rounds,
            probe=probe,
        )
        hook = history_hook(merge)
        wants_histories = config.history_gossip
        if wants_histories is None:
            wants_histories = hook is not None
        self._histories: HistoryGossip | None = None
        if wants_histories and self.HISTORY_GOSSIP:
            self._histories = HistoryGossip(
                identity,
                self.vector,
                hook=hook,
                state=self._merger.state,
                lam=config.history_lambda,
                capacity=config.history_capacity,
                wire_dtype=config.wire_dtype,
            )
        self._machine = PhaseMachine(self.TRANSITIONS)
        self._now = -math.inf
        self._last_loss = math.nan
        self._left_training = False
        """Left while a training was outstanding: its ``TrainingFinished`` is dropped."""
        self._init_mode()

    # -- the Core interface -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._machine.phase is Phase.DONE

    @property
    def idle(self) -> bool:
        phase = self._machine.phase
        # Not started, training or finished is not idle (compared by identity: an enum's
        # hash is a Python call).
        if phase is Phase.IDLE or phase is Phase.TRAINING or phase is Phase.DONE:
            return False
        return self._deadline() is None

    @property
    def phase(self) -> Phase:
        return self._machine.phase

    @property
    def gossips_histories(self) -> bool:
        return self._histories is not None

    @property
    def history_gossip(self) -> HistoryGossip | None:
        """The signed history records this node holds for SybilWall, or None when history
        gossip is off (read it, never change it)."""
        return self._histories

    @property
    def merge_state(self) -> Mapping[str, Any]:
        """The merge rule's private state (e.g. SybilWall's history table); read only."""
        return self._merger.state

    def handle(self, event: Event, *, now: float) -> list[Action]:
        """Feed one event that happened at ``now``.

        Raises:
            LocalProtocolError: ``now`` went backwards or is not finite; ``Started`` twice;
                ``TrainingFinished`` after ``LeaveRequested`` with no training outstanding then;
                ``TrainingFinished`` with no training outstanding or a vector of another
                shape; ``PeerConnected`` for this node itself. A peer's fault never raises.
        """
        if not math.isfinite(now) or now < self._now:
            raise LocalProtocolError(f"now = {now!r} is not finite or before {self._now!r}")
        self._now = now
        if event.__class__ is MessageReceived:  # most events: skip the match's type tests
            return [] if self._machine.phase is _DONE else self._on_message(event)
        match event:
            case Started():
                self._machine.expect(Phase.IDLE, "Started")
                if self.round >= self.config.rounds:
                    self._machine.goto(Phase.DONE)
                    return [Stop(f"start round {self.round} >= rounds {self.config.rounds}")]
                return self._on_started()
            case PeerConnected(peer=peer):
                if peer == self.node_id:
                    raise LocalProtocolError("PeerConnected for this node itself")
                if not self._peers.admits(peer):
                    return [Disconnect(peer, "not a configured neighbour")]
                self._peers.connect(peer)
                return [] if self.finished else self._on_connected(peer)
            case NeighboursConnected():
                self._peers.connect_all()
                # Only a mode that reacts to a connection pays one hook call per neighbour.
                if self.finished or type(self)._on_connected is BaseCore._on_connected:
                    return []
                return [
                    action for peer in self._peers.neighbours for action in self._on_connected(peer)
                ]
            case PeerDisconnected(peer=peer):
                if not self._peers.is_connected(peer):
                    return []
                self._peers.disconnect(peer)
                return [] if self.finished else self._on_disconnected(peer)
            case MessageReceived():
                if self.finished:
                    return []
                return self._on_message(event)
            case TrainingFinished(vector=trained, loss=loss, steps=steps):
                if self._left_training:
                    self._left_training = False
                    return []
                self._machine.expect(Phase.TRAINING, "TrainingFinished")
                if trained.shape != self._shape or not trained.is_floating_point():
                    raise LocalProtocolError(
                        f"trained vector {trained.dtype} {list(trained.shape)}, expected a "
                        f"float vector of shape {list(self._shape)}"
                    )
                if trained.dtype is _FLOAT32 and trained.is_cpu and not trained.requires_grad:
                    own = trained.clone()  # what the general line below does, in one call
                else:
                    own = trained.detach().to(device="cpu", dtype=torch.float32).clone()
                self._last_loss = float(loss)
                return self._on_trained(own, float(loss), int(steps))
            case DeadlineReached():
                return [] if self.finished else self._on_deadline()
            case LeaveRequested():
                if self.finished:
                    return []
                actions = self._on_leave()
                self._left_training = self._machine.phase is Phase.TRAINING
                self._machine.leave()
                return [*actions, Stop(f"left the population at round {self.round}")]
            case _:
                assert_never(event)

    def next_deadline(self) -> float | None:
        """When to deliver ``DeadlineReached``; a timer already due is reported as the last
        ``now``, so the answer is never in the past."""
        # Asked after every event: compared by hand rather than through ``finished`` and max().
        if self._machine.phase is _DONE:
            return None
        deadline = self._deadline()
        if deadline is None:
            return None
        now = self._now
        return deadline if deadline > now else now

    def _checkpoint(self, round: int, vector: torch.Tensor) -> SaveCheckpoint:
        """``SaveCheckpoint`` of ``vector`` as the start of ``round``, with the latest
        training's loss."""
        return SaveCheckpoint(round, vector, self._last_loss)

    def _trained_record(
        self, trained_round: int | None, loss: float, steps: int, *, stale: bool
    ) -> Emit:
        """The ``trained`` record of modes whose trainings are not rounds themselves
        (``round`` -1: a training that began with no round)."""
        return Emit(
            "trained",
            {
                "round": -1 if trained_round is None else trained_round,
                "loss": loss,
                "steps": steps,
                "stale": int(stale),
            },
        )

    # -- mode hooks ---------------------------------------------------------------------

    @abc.abstractmethod
    def _init_mode(self) -> None:
        """Set up the mode's own state (buffers, timers); called at the end of ``__init__``."""

    @abc.abstractmethod
    def _on_started(self) -> list[Action]:
        """Begin: the core is IDLE and has rounds left to run."""

    def _on_message(self, event: MessageReceived) -> list[Action]:
        """A message arrived (the core is not DONE). By default it must be a neighbour's
        ``MODEL_UPDATE``, handed to :meth:`_on_update`; a mode speaking other messages
        overrides this, and must turn every peer's fault into ``PeerMisbehaved``."""
        if event.envelope.kind is _HISTORY and self._histories is not None:
            return self._on_history(event)
        try:
            update = parse_model_update(event, self._peers, self._shape, self._chains)
        except MissingBase:
            return []  # a lost link of a delta chain: resumes at the sender's next keyframe
        except RemoteProtocolError as exc:
            return [PeerMisbehaved(event.peer, str(exc))]
        return self._on_update(update)

    def _on_history(self, event: MessageReceived) -> list[Action]:
        """A ``HISTORY`` message with history gossip on: check it, store what it teaches."""
        histories = self._histories
        assert histories is not None
        try:
            check_sender(event, self._peers)
            histories.receive(event.peer, event.envelope, self._shape)
        except RemoteProtocolError as exc:
            return [PeerMisbehaved(event.peer, str(exc))]
        return []

    def _gossip_histories(self, recipients: Sequence[NodeId], vector: torch.Tensor) -> list[Action]:
        """After sending ``vector`` (this round's model) to ``recipients``: send each its own
        signed history and one record drawn for it (nothing when history gossip is off)."""
        histories = self._histories
        if histories is None or not recipients:
            return []
        own = histories.publish(vector, self.round)
        sealed: dict[tuple[NodeId, int, int], Envelope] = {}

        def envelope(origin: NodeId, round: int, distance: int) -> Envelope:
            key = (origin, round, distance)
            found = sealed.get(key)
            if found is None:
                record = own if distance == 0 else histories.table[origin].record
                found = seal_history(self._sealer, record, distance=distance)
                sealed[key] = found
            return found

        actions: list[Action] = []
        for peer in recipients:
            actions.append(Send(peer, envelope(self.node_id, own.round, 0)))
            held = histories.draw(peer, self._rng)
            if held is not None:
                record = held.record
                actions.append(Send(peer, envelope(record.origin, record.round, held.distance)))
        return actions

    def _on_connected(self, peer: NodeId) -> list[Action]:
        """A neighbour (re)connected; the PeerSet already counts it as connected."""
        return []

    def _on_leave(self) -> list[Action]:
        """The node leaves for good (the core is not DONE; it will be right after): what to
        tell the others. By default nothing: neighbours see the connections close."""
        return []

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        """A neighbour went away; the PeerSet no longer counts it as connected."""
        return []

    @abc.abstractmethod
    def _on_update(self, update: ModelUpdate) -> list[Action]:
        """A neighbour's model passed every check (the core is not DONE)."""

    @abc.abstractmethod
    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        """The outstanding training finished; ``trained`` is a float32 copy the core owns."""

    @abc.abstractmethod
    def _on_deadline(self) -> list[Action]:
        """The driver woke the core; act on every timer due at ``self._now``."""

    @abc.abstractmethod
    def _deadline(self) -> float | None:
        """The earliest armed timer, or None (may lie before ``self._now`` if overdue)."""
