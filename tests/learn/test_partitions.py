from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.learn.partition import (
    PARTITIONS,
    Partition,
    dirichlet,
    iid,
    make_partition,
    natural,
    quantity_skew,
    shards,
)

LABELS = np.repeat(np.arange(10), 100)


def assert_exact_cover(parts: Partition, n_nodes: int, n_samples: int) -> None:
    assert len(parts) == n_nodes
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n_samples))


@st.composite
def problems(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], int, int]:
    labels = np.array(draw(st.lists(st.integers(0, 4), min_size=1, max_size=200)), dtype=np.int64)
    n = draw(st.integers(1, len(labels)))
    return labels, n, draw(st.integers(0, 2**32))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_iid_covers_and_balances(problem: tuple[npt.NDArray[np.int64], int, int]) -> None:
    labels, n, seed = problem
    parts = iid(labels, n, seed=seed)
    assert_exact_cover(parts, n, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.01, 100))
def test_dirichlet_covers(problem: tuple[npt.NDArray[np.int64], int, int], alpha: float) -> None:
    labels, n, seed = problem
    assert_exact_cover(dirichlet(labels, n, alpha, seed=seed, min_size=0), n, len(labels))


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(1, 4))
def test_shards_cover(problem: tuple[npt.NDArray[np.int64], int, int], k: int) -> None:
    labels, n, seed = problem
    if n * k > len(labels):
        k = len(labels) // n
    parts = shards(labels, n, k, seed=seed)
    assert_exact_cover(parts, n, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= k


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.01, 100))
def test_quantity_skew_covers(
    problem: tuple[npt.NDArray[np.int64], int, int], alpha: float
) -> None:
    labels, n, seed = problem
    parts = quantity_skew(labels, n, alpha, seed=seed)
    assert_exact_cover(parts, n, len(labels))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5}),
        ("shards", {"k": 2}),
        ("quantity_skew", {"alpha": 1.0}),
    ],
)
def test_partitions_are_seeded(name: str, params: dict[str, float]) -> None:
    a = make_partition(name, LABELS, 10, seed=1, **params)
    b = make_partition(name, LABELS, 10, seed=1, **params)
    c = make_partition(name, LABELS, 10, seed=2, **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def mean_label_entropy(parts: Partition, labels: npt.NDArray[np.int64]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_small_alpha_is_more_skewed() -> None:
    skewed = np.mean(
        [mean_label_entropy(dirichlet(LABELS, 10, 0.1, seed=s), LABELS) for s in range(5)]
    )
    mild = np.mean(
        [mean_label_entropy(dirichlet(LABELS, 10, 100.0, seed=s), LABELS) for s in range(5)]
    )
    assert mild > 0.95 * np.log(10)
    assert skewed < mild - 0.7


def test_dirichlet_min_size_is_met() -> None:
    parts = dirichlet(LABELS, 20, 0.3, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="3 attempts") as info:
        dirichlet(LABELS, 50, 0.01, seed=0, min_size=19, max_attempts=3)
    assert info.value.key == "alpha"


def test_shards_give_each_node_at_most_k_labels() -> None:
    parts = shards(LABELS, 10, 2, seed=0)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_quantity_skew_small_alpha_spreads_sizes() -> None:
    def spread(alpha: float) -> float:
        return float(
            np.mean(
                [
                    np.std([len(p) for p in quantity_skew(LABELS, 10, alpha, seed=s)])
                    for s in range(5)
                ]
            )
        )

    assert spread(0.2) > 3 * spread(100.0)


Call = Callable[[], Partition]


@pytest.mark.parametrize(
    ("key", "call"),
    [
        ("partition", lambda: make_partition("pathological", LABELS, 2, seed=0)),
        ("alpha", lambda: make_partition("dirichlet", LABELS, 2, seed=0, alpha=0.0)),
        ("alpha", lambda: make_partition("quantity_skew", LABELS, 2, seed=0, alpha=-1)),
        ("alpha", lambda: make_partition("dirichlet", LABELS, 2, seed=0, alpha=float("nan"))),
        ("n", lambda: make_partition("iid", LABELS, 0, seed=0)),
        ("n", lambda: make_partition("iid", LABELS[:5], 6, seed=0)),
        ("k", lambda: make_partition("shards", LABELS, 10, seed=0, k=101)),
        ("k", lambda: make_partition("shards", LABELS, 10, seed=0, k=0)),
        (
            "min_size",
            lambda: make_partition("dirichlet", LABELS, 10, seed=0, alpha=1, min_size=101),
        ),
        ("seed", lambda: make_partition("iid", LABELS, 2, seed=-1)),
        ("labels", lambda: make_partition("iid", LABELS.reshape(100, 10), 2, seed=0)),
        ("labels", lambda: make_partition("iid", LABELS.astype(float), 2, seed=0)),
        ("partition_params.beta", lambda: make_partition("dirichlet", LABELS, 2, seed=0, beta=1)),
        ("partition_params.n", lambda: make_partition("iid", LABELS, 2, seed=0, n=3)),
        ("partition_params.alpha", lambda: make_partition("dirichlet", LABELS, 2, seed=0)),
    ],
)
def test_bad_arguments_name_the_key(key: str, call: Call) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.key == key


def test_registry_lists_names() -> None:
    assert set(PARTITIONS) == {"iid", "dirichlet", "shards", "quantity_skew", "natural"}
    with pytest.raises(ConfigError, match="dirichlet, iid, natural, quantity_skew, shards"):
        make_partition("nope", LABELS, 2, seed=0)


def test_natural_deals_owners_round_robin_in_sorted_order() -> None:
    owners = np.array([30, 10, 20, 10, 40, 30, 20, 50])  # sorted: 10 20 30 40 50
    parts = natural(np.zeros(8, dtype=np.int64), 2, seed=0, owners=owners)
    assert_exact_cover(parts, 2, 8)
    # node 0: owners 10, 30, 50; node 1: owners 20, 40 - every owner whole
    assert parts[0].tolist() == [0, 1, 3, 5, 7] and parts[1].tolist() == [2, 4, 6]
    one_each = natural(np.zeros(8, dtype=np.int64), 5, seed=0, owners=owners)
    assert [sorted(set(owners[p].tolist())) for p in one_each] == [[10], [20], [30], [40], [50]]


def test_natural_errors_name_the_policy() -> None:
    labels = np.zeros(6, dtype=np.int64)
    with pytest.raises(ConfigError, match="3 owners for 4 nodes") as info:
        natural(labels, 4, seed=0, owners=np.array([0, 0, 1, 1, 2, 2]))
    assert info.value.key == "partition"
    with pytest.raises(ConfigError, match="carry an owner"):
        make_partition("natural", labels, 2, seed=0)
    with pytest.raises(ConfigError) as info:
        make_partition("natural", labels, 2, seed=0, owners=np.arange(5))
    assert info.value.key == "owners"
    # the other partitions ignore owners; none takes it as a parameter
    assert len(make_partition("iid", labels, 2, seed=0, owners=np.arange(6))) == 2
