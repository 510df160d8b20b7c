"""Classification datasets held as in-memory tensors, a name registry, and a seeded split.

scikit-learn is an optional dependency (``p2pfl-gossip[sim]``): it is imported only inside
:func:`load_digits`, so ``import p2pfl.learn`` works on a device without it.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from p2pfl.errors import ConfigError
from p2pfl.learn._config import call_with_params, check_int, check_seed

SIM_EXTRA_HINT = "pip install 'p2pfl-gossip[sim]'"


@dataclass(frozen=True, slots=True, eq=False)
class ArrayDataset:
    """A labelled dataset in memory.

    Attributes:
        x: features, float32, shape ``[N, D]``.
        y: class labels, int64, shape ``[N]``, each in ``[0, num_classes)``.
        num_classes: number of classes.

    Raises:
        ConfigError: on construction, a field has the wrong dtype or shape, or a label is
            outside ``[0, num_classes)``.
    """

    x: Tensor
    y: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim != 2:
            raise ConfigError(
                "x", f"{self.x.dtype} tensor of shape {tuple(self.x.shape)}", "float32 [N, D]"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ConfigError(
                "y",
                f"{self.y.dtype} tensor of shape {tuple(self.y.shape)}",
                f"int64 [{self.x.shape[0]}], one label per row of x",
            )
        if self.num_classes < 1:
            raise ConfigError("num_classes", self.num_classes, "an int >= 1")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ConfigError("y", "labels out of range", f"every label in [0, {self.num_classes})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        """Number of features per example."""
        return int(self.x.shape[1])

    def labels(self) -> npt.NDArray[np.int64]:
        """The labels as a new numpy array, the input that partitions expect."""
        return self.y.numpy().copy()

    def subset(self, indices: npt.ArrayLike) -> ArrayDataset:
        """A new dataset of the rows at ``indices``, in that order.

        Raises:
            IndexError: an index is out of range.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.x[index], self.y[index], self.num_classes)


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1797 examples, 64 features in [0, 1], 10 classes.

    The CSV that scikit-learn ships is read directly: importing ``sklearn`` pulls in SciPy's
    statistics and costs seconds, which every simulation run would pay.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(location) / "datasets" / "data" / "digits.csv.gz" for location in locations]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise ImportError(f"the 'digits' dataset needs scikit-learn: {SIM_EXTRA_HINT}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(table[:, :-1]) / np.float32(16.0))
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    return ArrayDataset(x, y, 10)


def gaussian_mixture(
    n_samples: int,
    dim: int,
    num_classes: int,
    *,
    seed: int,
    separation: float = 3.0,
) -> ArrayDataset:
    """A generated classification task: one isotropic unit-variance Gaussian per class.

    Class means are drawn from ``N(0, separation**2 / dim * I)``, so two means lie about
    ``separation * sqrt(2)`` standard deviations apart whatever ``dim`` is. Classes are
    balanced (sizes differ by at most one) and rows are shuffled.

    Args:
        n_samples: number of examples, at least ``num_classes``.
        dim: number of features, at least 1.
        num_classes: number of classes, at least 2.
        seed: seed of the numpy generator that draws everything (non-negative).
        separation: how far apart the classes are; 0 makes them indistinguishable.

    Raises:
        ConfigError: an argument is out of range (the message names it).
    """
    check_int("dim", dim, 1)
    check_int("num_classes", num_classes, 2)
    check_int("n_samples", n_samples, num_classes)
    check_seed(seed)
    if not (isinstance(separation, int | float) and math.isfinite(separation) and separation >= 0):
        raise ConfigError("separation", separation, "a finite number >= 0")
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, dim)) * (separation / math.sqrt(dim))
    y = rng.permutation(np.arange(n_samples, dtype=np.int64) % num_classes)
    x = means[y] + rng.standard_normal((n_samples, dim))
    return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), num_classes)


def train_test_split(
    ds: ArrayDataset, test_fraction: float, *, seed: int, stratify: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``ds`` into ``(train, test)``, seeded, stratified by label by default.

    The test set has ``round(test_fraction * len(ds))`` examples (at least 1, leaving at
    least 1 for training). Stratified, each class contributes in proportion to its size,
    remainders going to the classes with the largest fractional share.

    Args:
        ds: the dataset to split, at least 2 examples.
        test_fraction: share of examples for the test set, strictly between 0 and 1.
        seed: seed of the numpy generator that picks the examples (non-negative).
        stratify: keep class proportions (True) or pick uniformly at random (False).

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1), ``ds`` has fewer than 2 examples,
            or ``seed`` is negative.
    """
    if not (isinstance(test_fraction, int | float) and 0 < test_fraction < 1):
        raise ConfigError("test_fraction", test_fraction, "a number strictly between 0 and 1")
    n = len(ds)
    if n < 2:
        raise ConfigError("dataset", f"{n} examples", "at least 2 examples to split")
    check_seed(seed)
    rng = np.random.default_rng(seed)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    if stratify:
        labels = ds.labels()
        classes, counts = np.unique(labels, return_counts=True)
        exact = counts * (n_test / n)
        quota = np.floor(exact).astype(np.int64)
        leftover = n_test - int(quota.sum())
        quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
        picked = [
            rng.permutation(np.flatnonzero(labels == c))[:q]
            for c, q in zip(classes, quota, strict=True)
        ]
        test_idx = np.concatenate(picked)
    else:
        test_idx = rng.permutation(n)[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return ds.subset(np.flatnonzero(~is_test)), ds.subset(np.flatnonzero(is_test))


DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": load_digits,
    "gaussian_mixture": gaussian_mixture,
}
"""Dataset builders by name; a plug-in registers a new one by adding an entry."""


def make_dataset(name: str, /, **params: Any) -> ArrayDataset:
    """Build the dataset registered as ``name`` with ``params``.

    Raises:
        ConfigError: ``name`` is not in :data:`DATASETS`, a parameter is unknown or
            missing, or a value is out of range.
        ImportError: the dataset needs an optional dependency that is not installed.
    """
    if name not in DATASETS:
        raise ConfigError("dataset", name, f"one of {', '.join(sorted(DATASETS))}")
    dataset: ArrayDataset = call_with_params("dataset", name, DATASETS[name], params)
    return dataset
