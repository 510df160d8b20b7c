"""The Learner interface, the torch learner, models, datasets and non-IID partitions.

Importing this package needs torch and numpy only; scikit-learn, ``mnist1d`` and
``datasets`` are imported on first use of a dataset that needs them.
"""

from p2pfl.learn.base import EvalResult, Learner, TrainResult
from p2pfl.learn.datasets import (
    DATASETS,
    ArrayDataset,
    SplitDataset,
    gaussian_mixture,
    load_digits,
    make_dataset,
    train_test_split,
)
from p2pfl.learn.models import mlp
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
from p2pfl.learn.sampling import MinibatchSampler
from p2pfl.learn.setup import Federation, build_federation, build_node_learner, derive_seed
from p2pfl.learn.torch_learner import TorchLearner

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ArrayDataset",
    "EvalResult",
    "Federation",
    "Learner",
    "MinibatchSampler",
    "Partition",
    "SplitDataset",
    "TorchLearner",
    "TrainResult",
    "build_federation",
    "build_node_learner",
    "derive_seed",
    "dirichlet",
    "gaussian_mixture",
    "iid",
    "load_digits",
    "make_dataset",
    "make_partition",
    "mlp",
    "natural",
    "quantity_skew",
    "shards",
    "train_test_split",
]
