"""Averaging merge rules: the plain mean, the sample-weighted mean and the age-weighted mean.

Both treat the own vector as one more input next to the ``k`` received rows. Rows holding a
NaN or an infinity are left out (the own vector too, if it is the non-finite one); if nothing
finite remains the result is a copy of the own vector. The result has the own vector's shape
and dtype and is always a new tensor; the inputs are never written to.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from p2pfl.errors import ConfigError
from p2pfl.merge.base import MergeContext, as_rows, register_merge_rule
from p2pfl.numerics import _numpy_view, all_finite, finite_rows


def _finite_inputs(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check shapes and pick the usable inputs.

    Returns ``(own_flat, rows, own_ok)``: the own vector flattened, the finite received rows
    (flattened, in the own dtype) and whether the own vector is finite.

    Raises:
        ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
    """
    own_flat, rows = as_rows(own, received, weights)
    keep = finite_rows(rows)
    if not bool(keep.all()):
        rows = rows[keep]
    return own_flat, rows, all_finite(own_flat)


_EXACT_SUM = 2.0**53
"""Below this, a sum of non-negative integers in float64 is exact in any order."""


def _sum(weights: list[float]) -> float:
    """The float64 sum of non-negative ``weights``, equal to ``torch.sum`` of them: in Python
    when they are integers (exact in any order), else by torch (whose order may differ)."""
    total = sum(weights)
    if total < _EXACT_SUM and all(weight.is_integer() for weight in weights):
        return total
    return float(torch.tensor(weights, dtype=torch.float64).sum())


def _plain_mean(own_flat: torch.Tensor, rows: torch.Tensor, own_ok: bool) -> torch.Tensor | None:
    count = rows.shape[0] + int(own_ok)
    if count == 0:
        return None
    total = rows.sum(dim=0, dtype=torch.float64)  # float64: no overflow near float32's max
    if own_ok:
        total = total + own_flat.to(torch.float64)
    return total / count


class Mean:
    """The plain mean of the own vector and the received rows (the own vector counts once)."""

    name: str = "mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Average the finite inputs; the values of ``weights`` and ``ctx`` are not used.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        own_flat, rows, own_ok = _finite_inputs(own, received, weights)
        merged = _plain_mean(own_flat, rows, own_ok)
        if merged is None:
            return own.clone()
        return merged.reshape(own.shape).to(dtype=own.dtype)


class WeightedMean:
    """Sample-weighted mean: ``(w_own·own + Σ w_i·x_i) / (w_own + Σ w_i)``.

    ``w_own`` is ``ctx.own_weight``. Rows whose weight is negative or non-finite are left
    out like non-finite rows. If the remaining weights sum to zero it falls back to the
    plain mean of the finite inputs.
    """

    name: str = "weighted"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Weighted average of the finite inputs.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        own_flat, rows = as_rows(own, received, weights)
        # The weights are a handful of numbers: checking and summing them as Python floats
        # (exact: float32 and float64 values are Python floats) saves a dozen tiny tensor ops
        # per merge, which is most of a merge's time for small models.
        row_finite = _finite_flags(rows)
        listed = weights.tolist()
        keep = [ok and _usable(weight) for ok, weight in zip(row_finite, listed, strict=True)]
        if all(keep):
            kept = listed
        else:
            rows = rows[torch.tensor(keep, dtype=torch.bool)]
            kept = [weight for weight, ok in zip(listed, keep, strict=True) if ok]
        own_ok = all_finite(own_flat)
        own_weight = float(ctx.own_weight)
        if not own_ok or not _usable(own_weight):
            own_weight = 0.0
        merged = _weighted(own_flat, rows, kept, own_weight)
        if merged is None:
            merged = _plain_mean(own_flat, rows, own_ok)
            if merged is None:
                return own.clone()
            return merged.reshape(own.shape).to(dtype=own.dtype)
        # Skipping the no-op reshape and cast of a flat vector saves two tensor calls a merge.
        if merged.shape != own.shape:
            merged = merged.reshape(own.shape)
        return merged if merged.dtype == own.dtype else merged.to(dtype=own.dtype)

    def merge_finite(
        self, own: torch.Tensor, rows: torch.Tensor, weights: list[float], own_weight: float
    ) -> torch.Tensor | None:
        """What ``self(own, rows, torch.tensor(weights, dtype=own.dtype), ctx)`` returns with
        ``ctx.own_weight = own_weight``, bit for bit, for inputs a caller has checked: ``own``
        ``[P]`` and ``rows`` ``[k, P]``, both of one floating dtype and entirely finite, and
        ``weights`` Python floats exactly representable in that dtype. It skips the checks and
        the context a merge of a node's own received models does not need
        (:class:`~p2pfl.protocol.merging.Merger` takes this path for sample-count weights).

        Returns:
            The merged ``[P]`` vector (a new tensor), or None when the general path must
            decide: a weight is negative, or the weights sum to zero or overflow.
        """
        if not (all(map(_usable, weights)) and _usable(own_weight)):
            return None
        return _weighted(own, rows, weights, own_weight)


def _usable(weight: float) -> bool:
    """Whether a weight takes part in a weighted mean: finite and not negative (NaN is not)."""
    return weight >= 0.0 and weight != float("inf")


def _weighted(
    own_flat: torch.Tensor, rows: torch.Tensor, weights: list[float], own_weight: float
) -> torch.Tensor | None:
    """``(own_weight·own + Σ w_i·row_i) / total`` for finite inputs and non-negative finite
    weights (one per row), in the dtype of ``rows``; None if ``total`` is 0 or overflows."""
    total = own_weight + _sum(weights)
    if total <= 0.0 or total == float("inf"):
        return None
    # Each share divided in float64 and rounded to the own dtype, as a tensor op would.
    shares = _shares([weight / total for weight in weights], own_flat.dtype)
    merged = shares @ rows if rows.shape[0] else torch.zeros_like(own_flat)
    if own_weight > 0.0:
        _add_scaled(merged, own_flat, own_weight / total)
    return merged


def _add_scaled(merged: torch.Tensor, vector: torch.Tensor, scale: float) -> None:
    """``merged += vector * scale`` in place (``merged`` is a new tensor), with the bits of
    torch's ``merged + vector * scale``: in numpy for float32 and float64, where a product and
    a sum are one IEEE rounding each and torch rounds the scale to the tensor's dtype first,
    as ``dtype.type(scale)`` does; the numpy calls cost a fraction of torch's two."""
    if merged.dtype in _IEEE_NUMPY and not (merged.requires_grad or vector.requires_grad):
        out = merged.numpy()
        out += vector.numpy() * out.dtype.type(scale)
    else:
        merged.add_(vector * scale)


_IEEE_NUMPY = (torch.float32, torch.float64)


def _finite_flags(rows: torch.Tensor) -> list[bool]:
    """Whether each row of ``[k, P]`` ``rows`` is entirely finite, as Python booleans."""
    view = _numpy_view(rows) if rows.shape[0] else None
    if view is not None:
        # One numpy pass (torch.isfinite is not vectorised on CPU), no tensor round trip.
        flags: list[bool] = np.isfinite(view).all(axis=1).tolist()
        return flags
    listed: list[bool] = finite_rows(rows).tolist()
    return listed


def _shares(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float64) rounded once to ``dtype``, as ``torch.tensor(values,
    dtype=float64).to(dtype)`` does: through numpy for float32 and float64, whose one IEEE
    rounding is the same as torch's and costs a fraction of building a tensor from a list."""
    if dtype is torch.float32:
        return torch.from_numpy(np.array(values, dtype=np.float32))
    if dtype is torch.float64:
        return torch.from_numpy(np.array(values, dtype=np.float64))
    return torch.tensor(values, dtype=torch.float64).to(dtype=dtype)


class AgeWeightedMean:
    """Age-weighted mean for gossip learning: older (more trained) models count more.

    The age of a received row is ``ctx.rounds[j]``, the own vector's ``ctx.own_round``
    (negative ages count as 0). Each input weighs ``age + offset``::

        y = ((a_s + c)·x_s + Σ_j (a_j + c)·x_j) / ((a_s + c) + Σ_j (a_j + c)),  c = offset

    so with the default ``offset=1`` a fresh model (age 0) still counts, and equal ages give
    the plain mean. Only the ratios matter: weighting by ``(a_j + c)/(a_s + c)`` relative to
    the own age is the same rule. The sample-count ``weights`` are not used. Missing ages
    (``ctx.rounds`` empty) count as the own age. Non-finite rows are left out as in
    :class:`WeightedMean`, to which the weighted average is delegated (including its
    fallback to the plain mean when all weights are 0).

    Args:
        offset: ``c >= 0`` added to every age (default 1.0).

    Raises:
        ConfigError: ``offset`` is negative or not finite.
    """

    name: str = "age_weighted"

    def __init__(self, *, offset: float = 1.0) -> None:
        if (
            isinstance(offset, bool)
            or not isinstance(offset, int | float)
            or not math.isfinite(offset)
            or offset < 0
        ):
            raise ConfigError("merge.offset", offset, "a finite number >= 0")
        self.offset = float(offset)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Age-weighted average of the finite inputs.

        Raises:
            ValueError: bad shapes, or ``ctx.rounds`` is neither empty nor one age per row.
        """
        k = received.shape[0] if received.ndim >= 1 else 0
        ages = ctx.rounds if ctx.rounds else (ctx.own_round,) * k
        if len(ages) != k:
            raise ValueError(f"ctx.rounds has {len(ages)} ages for {k} received rows")
        age_weights = torch.tensor([max(age, 0) + self.offset for age in ages], dtype=torch.float64)
        own_weight = max(ctx.own_round, 0) + self.offset
        aged = dataclasses.replace(ctx, own_weight=own_weight)
        return WeightedMean()(own, received, age_weights, aged)


register_merge_rule("mean")(Mean)
register_merge_rule("weighted")(WeightedMean)
register_merge_rule("age_weighted")(AgeWeightedMean)
