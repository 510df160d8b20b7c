"""Share one dataset out over a run's nodes: test split, partition, model, minibatch streams.

:func:`build_federation` does it once for all nodes (the simulator); every live node calls
:func:`build_node_learner` with the same arguments except ``node_index`` and gets its own
share of the same data. The run ``seed`` is spread into
independent streams (test split, partition, model initialisation, each node's minibatches)
with ``numpy.random.SeedSequence``, so no two of them are correlated and every host derives
the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from p2pfl.checks import check_int, check_seed
from p2pfl.errors import ConfigError
from p2pfl.learn.datasets import ArrayDataset, load_split
from p2pfl.learn.models import build_model
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.learn.partition import make_partition
from p2pfl.learn.sampling import MinibatchSampler
from p2pfl.learn.torch_learner import TorchLearner
from p2pfl.params import ParamLayout, flatten, layout_of

_STREAM_DATASET = 0
_STREAM_SPLIT = 1
_STREAM_PARTITION = 2
_STREAM_INIT = 3
_STREAM_BATCHES = 4


def derive_seed(seed: int, *path: int) -> int:
    """An independent 63-bit seed for the stream named by ``path`` under the run ``seed``.

    Raises:
        ConfigError: ``seed`` or an element of ``path`` is negative.
    """
    check_seed(seed)
    if any(p < 0 for p in path):
        raise ConfigError("seed path", path, "non-negative ints")
    # The length goes first because SeedSequence pads its input with zeros: without it,
    # paths (1,) and (1, 0) would give the same stream.
    sequence = np.random.SeedSequence(seed, spawn_key=(len(path), *path))
    state = sequence.generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


@dataclass(frozen=True, slots=True)
class Federation:
    """Every node's share of one run's data, the common test set and the initial model.

    Built once per run by :func:`build_federation`; ``p2pfl node`` takes one node's learner
    from it, the simulator takes all of them.
    """

    train_parts: tuple[ArrayDataset, ...]
    """Node i's share; every share is a row range of :attr:`train_pool`, in node order."""
    test: ArrayDataset
    model_name: str
    model_params: Mapping[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    init_seed: int
    seed: int
    layout: ParamLayout
    init_vector: Tensor
    train_pool: ArrayDataset
    """All shares' examples as one dataset (share 0's rows, then share 1's, ...): a batched
    trainer gathers every node's minibatch from it in one indexing operation."""

    def build_model(self, seed: int | None = None) -> nn.Module:
        """A new copy of the model, initialised from ``seed`` (default: the shared init seed).

        Raises:
            ConfigError: the model cannot be built (as :func:`~p2pfl.learn.models.build_model`).
        """
        return build_model(
            self.model_name,
            self.model_params,
            self.input_shape,
            self.num_classes,
            seed=self.init_seed if seed is None else seed,
        )

    @property
    def num_nodes(self) -> int:
        """Number of nodes sharing the training set."""
        return len(self.train_parts)

    def batch_seed(self, node_index: int) -> int:
        """The seed of node ``node_index``'s minibatch stream."""
        return derive_seed(self.seed, _STREAM_BATCHES, node_index)

    def sampler(self, node_index: int, *, batch_size: int) -> MinibatchSampler:
        """A fresh minibatch sampler over node ``node_index``'s share.

        Raises:
            ConfigError: ``batch_size`` below 1.
        """
        part = self.train_parts[node_index]
        return MinibatchSampler(len(part), batch_size, seed=self.batch_seed(node_index))

    def learner(
        self,
        node_index: int,
        *,
        batch_size: int,
        lr: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSettings | None = None,
        own_copy: bool = False,
    ) -> TorchLearner:
        """The :class:`TorchLearner` of node ``node_index`` (``optimizer``, or plain SGD
        from ``lr``, ``momentum``, ``weight_decay``).

        ``own_copy`` gives the learner a copy of its share rather than a view of
        :attr:`train_pool`, so that a lone node does not keep every share's examples alive.

        Raises:
            ConfigError: ``node_index`` out of range or a hyper-parameter out of range.
        """
        check_int("node_index", node_index, 0)
        if node_index >= self.num_nodes:
            raise ConfigError("node_index", node_index, f"an int in [0, {self.num_nodes})")
        share = self.train_parts[node_index]
        if own_copy:
            share = ArrayDataset(share.x.clone(), share.y.clone(), share.num_classes)
        return TorchLearner(
            self.build_model(),
            share,
            self.test,
            lr=lr,
            batch_size=batch_size,
            momentum=momentum,
            weight_decay=weight_decay,
            optimizer=optimizer,
            seed=self.batch_seed(node_index),
        )


def build_federation(
    dataset: str,
    dataset_params: Mapping[str, Any],
    partition: str,
    partition_params: Mapping[str, Any],
    *,
    num_nodes: int,
    model: str | Sequence[int],
    seed: int,
    test_fraction: float = 0.2,
    init_seed: int | None = None,
    model_params: Mapping[str, Any] | None = None,
) -> Federation:
    """Load a dataset once and share it out over ``num_nodes`` nodes.

    Steps: build the dataset and take its test set, common to all nodes (its own, or a
    stratified split; see :func:`~p2pfl.learn.datasets.load_split`); partition the rest
    (examples' owners go to partitions that use them); fix the model and its
    initialisation.

    Args:
        dataset: a name in :data:`~p2pfl.learn.datasets.DATASETS`.
        dataset_params: keyword arguments of that dataset builder.
        partition: a name in :data:`~p2pfl.learn.partition.PARTITIONS`.
        partition_params: keyword arguments of that partition, besides labels, n and seed.
        num_nodes: number of nodes sharing the training set, >= 1.
        model: a model name or ``python:`` factory (:func:`~p2pfl.learn.models.build_model`),
            or a list of hidden layer sizes as a shortcut for ``mlp`` (``[]``: linear).
        seed: the run seed (non-negative).
        test_fraction: share of the dataset held out as the common test set (unused when
            the dataset comes with its own test set).
        init_seed: seed of the model initialisation; by default one derived from ``seed``,
            so all nodes start from the same parameters.
        model_params: keyword arguments of the model factory.

    Raises:
        ConfigError: any argument is out of range or names an unknown dataset, partition or
            parameter (the message names the key).
        ImportError: the dataset needs an optional dependency that is not installed.
    """
    check_seed(seed)
    check_int("num_nodes", num_nodes, 1)
    name, factory_params = _model_spec(model, model_params)
    train, test = load_split(
        dataset,
        dataset_params,
        test_fraction=test_fraction,
        data_seed=derive_seed(seed, _STREAM_DATASET),
        split_seed=derive_seed(seed, _STREAM_SPLIT),
        num_clients=num_nodes,
    )
    parts = make_partition(
        partition,
        train.labels(),
        num_nodes,
        seed=derive_seed(seed, _STREAM_PARTITION),
        owners=train.owner_array(),
        **partition_params,
    )
    input_shape = tuple(int(size) for size in train.x.shape[1:])
    chosen_init = derive_seed(seed, _STREAM_INIT) if init_seed is None else init_seed
    module = build_model(name, factory_params, input_shape, train.num_classes, seed=chosen_init)
    # One gather of every share's examples, then each share a view of its rows: the same
    # values as a gather per share, faster at 100,000 nodes, and the pool a batched trainer
    # indexes once per step for all nodes.
    pool = train.subset(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    train_parts = []
    start = 0
    for part in parts:
        rows = slice(start, start + len(part))
        owners = None if pool.owners is None else pool.owners[rows]
        train_parts.append(ArrayDataset(pool.x[rows], pool.y[rows], pool.num_classes, owners))
        start += len(part)
    return Federation(
        train_parts=tuple(train_parts),
        test=test,
        model_name=name,
        model_params=factory_params,
        input_shape=input_shape,
        num_classes=train.num_classes,
        init_seed=chosen_init,
        seed=seed,
        layout=layout_of(module),
        init_vector=flatten(module),
        train_pool=pool,
    )


def build_node_learner(
    dataset: str,
    dataset_params: Mapping[str, Any],
    partition: str,
    partition_params: Mapping[str, Any],
    num_nodes: int,
    node_index: int,
    model: str | Sequence[int],
    lr: float | None,
    batch_size: int,
    seed: int,
    test_fraction: float = 0.2,
    *,
    init_seed: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    model_params: Mapping[str, Any] | None = None,
    optimizer: OptimizerSettings | None = None,
) -> TorchLearner:
    """The learner of node ``node_index`` out of ``num_nodes``: see :func:`build_federation`.

    Raises:
        ConfigError: any argument is out of range or names an unknown dataset, partition or
            parameter (the message names the key).
        ImportError: the dataset needs an optional dependency that is not installed.
    """
    check_int("num_nodes", num_nodes, 1)
    check_int("node_index", node_index, 0)
    if node_index >= num_nodes:
        raise ConfigError("node_index", node_index, f"an int in [0, {num_nodes})")
    federation = build_federation(
        dataset,
        dataset_params,
        partition,
        partition_params,
        num_nodes=num_nodes,
        model=model,
        seed=seed,
        test_fraction=test_fraction,
        init_seed=init_seed,
        model_params=model_params,
    )
    return federation.learner(
        node_index,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer=optimizer,
        own_copy=True,
    )


def _model_spec(
    model: str | Sequence[int], params: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """(factory name, its parameters) from a name or an mlp hidden-size list."""
    if isinstance(model, str):
        return model, dict(params or {})
    hidden = list(model)
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise ConfigError("model", hidden, "a list of hidden layer sizes, each an int >= 1")
    if params:
        raise ConfigError("model_params", dict(params), "empty when model is a hidden-size list")
    return "mlp", {"hidden": hidden}
