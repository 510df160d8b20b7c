"""The fedavg mode: a server averaging sampled clients' models, driven through real envelopes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    CoreConfig,
    DeadlineReached,
    Emit,
    MessageReceived,
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
)
from p2pfl.protocol.fedavg import FedAvgClient, FedAvgServer, clients_per_round

from .network import FakeNetwork, identity_of
from .single import SIZE, sealed

SERVER = 0
CLIENTS = (1, 2, 3, 4)


def fedavg_config(**overrides: object) -> CoreConfig:
    fields: dict[str, object] = {
        "mode": "fedavg",
        "server": identity_of(SERVER).node_id.hex(),
        "rounds": 3,
        "local_steps": 1,
        "round_timeout": 5.0,
        "sample_size": len(CLIENTS),
    }
    fields.update(overrides)
    return CoreConfig(**fields)  # type: ignore[arg-type]


def star(clients: int = len(CLIENTS)) -> list[tuple[int, int]]:
    return [(SERVER, client) for client in range(1, clients + 1)]


def network(clients: int = len(CLIENTS), **overrides: object) -> FakeNetwork:
    kwargs = {key: overrides.pop(key) for key in ("silent", "samples", "train") if key in overrides}
    return FakeNetwork(
        clients + 1,
        star(clients),
        fedavg_config(**overrides),
        vectors=[torch.zeros(SIZE)] * (clients + 1),
        merge="weighted",
        **kwargs,  # type: ignore[arg-type]
    )


def core(
    index: int, neighbours: tuple[int, ...], *, start_round: int = 0, **overrides: object
) -> FedAvgServer:
    built = make_core(
        fedavg_config(**overrides),
        identity=identity_of(index),
        neighbours=[identity_of(i).node_id for i in neighbours],
        vector=torch.zeros(SIZE),
        samples=3,
        merge=make_merge_rule("weighted"),
        rng=np.random.default_rng(0),
        start_round=start_round,
    )
    assert isinstance(built, FedAvgServer | FedAvgClient)
    return built  # type: ignore[return-value]


def connect_all(server: FedAvgServer, clients: tuple[int, ...] = CLIENTS) -> None:
    for client in clients:
        assert server.handle(PeerConnected(identity_of(client).node_id), now=0.0) == []


def test_mode_declares_a_server() -> None:
    assert mode_traits("fedavg").server
    assert not mode_traits("dsgd").server


def test_role_follows_the_server_key() -> None:
    assert isinstance(core(SERVER, CLIENTS), FedAvgServer)
    assert isinstance(core(1, (SERVER,)), FedAvgClient)


@pytest.mark.parametrize(
    ("index", "neighbours", "overrides", "key"),
    [
        (1, (SERVER,), {"server": ""}, "protocol.server"),
        (1, (SERVER,), {"server": "abc"}, "protocol.server"),
        (1, (2,), {}, "protocol.server"),
        (SERVER, (), {}, "neighbours"),
        (SERVER, CLIENTS, {"sample_fraction": 0.0}, "protocol.sample_fraction"),
        (SERVER, CLIENTS, {"sample_fraction": 1.5}, "protocol.sample_fraction"),
        (SERVER, CLIENTS, {"history_gossip": True}, "protocol.history_gossip"),
    ],
)
def test_bad_setup_is_a_config_error(
    index: int, neighbours: tuple[int, ...], overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        core(index, neighbours, **overrides)
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("fraction", "size", "clients", "expected"),
    [(None, 10, 4, 4), (None, 3, 100, 3), (0.1, 10, 100, 10), (0.01, 10, 30, 1), (1.0, 1, 7, 7)],
)
def test_clients_per_round(fraction: float | None, size: int, clients: int, expected: int) -> None:
    config = fedavg_config(sample_fraction=fraction, sample_size=size)
    assert clients_per_round(config, clients) == expected


def test_server_averages_by_sample_count() -> None:
    server = core(SERVER, CLIENTS)
    connect_all(server)
    actions = server.handle(Started(), now=0.0)
    sends = [a for a in actions if isinstance(a, Send)]
    assert sorted(s.peer for s in sends) == sorted(identity_of(c).node_id for c in CLIENTS)
    assert {s.envelope.round for s in sends} == {0}
    models = {c: torch.full((SIZE,), float(c)) for c in CLIENTS}
    actions = []
    for c in CLIENTS:
        envelope = sealed(identity_of(c), seq=0, round=0, vector=models[c], samples=c)
        actions = server.handle(MessageReceived(identity_of(c).node_id, envelope), now=1.0)
    expected = sum(c * models[c] for c in CLIENTS) / sum(CLIENTS)
    checkpoint = next(a for a in actions if isinstance(a, SaveCheckpoint))
    assert checkpoint.round == 1
    assert torch.allclose(checkpoint.vector, expected)
    assert torch.allclose(server.vector, expected)
    # the next round opens at once with the average
    assert [a.envelope.round for a in actions if isinstance(a, Send)] == [1] * len(CLIENTS)


def test_conflicting_second_model_is_misbehaviour_and_the_first_kept() -> None:
    server = core(SERVER, CLIENTS)
    connect_all(server)
    server.handle(Started(), now=0.0)
    peer = identity_of(1).node_id
    first = sealed(identity_of(1), seq=0, round=0, vector=torch.ones(SIZE))
    again = sealed(identity_of(1), seq=1, round=0, vector=torch.ones(SIZE))
    other = sealed(identity_of(1), seq=2, round=0, vector=torch.zeros(SIZE))
    assert server.handle(MessageReceived(peer, first), now=0.1) == []
    assert server.handle(MessageReceived(peer, again), now=0.2) == []
    actions = server.handle(MessageReceived(peer, other), now=0.3)
    assert actions == [PeerMisbehaved(peer, "two different models for round 0")]


def test_a_full_run_converges_and_everyone_stops() -> None:
    net = network()
    net.start()
    net.run()
    server = net.nodes[SERVER]
    assert server.core.finished and server.core.round == 3
    # every client trained every round: the global model grew by one per round
    assert torch.equal(server.core.vector, torch.full((SIZE,), 3.0))
    assert [c.round for c in server.checkpoints] == [1, 2, 3]
    for client in CLIENTS:
        node = net.nodes[client]
        assert node.core.finished and node.stopped_at is not None
        assert node.checkpoints == []  # only the server holds the global model
        assert torch.equal(node.core.vector, server.core.vector)
    assert [r["received"] for r in server.records] == [4, 4, 4]


def test_sampling_is_seeded_and_covers_the_clients() -> None:
    def sampled_per_round() -> list[list[int]]:
        net = network(clients=8, sample_fraction=0.25, rounds=10)
        net.start()
        net.run()
        rounds: dict[int, list[int]] = {}
        for _at, index, event, actions in net.trace:
            if event != "TrainingFinished" and index != SERVER and "Train(" in actions:
                round_ = int(actions.split("Train(")[1].split(",")[0])
                rounds.setdefault(round_, []).append(index)
        return [sorted(rounds[r]) for r in sorted(rounds)]

    first = sampled_per_round()
    assert first == sampled_per_round()
    assert all(len(clients) == 2 for clients in first)
    assert len({c for clients in first for c in clients}) > 4


def test_straggler_is_left_behind_at_round_timeout() -> None:
    net = network(silent=[2], round_timeout=5.0)
    net.start()
    net.run()
    server = net.nodes[SERVER]
    assert server.core.finished
    assert [(r["received"], r["timed_out"]) for r in server.records] == [(3, 1)] * 3
    opened = [float(r["opened_at"]) for r in server.records]
    merged = [float(r["merged_at"]) for r in server.records]
    assert [m - o for o, m in zip(opened, merged, strict=True)] == [5.0] * 3


def test_dropped_client_is_not_waited_for() -> None:
    net = network(train=lambda v: v + 1.0)
    net.train_time = 2.0
    net.disconnect_at(0.5, SERVER, 3)
    net.start()
    net.run()
    records = net.nodes[SERVER].records
    # round 0 closes when the three remaining clients answer, long before round_timeout
    assert (records[0]["received"], records[0]["timed_out"]) == (3, 0)
    assert float(records[0]["merged_at"]) < 3.0
    assert all(r["sampled"] == 3 for r in records[1:])


def test_reconnecting_client_gets_the_round_again_and_its_model_counts() -> None:
    server = core(SERVER, CLIENTS)
    connect_all(server)
    server.handle(Started(), now=0.0)
    peer = identity_of(2).node_id
    assert server.handle(PeerDisconnected(peer), now=0.5) == []
    actions = server.handle(PeerConnected(peer), now=0.6)
    assert [(type(a), a.peer) for a in actions] == [(Send, peer)]  # type: ignore[union-attr]
    for c in CLIENTS:
        envelope = sealed(identity_of(c), seq=0, round=0, vector=torch.ones(SIZE))
        actions = server.handle(MessageReceived(identity_of(c).node_id, envelope), now=1.0)
    assert any(isinstance(a, SaveCheckpoint) for a in actions)


def test_server_waits_for_a_client_when_none_is_connected() -> None:
    server = core(SERVER, CLIENTS)
    assert server.handle(Started(), now=0.0) == []
    assert server.next_deadline() == 5.0
    assert server.handle(PeerDisconnected(identity_of(1).node_id), now=1.0) == []
    actions = server.handle(PeerConnected(identity_of(1).node_id), now=2.0)
    assert [type(a) for a in actions] == [Send]
    assert server.next_deadline() == 7.0


def test_empty_round_keeps_the_global_model() -> None:
    server = core(SERVER, CLIENTS, rounds=1)
    connect_all(server)
    server.handle(Started(), now=0.0)
    actions = server.handle(DeadlineReached(), now=5.0)
    checkpoint = next(a for a in actions if isinstance(a, SaveCheckpoint))
    assert torch.equal(checkpoint.vector, torch.zeros(SIZE))
    assert isinstance(actions[-1], Stop)


def test_client_trains_rounds_from_the_server_only() -> None:
    client = core(1, (SERVER, 2))
    server_id, other = identity_of(SERVER).node_id, identity_of(2).node_id
    for peer in (server_id, other):
        client.handle(PeerConnected(peer), now=0.0)
    assert client.handle(Started(), now=0.0) == []
    assert client.next_deadline() is None
    stray = sealed(identity_of(2), seq=0, round=0)
    assert client.handle(MessageReceived(other, stray), now=0.1) == [
        PeerMisbehaved(other, "a model from a peer that is not the server")
    ]
    global0 = sealed(identity_of(SERVER), seq=0, round=0, vector=torch.full((SIZE,), 2.0))
    actions = client.handle(MessageReceived(server_id, global0), now=0.2)
    assert len(actions) == 1 and isinstance(actions[0], StartTraining)
    assert torch.equal(actions[0].vector, torch.full((SIZE,), 2.0))
    # round 1 arrives before round 0's training is done: round 0's result is stale
    global1 = sealed(identity_of(SERVER), seq=1, round=1, vector=torch.full((SIZE,), 5.0))
    assert client.handle(MessageReceived(server_id, global1), now=0.3) == []
    actions = client.handle(TrainingFinished(torch.ones(SIZE), 0.1, 1), now=0.4)
    assert not any(isinstance(a, Send) for a in actions)
    train = next(a for a in actions if isinstance(a, StartTraining))
    assert train.round == 1 and torch.equal(train.vector, torch.full((SIZE,), 5.0))
    actions = client.handle(TrainingFinished(torch.ones(SIZE), 0.1, 1), now=0.5)
    sends = [a for a in actions if isinstance(a, Send)]
    assert [(s.peer, s.envelope.round) for s in sends] == [(server_id, 1)]
    # the connection drops and comes back: the model is sent again
    client.handle(PeerDisconnected(server_id), now=0.6)
    again = client.handle(PeerConnected(server_id), now=0.7)
    assert again == [Send(server_id, sends[0].envelope)]


def test_client_stops_on_the_final_model_even_while_training() -> None:
    client = core(1, (SERVER,), rounds=2)
    server_id = identity_of(SERVER).node_id
    client.handle(PeerConnected(server_id), now=0.0)
    client.handle(Started(), now=0.0)
    global1 = sealed(identity_of(SERVER), seq=0, round=1)
    assert isinstance(client.handle(MessageReceived(server_id, global1), now=0.1)[0], StartTraining)
    final = sealed(identity_of(SERVER), seq=1, round=2, vector=torch.full((SIZE,), 7.0))
    assert client.handle(MessageReceived(server_id, final), now=0.2) == []
    actions = client.handle(TrainingFinished(torch.ones(SIZE), 0.1, 1), now=0.3)
    assert isinstance(actions[-1], Stop) and client.finished
    assert torch.equal(client.vector, torch.full((SIZE,), 7.0))


@pytest.mark.parametrize(("index", "neighbours"), [(SERVER, CLIENTS), (1, (SERVER,))])
def test_start_round_at_or_past_rounds_stops_at_once(
    index: int, neighbours: tuple[int, ...]
) -> None:
    built = core(index, neighbours, rounds=3, start_round=3)
    assert [type(a) for a in built.handle(Started(), now=0.0)] == [Stop]
    assert built.finished and built.next_deadline() is None


def test_local_misuse_raises_and_changes_nothing() -> None:
    client = core(1, (SERVER,))
    server_id = identity_of(SERVER).node_id
    with pytest.raises(LocalProtocolError):
        client.handle(TrainingFinished(torch.ones(SIZE), 0.0, 1), now=0.0)
    client.handle(PeerConnected(server_id), now=0.0)
    client.handle(Started(), now=1.0)
    with pytest.raises(LocalProtocolError):
        client.handle(Started(), now=1.0)
    global0 = sealed(identity_of(SERVER), seq=0, round=0)
    assert isinstance(client.handle(MessageReceived(server_id, global0), now=1.0)[0], StartTraining)
    with pytest.raises(LocalProtocolError):
        client.handle(TrainingFinished(torch.ones(SIZE + 1), 0.0, 1), now=1.0)
    with pytest.raises(LocalProtocolError):
        client.handle(DeadlineReached(), now=0.5)
    with pytest.raises(LocalProtocolError):
        client.handle(PeerConnected(identity_of(1).node_id), now=1.0)
    actions = client.handle(TrainingFinished(torch.ones(SIZE), 0.0, 1), now=2.0)
    assert [type(a) for a in actions] == [Emit, Send]
    server = core(SERVER, CLIENTS)
    connect_all(server)
    server.handle(Started(), now=0.0)
    with pytest.raises(LocalProtocolError):
        server.handle(TrainingFinished(torch.ones(SIZE), 0.0, 1), now=1.0)
