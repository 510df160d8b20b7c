"""The dataset registry: built-in generators, loaders of files on disk, and the run's split.

The types and the split live in :mod:`p2pfl.learn.data.core`, one module per loader family
beside it. Optional dependencies (scikit-learn for ``digits``, ``mnist1d``, ``datasets``)
are imported only when their dataset is built, so ``import p2pfl.learn`` works on a device
without them.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.checks import check_int, check_seed
from p2pfl.errors import ConfigError
from p2pfl.learn._config import call_with_params
from p2pfl.learn.data.core import ArrayDataset, SplitDataset, train_test_split
from p2pfl.learn.data.hf import load_hf
from p2pfl.learn.data.mnist1d import mnist1d
from p2pfl.learn.data.npz import load_npz
from p2pfl.learn.data.synthetic import synthetic_leaf
from p2pfl.learn.data.vision import torchvision_dataset

__all__ = [
    "DATASETS",
    "PATH_PARAMS",
    "ArrayDataset",
    "SplitDataset",
    "gaussian_mixture",
    "load_digits",
    "load_split",
    "make_dataset",
    "train_test_split",
]

SIM_EXTRA_HINT = "pip install 'p2pfl-gossip[sim]'"


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
    # In blocks of rows: the generator's stream continues across draws, so the numbers are
    # those of one (n_samples, dim) draw, without its float64 temporaries (3 GB each for
    # 6.4 million examples of 64 features) and with each block still in cache when added.
    x = np.empty((n_samples, dim), dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // dim)
    for start in range(0, n_samples, block):
        rows = slice(start, min(start + block, n_samples))
        noise = rng.standard_normal((rows.stop - rows.start, dim))
        noise += means[y[rows]]
        x[rows] = noise
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), num_classes)


_BLOCK_ELEMENTS = 1 << 16


DATASETS: dict[str, Callable[..., ArrayDataset | SplitDataset]] = {
    "digits": load_digits,
    "gaussian_mixture": gaussian_mixture,
    "mnist1d": mnist1d,
    "synthetic_leaf": synthetic_leaf,
    "npz": load_npz,
    "torchvision": torchvision_dataset,
    "hf": load_hf,
}
"""Dataset builders by name; a plug-in registers a new one by adding an entry. A builder
returns an :class:`ArrayDataset` (the run splits off a test set) or a :class:`SplitDataset`
(the source has its own)."""

PATH_PARAMS = frozenset({"path", "root"})
"""Builder parameters that name files: configs resolve them against their own folder."""


def make_dataset(name: str, /, **params: Any) -> ArrayDataset | SplitDataset:
    """Build the dataset registered as ``name`` with ``params``.

    Raises:
        ConfigError: ``name`` is not in :data:`DATASETS`, a parameter is unknown or
            missing, or a value is out of range.
        ImportError: the dataset needs an optional dependency that is not installed.
    """
    if name not in DATASETS:
        raise ConfigError("dataset", name, f"one of {', '.join(sorted(DATASETS))}")
    dataset: ArrayDataset | SplitDataset = call_with_params("dataset", name, DATASETS[name], params)
    return dataset


def load_split(
    name: str,
    params: Mapping[str, Any],
    *,
    test_fraction: float,
    data_seed: int,
    split_seed: int,
    num_clients: int,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Build dataset ``name`` for a run and return its ``(train, test)`` halves.

    A builder that takes a ``seed`` gets ``data_seed`` unless ``params`` sets one; one that
    takes ``num_clients`` (``synthetic_leaf``) gets the run's number of data holders unless
    set. A :class:`SplitDataset` keeps its own test set; an :class:`ArrayDataset` is split
    with :func:`train_test_split` (``test_fraction``, ``split_seed``).

    Raises:
        ConfigError: as :func:`make_dataset` or :func:`train_test_split`; a key that is a
            parameter of the builder is reported as ``data.params.KEY``.
        ImportError: the dataset needs an optional dependency that is not installed.
    """
    given = dict(params)
    builder = DATASETS.get(name)
    accepted = inspect.signature(builder).parameters if builder is not None else {}
    if "seed" in accepted:
        given.setdefault("seed", data_seed)
    if "num_clients" in accepted:
        given.setdefault("num_clients", num_clients)
    try:
        data = make_dataset(name, **given)
    except ConfigError as exc:
        key = exc.key.removeprefix("dataset_params.")
        if key in accepted:
            raise ConfigError(f"data.params.{key}", exc.value, exc.allowed) from exc
        raise
    if isinstance(data, SplitDataset):
        return data.train, data.test
    return train_test_split(data, test_fraction, seed=split_seed)
