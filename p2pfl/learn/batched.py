"""Many nodes' copies of one model trained and evaluated as one vectorised computation.

The simulator defers trainings and runs all pending ones of the same length together (a
training depends only on its inputs at its start). B nodes' parameters are one ``[B, P]``
tensor; ``torch.func.vmap`` runs ``functional_call`` of the node's module over the B rows,
each row on its own minibatch, to ``[B, N, C]`` logits. Every path (this one,
:class:`LinearStack`'s, the one-by-one fallback) trains on one loss,
:func:`p2pfl.learn.functional.loss_and_logit_gradient`: each row's mean cross-entropy and its
gradient with respect to the logits, from which one backward pass gives every row exactly its
own gradient (row b's logits do not depend on any other row). The optimiser
(:mod:`p2pfl.learn.optim`) then updates the B rows at once with each node's own learning rate
(the schedule is keyed on the node's round) and state.

Each node draws its minibatches from its own :class:`~p2pfl.learn.MinibatchSampler` and keeps
its own :class:`~p2pfl.learn.optim.OptimizerState`. A training draws all its steps' indices at
once (the same stream), and when the nodes' data are :class:`Shares` of one pool (as the
simulator holds them), a step's minibatches for all B nodes are one gather of that pool.

A device is one row of this: a node's :class:`~p2pfl.learn.TorchLearner` trains through
:meth:`BatchedLearner.train_rows` with B = 1, so there is one step loop, one gradient choice
and one loss for both. A node and the same node simulated in a group of one agree bit for bit;
in a larger group they agree bit for bit for a Linear/ReLU stack (:class:`LinearStack`) and in
the one-by-one fallback, and to float rounding for other vmapped modules (a vmapped
convolution sums in another order over B rows than over one).

Which modules batch: whatever ``vmap`` can run; tested: Linear, Conv1d, Conv2d, max pooling,
LayerNorm, GroupNorm and elementwise activations. Not: BatchNorm in training
(it updates running statistics in place), Dropout and other random layers (each node would
need its own random stream), and data-dependent Python control flow (``if x.sum() > 0``).
This is detected, not guessed from the layer types: at construction one training step is
run under ``vmap`` on two copies of the model and two examples; if it raises, or changes one
of the module's buffers, training falls back to one node at a time (plain autograd of the
module; each node keeps its own buffers) and :attr:`BatchedLearner.notice`
says why in one line. In that fallback, evaluation uses the model's initial buffers: the
metrics cannot tell which node a vector came from (use GroupNorm or LayerNorm instead of
BatchNorm in simulations).

Memory: a group is trained in chunks of at most :data:`TRAIN_BUDGET` parameters times rows
and :data:`SAMPLE_BUDGET` examples times rows; evaluation in chunks of
:data:`EVAL_BUDGET` (model, example) pairs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from p2pfl.errors import ConfigError
from p2pfl.learn.functional import (
    flat_grads,
    loss_and_logit_gradient,
    row_gradient,
    row_params,
    score_logits,
)
from p2pfl.learn.optim import (
    OptimizerSettings,
    OptimizerState,
    begin_states,
    finish_states,
    optimizer_step,
    stack_states,
    step_gradient,
    unstack_states,
)
from p2pfl.learn.sampling import MinibatchSampler
from p2pfl.learn.spsa import ProbeResult, module_loss, projected_gradients
from p2pfl.params import ParamLayout, flatten, layout_of

TRAIN_BUDGET = 2**26
"""Rows times parameters trained in one chunk (256 MB per float32 ``[rows, P]`` tensor)."""
SAMPLE_BUDGET = 2**15
"""Rows times examples in one chunk of a forward pass."""
EVAL_EXAMPLES = 4096
"""Test examples per evaluation chunk."""
EVAL_BUDGET = 2**15
"""Rows times test examples in one evaluation chunk."""

Dataset = tuple[Tensor, Tensor]


@dataclass(frozen=True, slots=True)
class Shares:
    """Many nodes' training shares as row ranges of one pool of examples.

    Row b's share is ``x[starts[b] : starts[b] + n_b]`` (and the same rows of ``y``), n_b being
    its sampler's ``num_samples``. A step's minibatches for all B rows are then one gather of
    the pool at ``starts[b] + pick_b`` instead of B indexing operations and a stack; the
    examples gathered are the same, so the numbers are too.
    """

    x: Tensor
    """``[N, ...]``: every share's examples."""
    y: Tensor
    """``[N]``: their labels."""
    starts: Tensor
    """``[B]`` int64: where each row's share begins in the pool."""

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def select(self, rows: Sequence[int] | slice) -> Shares:
        """The shares of ``rows`` (indices into :attr:`starts`), over the same pool."""
        if isinstance(rows, slice):
            return Shares(self.x, self.y, self.starts[rows])
        return Shares(self.x, self.y, self.starts[torch.as_tensor(rows, dtype=torch.int64)])

    def gather(self, picks: Tensor) -> Dataset:
        """Each row's examples at its own indices ``picks [B, k]`` -> ``([B, k, ...], [B, k])``."""
        # index_select of the flat index, then a view: the same copy as ``x[index]``, several
        # times faster than advanced indexing with a 2-D index.
        index = (picks + self.starts.unsqueeze(1)).view(-1)
        shape = picks.shape
        x = self.x.index_select(0, index).view(*shape, *self.x.shape[1:])
        return x, self.y.index_select(0, index).view(shape)


def _gather(data: Shares | Sequence[Dataset], picks: Tensor) -> Dataset:
    """Row b's examples at ``picks[b]`` from its share, stacked: ``([B, k, ...], [B, k])``."""
    if isinstance(data, Shares):
        return data.gather(picks)
    rows = list(zip(data, picks, strict=True))
    return torch.stack([x[pick] for (x, _), pick in rows]), torch.stack(
        [y[pick] for (_, y), pick in rows]
    )


class BatchedLearner:
    """Trains and evaluates B copies of one module at once; holds each node's optimiser state."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerSettings,
        sample_shape: Sequence[int],
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """Probe whether ``model`` batches under ``vmap`` (see the module docstring).

        Args:
            model: the module every node trains (its parameters are ignored: rows are given
                to :meth:`train`); the learner keeps it.
            optimizer: the optimiser and schedule of every node.
            sample_shape: one example's shape, for the probe.
            log: called once with a one-line notice if training falls back to one by one.

        Raises:
            ConfigError: the model fails a training step on examples of ``sample_shape``
                even one node at a time.
        """
        self.model = model
        self.layout: ParamLayout = layout_of(model)
        self.optimizer = optimizer
        self._buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        # Evaluation runs on its own copy, always in eval mode, so it never flips the
        # training module's mode: a simulator evaluates in a worker thread while it trains.
        self._eval_model = copy.deepcopy(model).eval()
        self._states: dict[int, OptimizerState] = {}
        self._node_buffers: dict[int, dict[str, Tensor]] = {}
        # A Linear/ReLU stack without buffers is known to batch; anything else is probed.
        self._stack = LinearStack.of(model, self.layout)
        if self._stack is not None:
            self.notice = None
        else:
            # The probe may train a step (dropout draws): building a learner must not move
            # the process's random stream, or a node's later training would differ.
            with torch.random.fork_rng(devices=[]):
                self.notice = self._probe(tuple(sample_shape))
        self.batched = self.notice is None
        if self.notice is not None and log is not None:
            log(self.notice)

    def use_buffers(self, node: int, buffers: dict[str, Tensor]) -> None:
        """Train and probe node ``node`` with ``buffers`` instead of copies of the model's
        initial ones. A node's :class:`~p2pfl.learn.TorchLearner` passes its module's own, so
        the running statistics one-by-one training keeps (BatchNorm) are the module's, which
        the node evaluates with."""
        self._node_buffers[node] = buffers

    def state(self, node: int) -> OptimizerState:
        """Node ``node``'s optimiser state (created empty on first use)."""
        state = self._states.get(node)
        if state is None:
            state = self._states[node] = OptimizerState()
        return state

    def train(
        self,
        nodes: Sequence[int],
        vectors: Tensor,
        datasets: Shares | Sequence[Dataset],
        samplers: Sequence[MinibatchSampler],
        steps: int,
        rounds: Sequence[int],
    ) -> tuple[Tensor, Tensor]:
        """Take ``steps`` optimiser steps for every node at once.

        Args:
            nodes: the nodes trained (keys of their optimiser state).
            vectors: ``[B, P]`` starting parameters (not modified).
            datasets: each node's ``(x [N_b, ...], y [N_b])`` training data, or all of them
                as :class:`Shares` of one pool (one gather per step instead of B).
            samplers: each node's minibatch sampler; all must have the same batch size.
            steps: local steps, the same for all B nodes.
            rounds: each node's protocol round (the learning-rate schedule's key).

        Returns:
            The new ``[B, P]`` parameters and each node's mean loss over the steps ``[B]``.

        Raises:
            ValueError: the samplers disagree on the batch size, or the lists on B.
        """
        count = vectors.shape[0]
        if not len(nodes) == len(datasets) == len(samplers) == len(rounds) == count:
            raise ValueError("one node, dataset, sampler and round per row")
        batch_sizes = {sampler.batch_size for sampler in samplers}
        if len(batch_sizes) > 1:
            raise ValueError(f"one batched call needs one batch size, got {sorted(batch_sizes)}")
        batch = batch_sizes.pop() if batch_sizes else 1
        if not self.batched:
            chunk = 1
        else:
            size = max(self.layout.size, 1)
            chunk = max(1, min(TRAIN_BUDGET // size, SAMPLE_BUDGET // batch))
        params = vectors.detach().clone()
        losses = torch.zeros(count, dtype=torch.float64)
        for start in range(0, count, chunk):
            rows = slice(start, min(start + chunk, count))
            data = datasets.select(rows) if isinstance(datasets, Shares) else datasets[rows]
            losses[rows] = self.train_rows(
                nodes[rows], params[rows], data, samplers[rows], steps, rounds[rows]
            )
        return params, (losses / max(steps, 1)).to(torch.float32)

    def train_rows(
        self,
        nodes: Sequence[int],
        params: Tensor,
        datasets: Shares | Sequence[Dataset],
        samplers: Sequence[MinibatchSampler],
        steps: int,
        rounds: Sequence[int],
    ) -> Tensor:
        """The step loop of every learner: ``steps`` optimiser steps of the rows ``params
        [R, P]``, in place, as one computation.

        :meth:`train` runs it on chunks of its rows; a node's
        :class:`~p2pfl.learn.TorchLearner` runs it on its one row (R = 1), so a device trains
        with the simulator's sampling, gradient, loss and optimiser step. The arguments are
        :meth:`train`'s for these rows (the caller checks their lengths); without
        :attr:`batched`, R must be 1.

        Returns:
            Each row's loss summed over the steps ``[R]`` (float64).
        """
        settings = self.optimizer
        states = [self.state(node) for node in nodes]
        begin_states(settings, states, params)
        stacked = stack_states(settings, states, self.layout.size)
        rates = {round_: settings.lr_at(round_) for round_ in set(rounds)}
        lrs = [rates[round_] for round_ in rounds]
        total = torch.zeros(len(nodes), dtype=torch.float64)
        # Every step's picks of every row at once: [B, steps, batch], the very indices the
        # samplers would give step by step (each node draws from its own sampler only).
        picks = torch.stack([sampler.next_batches(steps) for sampler in samplers])
        self.model.train()
        buffers = None if self.batched else self._buffers_of(nodes[0])
        for step in range(steps):
            x, y = _gather(datasets, picks[:, step])
            if buffers is None:
                gradient = partial(self._vmap_gradient, x=x, y=y)
            else:
                gradient = partial(
                    row_gradient, self.model, self.layout, buffers=buffers, x=x[0], y=y[0]
                )
            loss, grads = step_gradient(settings, gradient, params)
            counts = [state.steps + step + 1 for state in states]
            optimizer_step(settings, params, grads, stacked, lrs=lrs, step_counts=counts)
            total += loss
        unstack_states(stacked, states, steps)
        finish_states(settings, states, params)
        return total

    def probe(
        self,
        node: int,
        vector: Tensor,
        data: Dataset,
        sampler: MinibatchSampler,
        seeds: Sequence[int],
        eps: float,
    ) -> ProbeResult:
        """Node ``node``'s SPSA projections at ``vector``: the very computation a
        :meth:`~p2pfl.learn.TorchLearner.probe` runs (one forward per row, the node's own
        buffers), so the simulator sends the byte a device would."""
        x, y = data

        def batches() -> tuple[Tensor, Tensor]:
            pick = sampler.next_batch()
            return x[pick], y[pick]

        loss = module_loss(self.model, self.layout, self._buffers_of(node))
        return projected_gradients(loss, vector, seeds, eps, batches)

    def _vmap_gradient(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self._stack is not None:
            return self._stack.gradient(params, x, y)
        return _vmapped_gradient(self.model, self.layout, self._buffers, params, x, y)

    def _buffers_of(self, node: int) -> dict[str, Tensor]:
        buffers = self._node_buffers.get(node)
        if buffers is None:
            buffers = {name: b.clone() for name, b in self._buffers.items()}
            self._node_buffers[node] = buffers
        return buffers

    @torch.no_grad()
    def logits(self, vectors: Tensor, x: Tensor) -> Tensor:
        """``vectors [B, P]`` on ``x [N, ...]`` shared by all → logits ``[B, N, C]`` (eval mode).

        Safe to call from another thread while :meth:`train` runs: it reads no state that
        training writes.
        """
        count = vectors.shape[0]
        if not self.batched:
            return torch.stack(
                [
                    torch.cat(
                        [
                            _logits(
                                self._eval_model,
                                _single(self.layout, vectors, b),
                                self._buffers,
                                part,
                            )
                            for part in torch.split(x, EVAL_EXAMPLES)
                        ]
                    )
                    for b in range(count)
                ]
            )
        if self._stack is not None:
            return torch.cat(
                [self._stack.logits(vectors, part) for part in torch.split(x, EVAL_EXAMPLES)], dim=1
            )
        from torch.func import vmap

        forward = vmap(_logits, in_dims=(None, 0, None, None))
        parts = []
        rows = self.evaluation_rows(len(x))
        for start in range(0, count, rows):
            params = row_params(self.layout, vectors[start : start + rows])
            parts.append(
                torch.cat(
                    [
                        forward(self._eval_model, params, self._buffers, x[i : i + EVAL_EXAMPLES])
                        for i in range(0, len(x), EVAL_EXAMPLES)
                    ],
                    dim=1,
                )
            )
        return torch.cat(parts)

    @staticmethod
    def evaluation_rows(examples: int) -> int:
        """Rows :meth:`evaluate` scores together on a test set of ``examples``: evaluating a
        slice of rows that starts at a multiple of it scores every row in the same company,
        so with the same bits as the whole."""
        return max(1, EVAL_BUDGET // max(min(examples, EVAL_EXAMPLES), 1))

    @torch.no_grad()
    def evaluate(self, vectors: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy of every row on one shared test set, as a node
        computes its own (:func:`p2pfl.learn.functional.score_logits`).

        Returns:
            ``(loss [B], accuracy [B])`` as float64 tensors.
        """
        losses = []
        accuracies = []
        rows = self.evaluation_rows(len(x))
        for start in range(0, vectors.shape[0], rows):
            loss, accuracy = score_logits(self.logits(vectors[start : start + rows], x), y)
            losses.append(loss)
            accuracies.append(accuracy)
        return torch.cat(losses), torch.cat(accuracies)

    def _probe(self, sample_shape: tuple[int, ...]) -> str | None:
        """None if one vmapped training step works; else the one-line reason it does not."""
        name = type(self.model).__name__
        probe = copy.deepcopy(self.model)
        before = {key: b.clone() for key, b in probe.named_buffers()}
        buffers = {key: b.clone() for key, b in before.items()}
        rows = flatten(probe).unsqueeze(0).repeat(2, 1)
        x = torch.zeros(2, 2, *sample_shape)
        y = torch.zeros(2, 2, dtype=torch.int64)
        probe.train()
        try:
            _vmapped_gradient(probe, self.layout, buffers, rows, x, y)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            self._check_runs(sample_shape)
            return (
                f"model {name} does not batch under vmap ({_first_line(exc)}); "
                "training one node at a time"
            )
        changed = [key for key, b in buffers.items() if not torch.equal(b, before[key])]
        if changed:
            return (
                f"model {name} updates buffers in training ({', '.join(changed)}); "
                "training one node at a time"
            )
        return None

    def _check_runs(self, sample_shape: tuple[int, ...]) -> None:
        """Raise ConfigError if the model fails one plain (unbatched) training step too."""
        probe = copy.deepcopy(self.model)
        buffers = {key: b.clone() for key, b in probe.named_buffers()}
        row = flatten(probe).unsqueeze(0)
        x = torch.zeros(2, *sample_shape)
        try:
            row_gradient(probe, self.layout, row, buffers, x, torch.zeros(2, dtype=torch.int64))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ConfigError(
                "model",
                type(self.model).__name__,
                f"a module mapping [N, {', '.join(map(str, sample_shape))}] inputs to logits "
                f"({_first_line(exc)})",
            ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LinearStack:
    """The fast path for a ``Sequential`` of ``Linear`` and ``ReLU`` layers (the ``mlp``).

    ``vmap`` of such a model computes, per layer, a batched matrix product plus the bias; this
    class writes the same products as one ``baddbmm`` per layer on ``[B, out, in]`` views of
    the rows, without ``functional_call`` and ``vmap``'s per-call bookkeeping, which dominates
    for the small groups of small models the simulator trains (about 1.5 ms a step). The
    numbers are the same bit for bit (tests/learn/test_batched.py checks both paths
    against each other), so this is purely a speed choice.
    """

    def __init__(self, plan: list[tuple[slice, slice, int, int] | None]) -> None:
        self.plan = plan

    @classmethod
    def of(cls, model: nn.Module, layout: ParamLayout) -> LinearStack | None:
        """The fast path for ``model``, or None if it is not a plain Linear/ReLU stack."""
        if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
            return None
        slots = {slot.name: slot for slot in layout.slots}
        plan: list[tuple[slice, slice, int, int] | None] = []
        for name, layer in model.named_children():
            if isinstance(layer, nn.ReLU) and not layer.inplace:
                plan.append(None)
            elif isinstance(layer, nn.Linear) and layer.bias is not None:
                weight, bias = slots.get(f"{name}.weight"), slots.get(f"{name}.bias")
                if weight is None or bias is None:
                    return None
                plan.append((weight.span, bias.span, *layer.weight.shape))
            else:
                return None
        return cls(plan) if plan and plan[-1] is not None else None

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """``params [B, P]``, ``x [B, N, D]`` (or ``[N, D]`` shared by all) → ``[B, N, C]``."""
        count = params.shape[0]
        hidden = x if x.ndim == 3 else x.unsqueeze(0).expand(count, -1, -1)
        for step in self.plan:
            if step is None:
                hidden = torch.relu(hidden)
                continue
            weight, bias, fan_out, fan_in = step
            matrix = params[:, weight].view(count, fan_out, fan_in)
            hidden = torch.baddbmm(params[:, bias].unsqueeze(1), hidden, matrix.transpose(1, 2))
        return hidden

    def gradient(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's mean loss ``[B]`` (float64) and gradient ``[B, P]`` on its minibatch.

        The layers' backward pass is written out: the very operations autograd runs for the
        forward of :meth:`logits` (``bmm`` of the saved input and the incoming gradient for a
        weight, its sum over the examples for a bias, ``bmm`` with the weight to go down a
        layer, ``threshold_backward`` through a ReLU), on tensors of the same layout, so the
        gradient is the same bit for bit; autograd only differentiates the loss. What it
        saves: autograd differentiated each of the row's parameter slices into a zero-filled
        ``[B, P]`` tensor and summed the four or more of them; here each slice's gradient is
        written into its place once. (That sum added zeros, which would turn a -0.0 into
        +0.0; no entry is -0.0 here: a matrix product and a sum start from +0.0, the loss's
        gradient is a difference, ``threshold_backward`` writes +0.0.) The loss and its
        gradient come from :func:`p2pfl.learn.functional.loss_and_logit_gradient`.
        """
        count = params.shape[0]
        inputs: list[Tensor] = []
        activations: list[Tensor] = []
        hidden = x
        for step in self.plan:
            if step is None:
                hidden = torch.relu(hidden)
                activations.append(hidden)
                continue
            weight, bias, fan_out, fan_in = step
            inputs.append(hidden)
            matrix = params[:, weight].view(count, fan_out, fan_in)
            hidden = torch.baddbmm(params[:, bias].unsqueeze(1), hidden, matrix.transpose(1, 2))
        per_row, incoming = loss_and_logit_gradient(hidden, y)
        grad = torch.empty_like(params)
        for step in reversed(self.plan):
            if step is None:
                incoming = torch.ops.aten.threshold_backward(incoming, activations.pop(), 0)
                continue
            weight, bias, fan_out, fan_in = step
            below = inputs.pop()
            grad[:, bias].copy_(incoming.sum(1))
            weight_grad = below.transpose(1, 2).bmm(incoming).transpose(1, 2)
            grad[:, weight].view(count, fan_out, fan_in).copy_(weight_grad)
            if inputs:  # the model's input needs no gradient
                incoming = incoming.bmm(params[:, weight].view(count, fan_out, fan_in))
        return per_row.detach().to(torch.float64), grad


def _vmapped_gradient(
    model: nn.Module,
    layout: ParamLayout,
    buffers: dict[str, Tensor],
    params: Tensor,
    x: Tensor,
    y: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each row's mean loss ``[B]`` (float64) and gradient ``[B, P]`` on its minibatch, for a
    module that batches under ``vmap`` (training mode, ``buffers`` left unchanged).

    As in :meth:`LinearStack.gradient`, the loss and its gradient with respect to the logits
    are :func:`~p2pfl.learn.functional.loss_and_logit_gradient`'s, and the layers' backward
    starts from there, here by autograd through the vmapped forward. That gives the bits of
    autograd through ``vmap`` of the whole loss (``F.cross_entropy`` included, whose batching
    rule runs as several Python decompositions a step).
    """
    from torch.func import vmap

    leaves = row_params(layout, params, leaves=True)
    with torch.enable_grad():
        logits = vmap(_logits, in_dims=(None, 0, None, 0))(model, leaves, buffers, x)
        per_row, incoming = loss_and_logit_gradient(logits.detach(), y)
        # Row b's logits depend on row b's parameters only, so each row's gradient is node
        # b's own.
        grads = torch.autograd.grad(
            logits,
            list(leaves.values()),
            grad_outputs=incoming,
            allow_unused=True,
            materialize_grads=True,
        )
    return per_row, flat_grads(layout, dict(zip(leaves, grads, strict=True)), params.shape[0])


def _single(layout: ParamLayout, vectors: Tensor, row: int) -> dict[str, Tensor]:
    return {name: t[0] for name, t in row_params(layout, vectors[row : row + 1]).items()}


def _logits(
    model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
) -> Tensor:
    from torch.func import functional_call

    return functional_call(model, (params, buffers), (x,))  # type: ignore[no-any-return]
