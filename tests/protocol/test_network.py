"""Several cores joined through the fake network: whole runs of each mode."""

from __future__ import annotations

import pytest
import torch

from p2pfl.protocol import CoreConfig
from p2pfl.testing.network import FakeNetwork

TRIANGLE = [(0, 1), (1, 2), (0, 2)]
RING4 = [(0, 1), (1, 2), (2, 3), (3, 0)]


def start_vectors(n: int, size: int = 5) -> list[torch.Tensor]:
    return [torch.arange(size, dtype=torch.float32) * (i + 1) - 3 * i for i in range(n)]


@pytest.mark.parametrize("merge", ["mean", "weighted"])
def test_dsgd_triangle_reaches_the_mean(merge: str) -> None:
    rounds = 5
    vectors = start_vectors(3)
    net = FakeNetwork(
        3, TRIANGLE, CoreConfig(mode="dsgd", rounds=rounds), vectors=vectors, merge=merge
    )
    net.start()
    net.run()

    expected = torch.stack(vectors).mean(dim=0) + rounds
    for node in net.nodes.values():
        assert node.core.finished and node.stopped_at is not None
        assert node.core.round == rounds
        torch.testing.assert_close(node.core.vector, expected)
        assert [r["round"] for r in node.records] == list(range(rounds))
        assert all(r["received"] == 2 and r["timed_out"] == 0 for r in node.records)
        assert [c.round for c in node.checkpoints] == list(range(1, rounds + 1))
        assert node.misbehaved == []
    # nobody waited for a timeout: each round is one training plus one message latency
    assert net.now == pytest.approx(rounds * (net.train_time + net.latency))


def test_dsgd_weighted_by_samples() -> None:
    vectors = start_vectors(3)
    samples = [1, 2, 5]
    config = CoreConfig(mode="dsgd", rounds=2)
    net = FakeNetwork(3, TRIANGLE, config, vectors=vectors, samples=samples, merge="weighted")
    net.start()
    net.run()
    weights = torch.tensor(samples, dtype=torch.float32)
    expected = (torch.stack(vectors) * weights[:, None]).sum(0) / weights.sum() + 2
    for node in net.nodes.values():
        torch.testing.assert_close(node.core.vector, expected)


def test_dsgd_silent_neighbour_rounds_end_at_the_timeout() -> None:
    rounds, timeout = 3, 5.0
    vectors = start_vectors(3)
    config = CoreConfig(mode="dsgd", rounds=rounds, round_timeout=timeout)
    net = FakeNetwork(3, TRIANGLE, config, vectors=vectors, silent={2})
    net.start()
    net.run()

    for node in net.nodes.values():
        assert node.core.finished
        assert all(r["timed_out"] == 1 for r in node.records)
        assert all(r["received"] == 1 and r["expected"] == 2 for r in node.records)
    assert net.now == pytest.approx(rounds * (net.train_time + timeout))
    torch.testing.assert_close(net.nodes[0].core.vector, net.nodes[1].core.vector)
    expected = (vectors[0] + vectors[1]) / 2 + rounds
    torch.testing.assert_close(net.nodes[0].core.vector, expected)


def test_dsgd_disconnected_neighbour_is_not_waited_for() -> None:
    config = CoreConfig(mode="dsgd", rounds=3, round_timeout=50.0)
    net = FakeNetwork(3, TRIANGLE, config, vectors=start_vectors(3), silent={2})
    net.disconnect_at(0.5, 0, 2)
    net.disconnect_at(0.5, 1, 2)
    net.start()
    net.run()
    for node in net.nodes.values():
        assert node.core.finished
        assert all(r["timed_out"] == 0 and r["expected"] == 1 for r in node.records)
    assert net.now == pytest.approx(3 * (net.train_time + net.latency))


def test_gossip_ring_completes_its_rounds() -> None:
    rounds = 6
    config = CoreConfig(mode="gossip", rounds=rounds, period=0.7, fanout=1)
    vectors = start_vectors(4)
    net = FakeNetwork(4, RING4, config, vectors=vectors, train_time=0.5)
    net.start()
    net.run()

    low = torch.stack(vectors).min(0).values
    high = torch.stack(vectors).max(0).values + rounds
    for node in net.nodes.values():
        assert node.core.finished and node.core.round == rounds
        assert len(node.records) == rounds and len(node.checkpoints) == rounds
        assert node.sent > 0 and node.misbehaved == []
        assert bool(((node.core.vector >= low) & (node.core.vector <= high)).all())
    assert sum(r["received"] for node in net.nodes.values() for r in node.records) > 0


def test_gossip_without_neighbours_still_trains() -> None:
    config = CoreConfig(mode="gossip", rounds=4, period=1.0, period_jitter=0.0)
    net = FakeNetwork(2, [(0, 1)], config, vectors=start_vectors(2), silent={1})
    net.start()
    net.run()
    node = net.nodes[0]
    assert node.core.finished
    torch.testing.assert_close(node.core.vector, start_vectors(1)[0] + 4)
    # training 0 starts at Started, later ones at each push tick after the previous ended
    assert net.now == pytest.approx(3 * 1.0 + net.train_time)


@pytest.mark.parametrize("mode", ["dsgd", "gossip"])
def test_same_events_give_same_actions(mode: str) -> None:
    def trace() -> list[tuple[float, int, str, str]]:
        config = CoreConfig(mode=mode, rounds=4, period=0.6, round_timeout=2.0, fanout=2)
        net = FakeNetwork(5, [*RING4, (3, 4), (0, 4)], config, vectors=start_vectors(5), seed=7)
        net.start()
        net.run()
        return net.trace

    assert trace() == trace()
