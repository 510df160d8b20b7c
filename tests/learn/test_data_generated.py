"""mnist1d and synthetic_leaf: seeded, shaped as documented, and the properties users rely on."""

import random
import sys

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn import build_federation
from p2pfl.learn.data.core import ArrayDataset
from p2pfl.learn.data.mnist1d import mnist1d
from p2pfl.learn.data.synthetic import synthetic_leaf

pytest.importorskip("mnist1d", reason="the [data] extra")


def nearest_neighbour_accuracy(train: ArrayDataset, test: ArrayDataset) -> float:
    nearest = torch.cdist(test.x, train.x).argmin(1)
    return float((train.y[nearest] == test.y).double().mean())


def test_mnist1d_is_seeded_balanced_and_any_size() -> None:
    a, b, c = mnist1d(1003, seed=5), mnist1d(1003, seed=5), mnist1d(1003, seed=6)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert a.x.shape == (1003, 40) and a.x.dtype == torch.float32 and a.num_classes == 10
    counts = np.bincount(a.labels(), minlength=10)
    assert counts.max() - counts.min() <= 1
    assert abs(float(a.x.mean())) < 1e-4 and abs(float(a.x.std()) - 1) < 1e-3


def test_mnist1d_vectorized_matches_the_package_generator() -> None:
    # Same distribution, different draws: a 1-NN classifier fit on either generator's data
    # scores the same on the package's held-out data (MNIST-1D's 1-NN accuracy is ~0.55).
    package = mnist1d(2000, seed=1, generator="package")
    held_out = mnist1d(1000, seed=2, generator="package")
    ours = mnist1d(2000, seed=1)
    from_package = nearest_neighbour_accuracy(package, held_out)
    from_ours = nearest_neighbour_accuracy(ours, held_out)
    assert 0.4 < from_package < 0.7
    assert abs(from_ours - from_package) < 0.05
    # and the per-position spread of the sequences agrees
    assert torch.allclose(ours.x.std(0), package.x.std(0), atol=0.1)


def test_mnist1d_package_generator_leaves_global_random_state_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d(20, seed=9, generator="package")
    assert (np.random.random(), random.random()) == expected


@pytest.mark.parametrize(
    ("key", "params"),
    [
        ("n_samples", {"n_samples": 5}),
        ("n_samples", {"n_samples": 15, "generator": "package"}),
        ("generator", {"generator": "fast"}),
        ("seed", {"seed": -1}),
    ],
)
def test_mnist1d_bad_arguments(key: str, params: dict[str, object]) -> None:
    arguments: dict[str, object] = {"n_samples": 100, "seed": 0, **params}
    with pytest.raises(ConfigError) as info:
        mnist1d(**arguments)  # type: ignore[arg-type]
    assert info.value.key == key


def test_mnist1d_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install 'p2pfl-gossip\[data\]'") as info:
        mnist1d(100, seed=0)
    assert "\n" not in str(info.value)


def test_synthetic_leaf_shapes_owners_and_sizes() -> None:
    ds = synthetic_leaf(12, 0.5, 0.5, seed=3)
    assert ds.sample_shape == (60,) and ds.num_classes == 10
    owners = ds.owner_array()
    assert owners is not None
    sizes = np.bincount(owners)
    assert len(sizes) == 12 and sizes.min() >= 50
    assert len(ds) == sizes.sum()
    again = synthetic_leaf(12, 0.5, 0.5, seed=3)
    assert torch.equal(ds.x, again.x) and torch.equal(ds.y, again.y)
    capped = synthetic_leaf(12, 0.5, 0.5, seed=3, max_size=60)
    assert np.bincount(capped.owner_array()).max() <= 60


def label_spread(ds: ArrayDataset) -> float:
    """Mean total-variation distance between a client's label mix and the global one."""
    owners = ds.owner_array()
    assert owners is not None
    overall = np.bincount(ds.labels(), minlength=ds.num_classes) / len(ds)
    gaps = []
    for k in np.unique(owners):
        mine = np.bincount(ds.labels()[owners == k], minlength=ds.num_classes)
        gaps.append(0.5 * np.abs(mine / mine.sum() - overall).sum())
    return float(np.mean(gaps))


def test_synthetic_leaf_is_non_iid_by_client() -> None:
    # Every client labels with its own model: its label mix is far from the global one,
    # unlike the same examples dealt out at random.
    ds = synthetic_leaf(30, 0.5, 0.5, seed=0, max_size=200)
    shuffled = np.random.default_rng(0).permutation(ds.owner_array())
    iid = ArrayDataset(ds.x, ds.y, ds.num_classes, torch.from_numpy(shuffled))
    assert label_spread(ds) > 0.5 and label_spread(iid) < 0.2


def test_synthetic_leaf_beta_spreads_client_inputs() -> None:
    def spread_of_means(beta: float) -> float:
        ds = synthetic_leaf(30, 0.0, beta, seed=1, max_size=200)
        owners = ds.owner_array()
        means = [float(ds.x[torch.from_numpy(owners == k)].mean()) for k in range(30)]
        return float(np.std(means))

    assert spread_of_means(3.0) > 2 * spread_of_means(0.0)


def test_synthetic_leaf_refuses_huge_totals_before_allocating() -> None:
    with pytest.raises(ConfigError, match="max_size") as info:
        synthetic_leaf(100_000, seed=0, size_mean=12.0)
    assert info.value.key == "num_clients"
    with pytest.raises(ConfigError) as info:
        synthetic_leaf(5, seed=0, min_size=10, max_size=5)
    assert info.value.key == "max_size"
    with pytest.raises(ConfigError) as info:
        synthetic_leaf(5, -1.0, seed=0)
    assert info.value.key == "alpha"


def test_synthetic_leaf_natural_federation_gives_each_node_one_client() -> None:
    federation = build_federation(
        "synthetic_leaf",
        {"alpha": 0.5, "beta": 0.5, "max_size": 300},
        "natural",
        {},
        num_nodes=6,
        model=[8],
        seed=4,
    )
    assert federation.num_nodes == 6 and federation.input_shape == (60,)
    assert federation.num_classes == 10 and federation.model_params == {"hidden": [8]}
    for index, part in enumerate(federation.train_parts):
        owners = part.owner_array()
        assert owners is not None and set(owners.tolist()) == {index}
    test_owners = federation.test.owner_array()
    assert test_owners is not None and set(test_owners.tolist()) == set(range(6))


@pytest.mark.parametrize(
    ("dataset", "params", "partition", "partition_params"),
    [
        ("mnist1d", {"n_samples": 600}, "dirichlet", {"alpha": 0.5}),
        ("synthetic_leaf", {"max_size": 100}, "natural", {}),
    ],
)
def test_generated_federations_follow_the_run_seed(
    dataset: str, params: dict[str, object], partition: str, partition_params: dict[str, object]
) -> None:
    def build(seed: int) -> list[torch.Tensor]:
        federation = build_federation(
            dataset, params, partition, partition_params, num_nodes=4, model=[4], seed=seed
        )
        return [part.x for part in federation.train_parts] + [federation.test.x]

    first, again, other = build(7), build(7), build(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other, strict=True)
    )
