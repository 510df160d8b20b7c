"""Every node's training set is a row range of one pool, which the batched trainer gathers
minibatches from; the pool holds each example once."""

from __future__ import annotations

import torch

from sim.population import Population, build_population
from sim.scenario import parse_scenario
from tests.sim.conftest import SmallDocument


def _gathered(population: Population, node: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(population.train_sets[node][1])
    return population.train_shares.select([node]).gather(torch.arange(count).view(1, -1))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_shares_are_the_train_sets_and_views_of_the_federation_pool(
    small_document: SmallDocument,
) -> None:
    population = build_population(parse_scenario(small_document(roles={"relays": [3]})))
    pool = population.federation.train_pool
    assert population.train_shares.x is pool.x and len(pool) == 400 - 80  # minus the test set
    for node in range(population.size):
        x, y = population.train_sets[node]
        if node == 3:
            assert population.samplers[node] is None and len(y) == 0
            continue
        gx, gy = _gathered(population, node)
        assert torch.equal(gx[0], x) and torch.equal(gy[0], y)
        assert _same_storage(x, pool.x)  # a view, not a copy
    for part in population.federation.train_parts:
        assert _same_storage(part.x, pool.x) and _same_storage(part.y, pool.y)


def test_poisoned_sets_join_the_pool_and_the_old_pool_is_not_kept(
    small_document: SmallDocument,
) -> None:
    document = small_document(
        adversaries=[
            {"attack": "backdoor", "nodes": [1], "image_shape": [2, 4]},
            {"attack": "label_flip", "sybils": 2, "sybil_edges": 2},
        ]
    )
    population = build_population(parse_scenario(document))
    clean = build_population(parse_scenario(small_document()))
    shares = population.train_shares
    assert population.size == 10
    # the backdoor attacker holds its share plus a triggered copy; each clone its own flipped
    # copy of all data: the pool is the clean shares once, then those three sets
    assert len(population.train_sets[1][1]) == 2 * len(clean.train_sets[1][1])
    poisoned = sum(len(population.train_sets[node][1]) for node in (1, 8, 9))
    assert len(shares.y) == 320 + poisoned
    for node in range(population.size):
        x, y = population.train_sets[node]
        gx, gy = _gathered(population, node)
        assert torch.equal(gx[0], x) and torch.equal(gy[0], y)
        assert _same_storage(x, shares.x)
        if node not in (1, 8, 9):  # honest holders keep their clean share
            assert torch.equal(y, clean.train_sets[node][1])
    assert not torch.equal(population.train_sets[1][1], torch.cat([clean.train_sets[1][1]] * 2))
    for part in population.federation.train_parts:
        assert _same_storage(part.x, shares.x)
    assert _same_storage(population.federation.train_pool.x, shares.x)
