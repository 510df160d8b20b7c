"""Batched training of many nodes equals training them one by one."""

from __future__ import annotations

import torch

from p2pfl.learn import build_federation
from sim.batched import BatchedMLP


def test_batched_training_equals_one_by_one_within_1e_5() -> None:
    federation = build_federation(
        "digits", {}, "dirichlet", {"alpha": 0.5}, num_nodes=6, model=[16], seed=3
    )
    lr, batch_size, steps = 0.1, 16, 7
    starts = torch.stack(
        [federation.init_vector + 0.01 * torch.randn(federation.layout.size) for _ in range(6)]
    )
    singles = []
    for node in range(6):
        learner = federation.learner(node, lr=lr, batch_size=batch_size)
        singles.append(learner.train(starts[node], steps))
    # Nodes with fewer examples than the batch size cap their batch, so one call per size,
    # as the engine groups them.
    trainer = BatchedMLP(federation.layout, lr=lr)
    samplers = [federation.sampler(node, batch_size=batch_size) for node in range(6)]
    groups: dict[int, list[int]] = {}
    for node, sampler in enumerate(samplers):
        groups.setdefault(sampler.batch_size, []).append(node)
    for nodes in groups.values():
        vectors, losses = trainer.train(
            starts[nodes],
            [(federation.train_parts[n].x, federation.train_parts[n].y) for n in nodes],
            [samplers[n] for n in nodes],
            steps,
        )
        for row, node in enumerate(nodes):
            assert torch.allclose(vectors[row], singles[node].vector, atol=1e-5, rtol=0)
            assert abs(float(losses[row]) - singles[node].loss) < 1e-5
    assert not torch.allclose(singles[0].vector, starts[0], atol=1e-3)


def test_batched_evaluation_equals_learner_evaluation() -> None:
    federation = build_federation("digits", {}, "iid", {}, num_nodes=3, model=[8], seed=0)
    vectors = torch.stack(
        [federation.init_vector + 0.1 * torch.randn(federation.layout.size) for _ in range(3)]
    )
    losses, accuracies = BatchedMLP(federation.layout, lr=0.1).evaluate(
        vectors, federation.test.x, federation.test.y
    )
    for node in range(3):
        expected = federation.learner(node, lr=0.1, batch_size=8).evaluate(vectors[node])
        assert abs(float(losses[node]) - expected.loss) < 1e-5
        assert float(accuracies[node]) == expected.accuracy
