"""One core, its neighbours played by hand: each rule of the protocol, one test each."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.identity import Identity
from p2pfl.merge import make_merge_rule
from p2pfl.params import ParamLayout
from p2pfl.protocol import (
    PROTOCOL_MODES,
    CoreConfig,
    DeadlineReached,
    Disconnect,
    Emit,
    MessageReceived,
    ModeTraits,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    Started,
    StartTraining,
    Stop,
    TrainingFinished,
    make_core,
    mode_traits,
    register_protocol_mode,
)
from p2pfl.protocol.core import MODE_TRAITS
from p2pfl.protocol.dsgd import DsgdCore
from p2pfl.wire import MessageKind, PayloadSpec, decode_frame, encode_frame

from .single import NEIGHBOURS, SIZE, STRANGER, make_single, sealed, sealed_raw

MODES = sorted(PROTOCOL_MODES)
# Modes with a server have two roles, set up by key; test_fedavg.py holds their equivalents.
ROLELESS_MODES = [mode for mode in MODES if not mode_traits(mode).server]
# Modes that exchange MODEL_UPDATEs with configured neighbours; modest samples committees
# instead, and its equivalents live in test_modest_stateful.py.
NEIGHBOUR_MODEL_MODES = ["dsgd", "gossip"]


def kinds(actions: list[object]) -> list[str]:
    return [type(action).__name__ for action in actions]


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "modest-later"),
        ("rounds", 0),
        ("rounds", True),
        ("local_steps", 1.5),
        ("round_timeout", 0.0),
        ("round_timeout", math.inf),
        ("period", -1.0),
        ("period_jitter", 1.0),
        ("fanout", 0),
        ("wire_dtype", "int8"),
        ("max_rounds_ahead", -1),
        ("replay_window", 0),
    ],
)
def test_config_errors_name_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CoreConfig(**{field: value})
    assert info.value.key == f"protocol.{field}"


def test_default_config_is_valid() -> None:
    for mode in MODES:
        assert CoreConfig(mode=mode).mode == mode


def test_a_config_exists_only_valid() -> None:
    """Checked when made, frozen after: a core never needs to check it again."""
    config = CoreConfig(rounds=1)
    with pytest.raises(ValidationError, match="frozen"):
        config.rounds = 0  # type: ignore[misc]
    # Equal is not the same: rounds=True == rounds=1, yet it is refused.
    with pytest.raises(ConfigError, match="protocol.rounds"):
        CoreConfig(rounds=True)
    with pytest.raises(ConfigError, match=r"^protocol\.fanout = 0: an integer >= 1$"):
        config.replace(fanout=0)
    assert config.replace(fanout=3).fanout == 3 and config.fanout == 1


@pytest.fixture
def plugin_mode() -> Iterator[str]:
    """A plug-in mode (dsgd under another name) that admits strangers; unregistered after."""
    name = "plugin-dsgd"
    register_protocol_mode(name, traits=ModeTraits(strangers=True))(DsgdCore)
    yield name
    del PROTOCOL_MODES[name], MODE_TRAITS[name]


def test_a_plugin_mode_is_named_and_declares_what_it_needs(plugin_mode: str) -> None:
    config = CoreConfig(mode=plugin_mode)
    assert config.admits_strangers and mode_traits(plugin_mode) == ModeTraits(strangers=True)
    assert not CoreConfig(mode="dsgd").admits_strangers
    with pytest.raises(ValueError, match="already registered"):
        register_protocol_mode(plugin_mode)(DsgdCore)


def test_make_core_rejects_itself_as_neighbour_and_bad_vectors() -> None:
    me = Identity.from_seed(b"\x01" * 32)
    args = {
        "identity": me,
        "samples": 1,
        "merge": make_merge_rule("mean"),
        "rng": np.random.default_rng(0),
    }
    with pytest.raises(ConfigError, match="neighbours"):
        make_core(CoreConfig(), neighbours=[me.node_id], vector=torch.zeros(3), **args)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vector"):
        make_core(CoreConfig(), neighbours=[], vector=torch.zeros(2, 2), **args)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layout"):
        layout = ParamLayout.from_shapes([("w", (2,))])
        make_core(CoreConfig(), neighbours=[], vector=torch.zeros(3), layout=layout, **args)  # type: ignore[arg-type]


# -- local misuse raises ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ROLELESS_MODES)
def test_local_misuse_raises(mode: str) -> None:
    single = make_single(mode)
    core = single.core
    with pytest.raises(LocalProtocolError):
        core.handle(TrainingFinished(torch.ones(SIZE), 0.0, 1), now=0.0)
    core.handle(Started(), now=1.0)
    with pytest.raises(LocalProtocolError):
        core.handle(Started(), now=1.0)
    with pytest.raises(LocalProtocolError):
        core.handle(TrainingFinished(torch.ones(SIZE + 1), 0.0, 1), now=1.0)
    with pytest.raises(LocalProtocolError):
        core.handle(DeadlineReached(), now=0.5)
    with pytest.raises(LocalProtocolError):
        core.handle(PeerConnected(single.me.node_id), now=1.0)
    # the failed calls changed nothing: the training is still outstanding
    actions = core.handle(TrainingFinished(torch.ones(SIZE), 0.0, 1), now=2.0)
    assert "Send" in kinds(actions) or "Emit" in kinds(actions)


@pytest.mark.parametrize("mode", ROLELESS_MODES)
def test_start_round_at_or_past_rounds_stops_at_once(mode: str) -> None:
    me = Identity.from_seed(b"\x01" * 32)
    core = make_core(
        CoreConfig(mode=mode, rounds=3),
        identity=me,
        neighbours=[],
        vector=torch.zeros(2),
        samples=1,
        merge=make_merge_rule("mean"),
        rng=np.random.default_rng(0),
        start_round=3,
    )
    assert kinds(core.handle(Started(), now=0.0)) == ["Stop"]
    assert core.finished and core.next_deadline() is None


# -- a peer's faults become PeerMisbehaved ------------------------------------------------


@pytest.mark.parametrize("mode", NEIGHBOUR_MODEL_MODES)
def test_peer_faults_become_misbehaved(mode: str) -> None:
    single = make_single(mode)
    single.core.handle(Started(), now=0.0)
    a, b = NEIGHBOURS[0], NEIGHBOURS[1]
    cases = {
        "stranger": (STRANGER, sealed(single.peers[STRANGER], seq=0, round=0), None),
        "wrong sender": (a, sealed(single.peers[a], seq=0, round=0), b),
        "wrong kind": (a, sealed(single.peers[a], seq=1, round=0, kind=MessageKind.HELLO), None),
        "wrong shape": (
            a,
            sealed(single.peers[a], seq=2, round=0, vector=torch.zeros(SIZE + 1)),
            None,
        ),
        "nan": (
            a,
            sealed(single.peers[a], seq=3, round=0, vector=torch.full((SIZE,), math.nan)),
            None,
        ),
        "inf": (
            a,
            sealed(single.peers[a], seq=4, round=0, vector=torch.full((SIZE,), math.inf)),
            None,
        ),
        "bad codec": (
            a,
            sealed_raw(
                single.peers[a],
                seq=5,
                round=0,
                spec=PayloadSpec("zip", "float32", (SIZE,), 1),
                payload=bytes(4 * SIZE),
            ),
            None,
        ),
        "short payload": (
            a,
            sealed_raw(
                single.peers[a],
                seq=6,
                round=0,
                spec=PayloadSpec("dense", "float32", (SIZE,), 1),
                payload=bytes(3),
            ),
            None,
        ),
    }
    for name, (sender, envelope, via) in cases.items():
        actions = single.receive(sender, envelope, via=via)
        culprit = single.id(sender if via is None else via)
        assert actions == [PeerMisbehaved(culprit, actions[0].reason)], name  # type: ignore[union-attr]
    good = sealed(single.peers[a], seq=7, round=0)
    assert single.receive(a, good) == []
    replayed = single.receive(a, good)
    assert kinds(replayed) == ["PeerMisbehaved"] and "replay" in replayed[0].reason  # type: ignore[union-attr]
    same_seq_other_content = sealed(single.peers[a], seq=7, round=1)
    assert kinds(single.receive(a, same_seq_other_content)) == ["PeerMisbehaved"]


@pytest.mark.parametrize("mode", NEIGHBOUR_MODEL_MODES)
def test_reconnect_resets_the_replay_window(mode: str) -> None:
    single = make_single(mode)
    a = NEIGHBOURS[0]
    envelope = sealed(single.peers[a], seq=0, round=0)
    assert single.receive(a, envelope) == []
    assert kinds(single.receive(a, envelope)) == ["PeerMisbehaved"]
    single.core.handle(PeerDisconnected(single.id(a)), now=0.0)
    single.core.handle(PeerConnected(single.id(a)), now=0.0)
    assert single.receive(a, envelope) == []


@pytest.mark.parametrize("mode", NEIGHBOUR_MODEL_MODES)
def test_connection_from_a_stranger_is_closed(mode: str) -> None:
    single = make_single(mode)
    stranger = single.id(STRANGER)
    actions = single.core.handle(PeerConnected(stranger), now=0.0)
    assert actions == [Disconnect(stranger, "not a configured neighbour")]


@pytest.mark.parametrize(
    ("mode", "overrides"), [("modest", {}), ("gossip", {"peer_sampling": "membership"})]
)
def test_modes_with_a_membership_view_admit_strangers(
    mode: str, overrides: dict[str, object]
) -> None:
    single = make_single(mode, **overrides)
    stranger = single.id(STRANGER)
    assert single.core.handle(PeerConnected(stranger), now=0.0) == []
    assert single.core.handle(PeerDisconnected(stranger), now=0.0) == []


@pytest.mark.parametrize("mode", NEIGHBOUR_MODEL_MODES)
def test_received_model_does_not_alias_the_receive_buffer(mode: str) -> None:
    single = make_single(mode, rounds=2)
    a = NEIGHBOURS[0]
    frame = bytearray(
        encode_frame(sealed(single.peers[a], seq=0, round=0, vector=torch.full((SIZE,), 4.0)))
    )
    envelope = decode_frame(frame)
    single.core.handle(Started(), now=0.0)
    assert single.core.handle(MessageReceived(single.id(a), envelope), now=0.0) == []
    frame[:] = bytes(len(frame))  # the driver reuses its buffer
    if mode == "dsgd":
        for b in NEIGHBOURS[1:]:
            single.receive(
                b, sealed(single.peers[b], seq=0, round=0, vector=torch.full((SIZE,), 4.0))
            )
    actions = single.core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
    assert kinds(actions)[-1] == "StartTraining"  # merged with the received model
    assert single.core.vector.min().item() > 0.0


@pytest.mark.parametrize("mode", NEIGHBOUR_MODEL_MODES)
def test_one_envelope_is_decoded_once_for_all_its_receivers(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2pfl.protocol.messages as messages

    decodes: list[int] = []
    real = messages.decode_vector

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        decodes.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(messages, "decode_vector", counting)
    receivers = [make_single(mode, rounds=2) for _ in range(3)]
    a = NEIGHBOURS[0]
    shared = sealed(receivers[0].peers[a], seq=0, round=0, vector=torch.full((SIZE,), 4.0))
    poisoned = sealed(receivers[0].peers[a], seq=1, round=0, vector=torch.full((SIZE,), math.nan))
    reasons = set()
    for single in receivers:
        single.core.handle(Started(), now=0.0)
        assert single.receive(a, shared) == []
        (refused,) = single.receive(a, poisoned)
        assert isinstance(refused, PeerMisbehaved)
        reasons.add(refused.reason)
    assert len(decodes) == 2 and len(reasons) == 1  # one decode per envelope, not per receiver
    for single in receivers:
        if mode == "dsgd":
            for b in NEIGHBOURS[1:]:
                single.receive(b, sealed(single.peers[b], seq=0, round=0))
        actions = single.core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
        assert kinds(actions)[-1] == "StartTraining"
        single.core.vector.add_(1.0)  # a core's own model is its own, whatever it merged
    # Merging read the shared model and never wrote to it.
    assert torch.equal(messages.decode_model(shared, torch.Size([SIZE])), torch.full((SIZE,), 4.0))


# -- dsgd -----------------------------------------------------------------------------


def test_dsgd_round_sends_one_envelope_to_each_connected_neighbour() -> None:
    single = make_single("dsgd", rounds=2, round_timeout=10.0)
    core = single.core
    core.handle(PeerDisconnected(single.id(3)), now=0.0)
    assert core.handle(Started(), now=0.0) == [StartTraining(core.vector, 10, 0)]
    actions = core.handle(TrainingFinished(torch.ones(SIZE), 0.25, 10), now=1.0)
    sends = [a for a in actions if isinstance(a, Send)]
    assert [s.peer for s in sends] == sorted([single.id(1), single.id(2)])
    assert len({id(s.envelope) for s in sends}) == 1
    envelope = sends[0].envelope
    assert (envelope.sender, envelope.round, envelope.seq) == (single.me.node_id, 0, 0)
    assert envelope.spec.samples == 1
    assert core.next_deadline() == 11.0
    # the model for round 1 arrives early and is kept; round 0 from peer 1 does not close yet
    assert single.receive(1, sealed(single.peers[1], seq=0, round=1), now=1.5) == []
    assert (
        single.receive(
            1, sealed(single.peers[1], seq=1, round=0, vector=torch.full((SIZE,), 4.0)), now=2.0
        )
        == []
    )
    actions = single.receive(
        2, sealed(single.peers[2], seq=0, round=0, vector=torch.full((SIZE,), 7.0)), now=3.0
    )
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "StartTraining"]
    emit, checkpoint, train = actions
    assert isinstance(emit, Emit) and isinstance(checkpoint, SaveCheckpoint)
    assert isinstance(train, StartTraining)
    torch.testing.assert_close(train.vector, torch.full((SIZE,), 4.0))  # mean(1, 4, 7)
    assert (train.round, checkpoint.round, core.round) == (1, 1, 1)
    assert emit.fields["received"] == 2 and emit.fields["expected"] == 2
    assert emit.fields["timed_out"] == 0 and emit.fields["merged_at"] == 3.0
    assert core.next_deadline() is None
    # round 1: peer 1's early model counts; peer 2 stays silent; timeout closes the round
    core.handle(TrainingFinished(torch.full((SIZE,), 2.0), 0.1, 10), now=4.0)
    assert core.next_deadline() == 14.0
    assert core.handle(DeadlineReached(), now=13.9) == []
    actions = core.handle(DeadlineReached(), now=14.0)
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "Stop"]
    torch.testing.assert_close(core.vector, torch.full((SIZE,), 1.5))  # mean(2, 1)
    assert core.finished and core.next_deadline() is None


def test_dsgd_duplicates_conflicts_stale_and_far_future() -> None:
    single = make_single("dsgd", rounds=10, max_rounds_ahead=2)
    core = single.core
    core.handle(Started(), now=0.0)
    peer = single.peers[1]
    assert single.receive(1, sealed(peer, seq=0, round=0)) == []
    assert single.receive(1, sealed(peer, seq=1, round=0)) == []  # identical content, ignored
    conflict = single.receive(1, sealed(peer, seq=2, round=0, vector=torch.ones(SIZE)))
    assert kinds(conflict) == ["PeerMisbehaved"] and "round 0" in conflict[0].reason  # type: ignore[union-attr]
    assert single.receive(1, sealed(peer, seq=3, round=2)) == []  # within max_rounds_ahead
    assert single.receive(1, sealed(peer, seq=4, round=3)) == []  # too far: dropped, no fault
    core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
    for i in (2, 3):
        single.receive(i, sealed(single.peers[i], seq=0, round=0), now=1.0)
    assert core.round == 1
    assert single.receive(1, sealed(peer, seq=5, round=0), now=1.0) == []  # stale: ignored


def test_dsgd_disconnect_while_collecting_closes_the_round() -> None:
    single = make_single("dsgd", rounds=3)
    core = single.core
    core.handle(Started(), now=0.0)
    core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
    single.receive(1, sealed(single.peers[1], seq=0, round=0), now=1.0)
    single.receive(2, sealed(single.peers[2], seq=0, round=0), now=1.0)
    assert core.round == 0
    actions = core.handle(PeerDisconnected(single.id(3)), now=2.0)
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "StartTraining"]


def test_dsgd_neighbour_connecting_while_collecting_gets_this_rounds_model() -> None:
    single = make_single("dsgd", connect=False, rounds=3)
    core = single.core
    core.handle(Started(), now=0.0)
    actions = core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "StartTraining"]  # nobody to wait for
    core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=2.0)
    assert core.round == 2
    core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=3.0)
    assert core.finished

    single = make_single("dsgd", connect=False, rounds=3)
    core = single.core
    core.handle(PeerConnected(single.id(1)), now=0.0)
    core.handle(Started(), now=0.0)
    sent = core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=1.0)
    actions = core.handle(PeerConnected(single.id(2)), now=2.0)
    assert actions == [Send(single.id(2), sent[0].envelope)]  # type: ignore[union-attr]


# -- gossip ---------------------------------------------------------------------------


def test_gossip_pushes_to_fanout_connected_neighbours() -> None:
    single = make_single("gossip", fanout=2, period=1.0, period_jitter=0.1, rounds=50)
    core = single.core
    core.handle(PeerDisconnected(single.id(3)), now=0.0)
    core.handle(Started(), now=0.0)
    now = 0.0
    for _ in range(20):
        deadline = core.next_deadline()
        assert deadline is not None and 0.9 <= deadline - now <= 1.1
        now = deadline
        actions = core.handle(DeadlineReached(), now=now)
        sends = [a for a in actions if isinstance(a, Send)]
        assert sorted(s.peer for s in sends) == sorted([single.id(1), single.id(2)])
        assert sends[0].envelope is sends[1].envelope
        assert sends[0].envelope.round == core.round


def test_gossip_merges_buffer_after_training_and_on_receipt_when_idle() -> None:
    single = make_single("gossip", rounds=3, period=100.0, period_jitter=0.0)
    core = single.core
    assert kinds(core.handle(Started(), now=0.0)) == ["StartTraining"]
    # received while training: buffered; the newest per sender is kept
    single.receive(1, sealed(single.peers[1], seq=0, round=0, vector=torch.full((SIZE,), 9.0)))
    single.receive(1, sealed(single.peers[1], seq=1, round=1, vector=torch.full((SIZE,), 3.0)))
    single.receive(2, sealed(single.peers[2], seq=0, round=0, vector=torch.full((SIZE,), 6.0)))
    actions = core.handle(TrainingFinished(torch.full((SIZE,), 3.0), 0.0, 1), now=1.0)
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "StartTraining"]
    assert actions[2] == StartTraining(core.vector, 10, 1)
    torch.testing.assert_close(core.vector, torch.full((SIZE,), 4.0))  # mean(3, 3, 6)
    # nothing buffered after the next training: wait
    assert kinds(core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=2.0)) == [
        "Emit",
        "SaveCheckpoint",
    ]
    # a model arrives while waiting: merge and train at once
    actions = single.receive(
        3, sealed(single.peers[3], seq=0, round=5, vector=torch.full((SIZE,), 2.0)), now=3.0
    )
    assert kinds(actions) == ["StartTraining"]
    torch.testing.assert_close(core.vector, torch.full((SIZE,), 1.0))
    actions = core.handle(TrainingFinished(torch.zeros(SIZE), 0.0, 1), now=4.0)
    assert kinds(actions) == ["Emit", "SaveCheckpoint", "Stop"]
    assert isinstance(actions[-1], Stop) and core.finished and core.next_deadline() is None


def test_next_deadline_is_never_before_the_last_now() -> None:
    single = make_single("gossip", period=1.0, period_jitter=0.0)
    core = single.core
    core.handle(Started(), now=0.0)
    assert core.next_deadline() == 1.0
    single.receive(1, sealed(single.peers[1], seq=0, round=0), now=5.0)  # driver was late
    assert core.next_deadline() == 5.0
    core.handle(DeadlineReached(), now=5.0)
    assert core.next_deadline() == 6.0
