"""The optimisers of every p2pfl learner: SGD (momentum, Nesterov, weight decay), Adam, AdamW,
and SAM over SGD.

One implementation serves the one-by-one :class:`~p2pfl.learn.TorchLearner` of a node and the
simulator's :class:`~p2pfl.learn.batched.BatchedLearner`: it updates *rows* of flat parameter
vectors, ``[R, P]`` tensors where R is 1 for a node and B for B simulated nodes trained at
once. The rules are torch.optim's (``SGD`` with ``dampening = 0``, ``Adam``, ``AdamW``, all
single-tensor, not ``amsgrad``), written as tensor operations for two reasons:

* constructing a ``torch.optim`` optimiser imports ``torch._dynamo``, about two seconds on a
  small device, paid by every ``p2pfl node`` start;
* the simulator needs a per-row learning rate and Adam step count (nodes in different rounds
  train together), which torch.optim's scalar arguments cannot express.

The per-row scalars are applied with the operations torch.optim applies its scalars with
(``addcmul`` where it calls ``add_(..., alpha=)``, ``addcdiv`` with the step size folded into
the numerator), which round alike on CPU, so a row updated here equals torch.optim's update
bit for bit when given the same gradient (tests/learn/test_optim.py checks it).

State: SGD with momentum keeps a ``momentum_buffer``; Adam and AdamW keep ``exp_avg``,
``exp_avg_sq`` and a step count. A buffer starts at zeros, which gives torch's first step
exactly (its momentum buffer starts as a copy of the gradient: ``0 * m + g == g``).

Learning-rate schedules are keyed on the protocol round (0-based, as ``StartTraining``
carries it): ``constant``; ``step`` (``lr * lr_gamma ** (round // lr_step_size)``);
``cosine`` (``lr_min + (lr - lr_min) * (1 + cos(pi * round / total_rounds)) / 2``, the
formula of torch's ``CosineAnnealingLR`` with one "epoch" per round and ``T_max`` the run's
rounds; rounds past the end keep ``lr_min``).

SAM (sharpness-aware minimisation, the local optimiser of DFedSAM; Foret et al., Shi et al.)
takes two gradients per step: ``g = grad F(x)``, then ``g' = grad F(x + rho * g / ||g||)`` on
the same minibatch (``||g||`` the norm of the node's whole flat gradient), and updates ``x``
with SGD's rule (momentum, Nesterov, weight decay as for ``sgd``) applied to ``g'``.
:func:`step_gradient` is that two-gradient wrapper around any learner's gradient function, so
the one-by-one and batched learners share it; the reported loss is the one at ``x``.

After a merge: ``optimizer_state = "keep"`` carries the state into the next training whatever
vector it starts from (local SGD with momentum as usually simulated). ``"reset"`` drops it at
the start of a training whenever the starting vector is not bit-identical to the vector that
node's previous training returned, that is whenever anything (a merge, a received model) changed
the model between two trainings; a node whose model was left alone keeps its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from p2pfl.checks import check_int, check_number
from p2pfl.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "sam")
DEFAULT_RHO = 0.05
"""SAM's ascent radius when none is given (DFedSAM's range is about 0.01-0.05)."""
SAM_NORM_EPS = 1e-12
"""Added to ``||g||`` in SAM's ascent step so that a zero gradient gives a zero step."""
LR_SCHEDULES = ("constant", "step", "cosine")
STATE_POLICIES = ("keep", "reset")


@dataclass(frozen=True, slots=True)
class Range:
    """The allowed values of a finite number setting (``open_min`` / ``open_max`` exclude the
    bound itself)."""

    minimum: float | None = None
    maximum: float | None = None
    open_min: bool = False
    open_max: bool = False

    def check(self, key: str, value: object) -> float:
        """``value`` as a float if it is in range.

        Raises:
            ConfigError: it is not (:func:`p2pfl.checks.check_number`'s wording).
        """
        return check_number(
            key,
            value,
            minimum=self.minimum,
            maximum=self.maximum,
            open_min=self.open_min,
            open_max=self.open_max,
        )


RANGES: dict[str, Range] = {
    "lr": Range(0, open_min=True),
    "momentum": Range(0, 1, open_max=True),
    "weight_decay": Range(0),
    "betas": Range(0, 1, open_max=True),
    "eps": Range(0, open_min=True),
    "lr_gamma": Range(0, open_min=True),
    "lr_min": Range(0),
    "rho": Range(0, open_min=True),
}
"""The optimiser's number settings by ``[learner]`` key (``betas``: each of the two), written
once: :class:`OptimizerSettings` checks them and the ``[learner]`` schema
(:class:`p2pfl.learn.settings.LearnerSettings`) declares them."""


SGD_RULES = ("sgd", "sam")
"""Optimisers whose update is SGD's (``sam`` is SGD at another gradient): momentum and
Nesterov apply to them only."""


def momentum_refusal(optimizer: str, momentum: float) -> str | None:
    """What is allowed if ``momentum`` does not go with ``optimizer``, else None (the one
    wording of the rule, for :class:`OptimizerSettings` and the ``[learner]`` schema)."""
    if momentum and optimizer not in SGD_RULES:
        return "0 unless optimizer is 'sgd' or 'sam' (adam and adamw have betas)"
    return None


def nesterov_refusal(optimizer: str, momentum: float, nesterov: bool) -> str | None:
    """What is allowed if ``nesterov`` does not go with ``optimizer`` and ``momentum``, else
    None (as :func:`momentum_refusal`)."""
    if nesterov and (optimizer not in SGD_RULES or not momentum):
        return "true only with optimizer 'sgd' or 'sam' and momentum > 0"
    return None


@dataclass(frozen=True, slots=True)
class OptimizerSettings:
    """An optimiser, its hyper-parameters and its learning-rate schedule.

    Built from the ``[learner]`` keys by
    :meth:`p2pfl.learn.settings.LearnerSettings.optimizer_settings`; the defaults are plain
    SGD at ``lr = 0.1``.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    lr_step_size: int = 1
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    total_rounds: int = 1
    state_policy: str = "keep"
    rho: float = DEFAULT_RHO
    """SAM: the radius of the ascent step (``optimizer = "sam"`` only)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("optimizer", self.name, f"one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", self.lr_schedule, f"one of {', '.join(LR_SCHEDULES)}")
        if self.state_policy not in STATE_POLICIES:
            raise ConfigError(
                "optimizer_state", self.state_policy, f"one of {', '.join(STATE_POLICIES)}"
            )
        for key, bounds in RANGES.items():
            if key != "betas":  # two numbers, checked one by one below
                bounds.check(key, getattr(self, key))
        for index, beta in enumerate(self.betas):
            RANGES["betas"].check(f"betas[{index}]", beta)
        if len(self.betas) != 2:
            raise ConfigError("betas", list(self.betas), "two numbers in [0, 1)")
        refusal = momentum_refusal(self.name, self.momentum)
        if refusal is not None:
            raise ConfigError("momentum", self.momentum, refusal)
        refusal = nesterov_refusal(self.name, self.momentum, self.nesterov)
        if refusal is not None:
            raise ConfigError("nesterov", self.nesterov, refusal)
        check_int("lr_step_size", self.lr_step_size, 1)
        check_int("rounds", self.total_rounds, 1)

    @property
    def sgd_rule(self) -> bool:
        """Whether the update is SGD's (``sgd``, and ``sam``, which is SGD at another gradient)."""
        return self.name in SGD_RULES

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors this optimiser keeps (none for plain SGD)."""
        if self.sgd_rule:
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")

    def lr_at(self, round_: int) -> float:
        """The learning rate of a training started in protocol round ``round_`` (0-based)."""
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** (max(round_, 0) // self.lr_step_size)
        if self.lr_schedule == "cosine":
            t = min(max(round_, 0), self.total_rounds)
            cosine = (1 + math.cos(math.pi * t / self.total_rounds)) / 2
            return self.lr_min + (self.lr - self.lr_min) * cosine
        return self.lr


class OptimizerState:
    """One node's optimiser state over flat ``[P]`` parameter vectors; never sent to peers.

    After a training the state tensors are rows of the ``[R, P]`` tensors the R nodes trained
    together updated (:func:`unstack_states`); :attr:`tensors` makes the per-node views only
    when asked, and the next :func:`stack_states` of the same nodes in the same order takes the
    stacked tensors back as they are instead of copying R rows into new ones.
    """

    __slots__ = ("_row", "_rows", "_tensors", "last_vector", "steps")

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] | None = {}
        self._rows: dict[str, Tensor] | None = None
        self._row = 0
        self.steps = 0
        self.last_vector: Tensor | None = None

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The state tensors by name, ``[P]`` each (replace the dict, not its entries)."""
        if self._tensors is None:
            assert self._rows is not None
            self._tensors = {name: tensor[self._row] for name, tensor in self._rows.items()}
        return self._tensors

    @tensors.setter
    def tensors(self, value: dict[str, Tensor]) -> None:
        self._tensors = value
        self._rows = None

    def begin(self, settings: OptimizerSettings, vector: Tensor) -> None:
        """Apply the ``optimizer_state`` policy before a training that starts from ``vector``."""
        if settings.state_policy == "reset" and not (
            self.last_vector is not None and torch.equal(self.last_vector, vector)
        ):
            self.tensors = {}
            self.steps = 0

    def finish(self, settings: OptimizerSettings, vector: Tensor) -> None:
        """Remember the vector a training returned (what ``"reset"`` compares against); a
        copy, since whoever receives the result may change it in place."""
        self.last_vector = vector.clone() if settings.state_policy == "reset" else None


def begin_states(
    settings: OptimizerSettings, states: Sequence[OptimizerState], vectors: Tensor
) -> None:
    """:meth:`OptimizerState.begin` for each state and its row of ``vectors [R, P]``."""
    _each_row(settings, states, vectors, OptimizerState.begin)


def finish_states(
    settings: OptimizerSettings, states: Sequence[OptimizerState], vectors: Tensor
) -> None:
    """:meth:`OptimizerState.finish` for each state and its row of ``vectors [R, P]``."""
    _each_row(settings, states, vectors, OptimizerState.finish)


def _each_row(
    settings: OptimizerSettings,
    states: Sequence[OptimizerState],
    vectors: Tensor,
    call: Callable[[OptimizerState, OptimizerSettings, Tensor], None],
) -> None:
    # Under "keep" neither call does anything (begin keeps the state, finish leaves
    # last_vector None), so no per-row call is made.
    if settings.state_policy == "keep":
        return
    for state, vector in zip(states, vectors.unbind(), strict=True):
        call(state, settings, vector)


def stack_states(
    settings: OptimizerSettings, states: Sequence[OptimizerState], size: int
) -> dict[str, Tensor]:
    """The state tensors of ``states`` as ``[R, size]`` rows (zeros where a node has none).

    When ``states`` are exactly the rows of one earlier :func:`unstack_states`, in order (the
    same nodes trained together again), those tensors themselves: no copy.
    """
    shared = _shared_rows(states)
    if shared is not None and tuple(shared) == settings.state_names:
        return shared
    stacked: dict[str, Tensor] = {}
    for name in settings.state_names:
        rows = [state.tensors.get(name) for state in states]
        if all(row is None for row in rows):
            stacked[name] = torch.zeros(len(states), size)
        else:
            stacked[name] = torch.stack([torch.zeros(size) if r is None else r for r in rows])
    return stacked


def _shared_rows(states: Sequence[OptimizerState]) -> dict[str, Tensor] | None:
    """The stacked tensors whose rows 0..R-1 are ``states``, if there are such."""
    rows = states[0]._rows if states else None
    if rows is None or any(tensor.shape[0] != len(states) for tensor in rows.values()):
        return None
    for index, state in enumerate(states):
        if state._rows is not rows or state._row != index:
            return None
    return rows


def unstack_states(
    stacked: dict[str, Tensor], states: Sequence[OptimizerState], steps: int
) -> None:
    """Give each node its row of ``stacked`` back and count ``steps`` more optimiser steps."""
    for row, state in enumerate(states):
        state._rows = stacked
        state._row = row
        state._tensors = None
        state.steps += steps


def optimizer_step(
    settings: OptimizerSettings,
    params: Tensor,
    grads: Tensor,
    state: dict[str, Tensor],
    *,
    lrs: Sequence[float],
    step_counts: Sequence[int],
) -> None:
    """Update ``params [R, P]`` in place with ``grads [R, P]``, one optimiser step per row.

    Args:
        settings: the optimiser.
        params: rows of flat parameters, updated in place.
        grads: their gradients (not modified).
        state: the rows' state tensors by name (``[R, P]`` each, from :func:`stack_states`),
            updated in place.
        lrs: each row's learning rate for this step.
        step_counts: each row's step number counting this step (1 for the first step); Adam's
            bias corrections need it.
    """
    rows = params.shape[0]

    def column(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=params.dtype).view(rows, 1)

    with torch.no_grad():
        if settings.sgd_rule:
            update = grads
            if settings.weight_decay:
                update = update.add(params, alpha=settings.weight_decay)
            if settings.momentum:
                buffer = state["momentum_buffer"]
                buffer.mul_(settings.momentum).add_(update)
                if settings.nesterov:
                    update = update.add(buffer, alpha=settings.momentum)
                else:
                    update = buffer
            # torch.optim.SGD: param.add_(update, alpha=-lr); addcmul rounds the same way.
            torch.addcmul(params, update, column([-lr for lr in lrs]), out=params)
            return
        beta1, beta2 = settings.betas
        if settings.name == "adamw":
            params.mul_(column([1 - lr * settings.weight_decay for lr in lrs]))
            gradient = grads
        elif settings.weight_decay:
            gradient = grads.add(params, alpha=settings.weight_decay)
        else:
            gradient = grads
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(gradient, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        step_sizes = [-lr / (1 - beta1**count) for lr, count in zip(lrs, step_counts, strict=True)]
        correction = [(1 - beta2**count) ** 0.5 for count in step_counts]
        denom = (exp_avg_sq.sqrt() / column(correction)).add_(settings.eps)
        # torch.optim.Adam: param.addcdiv_(exp_avg, denom, value=-step_size), which rounds as
        # addcdiv with the step size multiplied into the numerator.
        torch.addcdiv(params, exp_avg * column(step_sizes), denom, out=params)


GradientFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Rows ``[R, P]`` -> (each row's loss, ``[R, P]`` gradients) on the step's fixed minibatch."""


def step_gradient(
    settings: OptimizerSettings, gradient: GradientFn, params: Tensor
) -> tuple[Tensor, Tensor]:
    """The loss at ``params [R, P]`` and the gradient the optimiser steps with.

    For every optimiser but ``sam`` that is ``gradient(params)``. For ``sam`` it is the
    gradient at each row's ascent point ``x + rho * g / (||g|| + SAM_NORM_EPS)``, with ``g`` the
    row's gradient at ``x`` and the norm taken over the row (one node's whole model), so a
    row's step depends on that row alone and B rows batched equal B rows one by one.
    """
    loss, grads = gradient(params)
    if settings.name != "sam":
        return loss, grads
    with torch.no_grad():
        norms = torch.linalg.vector_norm(grads, dim=1, keepdim=True).add_(SAM_NORM_EPS)
        ascent = torch.addcdiv(params, grads, norms, value=settings.rho)
    _, sharp = gradient(ascent)
    return loss, sharp
