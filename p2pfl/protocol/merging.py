"""Calling the merge rule: stacking buffered updates into its inputs and checking its output."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from p2pfl.errors import InsufficientInputs, LocalProtocolError
from p2pfl.merge.base import MergeContext, MergeRule, Probe
from p2pfl.params import ParamLayout
from p2pfl.protocol.messages import ModelUpdate

# Field readers in C: a merge reads five fields of every update, and map() over these needs
# no Python frame per update (a generator expression does).
_VECTOR = operator.attrgetter("vector")
_SENDER = operator.attrgetter("sender")
_ROUND = operator.attrgetter("round")
_DEGREE = operator.attrgetter("degree")
_SAMPLES = operator.attrgetter("samples")


class Merger:
    """One node's merge rule, own weight, parameter layout and the rule's private state."""

    __slots__ = (
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
        if updates:
            received = torch.stack(list(map(_VECTOR, updates)))
        else:
            received = own.new_empty((0, *own.shape))
        if weights is None:
            # Python floats rounded once to float32, as torch.tensor(..., dtype=float32) does,
            # without building a tensor from a list (a third of a small model's merge).
            row_weights = torch.from_numpy(
                np.array(list(map(float, map(_SAMPLES, updates))), dtype=np.float32)
            )
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
