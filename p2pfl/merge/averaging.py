"""Averaging merge rules: the plain mean and the sample-weighted mean.

Both treat the own vector as one more input next to the ``k`` received rows. Rows holding a
NaN or an infinity are left out (the own vector too, if it is the non-finite one); if nothing
finite remains the result is a copy of the own vector. The result has the own vector's shape
and dtype and is always a new tensor; the inputs are never written to.
"""

from __future__ import annotations

import torch

from p2pfl.merge.base import MergeContext, register_merge_rule
from p2pfl.numerics import all_finite, finite_rows


def _finite_inputs(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, *, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
    """Check shapes and pick the usable inputs.

    Returns ``(own_flat, rows, own_ok, keep)``: the own vector flattened, the finite received
    rows (flattened, in the own dtype), whether the own vector is finite, and the boolean row
    mask that selected ``rows``. With ``weighted``, rows with a negative or non-finite weight
    are left out too.

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
    rows = received.reshape(k, size).to(dtype=own.dtype)
    if tuple(weights.shape) != (k,):
        raise ValueError(f"weights have shape {tuple(weights.shape)}, expected ({k},)")
    keep = finite_rows(rows)
    if weighted:
        keep = keep & torch.isfinite(weights) & (weights >= 0)
    if not bool(keep.all()):
        rows = rows[keep]
    own_ok = all_finite(own_flat)
    return own_flat, rows, own_ok, keep


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
        own_flat, rows, own_ok, _ = _finite_inputs(own, received, weights, weighted=False)
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
        own_flat, rows, own_ok, keep = _finite_inputs(own, received, weights, weighted=True)
        row_weights = weights.to(torch.float64)[keep]
        own_weight = float(ctx.own_weight)
        if not own_ok or not (own_weight >= 0.0 and own_weight != float("inf")):
            own_weight = 0.0
        total = own_weight + float(row_weights.sum())
        if total <= 0.0 or total == float("inf"):
            merged = _plain_mean(own_flat, rows, own_ok)
            if merged is None:
                return own.clone()
            return merged.reshape(own.shape).to(dtype=own.dtype)
        shares = (row_weights / total).to(dtype=own.dtype)
        merged = shares @ rows if rows.shape[0] else torch.zeros_like(own_flat)
        if own_weight > 0.0:
            merged = merged + own_flat * (own_weight / total)
        return merged.reshape(own.shape).to(dtype=own.dtype)


register_merge_rule("mean")(Mean)
register_merge_rule("weighted")(WeightedMean)
