"""A :class:`~p2pfl.learn.base.Learner` that trains a torch classifier with SGD on cross-entropy.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pfl.errors import ConfigError
from p2pfl.learn._config import check_int, check_positive
from p2pfl.learn.base import EvalResult, TrainResult
from p2pfl.learn.datasets import ArrayDataset
from p2pfl.learn.sampling import MinibatchSampler
from p2pfl.params import ParamLayout, flatten, layout_of, load_vector

EVAL_BATCH_SIZE = 4096

TensorPair = tuple[Tensor, Tensor]


class TorchLearner:
    """SGD on cross-entropy for a torch module mapping ``[B, D]`` features to ``[B, C]`` logits.

    The module's parameters at construction are the :meth:`initial_vector`. Each
    :meth:`train` call first loads the given vector into the module, so training state is
    only the vector passed in, the minibatch generator and, when ``momentum > 0``, the SGD
    momentum buffer, which is kept across calls (a node that merges and then trains keeps
    its velocity, as local SGD with momentum does). With ``momentum == 0`` there is no
    optimiser state at all.
    """

    def __init__(
        self,
        model: nn.Module,
        train: ArrayDataset | TensorPair,
        test: ArrayDataset | TensorPair,
        *,
        lr: float,
        batch_size: int,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int,
    ) -> None:
        """Wrap ``model`` and its local data.

        Args:
            model: the classifier; it is owned by the learner from now on.
            train: training features ``[N, D]`` and int labels ``[N]``, ``N >= 1``.
            test: evaluation features and labels, at least one example.
            lr: SGD learning rate, > 0.
            batch_size: examples per step, >= 1 (capped at the training set size).
            momentum: SGD momentum in ``[0, 1)``; 0 disables the momentum buffer.
            weight_decay: L2 penalty, >= 0.
            seed: seed of the minibatch generator (any int, reduced modulo 2**64).

        Raises:
            ConfigError: a hyper-parameter is out of range, a dataset is empty or
                misshapen, or ``model`` has no trainable parameter (the message names which).
        """
        check_positive("lr", lr)
        check_int("batch_size", batch_size, 1)
        if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
            raise ConfigError("momentum", momentum, "a number in [0, 1)")
        if not (isinstance(weight_decay, int | float) and 0 <= weight_decay < math.inf):
            raise ConfigError("weight_decay", weight_decay, "a finite number >= 0")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError("seed", seed, "an int")
        self._train_x, self._train_y = _as_pair("train", train)
        self._test_x, self._test_y = _as_pair("test", test)
        self._model = model
        self._layout = layout_of(model)
        self._initial = flatten(model)
        self._params = [p for _, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ConfigError("model", type(model).__name__, "a module with trainable parameters")
        self._lr = float(lr)
        self._momentum = float(momentum)
        self._weight_decay = float(weight_decay)
        self._velocity: list[Tensor] | None = None
        self._sampler = MinibatchSampler(len(self._train_y), batch_size, seed=seed)
        self._lock = threading.Lock()

    @property
    def layout(self) -> ParamLayout:
        """The layout of every vector this learner takes and returns."""
        return self._layout

    @property
    def num_samples(self) -> int:
        """Number of local training examples."""
        return int(self._train_y.shape[0])

    @property
    def model(self) -> nn.Module:
        """The wrapped module; its parameters hold whatever vector was loaded last."""
        return self._model

    def initial_vector(self) -> Tensor:
        """A new copy of the parameters the model had when the learner was built."""
        return self._initial.clone()

    def train(self, vector: Tensor, steps: int) -> TrainResult:
        """Load ``vector``, take ``steps`` SGD steps on minibatches, return the new vector.

        ``vector`` is never modified. With ``steps == 0`` the result is a copy of
        ``vector`` with NaN loss.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout` or ``steps < 0``.
        """
        check_int("steps", steps, 0)
        with self._lock:
            load_vector(self._model, vector)
            self._model.train()
            total_loss = torch.zeros((), dtype=torch.float64)
            with torch.enable_grad():
                for _ in range(steps):
                    index = self._sampler.next_batch()
                    loss = F.cross_entropy(self._model(self._train_x[index]), self._train_y[index])
                    grads = torch.autograd.grad(
                        loss, self._params, allow_unused=True, materialize_grads=True
                    )
                    self._sgd_step(grads)
                    total_loss += loss.detach()
            mean_loss = float(total_loss) / steps if steps else math.nan
            return TrainResult(
                vector=flatten(self._model),
                loss=mean_loss,
                samples=steps * self._sampler.batch_size,
                steps=steps,
            )

    def evaluate(self, vector: Tensor) -> EvalResult:
        """Mean cross-entropy and accuracy of ``vector`` on the test set, in batches of 4096.

        Training state (generator, momentum) is untouched.

        Raises:
            ConfigError: ``vector`` does not match :attr:`layout`.
        """
        with self._lock:
            load_vector(self._model, vector)
            self._model.eval()
            total_loss = 0.0
            correct = 0
            n = int(self._test_y.shape[0])
            with torch.no_grad():
                for start in range(0, n, EVAL_BATCH_SIZE):
                    x = self._test_x[start : start + EVAL_BATCH_SIZE]
                    y = self._test_y[start : start + EVAL_BATCH_SIZE]
                    logits = self._model(x)
                    total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
            return EvalResult(loss=total_loss / n, accuracy=correct / n, samples=n)

    def _sgd_step(self, grads: tuple[Tensor, ...]) -> None:
        # The update rule of torch.optim.SGD (no dampening, no Nesterov), written out because
        # constructing a torch.optim optimiser imports torch._dynamo, about two seconds on a
        # small device.
        with torch.no_grad():
            steps = [
                g.add(p, alpha=self._weight_decay) if self._weight_decay else g
                for p, g in zip(self._params, grads, strict=True)
            ]
            if self._momentum:
                if self._velocity is None:
                    self._velocity = [s.clone() for s in steps]
                else:
                    for v, s in zip(self._velocity, steps, strict=True):
                        v.mul_(self._momentum).add_(s)
                steps = self._velocity
            for p, s in zip(self._params, steps, strict=True):
                p.add_(s, alpha=-self._lr)


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
