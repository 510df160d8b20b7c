"""The in-memory dataset types, the seeded train/test split and the checks every loader shares.

A loader turns a file or a generator into an :class:`ArrayDataset` (the build step then
splits off a test set) or a :class:`SplitDataset` (the source fixes its own test set). Every
check here raises :class:`~p2pfl.errors.ConfigError` naming the offending key, so a bad file
is one line, not a traceback.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from p2pfl.checks import check_seed
from p2pfl.errors import ConfigError

DATA_EXTRA_HINT = "pip install 'p2pfl-gossip[data]'"
HF_EXTRA_HINT = "pip install 'p2pfl-gossip[hf]'"


@dataclass(frozen=True, slots=True, eq=False)
class ArrayDataset:
    """A labelled dataset in memory.

    Attributes:
        x: features, float32, shape ``[N, *sample_shape]``: ``[N, D]`` for vectors,
            ``[N, L]`` for sequences, ``[N, C, H, W]`` for images (values in ``[0, 1]``).
        y: class labels, int64, shape ``[N]``, each in ``[0, num_classes)``.
        num_classes: number of classes.
        owners: optional int64 ``[N]``: the example's natural owner (client, writer), the
            input of the ``natural`` partition; kept by :meth:`subset` and the split.

    Raises:
        ConfigError: on construction, a field has the wrong dtype or shape, or a label is
            outside ``[0, num_classes)``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    owners: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim < 2:
            raise ConfigError(
                "x", f"{self.x.dtype} tensor of shape {tuple(self.x.shape)}", "float32 [N, ...]"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ConfigError(
                "y",
                f"{self.y.dtype} tensor of shape {tuple(self.y.shape)}",
                f"int64 [{self.x.shape[0]}], one label per example of x",
            )
        if self.num_classes < 1:
            raise ConfigError("num_classes", self.num_classes, "an int >= 1")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ConfigError("y", "labels out of range", f"every label in [0, {self.num_classes})")
        owners = self.owners
        if owners is not None and (owners.dtype != torch.int64 or owners.shape != self.y.shape):
            raise ConfigError(
                "owners",
                f"{owners.dtype} tensor of shape {tuple(owners.shape)}",
                f"int64 [{self.x.shape[0]}], one owner per example",
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(D,)``, ``(L,)`` or ``(C, H, W)``; a model's input shape."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of features per example once flattened (the product of :attr:`sample_shape`)."""
        return math.prod(self.sample_shape)

    def labels(self) -> npt.NDArray[np.int64]:
        """The labels as a new numpy array, the input that partitions expect."""
        return self.y.numpy().copy()

    def owner_array(self) -> npt.NDArray[np.int64] | None:
        """The owners as a new numpy array, or ``None`` when the dataset has none."""
        return None if self.owners is None else self.owners.numpy().copy()

    def subset(self, indices: npt.ArrayLike) -> ArrayDataset:
        """A new dataset of the examples at ``indices``, in that order (owners kept).

        Raises:
            IndexError: an index is out of range.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        owners = None if self.owners is None else self.owners[index]
        return ArrayDataset(self.x[index], self.y[index], self.num_classes, owners)


@dataclass(frozen=True, slots=True)
class SplitDataset:
    """A dataset whose source fixes the test set (a file's ``x_test``, MNIST's t10k files).

    The federation uses ``test`` as the common test set and shares ``train`` out; the
    ``test_fraction`` setting does not apply.

    Raises:
        ConfigError: on construction, the two halves differ in example shape or classes.
    """

    train: ArrayDataset
    test: ArrayDataset

    def __post_init__(self) -> None:
        if self.train.sample_shape != self.test.sample_shape:
            raise ConfigError(
                "x_test",
                f"examples of shape {self.test.sample_shape}",
                f"the shape of the training examples, {self.train.sample_shape}",
            )
        if self.train.num_classes != self.test.num_classes:
            raise ConfigError(
                "num_classes",
                f"{self.train.num_classes} (train) vs {self.test.num_classes} (test)",
                "the same number of classes in both splits",
            )


def train_test_split(
    ds: ArrayDataset, test_fraction: float, *, seed: int, stratify: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``ds`` into ``(train, test)``, seeded, stratified by default.

    The test set has ``round(test_fraction * len(ds))`` examples (at least 1, leaving at
    least 1 for training). Stratified, each class contributes in proportion to its size,
    remainders going to the classes with the largest fractional share. A dataset with
    owners is stratified by owner instead, and no owner gives up its last example, so
    every owner keeps training data for the ``natural`` partition (the test set may then
    be a few examples smaller).

    Args:
        ds: the dataset to split, at least 2 examples.
        test_fraction: share of examples for the test set, strictly between 0 and 1.
        seed: seed of the numpy generator that picks the examples (non-negative).
        stratify: keep class (or owner) proportions, or pick uniformly at random (False).

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
        owners = ds.owner_array()
        groups = ds.labels() if owners is None else owners
        keys, counts = np.unique(groups, return_counts=True)
        exact = counts * (n_test / n)
        quota = np.floor(exact).astype(np.int64)
        leftover = n_test - int(quota.sum())
        quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
        if owners is not None:
            quota = np.minimum(quota, counts - 1)
        picked = [
            rng.permutation(np.flatnonzero(groups == key))[:q]
            for key, q in zip(keys, quota, strict=True)
        ]
        test_idx = np.concatenate(picked)
    else:
        test_idx = rng.permutation(n)[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return ds.subset(np.flatnonzero(~is_test)), ds.subset(np.flatnonzero(is_test))


def features_from_array(key: str, array: npt.NDArray[np.generic]) -> Tensor:
    """Examples ``[N, ...]`` as float32: floats cast, uint8 pixels scaled to ``[0, 1]``.

    Raises:
        ConfigError: the array is not float or uint8, has no feature axis, or holds a
            non-finite value.
    """
    if array.ndim < 2:
        raise ConfigError(key, f"array of shape {array.shape}", "shape [N, ...]: N examples")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / np.float32(255.0))
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise ConfigError(key, f"{array.dtype} array", "float16/32/64, or uint8 pixels")
    values = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ConfigError(key, "a NaN or infinite value", "finite numbers")
    return torch.from_numpy(values)


def labels_from_array(key: str, array: npt.NDArray[np.generic], n: int) -> Tensor:
    """Class labels ``[n]`` of any integer dtype as int64.

    Raises:
        ConfigError: the array is not 1-D integers of length ``n`` or holds a negative label.
    """
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(
            key, f"{array.dtype} array of shape {array.shape}", f"integer labels of shape ({n},)"
        )
    labels = array.astype(np.int64)
    if n and int(labels.min()) < 0:
        raise ConfigError(key, int(labels.min()), "labels >= 0")
    return torch.from_numpy(labels)


def owners_from_array(key: str, array: npt.NDArray[np.generic], n: int) -> Tensor:
    """Owner ids ``[n]`` (integers or strings) as int64 codes in sorted order of the ids.

    Raises:
        ConfigError: the array is not 1-D integers or strings of length ``n``.
    """
    if array.shape != (n,) or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.str_)
    ):
        raise ConfigError(
            key, f"{array.dtype} array of shape {array.shape}", f"integer or string ids, ({n},)"
        )
    codes = np.unique(array, return_inverse=True)[1].reshape(n)
    return torch.from_numpy(codes.astype(np.int64))


def class_count(key: str, labels: Tensor, given: int | None, *more: Tensor) -> int:
    """``given`` (checked against the labels), or one more than the largest label seen.

    Raises:
        ConfigError: ``given`` is below 1 or not above every label.
    """
    largest = max((int(t.max()) for t in (labels, *more) if len(t)), default=0)
    if given is None:
        return largest + 1
    if not isinstance(given, int) or isinstance(given, bool) or given < 1:
        raise ConfigError("num_classes", given, "an int >= 1")
    if largest >= given:
        raise ConfigError(key, f"label {largest}", f"labels in [0, {given}) (num_classes)")
    return given


def require(module: str, dataset: str, hint: str) -> ModuleType:
    """Import optional dependency ``module`` for ``dataset``.

    Raises:
        ImportError: one line naming the dataset and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the {dataset!r} dataset needs the {module} package: {hint}") from exc
