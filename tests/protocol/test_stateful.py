"""A Hypothesis state machine drives one core through everything its world can do.

The model plays the driver and three neighbours with real keys sealing real envelopes.
Messages in flight sit in a ``Bundle``: delivering one *consumes* it, dropping consumes it
without delivery, delaying puts it back to be drawn later (so deliveries reorder), and
duplicating re-delivers one already delivered. Garbage of every kind, reconnections, training
results and the passing of time are mixed in. After every step the invariants hold: the round
never goes back, nothing is sent to self or to a peer that is not connected, the deadline is
never before the last ``now`` the core saw, at most one training is outstanding, the model stays finite, and the core
is never stuck (it is training, has a timer armed, or has finished). A peer's fault must come
back as ``PeerMisbehaved`` naming that peer; any exception but a deliberate misuse fails.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from p2pfl.errors import LocalProtocolError
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    Action,
    CoreConfig,
    DeadlineReached,
    Disconnect,
    Event,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    Send,
    Started,
    StartTraining,
    Stop,
    TrainingFinished,
    make_core,
)
from p2pfl.testing.network import identity_of
from p2pfl.wire import Envelope, MessageKind, decode_frame, encode_frame

from .single import NEIGHBOURS, SIZE, STRANGER, sealed

Message = tuple[int, Envelope]
Delivered = tuple[int, Envelope, int]

GARBAGE = ["wrong_shape", "nan", "inf", "wrong_sender", "stranger", "wrong_kind"]


def budget(fast: int) -> int:
    """``fast`` examples in the quick tiers; more when the loaded profile asks (nightly)."""
    profile = settings().max_examples
    return profile if profile > 200 else fast


STATEFUL_SETTINGS = settings(
    max_examples=budget(60),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def content(sender: int, round_: int) -> torch.Tensor:
    """Honest neighbours send one deterministic model per round."""
    return torch.full((SIZE,), float(10 * sender + round_))


class CoreMachine(RuleBasedStateMachine):
    MODE: ClassVar[str]
    CONFIG: ClassVar[dict[str, Any]] = {}
    """More config fields a mode's machine needs (e.g. fedavg's server)."""

    in_flight = Bundle("in_flight")
    delivered = Bundle("delivered")

    def __init__(self) -> None:
        super().__init__()
        self.me = identity_of(0)
        self.peers = {i: identity_of(i) for i in (*NEIGHBOURS, STRANGER)}
        config = CoreConfig(
            mode=self.MODE,
            rounds=3,
            local_steps=1,
            round_timeout=3.0,
            period=1.0,
            period_jitter=0.3,
            fanout=2,
            max_rounds_ahead=2,
            **self.CONFIG,
        )
        self.core = make_core(
            config,
            identity=self.me,
            neighbours=[self.peers[i].node_id for i in NEIGHBOURS],
            vector=torch.zeros(SIZE),
            samples=4,
            merge=make_merge_rule("weighted"),
            rng=np.random.default_rng(0),
        )
        self.now = 0.0
        self.seen_now = 0.0
        self.seq = dict.fromkeys(self.peers, 0)
        self.epoch = dict.fromkeys(self.peers, 0)
        self.connected: set[int] = set()
        self.outstanding: StartTraining | None = None
        self.last_round = 0
        self.stopped = False

    # -- the driver's side ----------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        self.seen_now = self.now
        return self.core.handle(event, now=self.now)

    def apply(self, event: Event) -> list[Action]:
        actions = self.handle(event)
        connected_ids = {self.peers[i].node_id for i in self.connected}
        for action in actions:
            assert not self.stopped, f"{action} after Stop"
            match action:
                case Send(peer=peer, envelope=envelope):
                    assert peer != self.me.node_id, "send to self"
                    assert peer in connected_ids, "send to a peer that is not connected"
                    assert envelope.sender == self.me.node_id
                    assert envelope.kind is MessageKind.MODEL_UPDATE
                    decode_frame(encode_frame(envelope))  # signed and well-formed
                case StartTraining(vector=vector, round=round_):
                    assert self.outstanding is None, "two trainings outstanding"
                    assert round_ == self.core.round
                    assert bool(torch.isfinite(vector).all())
                    self.outstanding = action
                case Stop():
                    self.stopped = True
                case _:
                    pass
        return actions

    def fault_reported(self, actions: list[Action], culprit: int) -> None:
        if self.core.finished:
            assert actions == []
            return
        assert len(actions) == 1 and isinstance(actions[0], PeerMisbehaved), actions
        assert actions[0].peer == self.peers[culprit].node_id

    def next_seq(self, sender: int) -> int:
        self.seq[sender] += 1
        return self.seq[sender] - 1

    @initialize(connected=st.sets(st.sampled_from(NEIGHBOURS)))
    def start(self, connected: set[int]) -> None:
        for i in sorted(connected):
            self.connected.add(i)
            self.epoch[i] += 1
            assert self.apply(PeerConnected(self.peers[i].node_id)) == []
        self.apply(Started())

    # -- messages -------------------------------------------------------------------------

    @rule(target=in_flight, sender=st.sampled_from(NEIGHBOURS), offset=st.integers(-1, 3))
    def send_model(self, sender: int, offset: int) -> Message:
        round_ = max(0, self.core.round + offset)
        envelope = sealed(
            self.peers[sender],
            seq=self.next_seq(sender),
            round=round_,
            vector=content(sender, round_),
            samples=sender,
        )
        return sender, envelope

    @rule(target=delivered, message=consumes(in_flight))
    def deliver(self, message: Message) -> Delivered:
        sender, envelope = message
        actions = self.apply(MessageReceived(self.peers[sender].node_id, envelope))
        assert not any(isinstance(a, PeerMisbehaved | Disconnect) for a in actions), actions
        return sender, envelope, self.epoch[sender]

    @rule(message=consumes(in_flight))
    def drop(self, message: Message) -> None:
        pass

    @rule(target=in_flight, message=consumes(in_flight))
    def delay(self, message: Message) -> Message:
        return message

    @rule(item=delivered, tamper=st.booleans())
    def duplicate(self, item: Delivered, tamper: bool) -> None:
        sender, envelope, epoch = item
        fresh_window = epoch != self.epoch[sender]
        if tamper:
            if fresh_window:
                return  # the reused seq would be accepted and could clash with one in flight
            other = envelope.round + 1
            envelope = sealed(
                self.peers[sender], seq=envelope.seq, round=other, vector=content(sender, other)
            )
        actions = self.apply(MessageReceived(self.peers[sender].node_id, envelope))
        if fresh_window:
            culprit = self.peers[sender].node_id
            assert all(a.peer == culprit for a in actions if isinstance(a, PeerMisbehaved))
        else:
            self.fault_reported(actions, sender)

    @rule(kind=st.sampled_from(GARBAGE), sender=st.sampled_from(NEIGHBOURS))
    def deliver_garbage(self, kind: str, sender: int) -> None:
        culprit = sender
        round_ = self.core.round
        vector = content(sender, round_)
        message_kind = MessageKind.MODEL_UPDATE
        if kind == "wrong_shape":
            vector = torch.zeros(SIZE + 1)
        elif kind == "nan":
            vector = vector.clone()
            vector[1] = math.nan
        elif kind == "inf":
            vector = vector.clone()
            vector[0] = -math.inf
        elif kind == "wrong_kind":
            message_kind = MessageKind.HELLO_PROOF
        elif kind == "stranger":
            sender = culprit = STRANGER
        author = sender
        if kind == "wrong_sender":
            author = NEIGHBOURS[(NEIGHBOURS.index(sender) + 1) % len(NEIGHBOURS)]
        envelope = sealed(
            self.peers[author],
            seq=self.next_seq(author),
            round=round_,
            vector=vector,
            kind=message_kind,
        )
        actions = self.apply(MessageReceived(self.peers[sender].node_id, envelope))
        self.fault_reported(actions, culprit)

    # -- connections ----------------------------------------------------------------------

    @rule(peer=st.sampled_from(NEIGHBOURS))
    def connect(self, peer: int) -> None:
        self.connected.add(peer)
        self.epoch[peer] += 1
        actions = self.apply(PeerConnected(self.peers[peer].node_id))
        sends = [a for a in actions if isinstance(a, Send)]
        assert all(s.peer == self.peers[peer].node_id for s in sends)

    @rule(peer=st.sampled_from(NEIGHBOURS))
    def disconnect(self, peer: int) -> None:
        self.connected.discard(peer)
        actions = self.apply(PeerDisconnected(self.peers[peer].node_id))
        assert self.SENDS_ON_CLOSE or not any(isinstance(a, Send) for a in actions)

    @rule()
    def stranger_connects(self) -> None:
        stranger = self.peers[STRANGER].node_id
        actions = self.handle(PeerConnected(stranger))
        assert actions == [Disconnect(stranger, "not a configured neighbour")]

    # -- training and time ----------------------------------------------------------------

    @precondition(lambda self: self.outstanding is not None)
    @rule(loss=st.floats(0, 10), drift=st.floats(-1, 1))
    def finish_training(self, loss: float, drift: float) -> None:
        assert self.outstanding is not None
        trained = self.outstanding.vector + drift
        self.outstanding = None
        self.apply(TrainingFinished(trained, loss, 1))

    @precondition(lambda self: self.outstanding is None)
    @rule()
    def finish_training_not_started(self) -> None:
        with pytest.raises(LocalProtocolError):
            self.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1))

    @precondition(lambda self: self.outstanding is not None)
    @rule()
    def finish_training_with_wrong_shape(self) -> None:
        with pytest.raises(LocalProtocolError):
            self.handle(TrainingFinished(torch.zeros(SIZE + 2), 0.0, 1))

    @rule(dt=st.floats(0, 4))
    def advance(self, dt: float) -> None:
        """Time passes; the driver may be late to deliver a due timer."""
        self.now += dt

    @rule(spurious=st.booleans())
    def wake(self, spurious: bool) -> None:
        """Deliver ``DeadlineReached`` if a timer is due, or (spuriously) anyway."""
        deadline = self.core.next_deadline()
        due = deadline is not None and self.now >= deadline
        if not (due or spurious):
            return
        progress = due and self.progress_due()
        actions = self.apply(DeadlineReached())
        if progress:
            assert any(isinstance(a, self.PROGRESS) for a in actions), actions

    PROGRESS: ClassVar[tuple[type, ...]] = (StartTraining, Stop)
    SENDS_ON_CLOSE: ClassVar[bool] = False
    """Whether closing a collection can send (dsgd's next gossip step does)."""
    """What a due timer must bring when :meth:`progress_due` says it must bring something."""

    def progress_due(self) -> bool:
        """A due timer with no training outstanding makes progress."""
        return self.outstanding is None and not self.core.finished

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def round_never_goes_back(self) -> None:
        assert self.core.round >= self.last_round
        self.last_round = self.core.round

    @invariant()
    def deadline_never_in_the_past(self) -> None:
        deadline = self.core.next_deadline()
        assert deadline is None or deadline >= self.seen_now

    @invariant()
    def model_stays_finite(self) -> None:
        assert bool(torch.isfinite(self.core.vector).all())

    @invariant()
    def never_stuck(self) -> None:
        if self.core.finished:
            assert self.stopped and self.outstanding is None
            assert self.core.next_deadline() is None
        else:
            assert self.outstanding is not None or self.core.next_deadline() is not None


class DsgdMachine(CoreMachine):
    MODE = "dsgd"


class GossipMachine(CoreMachine):
    MODE = "gossip"


TestDsgdCore = DsgdMachine.TestCase
TestDsgdCore.settings = STATEFUL_SETTINGS
TestGossipCore = GossipMachine.TestCase
TestGossipCore.settings = STATEFUL_SETTINGS


class DsgdGossipStepsMachine(CoreMachine):
    """dsgd with two exchanges a round (DFedSAM-MGS)."""

    MODE = "dsgd"
    CONFIG: ClassVar[dict[str, Any]] = {"gossip_steps": 2}
    # a step that closes sends the next step's model instead of training
    PROGRESS: ClassVar[tuple[type, ...]] = (StartTraining, Stop, Send)
    SENDS_ON_CLOSE = True


class TimedGossipMachine(CoreMachine):
    """gossip merging on a clock (FedFix-style)."""

    MODE = "gossip"
    CONFIG: ClassVar[dict[str, Any]] = {"merge_trigger": "time", "merge_interval": 0.7}


TestDsgdGossipStepsCore = DsgdGossipStepsMachine.TestCase
TestDsgdGossipStepsCore.settings = STATEFUL_SETTINGS
TestTimedGossipCore = TimedGossipMachine.TestCase
TestTimedGossipCore.settings = STATEFUL_SETTINGS
