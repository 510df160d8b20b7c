import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn.datasets import (
    DATASETS,
    ArrayDataset,
    gaussian_mixture,
    load_digits,
    make_dataset,
    train_test_split,
)


def test_load_digits_is_scaled() -> None:
    ds = load_digits()
    assert ds.x.shape == (1797, 64) and ds.x.dtype == torch.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == torch.int64
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.num_classes == 10 and set(ds.y.tolist()) == set(range(10))


def test_import_without_sklearn() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None
        import p2pfl.learn
        try:
            p2pfl.learn.make_dataset("digits")
        except ImportError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'p2pfl-gossip[sim]'" in result.stdout


def test_gaussian_mixture_is_seeded_and_balanced() -> None:
    a = gaussian_mixture(103, 7, 4, seed=3)
    b = gaussian_mixture(103, 7, 4, seed=3)
    c = gaussian_mixture(103, 7, 4, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (103, 7) and a.x.dtype == torch.float32 and a.num_classes == 4
    counts = np.bincount(a.labels(), minlength=4)
    assert counts.max() - counts.min() <= 1


def nearest_mean_accuracy(ds: ArrayDataset) -> float:
    means = torch.stack([ds.x[ds.y == c].mean(0) for c in range(ds.num_classes)])
    predicted = torch.cdist(ds.x, means).argmin(1)
    return float((predicted == ds.y).double().mean())


def test_separation_controls_difficulty() -> None:
    easy = gaussian_mixture(2000, 10, 5, seed=0, separation=8.0)
    hard = gaussian_mixture(2000, 10, 5, seed=0, separation=0.0)
    assert nearest_mean_accuracy(easy) > 0.95
    assert nearest_mean_accuracy(hard) < 0.35


@pytest.mark.parametrize(
    ("key", "params"),
    [
        ("n_samples", {"n_samples": 2}),
        ("dim", {"dim": 0}),
        ("num_classes", {"num_classes": 1}),
        ("seed", {"seed": -1}),
        ("separation", {"separation": -1.0}),
    ],
)
def test_gaussian_mixture_bad_arguments_name_the_key(key: str, params: dict[str, float]) -> None:
    arguments = {"n_samples": 10, "dim": 2, "num_classes": 3, "seed": 0, **params}
    with pytest.raises(ConfigError) as info:
        gaussian_mixture(**arguments)  # type: ignore[arg-type]
    assert info.value.key == key


def indexed_dataset(n: int, num_classes: int) -> ArrayDataset:
    rows = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, num_classes, n))
    return ArrayDataset(rows, labels, num_classes)


def test_split_is_disjoint_complete_and_stratified() -> None:
    ds = indexed_dataset(1000, 7)
    train, test = train_test_split(ds, 0.25, seed=1)
    rows = sorted(train.x[:, 0].tolist() + test.x[:, 0].tolist())
    assert rows == list(range(1000))
    assert len(test) == 250
    full = np.bincount(ds.labels(), minlength=7)
    held = np.bincount(test.labels(), minlength=7)
    assert np.all(np.abs(held - full * 0.25) < 1)
    assert torch.equal(test.y, ds.y[test.x[:, 0].long()])


def test_split_is_seeded() -> None:
    ds = indexed_dataset(200, 3)
    for stratify in (True, False):
        a = train_test_split(ds, 0.3, seed=5, stratify=stratify)[1]
        b = train_test_split(ds, 0.3, seed=5, stratify=stratify)[1]
        c = train_test_split(ds, 0.3, seed=6, stratify=stratify)[1]
        assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ConfigError) as info:
        train_test_split(indexed_dataset(10, 2), fraction, seed=0)
    assert info.value.key == "test_fraction"


def test_registry_errors_name_the_key() -> None:
    assert set(DATASETS) == {
        "digits",
        "gaussian_mixture",
        "mnist1d",
        "synthetic_leaf",
        "npz",
        "torchvision",
        "hf",
    }
    with pytest.raises(ConfigError, match="digits, gaussian_mixture") as info:
        make_dataset("mnist")
    assert info.value.key == "dataset"
    with pytest.raises(ConfigError) as info:
        make_dataset("gaussian_mixture", n_samples=10, dim=2, num_classes=2, seed=0, noise=1.0)
    assert info.value.key == "dataset_params.noise"
    with pytest.raises(ConfigError, match="requires dim") as info:
        make_dataset("gaussian_mixture", n_samples=10, num_classes=2, seed=0)
    assert info.value.key == "dataset_params.dim"
    with pytest.raises(ConfigError) as info:
        make_dataset("digits", seed=1)
    assert info.value.key == "dataset_params.seed"


def test_make_dataset_builds_by_name() -> None:
    ds = make_dataset("gaussian_mixture", n_samples=50, dim=3, num_classes=2, seed=0)
    assert torch.equal(ds.x, gaussian_mixture(50, 3, 2, seed=0).x)


@pytest.mark.parametrize(
    ("key", "x", "y", "num_classes"),
    [
        ("x", torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), 2),
        ("x", torch.zeros(4), torch.zeros(4, dtype=torch.int64), 2),
        ("y", torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64), 2),
        ("y", torch.zeros(4, 2), torch.zeros(4), 2),
        ("y", torch.zeros(2, 2), torch.tensor([0, 2]), 2),
        ("num_classes", torch.zeros(2, 2), torch.tensor([0, 0]), 0),
    ],
)
def test_array_dataset_validates(
    key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int
) -> None:
    with pytest.raises(ConfigError) as info:
        ArrayDataset(x, y, num_classes)
    assert info.value.key == key
