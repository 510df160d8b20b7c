"""Calling the merge rule: stacking buffered updates into its inputs and checking its output."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from p2pfl.errors import InsufficientInputs, LocalProtocolError
from p2pfl.merge.base import MergeContext, MergeRule, Probe
from p2pfl.numerics import all_finite
from p2pfl.params import ParamLayout
from p2pfl.protocol.messages import ModelUpdate

# Field readers in C: a merge reads five fields of every update, and map() over these needs
# no Python frame per update (a generator expression does).
_VECTOR = operator.attrgetter("vector")
_SENDER = operator.attrgetter("sender")
_ROUND = operator.attrgetter("round")
_DEGREE = operator.attrgetter("degree")
_SAMPLES = operator.attrgetter("samples")

FiniteMerge = Callable[[torch.Tensor, torch.Tensor, list[float], float], torch.Tensor | None]
"""A rule's entry for checked inputs (:meth:`p2pfl.merge.averaging.WeightedMean.merge_finite`):
``(own [P], rows [k, P], weights, own_weight)``, all finite and of one dtype, to the merged
vector, or None to leave the decision to the rule's general call."""


class Merger:
    """One node's merge rule, own weight, parameter layout and the rule's private state."""

    __slots__ = (
        "_finite",
        "degree",
        "fallbacks",
        "layout",
        "own_weight",
        "probe",
        "rule",
        "state",
        "total_rounds",
    )

    def __init__(
        self,
        rule: MergeRule,
        *,
        own_weight: float,
        layout: ParamLayout | None,
        degree: int = 0,
        total_rounds: int = 0,
        probe: Probe | None = None,
    ) -> None:
        self.rule = rule
        self.own_weight = own_weight
        self.layout = layout
        self.degree = degree
        self.total_rounds = total_rounds
        self.probe = probe
        self.state: dict[str, Any] = {}
        self.fallbacks = 0
        """Merges skipped because the rule had too few inputs (own model kept)."""
        self._finite = _finite_entry(rule)
        """The rule's entry for finite inputs, which reads nothing of the MergeContext but
        the own weight, or None: every merge goes through the rule's general call."""

    def merge(
        self,
        own: torch.Tensor,
        updates: Sequence[ModelUpdate],
        *,
        own_round: int,
        weights: Sequence[float] | None = None,
        own_weight: float | None = None,
    ) -> torch.Tensor:
        """Merge ``own`` with ``updates``; weights are the senders' sample counts unless
        ``weights`` (one per update) and ``own_weight`` are given (time-triggered gossip).

        Raises:
            LocalProtocolError: the rule returned a tensor of another shape than ``own``.
        """
        if weights is None and own_weight is None and updates and self._finite is not None:
            merged = self._merge_finite(self._finite, own, updates)
            if merged is not None:
                return merged
        if updates:
            received = torch.stack(list(map(_VECTOR, updates)))
        else:
            received = own.new_empty((0, *own.shape))
        if weights is None:
            row_weights = torch.from_numpy(_sample_weights(updates))
        else:
            row_weights = torch.tensor(weights, dtype=torch.float32)
        context = MergeContext(
            senders=tuple(map(_SENDER, updates)),
            rounds=tuple(map(_ROUND, updates)),
            own_round=own_round,
            own_weight=self.own_weight if own_weight is None else own_weight,
            layout=self.layout,
            state=self.state,
            degree=self.degree,
            peer_degrees=tuple(map(_DEGREE, updates)),
            total_rounds=self.total_rounds,
            probe=self.probe,
        )
        try:
            merged = self.rule(own, received, row_weights, context)
        except InsufficientInputs:
            # Too few inputs for the rule's guarantee: keeping the own model is the one
            # choice no Byzantine input can influence.
            self.fallbacks += 1
            return own.clone()
        if merged.shape != own.shape:
            raise LocalProtocolError(
                f"merge rule {self.rule.name!r} returned shape {list(merged.shape)}, "
                f"expected {list(own.shape)}"
            )
        return merged if merged.dtype is torch.float32 else merged.to(torch.float32)

    def _merge_finite(
        self, finite: FiniteMerge, own: torch.Tensor, updates: Sequence[ModelUpdate]
    ) -> torch.Tensor | None:
        """The common merge (float32 vectors of own's shape, all finite, sample-count
        weights) through the rule's ``merge_finite``, with the bits of the general path; None
        when the inputs are anything else, which the general path then handles."""
        if own.dtype is not torch.float32 or own.ndim != 1 or own.requires_grad:
            return None
        rows = torch.stack(list(map(_VECTOR, updates)))
        if rows.dtype is not torch.float32 or rows.requires_grad or rows.shape[1:] != own.shape:
            return None  # the general path converts, or names the defect
        if not (all_finite(rows) and all_finite(own)):
            return None
        weights: list[float] = _sample_weights(updates).tolist()
        return finite(own, rows, weights, self.own_weight)


def _finite_entry(rule: MergeRule) -> FiniteMerge | None:
    """``rule.merge_finite`` if the class that defines it also defines the rule's general call:
    a subclass that changes one of the two gets no entry, so it never goes unheard."""
    cls = type(rule)
    entry_owner = _defined_by(cls, "merge_finite")
    if entry_owner is None or entry_owner is not _defined_by(cls, "__call__"):
        return None
    entry: FiniteMerge = getattr(rule, "merge_finite")  # noqa: B009 (not in MergeRule)
    return entry


def _defined_by(cls: type, name: str) -> type | None:
    return next((base for base in cls.__mro__ if name in vars(base)), None)


def _sample_weights(updates: Sequence[ModelUpdate]) -> np.ndarray:
    """The senders' sample counts as Python floats rounded once to float32, as
    ``torch.tensor(..., dtype=float32)`` does, without building a tensor from a list (a third
    of a small model's merge)."""
    return np.array(list(map(float, map(_SAMPLES, updates))), dtype=np.float32)
