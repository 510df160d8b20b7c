"""The learner's side of shared-randomness SPSA: perturbations anyone can regenerate, the
one-byte quantiser, the two-point projections, one code path for a node and the simulator,
and an update whose bits depend only on its inputs."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.identity import Identity
from p2pfl.learn import MinibatchSampler, TorchLearner, spsa
from p2pfl.learn.batched import BatchedLearner
from p2pfl.learn.models import build_model
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.learn.spsa import (
    apply_update,
    dequantise,
    perturbation,
    perturbation_seed,
    projected_gradients,
    quantise,
)

NODE = Identity.from_seed(bytes([9]) * 32).node_id
OTHER = Identity.from_seed(bytes([10]) * 32).node_id


def test_perturbations_are_signs_regenerated_from_the_seed() -> None:
    seed = perturbation_seed(7, 3, NODE, 0)
    z = perturbation(seed, 1000)
    assert z.dtype == torch.float32 and z.shape == (1000,)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(z, perturbation(seed, 1000))
    assert torch.equal(perturbation(seed, 1000)[:130], perturbation(seed, 130))
    assert abs(float(z.mean())) < 0.1  # balanced signs
    # Any other step, node, sample or salt gives another perturbation.
    others = [
        perturbation_seed(7, 4, NODE, 0),
        perturbation_seed(7, 3, OTHER, 0),
        perturbation_seed(7, 3, NODE, 1),
        perturbation_seed(8, 3, NODE, 0),
    ]
    assert len({seed, *others}) == 5
    for other in others:
        assert not torch.equal(perturbation(other, 1000), z)


@pytest.mark.parametrize(
    ("value", "level"),
    [(0.0, 0), (1.0, 32), (-1.0, -32), (4.0, 127), (-4.0, -127), (100.0, 127), (-1e9, -127)],
)
def test_quantiser_clips_and_rounds_to_one_signed_byte(value: float, level: int) -> None:
    assert quantise(value, 4.0) == level
    assert abs(dequantise(level, 4.0) - max(-4.0, min(4.0, value))) <= 4.0 / 127 / 2 + 1e-12


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_projection_is_sent_as_zero(value: float) -> None:
    assert quantise(value, 1.0) == 0


def test_projections_are_directional_derivatives() -> None:
    """For |θ − t|², the central difference is exact: g = 2 (θ − t) · z."""
    target = torch.linspace(-1.0, 1.0, 40)
    theta = torch.zeros(40)
    seeds = [perturbation_seed(0, 0, NODE, k) for k in range(3)]

    def loss(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == rows.shape[0] == 6  # both points of a sample share a batch
        return (rows - target).pow(2).sum(dim=1)

    batches = iter([(torch.zeros(2, 1), torch.zeros(2))] * 3)
    result = projected_gradients(loss, theta, seeds, 1e-2, lambda: next(batches))
    for seed, g in zip(seeds, result.projections, strict=True):
        expected = float(2 * (theta - target) @ perturbation(seed, 40))
        assert g == pytest.approx(expected, rel=1e-3)
    assert result.loss == pytest.approx(float(target.pow(2).sum()) + 40 * 1e-4, rel=1e-5)


def test_the_update_depends_only_on_its_inputs() -> None:
    theta = torch.randn(300, generator=torch.Generator().manual_seed(1))
    contributions = [
        (perturbation_seed(0, 5, NODE, k), dequantise(k * 9 - 20, 2.0)) for k in range(6)
    ]
    cached = apply_update(theta, contributions, 0.1)
    spsa._DELTAS.clear()
    fresh = apply_update(theta.clone(), contributions, 0.1)
    assert torch.equal(cached, fresh)
    expected = theta - 0.1 / 6 * sum(v * perturbation(s, 300) for s, v in contributions)
    assert torch.allclose(fresh, expected, atol=1e-6)
    assert torch.equal(apply_update(theta, [], 0.1), theta)


def test_a_node_and_the_simulator_measure_the_same_bytes() -> None:
    """TorchLearner.probe (a device) and BatchedLearner.probe (the simulator) run one path."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 12, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    model = build_model("mlp", {"hidden": [16]}, (12,), 3, seed=5)
    vector = TorchLearner(model, (x, y), (x, y), lr=0.1, batch_size=8, seed=11).initial_vector()
    seeds = [perturbation_seed(0, 0, NODE, k) for k in range(4)]
    device = TorchLearner(
        build_model("mlp", {"hidden": [16]}, (12,), 3, seed=5),
        (x, y),
        (x, y),
        lr=0.1,
        batch_size=8,
        seed=11,
    )
    batched = BatchedLearner(
        build_model("mlp", {"hidden": [16]}, (12,), 3, seed=5), OptimizerSettings(lr=0.1), (12,)
    )
    sampler = MinibatchSampler(50, 8, seed=11)
    for _ in range(2):  # the minibatch stream carries on across steps alike
        one = device.probe(vector, seeds, 1e-3)
        many = batched.probe(0, vector, (x, y), sampler, seeds, 1e-3)
        assert one == many
        assert len(one.projections) == 4 and all(math.isfinite(g) for g in one.projections)
