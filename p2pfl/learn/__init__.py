"""The Learner interface, the torch and batched learners, optimisers, models, datasets and
non-IID partitions.

Importing this package needs torch and numpy only; scikit-learn is imported on first use
of the ``digits`` dataset.
"""

from p2pfl.learn.base import EvalResult, Learner, TrainResult
from p2pfl.learn.datasets import (
    DATASETS,
    ArrayDataset,
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
    "parse_learner_settings",
    "quantity_skew",
    "shards",
    "train_test_split",
]
