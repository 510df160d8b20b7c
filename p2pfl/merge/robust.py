"""Byzantine-robust merge rules (ALGORITHMS.md §6), applied per node over own + received.

In every rule ``n`` counts the finite inputs *including the own vector* (n = own + neighbours)
and ``f`` is the number of Byzantine inputs tolerated. Like the averaging rules they leave out
rows holding a NaN or an infinity (the own vector too), never write to their inputs, and
return a new tensor of the own vector's shape and dtype. When no finite row was received the
result is a copy of the own vector (there is nothing to merge). When the finite inputs are too
few for the rule's resilience condition (``n > 2f + 2`` for Krum, ``n > 2b`` for the trimmed
mean, ``n >= 2f + 1`` for NNA) the rule raises :class:`~p2pfl.errors.InsufficientInputs`
naming the parameter and ``n``, and the protocol keeps the own model for that round (and
counts it): silently weakening the guarantee (as epfml's trimmed mean does by lowering ``b``)
would hide a misconfigured deployment. The ``weights`` (sample counts) are not used:
a Byzantine sender could inflate them.

Where a reference implementation differs from the textbook rule, the textbook rule is
implemented and the difference is noted in the class docstring.
"""

from __future__ import annotations

import torch

from p2pfl.checks import check_int, check_number
from p2pfl.errors import ConfigError, InsufficientInputs
from p2pfl.merge._common import (
    Inputs,
    canonical_order,
    gather,
    gram_matrix,
    mean64,
    pairwise_squared_distances,
    reference,
    result,
    row_norms,
    squared_distances,
)
from p2pfl.merge.base import MergeContext, register_merge_rule
from p2pfl.merge.kernels import coordinate_median, trimmed_mean


class CoordinateMedian:
    """Coordinate-wise median of the finite inputs (own included).

    For an even count, the mean of the two middle values (as epfml's ``CM``). Promises: order
    invariance, identity on equal inputs, and, while fewer than half of the inputs are
    Byzantine, each coordinate lies within the range of the honest inputs' coordinates.
    Computed with the cache-blocked sorting network of :mod:`p2pfl.merge.kernels`.
    """

    name: str = "median"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Median per coordinate.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        return result(coordinate_median(inputs.rows), own)


class TrimmedMean:
    """Coordinate-wise trimmed mean TM(b): drop the ``b`` largest and ``b`` smallest values of
    each coordinate, average the ``n − 2b`` left.

    Args:
        f: Byzantine inputs tolerated (default 1); ``b`` defaults to ``f``.
        b: values trimmed at each end; overrides ``f``.

    Requires ``n > 2b``; otherwise a ``ValueError`` names ``b`` and ``n`` (textbook; epfml
    instead lowers ``b`` until ``n − 2b > 0``). Promises: order invariance, identity on equal
    inputs, and, while ``f <= b`` inputs are Byzantine, each coordinate within the honest range.

    Raises:
        ConfigError: ``f`` or ``b`` is not an integer ``>= 0``.
    """

    name: str = "trimmed_mean"

    def __init__(self, *, f: int = 1, b: int | None = None) -> None:
        self.f = check_int("merge.f", f, 0)
        self.b = self.f if b is None else check_int("merge.b", b, 0)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Trimmed mean per coordinate.

        Raises:
            ValueError: bad shapes.
            InsufficientInputs: ``n <= 2b`` finite inputs (the protocol then keeps the own model).
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        if inputs.n <= 2 * self.b:
            raise InsufficientInputs(
                f"trimmed_mean needs n > 2b inputs (own included), got b={self.b} and n={inputs.n}"
            )
        return result(trimmed_mean(inputs.rows, self.b), own)


def _krum_scores(inputs: Inputs, f: int, rule: str) -> torch.Tensor:
    """Krum scores: the sum of the ``n − f − 2`` smallest squared distances to other inputs.

    Raises:
        InsufficientInputs: ``n <= 2f + 2``.
    """
    n = inputs.n
    if n <= 2 * f + 2:
        raise InsufficientInputs(
            f"{rule} needs n > 2f + 2 inputs (own included), got f={f} and n={n}"
        )
    distances = pairwise_squared_distances(inputs.stack())
    distances.fill_diagonal_(float("inf"))
    nearest = torch.sort(distances, dim=1).values[:, : n - f - 2]
    return nearest.sum(dim=1)


class Krum:
    """Krum (Blanchard et al.): the input whose ``n − f − 2`` nearest other inputs are closest.

    ``score(i) = Σ_{j ∈ N_{n−f−2}(i)} ‖x_i − x_j‖²`` with *squared* distances; the output is a
    copy of the lowest-scoring input. Each distance is summed from its own coordinate
    differences in float64, so the choice is exact up to rounding whatever the scale of any
    input (a Byzantine sender picks the scale of its row; distances derived from a Gram
    matrix lose the small ones to cancellation next to a large row). Quirk not reproduced:
    epfml's ``aggregator.py`` squares the already-squared distances, ranking by sums of 4th
    powers. Exact score ties go to the
    own vector, then to the lexicographically smaller row, so the choice is order invariant.
    Requires ``n > 2f + 2`` (raises ``InsufficientInputs`` naming ``f`` and ``n`` otherwise).

    Args:
        f: Byzantine inputs tolerated (default 1).

    Raises:
        ConfigError: ``f`` is not an integer ``>= 0``.
    """

    name: str = "krum"

    def __init__(self, *, f: int = 1) -> None:
        self.f = check_int("merge.f", f, 0)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Pick one input.

        Raises:
            ValueError: bad shapes.
            InsufficientInputs: ``n <= 2f + 2`` finite inputs (the protocol then keeps the own model).
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        scores = _krum_scores(inputs, self.f, self.name)
        best = canonical_order(scores, inputs.rows, own_first=inputs.own_ok)[0]
        return result(inputs.rows[best], own, copy=True)


class MultiKrum:
    """Multi-Krum: the mean of the ``m`` inputs with the lowest Krum scores.

    Args:
        f: Byzantine inputs tolerated (default 1).
        m: inputs averaged (default ``n − f``; capped at ``n``); ``m = 1`` is Krum.

    Quirks not reproduced: epfml returns the *sum* of the selected inputs and ranks by 4th
    powers (see :class:`Krum`); this averages and uses squared distances.

    Raises:
        ConfigError: ``f`` is not an integer ``>= 0`` or ``m`` not an integer ``>= 1``.
    """

    name: str = "multi_krum"

    def __init__(self, *, f: int = 1, m: int | None = None) -> None:
        self.f = check_int("merge.f", f, 0)
        self.m = None if m is None else check_int("merge.m", m, 1)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Average the best-scoring inputs.

        Raises:
            ValueError: bad shapes.
            InsufficientInputs: ``n <= 2f + 2`` finite inputs (the protocol then keeps the own model).
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        scores = _krum_scores(inputs, self.f, self.name)
        m = inputs.n - self.f if self.m is None else min(self.m, inputs.n)
        chosen = canonical_order(scores, inputs.rows, own_first=inputs.own_ok)[:m]
        return result(mean64([inputs.rows[i] for i in chosen]), own)


class GeometricMedian:
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al.).

    ``β_i = (1/n) / max(ν, ‖z − x_i‖)``, ``z ← Σ β_i x_i / Σ β_i``, ``iterations`` times,
    started from the own vector (both reference codes start from 0; the own vector is the
    better start). If the own vector is not finite, the start is the coordinate-wise median.
    Promises: order invariance, identity on equal inputs, output in the convex hull of the
    inputs; breakdown point 1/2.

    Args:
        nu: smoothing ν > 0 (default 0.1).
        iterations: Weiszfeld steps T >= 1 (default 8, epfml's "rfa8"; LPD uses 3).

    Raises:
        ConfigError: ``nu`` not > 0 or ``iterations`` not an integer >= 1.
    """

    name: str = "geometric_median"

    def __init__(self, *, nu: float = 0.1, iterations: int = 8) -> None:
        self.nu = check_number("merge.nu", nu, minimum=0, open_min=True)
        self.iterations = check_int("merge.iterations", iterations, 1)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Run the Weiszfeld iterations.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        stack = inputs.stack()
        start = reference(inputs)
        # z = Σ s_i x_i stays a convex combination of the inputs, so its distances follow
        # from the Gram matrix: ‖x_i − z‖² = G_ii − 2 (G s)_i + sᵀ G s, and only the final
        # z touches the P-long vectors again.
        gram = gram_matrix(stack, start)
        diagonal = torch.diagonal(gram)
        if inputs.own_ok:
            shares = torch.zeros(inputs.n, dtype=torch.float64)
            shares[0] = 1.0
            distances = diagonal.clamp(min=0.0).sqrt()
        else:
            distances = _distances(stack, start)  # the start is not among the inputs
        for _ in range(self.iterations):
            betas = 1.0 / distances.clamp(min=self.nu)
            shares = betas / betas.sum()
            pulled = gram @ shares
            squared = diagonal - 2.0 * pulled + torch.dot(shares, pulled)
            distances = squared.clamp(min=0.0).sqrt()
        z = shares.to(stack.dtype) @ stack
        return result(z, own, copy=True)


def _distances(
    stack: torch.Tensor, centre: torch.Tensor, diffs: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n]`` float64 norms ``‖x_i − centre‖`` (``diffs = stack − centre`` if already at
    hand); when a float32 difference overflows, all are redone in float64."""
    if diffs is None:
        diffs = stack - centre
    distances = row_norms(diffs)
    if not bool(torch.isfinite(distances).all()):
        distances = squared_distances(tuple(stack.unbind(0)), centre).sqrt()
    return distances


class CenteredClipping:
    """Centered clipping (Karimireddy et al.).

    ``v_{l+1} = v_l + (1/n) Σ_i clip(x_i − v_l, τ)``, ``clip(u, τ) = u · min(1, τ/‖u‖)``, for
    ``iterations`` steps. ``v_0`` is the own vector (``start="own"``) or the rule's previous
    output kept in ``ctx.state`` (``start="previous"``, the momentum form of the paper; the
    own vector on the first call). If the own vector is not finite, ``v_0`` falls back to the
    coordinate-wise median. Promises: order invariance, identity on equal inputs, and
    ``‖output − v_0‖ <= iterations · τ``.

    Args:
        tau: clipping radius τ > 0 (default 1.0, epfml; LPD uses 2 on MNIST).
        iterations: L >= 1 (default 1, epfml; LPD uses 3).
        start: ``"own"`` or ``"previous"``.

    Raises:
        ConfigError: a parameter is out of range.
    """

    name: str = "centered_clipping"
    STATE_KEY = "centered_clipping.previous"

    def __init__(self, *, tau: float = 1.0, iterations: int = 1, start: str = "own") -> None:
        self.tau = check_number("merge.tau", tau, minimum=0, open_min=True)
        self.iterations = check_int("merge.iterations", iterations, 1)
        if start not in ("own", "previous"):
            raise ConfigError("merge.start", start, "one of own, previous")
        self.start = start

    def _start(self, inputs: Inputs, ctx: MergeContext) -> torch.Tensor:
        if self.start == "previous":
            previous = ctx.state.get(self.STATE_KEY)
            if (
                isinstance(previous, torch.Tensor)
                and previous.shape == inputs.own.shape
                and bool(torch.isfinite(previous).all())
            ):
                return previous.to(inputs.own.dtype)
        return reference(inputs)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Clip around ``v`` and step.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        stack = inputs.stack()
        v = self._start(inputs, ctx)
        for _ in range(self.iterations):
            diffs = stack - v
            norms = _distances(stack, v, diffs)
            factors = torch.where(
                norms > self.tau, self.tau / norms.clamp(min=1e-300), torch.ones_like(norms)
            )
            v = v + (factors / inputs.n).to(stack.dtype) @ diffs
        merged = result(v, own, copy=True)
        if self.start == "previous":
            ctx.state[self.STATE_KEY] = merged.reshape(-1).clone()
        return merged


class NearestNeighbourAveraging:
    """NNA, the MoNNA mixing step (Farhadkhani et al.; LPD ``cva.py``): the mean of the
    ``n − f`` inputs closest to the own vector, the own vector included.

    Exact distance ties go to the lexicographically smaller row (order invariance). If the
    own vector is not finite, distances are taken to the coordinate-wise median instead.
    Requires ``n >= 2f + 1`` as the reference code checks (raises ``InsufficientInputs``
    naming ``f`` and ``n``). Promises: order invariance, identity on equal inputs.

    Args:
        f: Byzantine inputs tolerated (default 1).

    Raises:
        ConfigError: ``f`` is not an integer ``>= 0``.
    """

    name: str = "nna"

    def __init__(self, *, f: int = 1) -> None:
        self.f = check_int("merge.f", f, 0)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Average the nearest inputs.

        Raises:
            ValueError: bad shapes.
            InsufficientInputs: ``n < 2f + 1`` finite inputs (the protocol then keeps the own model).
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        n = inputs.n
        if n < 2 * self.f + 1:
            raise InsufficientInputs(
                f"nna needs n >= 2f + 1 inputs (own included), got f={self.f} and n={n}"
            )
        distances = squared_distances(inputs.rows, reference(inputs))
        chosen = canonical_order(distances, inputs.rows, own_first=inputs.own_ok)[: n - self.f]
        return result(mean64([inputs.rows[i] for i in chosen]), own)


register_merge_rule("median")(CoordinateMedian)
register_merge_rule("trimmed_mean")(TrimmedMean)
register_merge_rule("krum")(Krum)
register_merge_rule("multi_krum")(MultiKrum)
register_merge_rule("geometric_median")(GeometricMedian)
register_merge_rule("centered_clipping")(CenteredClipping)
register_merge_rule("nna")(NearestNeighbourAveraging)
