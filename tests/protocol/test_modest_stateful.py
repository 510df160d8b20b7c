"""A Hypothesis state machine drives one ``modest`` core through everything peers can send.

Honest peers (three bootstrap peers and a stranger the core has never heard of) send every
modest message kind for arbitrary rounds, with and without piggybacked views; garbage of every
kind is mixed in (wrong sender, a dsgd message, a replay, a forged or malformed view, a model of
the wrong shape or with NaN, a payload on a ping); training results, time and a graceful leave
come in any order. After every step: the round never goes back, nothing is sent to self, the
deadline is never before the last ``now``, at most one training is outstanding, the model stays
finite; a peer's fault comes back as exactly one ``PeerMisbehaved`` naming that peer, and no
exception escapes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from p2pfl.codec import encode_vector
from p2pfl.identity import Identity
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    Action,
    CoreConfig,
    DeadlineReached,
    Event,
    LeaveRequested,
    MessageReceived,
    PeerMisbehaved,
    Send,
    Started,
    StartTraining,
    TrainingFinished,
    make_core,
)
from p2pfl.protocol.membership import Advert, Record, Status, sign_advert
from p2pfl.testing.network import identity_of
from p2pfl.wire import Envelope, MessageKind, PayloadSpec, seal

SIZE = 4
ME = 0
BOOTSTRAP = (1, 2, 3)
STRANGER = 9
PEERS = {i: identity_of(i) for i in (*BOOTSTRAP, STRANGER)}
ADVERTS = {i: sign_advert(identity, 0, Status.JOIN) for i, identity in PEERS.items()}
HONEST_KINDS = [
    MessageKind.MODEST_PING,
    MessageKind.MODEST_PONG,
    MessageKind.MODEST_TRAINED,
    MessageKind.MODEST_AGGREGATE,
    MessageKind.MODEST_ACK,
    MessageKind.MODEST_NACK,
    MessageKind.MODEST_MEMBERSHIP,
]
GARBAGE = [
    "wrong_sender",
    "dsgd_kind",
    "forged_view",
    "malformed_view",
    "wrong_shape",
    "nan",
    "ping_payload",
]


def envelope(
    sender: Identity,
    kind: MessageKind,
    *,
    seq: int,
    round: int,
    vector: torch.Tensor | None = None,
    view: list[Any] | None = None,
) -> Envelope:
    spec, payload = PayloadSpec(), b""
    if vector is not None:
        spec, raw = encode_vector(vector)
        payload = bytes(raw)
    meta = {} if view is None else {"view": view}
    return seal(sender, kind, seq=seq, round=round, payload=payload, spec=spec, meta=meta)


def budget(fast: int) -> int:
    """``fast`` examples in the quick tiers; more when the loaded profile asks (nightly)."""
    profile = settings().max_examples
    return profile if profile > 200 else fast


class ModestMachine(RuleBasedStateMachine):
    delivered = Bundle("delivered")

    @initialize(samples=st.integers(1, 3), announce=st.booleans())
    def start(self, samples: int, announce: bool) -> None:
        config = CoreConfig(
            mode="modest",
            rounds=12,
            sample_size=2,
            aggregators=1,
            min_models=1,
            ping_timeout=1.0,
            aggregation_timeout=3.0,
            ack_timeout=4.0,
            local_steps=1,
            announce_join=announce,
        )
        self.me = identity_of(ME)
        self.core = make_core(
            config,
            identity=self.me,
            neighbours=[PEERS[i].node_id for i in BOOTSTRAP],
            vector=torch.zeros(SIZE),
            samples=samples,
            merge=make_merge_rule("mean"),
            rng=np.random.default_rng(samples),
        )
        self.now = 0.0
        self.seq = dict.fromkeys(PEERS, 0)
        self.outstanding = 0
        self.last_round = 0
        self.feed(Started())

    # -- driving ------------------------------------------------------------------------

    def feed(self, event: Event) -> list[Action]:
        actions = self.core.handle(event, now=self.now)
        self.check(actions)
        return actions

    def check(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                assert action.peer != self.me.node_id, "send to self"
            if isinstance(action, StartTraining):
                self.outstanding += 1
                assert self.outstanding <= 1, "two trainings outstanding"
        assert self.core.round >= self.last_round, "round went back"
        self.last_round = self.core.round

    def next_seq(self, peer: int) -> int:
        self.seq[peer] += 1
        return self.seq[peer]

    # -- rules --------------------------------------------------------------------------

    @rule(dt=st.floats(0.0, 5.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        deadline = self.core.next_deadline()
        if deadline is not None and deadline <= self.now:
            self.feed(DeadlineReached())

    @rule()
    def early_wakeup(self) -> None:
        self.feed(DeadlineReached())

    @rule(delta=st.floats(-1.0, 1.0))
    def training_finishes(self, delta: float) -> None:
        if self.outstanding:
            self.outstanding -= 1
            self.feed(TrainingFinished(self.core.vector + delta, loss=0.1, steps=1))

    @rule(
        target=delivered,
        peer=st.sampled_from(sorted(PEERS)),
        kind=st.sampled_from(HONEST_KINDS),
        round_=st.integers(0, 14),
        with_view=st.booleans(),
        value=st.floats(-10, 10),
    )
    def honest_message(
        self, peer: int, kind: MessageKind, round_: int, with_view: bool, value: float
    ) -> tuple[int, Envelope]:
        vector = None
        if kind in (MessageKind.MODEST_TRAINED, MessageKind.MODEST_AGGREGATE):
            vector = torch.full((SIZE,), value)
        view = None
        if with_view:
            view = [Record(ADVERTS[p], min(round_, 3)).to_wire() for p in sorted(ADVERTS)]
        sealed = envelope(
            PEERS[peer], kind, seq=self.next_seq(peer), round=round_, vector=vector, view=view
        )
        actions = self.feed(MessageReceived(PEERS[peer].node_id, sealed))
        assert not any(isinstance(action, PeerMisbehaved) for action in actions) or (
            kind is MessageKind.MODEST_TRAINED
        ), actions  # a second, different model for one round is the only honest-looking fault
        return (peer, sealed)

    @rule(message=delivered)
    def replay(self, message: tuple[int, Envelope]) -> None:
        peer, sealed = message
        actions = self.feed(MessageReceived(PEERS[peer].node_id, sealed))
        if not self.core.finished and not self.left:
            assert actions == [PeerMisbehaved(PEERS[peer].node_id, actions[0].reason)]  # type: ignore[union-attr]

    @rule(
        peer=st.sampled_from(sorted(PEERS)),
        other=st.sampled_from(sorted(PEERS)),
        garbage=st.sampled_from(GARBAGE),
    )
    def garbage_message(self, peer: int, other: int, garbage: str) -> None:
        me = PEERS[peer]
        seq = self.next_seq(peer)
        via = peer
        match garbage:
            case "wrong_sender":
                sealed = envelope(me, MessageKind.MODEST_PING, seq=seq, round=1)
                via = other if other != peer else STRANGER if peer != STRANGER else 1
            case "dsgd_kind":
                spec, raw = encode_vector(torch.zeros(SIZE))
                sealed = seal(
                    me, MessageKind.MODEL_UPDATE, seq=seq, round=1, payload=bytes(raw), spec=spec
                )
            case "forged_view":
                victim = other if other != peer else STRANGER if peer != STRANGER else 1
                forged = Advert(PEERS[victim].node_id, 99, Status.LEAVE, me.sign(b"not it"))
                view = [Record(forged, 1).to_wire()]
                sealed = envelope(me, MessageKind.MODEST_MEMBERSHIP, seq=seq, round=1, view=view)
            case "malformed_view":
                sealed = envelope(
                    me, MessageKind.MODEST_PING, seq=seq, round=1, view=[[b"x", 1, 2, 3]]
                )
            case "wrong_shape":
                sealed = envelope(
                    me, MessageKind.MODEST_TRAINED, seq=seq, round=1, vector=torch.zeros(SIZE + 1)
                )
            case "nan":
                sealed = envelope(
                    me,
                    MessageKind.MODEST_AGGREGATE,
                    seq=seq,
                    round=5,
                    vector=torch.full((SIZE,), math.nan),
                )
            case "ping_payload":
                sealed = seal(me, MessageKind.MODEST_PING, seq=seq, round=1, payload=b"xx")
            case _:
                raise AssertionError(garbage)
        culprit = PEERS[via].node_id
        actions = self.feed(MessageReceived(culprit, sealed))
        if not self.core.finished and not self.left:
            assert actions == [PeerMisbehaved(culprit, actions[0].reason)], (garbage, actions)  # type: ignore[union-attr]

    left = False

    @rule()
    def leave(self) -> None:
        self.feed(LeaveRequested())
        assert self.core.finished
        self.left = True

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def deadline_not_in_the_past(self) -> None:
        deadline = self.core.next_deadline()
        assert deadline is None or deadline >= self.now

    @invariant()
    def model_finite(self) -> None:
        assert bool(torch.isfinite(self.core.vector).all())


ModestMachine.TestCase.settings = settings(
    max_examples=budget(60),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestModestMachine = ModestMachine.TestCase
