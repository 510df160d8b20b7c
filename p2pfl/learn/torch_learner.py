"""A :class:`~p2pfl.learn.base.Learner` that trains a torch classifier on cross-entropy.

Training is the simulator's: the learner holds a :class:`~p2pfl.learn.batched.BatchedLearner`
and trains its one row with :meth:`~p2pfl.learn.batched.BatchedLearner.train_rows`, the step
loop the simulator runs for many nodes at once (the same sampling, gradient, loss and
optimiser step; a Linear/ReLU stack through its written-out backward). So a node started from
the vector and sampler state a simulated node has returns that node's vector bit for bit.

Determinism: minibatches come from a private ``torch.Generator`` seeded from ``seed``. The
learner walks a shuffled order of its training set and reshuffles when it runs out, carrying
its place across :meth:`TorchLearner.train` calls. So two learners built from the same seed
and inputs, given the same sequence of calls, return bit-identical vectors.

Threads: no global state is read or written (no global RNG, no ``set_num_threads``), and a
per-learner lock serialises calls, so ``train`` and ``evaluate`` may run in worker threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from p2pfl.checks import check_int
from p2pfl.errors import ConfigError
from p2pfl.learn.base import EvalResult, TrainResult
from p2pfl.learn.batched import EVAL_EXAMPLES, BatchedLearner, Shares
from p2pfl.learn.datasets import ArrayDataset
from p2pfl.learn.functional import score_logits
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.learn.sampling import MinibatchSampler
from p2pfl.learn.spsa import ProbeResult
from p2pfl.params import ParamLayout, flatten, load_vector

NODE = 0
"""The key of the learner's one node in its :class:`~p2pfl.learn.batched.BatchedLearner`."""

TensorPair = tuple[Tensor, Tensor]


class TorchLearner:
    """One node's optimiser on cross-entropy for a torch module mapping ``[N, ...]`` to logits.

    The module's parameters at construction are the :meth:`initial_vector`. Each
    :meth:`train` call starts from the vector it is given; the learner keeps, across calls,
    the minibatch generator, the optimiser state (momentum or Adam moments, per the
    ``optimizer_state`` policy of :mod:`p2pfl.learn.optim`) and the module's buffers
    (BatchNorm running statistics). None of these is ever sent.

    Training runs through a one-row :class:`~p2pfl.learn.batched.BatchedLearner`, the code
    the simulator runs for many nodes at once (see the module docstring); evaluation scores
    the logits with :func:`p2pfl.learn.functional.score_logits`, as the simulator does.
    """

    def __init__(
        self,
        model: nn.Module,
        train: ArrayDataset | TensorPair,
        test: ArrayDataset | TensorPair,
        *,
        lr: float | None = None,
        batch_size: int,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: OptimizerSettings | None = None,
        seed: int,
    ) -> None:
        """Wrap ``model`` and its local data.

        Args:
            model: the classifier; it is owned by the learner from now on.
            train: training examples ``[N, ...]`` and int labels ``[N]``, ``N >= 1``.
            test: evaluation examples and labels, at least one example.
            lr: SGD learning rate, > 0 (shortcut for ``optimizer``).
            batch_size: examples per step, >= 1 (capped at the training set size).
            momentum: SGD momentum in ``[0, 1)`` (shortcut for ``optimizer``).
            weight_decay: L2 penalty, >= 0 (shortcut for ``optimizer``).
            optimizer: the optimiser and learning-rate schedule; give either this or ``lr``.
            seed: seed of the minibatch generator (any int, reduced modulo 2**64).

        Raises:
            ConfigError: a hyper-parameter is out of range, both or neither of ``lr`` and
                ``optimizer`` are given, a dataset is empty or misshapen, or ``model`` has no
                trainable parameter (the message names which).
        """
        if optimizer is None:
            if lr is None:
                raise ConfigError("lr", None, "a learning rate (or an optimizer)")
            optimizer = OptimizerSettings(lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif lr is not None or momentum or weight_decay:
            raise ConfigError("lr", lr, "None when optimizer is given (it holds lr)")
        check_int("batch_size", batch_size, 1)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError("seed", seed, "an int")
        self._train_x, self._train_y = _as_pair("train", train)
        self._test_x, self._test_y = _as_pair("test", test)
        self._model = model
        self._initial = flatten(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("model", type(model).__name__, "a module with trainable parameters")
        _check_forward(model, self._train_x[:2])
        self._trainer = BatchedLearner(model, optimizer, tuple(self._train_x.shape[1:]))
        # The module's own buffers: one-by-one training (BatchNorm) updates the running
        # statistics in them, and evaluate runs the module.
        self._trainer.use_buffers(NODE, dict(model.named_buffers()))
        self._data = Shares(self._train_x, self._train_y, torch.zeros(1, dtype=torch.int64))
        self._sampler = MinibatchSampler(len(self._train_y), batch_size, seed=seed)
        self._lock = threading.Lock()

    @property
    def layout(self) -> ParamLayout:
        """The layout of every vector this learner takes and returns."""
        return self._trainer.layout

    @property
    def num_samples(self) -> int:
        """Number of local training examples."""
        return int(self._train_y.shape[0])

    @property
    def model(self) -> nn.Module:
        """The wrapped module; :meth:`train` leaves the returned vector loaded in it."""
        return self._model

    @property
    def optimizer(self) -> OptimizerSettings:
        """The optimiser and learning-rate schedule."""
        return self._trainer.optimizer

    def initial_vector(self) -> Tensor:
        """A new copy of the parameters the model had when the learner was built."""
        return self._initial.clone()

    def train(self, vector: Tensor, steps: int, *, round: int | None = None) -> TrainResult:
        """Start from ``vector``, take ``steps`` optimiser steps on minibatches.

        ``vector`` is never modified. With ``steps == 0`` the result is a copy of
        ``vector`` with NaN loss. ``round`` (0-based, as ``StartTraining`` carries it) picks
        the learning rate of the schedule; None means round 0.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout` or ``steps < 0``.
        """
        check_int("steps", steps, 0)
        self._check_vector(vector)
        with self._lock:
            row = vector.detach().to(torch.float32).clone().unsqueeze(0)
            rounds = [0 if round is None else round]
            total = self._trainer.train_rows(
                [NODE], row, self._data, [self._sampler], steps, rounds
            )
            load_vector(self._model, row[0])
            return TrainResult(
                vector=row[0].clone(),
                loss=float(total[0]) / steps if steps else math.nan,
                samples=steps * self._sampler.batch_size,
                steps=steps,
            )

    def probe(self, vector: Tensor, seeds: Sequence[int], eps: float) -> ProbeResult:
        """SPSA projected gradients at ``vector``, one per seed, each on the next minibatch
        (see :func:`p2pfl.learn.spsa.projected_gradients`); the optimiser state is untouched.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout`.
        """
        self._check_vector(vector)
        with self._lock:
            data = (self._train_x, self._train_y)
            return self._trainer.probe(NODE, vector, data, self._sampler, seeds, eps)

    def evaluate(self, vector: Tensor) -> EvalResult:
        """Mean cross-entropy and accuracy of ``vector`` on the test set (forward passes in
        batches of 4096), computed by :func:`p2pfl.learn.functional.score_logits` as the
        simulator computes every node's.

        Training state (generator, optimiser state) is untouched.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout`.
        """
        with self._lock:
            load_vector(self._model, vector)
            self._model.eval()
            n = int(self._test_y.shape[0])
            with torch.no_grad():
                logits = torch.cat(
                    [
                        self._model(self._test_x[start : start + EVAL_EXAMPLES])
                        for start in range(0, n, EVAL_EXAMPLES)
                    ]
                )
                loss, accuracy = score_logits(logits.unsqueeze(0), self._test_y)
            return EvalResult(loss=float(loss[0]), accuracy=float(accuracy[0]), samples=n)

    def _check_vector(self, vector: Tensor) -> None:
        size = self._trainer.layout.size
        if vector.shape != (size,):
            raise ConfigError("vector", tuple(vector.shape), f"a vector of {size}")


def _check_forward(model: nn.Module, x: Tensor) -> None:
    """Raise ConfigError unless ``model`` maps examples ``x`` to one row of logits each.

    Run in eval mode without gradients, so no buffer or parameter changes; a node learns at
    start-up, in one line, that its model does not fit its data.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = ", ".join(map(str, x.shape[1:]))
        raise ConfigError(
            "model", type(model).__name__, f"a module mapping [N, {shape}] inputs ({reason})"
        ) from None
    finally:
        model.train(training)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError("model", type(model).__name__, f"[N, classes] logits, not {got}")


def _as_pair(key: str, data: ArrayDataset | TensorPair) -> TensorPair:
    if isinstance(data, ArrayDataset):
        x, y = data.x, data.y
    else:
        try:
            x, y = data
        except (TypeError, ValueError):
            raise ConfigError(
                key, type(data).__name__, "an ArrayDataset or a pair (x, y)"
            ) from None
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise ConfigError(key, type(data).__name__, "tensors x [N, D] and y [N]")
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ConfigError(
            key,
            f"x {tuple(x.shape)}, y {tuple(y.shape)}",
            "x [N, ...] and y [N] with the same N >= 1",
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(key, f"labels of dtype {y.dtype}", "integer class labels")
    return x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous()
