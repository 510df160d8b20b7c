"""The merge-rule interface and its registry.

A merge rule maps the node's own flat vector and the vectors it received to a new vector::

    rule(own: Tensor[P], received: Tensor[k, P], weights: Tensor[k], ctx: MergeContext) -> Tensor[P]

``weights`` are non-negative per-input weights chosen by the protocol (the senders' sample
counts by default); ``ctx.own_weight`` is the own model's. Rules never mutate their inputs,
work on float32 CPU tensors of any P, and exclude non-finite inputs rather than propagate them.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.params import ParamLayout

Probe = Callable[[torch.Tensor], torch.Tensor]
"""Per-class recall ``[C]`` of a flat vector on the node's local held-out data."""


@dataclass(frozen=True, slots=True)
class MergeContext:
    """What a rule may know beyond the vectors themselves.

    Attributes:
        senders: who sent each received row, in row order.
        rounds: the round (dsgd) or age (gossip) of each received row.
        own_round: the round the own vector was trained in.
        own_weight: the own vector's weight (its sample count by default).
        layout: where each named tensor lives in the flat vector, if the driver knows it.
        state: the node's private, persistent state for rules that keep history.
        degree: the node's own number of neighbours.
        peer_degrees: each sender's declared number of neighbours (0 = unknown).
        total_rounds: the number of rounds the node will run (schedules such as BALANCE's).
        probe: per-class recall on local held-out data, where the node has such data.
    """

    senders: tuple[NodeId, ...] = ()
    rounds: tuple[int, ...] = ()
    own_round: int = 0
    own_weight: float = 1.0
    layout: ParamLayout | None = None
    state: MutableMapping[str, Any] = field(default_factory=dict)
    degree: int = 0
    peer_degrees: tuple[int, ...] = ()
    total_rounds: int = 0
    probe: Probe | None = None


class MergeRule(Protocol):
    """A named aggregation rule; see the module docstring for the contract."""

    name: str

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor: ...


@runtime_checkable
class HistoryHook(Protocol):
    """What a merge rule implements to learn from histories of *distant* nodes (SybilWall).

    A protocol core that finds this hook on its rule (:func:`history_hook`) gossips signed
    histories (:mod:`p2pfl.protocol.histories`) and tells the rule what it learns through
    these two calls; the rule keeps it in ``state``, the node's private state that its merges
    get as ``ctx.state``. The core never reads or writes that state itself.
    """

    def learn_history(
        self,
        state: MutableMapping[str, Any],
        origin: NodeId,
        round: int,
        distance: int,
        history: torch.Tensor,
    ) -> None:
        """A distant node's history, its signature checked: ``origin`` is ``distance`` >= 2
        hops away and published ``history`` (its accumulated update, ``[P]`` float32, the
        caller's copy) in ``round``. Must not raise on a peer's data (drop it instead)."""
        ...

    def forget_history(self, state: MutableMapping[str, Any], origin: NodeId) -> None:
        """The core evicted ``origin``'s history (its table is bounded): forget it too."""
        ...


def history_hook(rule: object) -> HistoryHook | None:
    """The :class:`HistoryHook` of ``rule``, or of the rule it wraps (``rule.base``, as
    variance correction wraps a base rule), or None if neither learns from histories."""
    for _ in range(8):  # a wrapper chain is short; the bound guards against a cycle
        if rule is None:
            return None
        if isinstance(rule, HistoryHook):
            return rule
        rule = getattr(rule, "base", None)
    return None


def as_rows(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a rule's inputs against the contract; ``(own [P], received [k, P])`` as views.

    ``received`` may be ``[k, P]`` or ``[k, *own.shape]``; the rows come back in own's dtype
    (a view when it already is).

    Raises:
        ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
    """
    own_flat = own.reshape(-1)
    size = own_flat.numel()
    if received.ndim < 1 or tuple(received.shape[1:]) not in ((size,), tuple(own.shape)):
        raise ValueError(
            f"received has shape {tuple(received.shape)}, expected [k, {size}] for own "
            f"shape {tuple(own.shape)}"
        )
    k = received.shape[0]
    if tuple(weights.shape) != (k,):
        raise ValueError(f"weights have shape {tuple(weights.shape)}, expected ({k},)")
    return own_flat, received.reshape(k, size).to(dtype=own.dtype)


MergeRuleFactory = Callable[..., MergeRule]
MERGE_RULES: dict[str, MergeRuleFactory] = {}


def register_merge_rule(name: str) -> Callable[[MergeRuleFactory], MergeRuleFactory]:
    """Class or function decorator adding a rule factory to the registry under ``name``."""

    def add(factory: MergeRuleFactory) -> MergeRuleFactory:
        if name in MERGE_RULES:
            raise ValueError(f"merge rule {name!r} is already registered")
        MERGE_RULES[name] = factory
        return factory

    return add


def make_merge_rule(name: str, *, key: str = "merge.rule", **params: Any) -> MergeRule:
    """Build a registered rule by name.

    Raises:
        ConfigError: unknown name, or parameters the rule does not take.
    """
    factory = MERGE_RULES.get(name)
    if factory is None:
        raise ConfigError(key, name, f"one of {', '.join(sorted(MERGE_RULES))}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(key, params, f"parameters accepted by {name!r}: {exc}") from exc
