"""The Learner interface: what a node needs from whatever trains its model.

A learner works on flat parameter vectors (see :mod:`p2pfl.params`): the protocol hands it a
vector, it trains for some steps and hands back a new vector. Nothing else about the model
crosses this boundary, so the protocol, the merge rules and the wire never see torch modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from p2pfl.params import ParamLayout


@dataclass(frozen=True, slots=True)
class TrainResult:
    """The outcome of one :meth:`Learner.train` call.

    Attributes:
        vector: the trained parameters, a new 1-D float32 tensor.
        loss: mean training loss over the steps taken (NaN when no step was taken).
        samples: number of training examples processed in this call (with repeats).
        steps: number of optimiser steps taken.
    """

    vector: Tensor
    loss: float
    samples: int
    steps: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    """The outcome of one :meth:`Learner.evaluate` call.

    Attributes:
        loss: mean loss over the evaluation set.
        accuracy: fraction of evaluation examples classified correctly, in [0, 1].
        samples: number of evaluation examples.
    """

    loss: float
    accuracy: float
    samples: int


@runtime_checkable
class Learner(Protocol):
    """Trains and evaluates one node's model, exchanging flat parameter vectors."""

    @property
    def layout(self) -> ParamLayout:
        """The layout every vector passed in or out must have."""
        ...

    @property
    def num_samples(self) -> int:
        """Size of the local training set, the weight of this node in sample-weighted merges."""
        ...

    def initial_vector(self) -> Tensor:
        """A new copy of the model's parameters before any training."""
        ...

    def train(self, vector: Tensor, steps: int, *, round: int | None = None) -> TrainResult:
        """Start from ``vector``, take ``steps`` optimiser steps, return a new vector.

        ``vector`` is never modified. ``round`` is the protocol round the training belongs
        to (0-based; a learning-rate schedule is keyed on it); None when unknown.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout` or ``steps`` is negative.
        """
        ...

    def evaluate(self, vector: Tensor) -> EvalResult:
        """Evaluate ``vector`` on the local test set without changing any training state.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout`.
        """
        ...
