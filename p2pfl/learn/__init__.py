"""The Learner interface, the torch and batched learners, optimisers, models, datasets and
non-IID partitions.

Importing this package needs torch, numpy and pydantic only; scikit-learn, ``mnist1d`` and
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
from p2pfl.learn.models import MODELS, build_model, count_parameters, mlp
from p2pfl.learn.optim import OptimizerSettings
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
from p2pfl.learn.settings import LearnerSettings, parse_learner_settings
from p2pfl.learn.setup import Federation, build_federation, build_node_learner, derive_seed
from p2pfl.learn.torch_learner import TorchLearner

__all__ = [
    "DATASETS",
    "MODELS",
    "PARTITIONS",
    "ArrayDataset",
    "EvalResult",
    "Federation",
    "Learner",
    "LearnerSettings",
    "MinibatchSampler",
    "OptimizerSettings",
    "Partition",
    "SplitDataset",
    "TorchLearner",
    "TrainResult",
    "build_federation",
    "build_model",
    "build_node_learner",
    "count_parameters",
    "derive_seed",
    "dirichlet",
    "gaussian_mixture",
    "iid",
    "load_digits",
    "make_dataset",
    "make_partition",
    "mlp",
    "natural",
    "parse_learner_settings",
    "quantity_skew",
    "shards",
    "train_test_split",
]
