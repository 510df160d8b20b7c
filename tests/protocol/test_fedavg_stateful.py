"""The stateful machine of test_stateful.py, driving a fedavg server and a fedavg client.

The world is the same (real envelopes delivered, dropped, delayed, duplicated, garbage,
reconnections, time); what differs is what each role may do. The server never trains, sends
each round's model to at most ``sample_size`` clients, and checkpoints rounds one by one; a
due timer of an open round always closes it. A client sends only to the server and only the
model of the round it holds, takes models only from the server, and is never left holding a
round it was sent without training it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from p2pfl.protocol import (
    Action,
    Event,
    MessageReceived,
    PeerDisconnected,
    SaveCheckpoint,
    Send,
    StartTraining,
)
from p2pfl.protocol.phases import Phase

from .network import identity_of
from .single import ME, NEIGHBOURS, sealed
from .test_stateful import STATEFUL_SETTINGS, CoreMachine, Message, content

SAMPLE_SIZE = 2
SERVER_PEER = NEIGHBOURS[0]
"""The client machine's server; its other neighbours are peers that must not send it models."""


class FedAvgServerMachine(CoreMachine):
    MODE = "fedavg"
    CONFIG: ClassVar[dict[str, Any]] = {
        "server": identity_of(ME).node_id.hex(),
        "sample_size": SAMPLE_SIZE,
    }

    def apply(self, event: Event) -> list[Action]:
        checkpointed = self.core.round
        actions = super().apply(event)
        assert not any(isinstance(a, StartTraining) for a in actions), "the server trained"
        recipients: dict[int, set[object]] = {}
        for action in actions:
            if isinstance(action, Send):
                envelope = action.envelope
                if envelope.round < 3:  # the final model goes to everyone connected
                    recipients.setdefault(envelope.seq, set()).add(action.peer)
            if isinstance(action, SaveCheckpoint):
                checkpointed += 1
                assert action.round == checkpointed, "rounds checkpointed out of order"
        assert all(len(peers) <= SAMPLE_SIZE for peers in recipients.values()), recipients
        return actions

    @rule(peer=st.sampled_from(NEIGHBOURS))
    def disconnect(self, peer: int) -> None:
        """A client going away may close the round, which opens the next one (sends)."""
        self.connected.discard(peer)
        self.apply(PeerDisconnected(self.peers[peer].node_id))

    PROGRESS = (SaveCheckpoint,)

    def progress_due(self) -> bool:
        """A due timer of an open round closes it with what it holds."""
        return self.core.phase is Phase.COLLECTING  # type: ignore[attr-defined]


class FedAvgClientMachine(CoreMachine):
    MODE = "fedavg"
    CONFIG: ClassVar[dict[str, Any]] = {"server": identity_of(SERVER_PEER).node_id.hex()}

    def apply(self, event: Event) -> list[Action]:
        actions = super().apply(event)
        for action in actions:
            if isinstance(action, Send):
                assert action.peer == self.peers[SERVER_PEER].node_id, "sent to a non-server"
                assert action.envelope.round == self.core.round, "sent a stale model"
        return actions

    @rule(target=CoreMachine.in_flight, offset=st.integers(-1, 3))
    def send_model(self, offset: int) -> Message:
        """Only the server sends a client models (one per round)."""
        round_ = max(0, self.core.round + offset)
        envelope = sealed(
            self.peers[SERVER_PEER],
            seq=self.next_seq(SERVER_PEER),
            round=round_,
            vector=content(SERVER_PEER, round_),
        )
        return SERVER_PEER, envelope

    @rule(sender=st.sampled_from(NEIGHBOURS[1:]))
    def model_from_a_client(self, sender: int) -> None:
        round_ = self.core.round
        envelope = sealed(
            self.peers[sender],
            seq=self.next_seq(sender),
            round=round_,
            vector=content(sender, round_),
        )
        actions = self.apply(MessageReceived(self.peers[sender].node_id, envelope))
        self.fault_reported(actions, sender)

    @invariant()
    def never_stuck(self) -> None:
        """Overrides the base invariant: a client waits for its server without a timer, but
        never sits on a round it was sent without training it."""
        if self.core.finished:
            assert self.stopped and self.outstanding is None
            assert self.core.next_deadline() is None
        elif self.outstanding is None:
            assert not self.core._train_wanted  # type: ignore[attr-defined]


TestFedAvgServer = FedAvgServerMachine.TestCase
TestFedAvgServer.settings = STATEFUL_SETTINGS
TestFedAvgClient = FedAvgClientMachine.TestCase
TestFedAvgClient.settings = STATEFUL_SETTINGS
