"""Own-centred robust rules for decentralised learning (ALGORITHMS.md §6, "Decentralised /
gossip rules"): ClippedGossip and BALANCE.

Both use the node's own vector as the reference the neighbours are judged against. Input
handling is that of :mod:`p2pfl.merge.robust`: non-finite rows are left out, inputs are never
written to, the result is new, and a node that received no finite row keeps (a copy of) its
own vector. If the own vector itself is not finite, the reference becomes the coordinate-wise
median of the finite received rows. The ``weights`` (sample counts) are not used.
"""

from __future__ import annotations

import math

import torch

from p2pfl.checks import check_number
from p2pfl.merge._common import gather, mean64, reference, result, row_norms
from p2pfl.merge.base import MergeContext, register_merge_rule


def _diffs(
    others: tuple[torch.Tensor, ...], centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_j − centre`` per row and their float64 norms; the differences are taken in float64
    if the float32 ones would overflow."""
    stack = torch.stack(others)
    diffs = stack - centre
    norms = row_norms(diffs)
    if not bool(torch.isfinite(norms).all()):
        diffs = stack.to(torch.float64) - centre.to(torch.float64)
        norms = row_norms(diffs)
    return diffs, norms


def metropolis_hastings_weights(
    ctx: MergeContext, received: tuple[int, ...], k: int
) -> torch.Tensor:
    """Metropolis–Hastings weights ``W_ij = 1 / (1 + max(deg_i, deg_j))`` of the rows
    ``received`` (indices among the ``k`` received rows).

    ``deg_i`` is ``ctx.degree``, raised to at least ``len(received)`` (the rows used this
    time) so that ``Σ_j W_ij < 1`` even when the degree is unknown (0) or a neighbour sent
    twice; ``deg_j`` is the sender's declared degree from ``ctx.peer_degrees``, with 0 or a
    missing entry meaning unknown, replaced by ``deg_i``. ``W_ii = 1 − Σ_j W_ij`` is implicit.
    """
    own_degree = max(ctx.degree, len(received))
    known = len(ctx.peer_degrees) == k
    weights = []
    for index in received:
        peer = ctx.peer_degrees[index] if known else 0
        if peer <= 0:
            peer = own_degree
        weights.append(1.0 / (1.0 + max(own_degree, peer)))
    return torch.tensor(weights, dtype=torch.float64)


class ClippedGossip:
    """ClippedGossip / self-centred clipping (He, Karimireddy, Jaggi; epfml
    ``SelfCenteredClipping``).

    ``x_i ← Σ_j W_ij (x_i + clip(x_j − x_i, τ)) = x_i + Σ_{j≠i} W_ij · clip(x_j − x_i, τ)``
    with Metropolis–Hastings weights (see :func:`metropolis_hastings_weights`; ``W_ii`` takes
    the weight of left-out rows). Without ``tau``, τ is adaptive as in the reference code:
    the second-largest neighbour distance ``‖x_j − x_i‖``, so only the farthest neighbour is
    clipped (with a single neighbour, its own distance: nothing is clipped).

    Promises: order invariance (with ``peer_degrees`` permuted alongside), identity on equal
    inputs, and ``‖output − x_i‖ <= Σ_j W_ij · τ < τ``.

    Args:
        tau: fixed clipping radius τ > 0, or ``None`` for the adaptive rule.

    Raises:
        ConfigError: ``tau`` is given and not a finite number > 0.
    """

    name: str = "clipped_gossip"

    def __init__(self, *, tau: float | None = None) -> None:
        self.tau = None if tau is None else check_number("merge.tau", tau, minimum=0, open_min=True)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """One self-centred clipped gossip step.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        centre = reference(inputs)
        diffs, norms = _diffs(inputs.others, centre)
        if self.tau is not None:
            tau = self.tau
        else:
            ordered = torch.sort(norms, descending=True).values
            tau = float(ordered[1] if ordered.numel() > 1 else ordered[0])
        factors = torch.where(norms > tau, tau / norms.clamp(min=1e-300), torch.ones_like(norms))
        mixing = metropolis_hastings_weights(ctx, inputs.received, received.shape[0])
        step = (mixing * factors).to(diffs.dtype) @ diffs
        return result(centre + step, own, copy=True)


class Balance:
    """BALANCE (Fang et al., CCS 2024), as in the third-party nebula ``Balance``.

    Accept ``w_j`` if ``‖w_i − w_j‖ <= γ · exp(−κ · λ) · ‖w_i‖`` with ``λ = t/T``,
    ``t = ctx.own_round`` and ``T = ctx.total_rounds`` (``λ = t`` when ``T`` is 0, i.e.
    unknown); then ``w_i ← α · w_i + (1 − α) · mean(accepted)``, keeping ``w_i`` if nothing
    is accepted.

    Defaults: ``gamma=0.3, kappa=1, alpha=0.5``. γ = 0.3 is the paper's default as recalled
    in ALGORITHMS.md, *not verified* against the paper; third-party codes use γ = 0.7
    (nebula) and 2.0 (murmura). It is the strictest of the three: pass ``gamma`` explicitly
    where neighbours legitimately drift further apart (non-IID data, early rounds).

    Promises: order invariance, identity on equal inputs, and every accepted input lies in
    the ball of radius ``γ·exp(−κλ)·‖w_i‖`` around ``w_i``, so the output does too.

    Raises:
        ConfigError: ``gamma`` or ``kappa`` negative or not finite, ``alpha`` outside [0, 1].
    """

    name: str = "balance"

    def __init__(self, *, gamma: float = 0.3, kappa: float = 1.0, alpha: float = 0.5) -> None:
        self.gamma = check_number("merge.gamma", gamma, minimum=0)
        self.kappa = check_number("merge.kappa", kappa, minimum=0)
        self.alpha = check_number("merge.alpha", alpha, minimum=0, maximum=1.0)

    def radius(self, reference_norm: float, ctx: MergeContext) -> float:
        """The acceptance radius ``γ · exp(−κ · t/T) · ‖w_i‖`` at this round."""
        t = max(ctx.own_round, 0)
        progress = t / ctx.total_rounds if ctx.total_rounds > 0 else float(t)
        return self.gamma * math.exp(-self.kappa * progress) * reference_norm

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Filter the neighbours by distance and mix the accepted ones in.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
        """
        inputs = gather(own, received, weights)
        if not inputs.others:
            return own.clone()
        centre = reference(inputs)
        _, norms = _diffs(inputs.others, centre)
        centre_norm = float(torch.linalg.vector_norm(centre, dtype=torch.float64))
        radius = self.radius(centre_norm, ctx)
        accepted = [
            row for row, norm in zip(inputs.others, norms.tolist(), strict=True) if norm <= radius
        ]
        if not accepted:
            return result(centre, own, copy=True)
        merged = self.alpha * centre.to(torch.float64) + (1.0 - self.alpha) * mean64(accepted)
        return result(merged, own)


register_merge_rule("clipped_gossip")(ClippedGossip)
register_merge_rule("balance")(Balance)
