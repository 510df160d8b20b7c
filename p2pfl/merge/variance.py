"""Variance-corrected averaging (Tian et al., "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems", ALGORITHMS.md §1.2).

Theory of operation. Averaging ``k`` uncorrelated models divides each weight tensor's variance
by about ``k``, undoing Xavier initialisation. After the merge, every weight tensor ``ℓ`` of
the result ``y`` is rescaled around its own scalar mean to a target variance::

    y_ℓ ← (y_ℓ − μ(y_ℓ)) · c + μ(y_ℓ),   c = sqrt((σ*²_ℓ + ε) / (Var(y_ℓ) + ε))

with the population variance (divide by N) and the target

* ``others``: the mean of the received models' variances (the Python "VC" preset),
* ``self``: the own model's variance *before* averaging,
* ``mix`` (``follow_beta``): ``β · Var(own) + (1 − β) · mean Var(received)``.

``y`` is by default step 1 of §1.2, ``β · own + (1 − β) · mean(received)``; with ``base`` it
is the output of any other registered rule, so a robust rule's output can be corrected too.

Reference quirks: DFL2 (C++) computes the ``self`` and ``follow_beta`` targets on the already
averaged output, which makes ``self`` (its default!) a no-op; the textbook (and the Python
port) use the own model before averaging, as here. The Python port divides by N − 1 and adds
ε = 1e-4; here the variance is the population one and ε defaults to 0 (the textbook), with
``eps=1e-4`` to match the port.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from p2pfl.checks import check_number
from p2pfl.errors import ConfigError
from p2pfl.merge._common import Inputs, gather, mean64, result
from p2pfl.merge.base import MergeContext, MergeRule, make_merge_rule, register_merge_rule
from p2pfl.params import ParamLayout

TARGETS = ("others", "self", "mix")


def corrected_spans(
    layout: ParamLayout | None, size: int, *, include_bias: bool = False
) -> list[slice]:
    """The slices of the flat vector that variance correction rescales.

    With a layout: every tensor with ``ndim >= 2`` (weights and kernels), plus, with
    ``include_bias``, the 1-D tensors (biases, norm scales); tensors with a single element
    are always skipped. Without a layout: the whole vector, as one tensor.

    Raises:
        ValueError: the layout does not describe a vector of ``size`` elements.
    """
    if layout is None:
        return [slice(0, size)] if size > 1 else []
    if layout.size != size:
        raise ValueError(f"layout describes {layout.size} elements, the vectors have {size}")
    return [
        slot.span
        for slot in layout.slots
        if slot.numel > 1 and (layout.is_weight(slot) or include_bias)
    ]


def _population_variance(segment: torch.Tensor) -> float:
    values = segment.to(torch.float64)
    return float(values.var(unbiased=False)) if values.numel() > 1 else 0.0


def rescale(segment: torch.Tensor, target: float, *, eps: float = 0.0) -> torch.Tensor:
    """``segment`` rescaled around its mean to variance ``target`` (computed in float64).

    Returns the segment unchanged (a float64 copy) when its variance and ``eps`` are both 0:
    a constant tensor has no spread to scale.
    """
    values = segment.to(torch.float64)
    mean = values.mean()
    variance = float(values.var(unbiased=False))
    if variance + eps <= 0.0:
        return values
    factor = math.sqrt((target + eps) / (variance + eps))
    return (values - mean) * factor + mean


def variance_correct(
    merged: torch.Tensor,
    targets: list[float],
    spans: list[slice],
    *,
    eps: float = 0.0,
) -> torch.Tensor:
    """A copy of the flat ``merged`` with each span rescaled to its target variance.

    Applying it twice with the same targets gives the same result (up to rounding): after the
    first pass every span already has its target variance.
    """
    out = merged.reshape(-1).clone()
    for span, target in zip(spans, targets, strict=True):
        out[span] = rescale(out[span], target, eps=eps).to(out.dtype)
    return out


class VarianceCorrected:
    """Variance-corrected averaging; see the module docstring for the formulas.

    Args:
        beta: own-model weight β in [0, 1] of the default averaging step and of the ``mix``
            target (default 0.5, as DFL2 and ``ConservativeModelAverager(0.5)``).
        target: ``"others"`` (default), ``"self"`` or ``"mix"``.
        eps: ε >= 0 added to both variances (default 0, textbook; 1e-4 matches the Python port).
        include_bias: also correct 1-D tensors (default False: weights with ``ndim >= 2``
            only, as the C++ simulator); single-element tensors are never corrected.
        base: name of a registered rule whose output is corrected instead of the β-mix.
        base_params: keyword parameters of ``base``.

    When nothing finite was received the result is a copy of the own vector. Targets use the
    finite inputs only; when the own vector is not finite, ``self`` and ``mix`` fall back to
    ``others`` and the default step to the mean of the received rows.

    Raises:
        ConfigError: a parameter is out of range, ``base`` is not registered, or
            ``base_params`` are not accepted by it.
    """

    name: str = "variance_corrected"

    def __init__(
        self,
        *,
        beta: float = 0.5,
        target: str = "others",
        eps: float = 0.0,
        include_bias: bool = False,
        base: str | None = None,
        base_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.beta = check_number("merge.beta", beta, minimum=0, maximum=1.0)
        if target not in TARGETS:
            raise ConfigError("merge.target", target, f"one of {', '.join(TARGETS)}")
        self.target = target
        self.eps = check_number("merge.eps", eps, minimum=0)
        if not isinstance(include_bias, bool):
            raise ConfigError("merge.include_bias", include_bias, "true or false")
        self.include_bias = include_bias
        if base_params is not None and not isinstance(base_params, Mapping):
            raise ConfigError("merge.base_params", base_params, "a table of rule parameters")
        if base is None and base_params:
            raise ConfigError("merge.base_params", dict(base_params), "only together with base")
        self.base: MergeRule | None = None
        if base is not None:
            self.base = make_merge_rule(base, key="merge.base", **dict(base_params or {}))

    def _average(self, inputs: Inputs) -> torch.Tensor:
        mean = mean64(inputs.others)
        if not inputs.own_ok:
            return mean
        return self.beta * inputs.own.to(torch.float64) + (1.0 - self.beta) * mean

    def targets(self, inputs: Inputs, spans: list[slice]) -> list[float]:
        """The target variance σ*² of each span, from the finite inputs."""
        found = []
        for span in spans:
            others = sum(_population_variance(row[span]) for row in inputs.others)
            others /= len(inputs.others)
            if self.target == "others" or not inputs.own_ok:
                found.append(others)
                continue
            own = _population_variance(inputs.own[span])
            found.append(
                own if self.target == "self" else self.beta * own + (1 - self.beta) * others
            )
        return found

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Merge (β-mix or ``base``), then correct each tensor's variance.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]``, ``weights`` is not ``[k]``,
                or ``ctx.layout`` does not match the vector size; whatever ``base`` raises.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        spans = corrected_spans(ctx.layout, inputs.own.numel(), include_bias=self.include_bias)
        if self.base is not None:
            merged = self.base(own, received, weights, ctx).reshape(-1)
        else:
            merged = self._average(inputs)
        corrected = variance_correct(merged, self.targets(inputs, spans), spans, eps=self.eps)
        # Rescaling finite inputs near the dtype's largest value can step past it (the target
        # variance may exceed the merged one); saturate so a finite own vector stays finite.
        limit = torch.finfo(own.dtype).max if own.dtype.is_floating_point else None
        if limit is not None:
            corrected = corrected.clamp(-limit, limit)
        return result(corrected, own)


register_merge_rule("variance_corrected")(VarianceCorrected)
