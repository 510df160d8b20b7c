"""Sybil-aware merge rules: FoolsGold and SybilWall, with SybilWall's two median variants.

Theory of operation
-------------------
A Sybil attacker runs many identities that all push the same poisoned update. FoolsGold
(Fung et al., 2018) notices that honest peers' *accumulated updates* point in different
directions while Sybils' point in the same one, and down-weights every sender whose history
is too similar to another's. SybilWall (Werthenbach & Pouwelse, 2023) runs the same
similarity test in a decentralised network and widens it with the histories of *distant*
nodes, learnt by gossip, so that Sybils spread over several neighbours are still compared
with each other.

Bookkeeping. Each node keeps a :class:`HistoryTable` in ``ctx.state[STATE_KEY]``:

* ``direct[p]``: for every sender ``p`` it has merged, the accumulated update
  ``H_p = Σ_r (m_p^r − m_p^{r−1})`` and the last model received from ``p``. The first model
  received from ``p`` has no predecessor; with ``baseline="zero"`` (the default) it only
  becomes the baseline and ``H_p`` starts at zero, with ``baseline="own"`` it counts as the
  update ``m_p − own`` (the own model at that time). Rows older than the recorded round
  (``ctx.rounds``) do not change the history.
* ``distant[o]``: histories of nodes ``o`` learnt by gossip, with the round and the hop
  distance; the SybilWall variants implement :class:`~p2pfl.merge.base.HistoryHook`, through
  which the protocol's history gossip hands them over (:func:`record_distant_history`).
  Gossip never overwrites a direct record.

**Deviation from the reference code** (ALGORITHMS.md §2.1): the reference stores the first
received model itself as the history and then adds deltas, so its history telescopes to the
latest model and similarity is computed on raw parameters (all near 1 when initialisations
are shared). p2pfl uses FoolsGold's accumulated updates without the initial model.

Weights (:func:`similarity_weights`, FoolsGold steps 1–5): pairwise cosine similarity of the
histories, pardoning, ``α_i = 1 − max_j cs_ij`` rescaled to a maximum of 1, then the logit
``κ·(ln(α/(1−α)) + 0.5)`` clipped to [0, 1].

* ``foolsgold`` compares only the histories of this call's senders.
* ``sybilwall`` compares all k + h histories it knows (this call's senders first, then the
  other direct and the distant ones), then keeps only the weights of this call's k senders
  and normalises them together with the own model's. **Fix of a reference bug:** the
  reference normalises over all k + h weights and pairs the own model with the first distant
  node's weight, which shrinks the model towards zero whenever distant histories exist.

Both append the own model with the trusted weight ``own_trust`` (1 by default, as SybilWall
does); ``own_trust=0`` gives FoolsGold's server form, where only the senders are averaged.
The sample-count ``weights`` argument is not used. Without ``ctx.senders`` nothing can be
tracked: each row's history is then its update relative to the own model in this call alone
and the state is left untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pfl.checks import check_number
from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.merge.base import MergeContext, as_rows, register_merge_rule
from p2pfl.merge.kernels import order_statistics
from p2pfl.numerics import all_finite, finite_rows

STATE_KEY = "sybil.histories"
"""The key of the :class:`HistoryTable` in a node's ``ctx.state``."""

PARDON_EPSILON = 1e-5
"""Added to each row maximum before pardoning, as in FoolsGold."""

DEFAULT_GOSSIP_LAMBDA = 0.8
"""λ of the history-gossip distribution, 1/1.25 in the SybilWall code."""

BASELINES = ("zero", "own")
_CHUNK = 1 << 16  # columns per block in the O(n·P) loops, bounding temporary memory


# --- history bookkeeping --------------------------------------------------------------------


@dataclass(slots=True)
class DirectHistory:
    """A direct neighbour's accumulated update and the last model it sent."""

    history: torch.Tensor
    last_model: torch.Tensor
    round: int


@dataclass(slots=True)
class DistantHistory:
    """A history learnt by gossip: its origin's round and its hop distance from this node."""

    history: torch.Tensor
    round: int
    distance: int


@dataclass(slots=True)
class HistoryTable:
    """All histories a node knows, by origin; lives in ``ctx.state[STATE_KEY]``."""

    direct: dict[NodeId, DirectHistory] = field(default_factory=dict)
    distant: dict[NodeId, DistantHistory] = field(default_factory=dict)


def history_table(state: MutableMapping[str, Any]) -> HistoryTable:
    """The node's history table, created empty on first use.

    Raises:
        TypeError: ``state[STATE_KEY]`` holds something else.
    """
    table = state.get(STATE_KEY)
    if table is None:
        table = HistoryTable()
        state[STATE_KEY] = table
    if not isinstance(table, HistoryTable):
        raise TypeError(f"state[{STATE_KEY!r}] is a {type(table).__name__}, not a HistoryTable")
    return table


def record_distant_history(
    state: MutableMapping[str, Any],
    origin: NodeId,
    round: int,
    distance: int,
    history: torch.Tensor,
) -> bool:
    """Store a history received by gossip (ALGORITHMS.md §2.2); call it after the signature check.

    ``distance`` is the hop distance carried in the message, i.e. the relay's own distance to
    ``origin`` (1 when the relay is ``origin``'s neighbour); the record is stored with
    ``distance + 1``. An unknown origin is stored; a known one is replaced only when
    ``round`` is newer. Records of direct neighbours are never overwritten. The caller must
    not pass the node's own id.

    Returns:
        Whether the record was stored. Unusable records (not a 1-D finite vector, negative
        round, distance below 1) are dropped, never raised on, since they came from a peer.

    Raises:
        TypeError: ``state[STATE_KEY]`` holds something other than a :class:`HistoryTable`.
    """
    if history.ndim != 1 or round < 0 or distance < 1 or not all_finite(history):
        return False
    table = history_table(state)
    if origin in table.direct:
        return False
    known = table.distant.get(origin)
    if known is not None and round <= known.round:
        return False
    table.distant[origin] = DistantHistory(
        history.detach().to(dtype=torch.float32).clone(), int(round), int(distance) + 1
    )
    return True


def forget_distant_history(state: MutableMapping[str, Any], origin: NodeId) -> None:
    """Drop a gossiped history (the protocol evicted its record); a no-op if there is none.

    Raises:
        TypeError: ``state[STATE_KEY]`` holds something other than a :class:`HistoryTable`.
    """
    if state.get(STATE_KEY) is not None:
        history_table(state).distant.pop(origin, None)


def history_gossip_weights(
    distances: Sequence[int] | torch.Tensor, lam: float = DEFAULT_GOSSIP_LAMBDA
) -> torch.Tensor:
    """Probabilities of gossiping each history record: ``∝ λ·e^{−λ(d−1)}`` (§2.2).

    Args:
        distances: hop distance of each candidate record (1 = a direct neighbour's).
        lam: the decay λ > 0.

    Returns:
        A float64 ``[n]`` tensor summing to 1 (empty for no records). For d = 1..4 the
        ratios are 1 : 0.449 : 0.202 : 0.091.

    Raises:
        ConfigError: ``lam`` is not a finite positive number.
        ValueError: a distance is below 1.
    """
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        raise ConfigError("merge.gossip_lambda", lam, "a finite number > 0 (default 0.8)")
    d = torch.as_tensor(distances, dtype=torch.float64).reshape(-1)
    if d.numel() == 0:
        return d
    if bool((d < 1).any()):
        raise ValueError(f"history distances must be >= 1, got {d.tolist()}")
    raw = lam * torch.exp(-lam * (d - 1.0))
    return raw / raw.sum()


# --- the FoolsGold weight computation -------------------------------------------------------


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix @ matrix.T`` in float64, in column blocks so no float64 copy of the whole."""
    n, size = matrix.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, size, _CHUNK):
        block = matrix[:, start : start + _CHUNK].to(torch.float64)
        gram += block @ block.T
    return gram


def similarity_weights(histories: torch.Tensor, *, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-history weights (ALGORITHMS.md §2.1 steps 1–5).

    1. ``cs_ij`` = cosine similarity of histories i and j (0 if either is all zeros),
       ``cs_ii = 0``;
    2. ``v_i = max_j cs_ij + 1e-5``;
    3. pardoning: ``cs_ij ← cs_ij·v_i/v_j`` where ``v_i < v_j``;
    4. ``α_i = clip(1 − max_j cs_ij, 0, 1)``, rescaled so that the largest is 1;
    5. ``clip(κ·(ln(α/(1−α)) + 0.5), 0, 1)``, so α = 1 maps to 1 and α = 0 to 0.

    If every α is 0 (all histories pairwise identical in direction) every weight is 0.

    Args:
        histories: ``[n, P]``, one flattened history per row.
        kappa: the logit's confidence κ > 0.

    Returns:
        A float64 ``[n]`` tensor in [0, 1].

    Raises:
        ValueError: ``histories`` is not 2-D or holds NaN or infinity.
    """
    if histories.ndim != 2:
        raise ValueError(f"histories must be [n, P], got shape {tuple(histories.shape)}")
    n = histories.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if not all_finite(histories):
        raise ValueError("histories must be finite")
    gram = _gram(histories)
    norms = gram.diagonal().sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    cs = gram / norms[:, None] / norms[None, :]
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values + PARDON_EPSILON
    cs = torch.where(v[:, None] < v[None, :], cs * (v[:, None] / v[None, :]), cs)
    alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = float(alpha.max())
    if not top > 0.0:
        return torch.zeros(n, dtype=torch.float64)
    alpha = alpha / top
    logit = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)  # α = 1 → +inf, α = 0 → −inf
    return logit.clamp(0.0, 1.0)


# --- combinations ---------------------------------------------------------------------------


def coordinate_weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the smallest value whose cumulative weight reaches half the total.

    The values of each column are sorted ascending and the first one at which the running sum
    of their weights is ≥ 0.5 of the total is taken, as in SybilWall's weighted median.

    Args:
        values: ``[n, P]`` finite rows, ``n >= 1``.
        weights: ``[n]`` non-negative weights with a positive sum.

    Returns:
        A ``[P]`` tensor in ``values``' dtype; every entry is one of the column's values.

    Raises:
        ValueError: shapes disagree, there are no rows, or the weights are negative, not
            finite or sum to zero.
    """
    if values.ndim != 2 or values.shape[0] == 0 or tuple(weights.shape) != (values.shape[0],):
        raise ValueError(
            f"need values [n>=1, P] and weights [n], got {tuple(values.shape)} and "
            f"{tuple(weights.shape)}"
        )
    w = weights.to(torch.float64)
    total = float(w.sum())
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not total > 0.0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    # Cumulative sums can miss an exact half by an ulp; the tolerance keeps the reference's
    # choice (e.g. four equal weights pick the lower middle value) stable.
    half = 0.5 * total * (1.0 - 1e-12)
    n, size = values.shape
    out = torch.empty(size, dtype=values.dtype)
    for start in range(0, size, _CHUNK):
        block = values[:, start : start + _CHUNK]
        ordered, order = torch.sort(block, dim=0, stable=True)
        reached = torch.cumsum(w[order], dim=0) >= half
        first = (~reached).sum(dim=0).clamp(max=n - 1)
        out[start : start + block.shape[1]] = ordered.gather(0, first[None, :])[0]
    return out


def _weighted_mean(
    own_flat: torch.Tensor, own_weight: float, rows: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor | None:
    """``(own_weight·own + Σ w_i·row_i) / total`` in own's dtype, or None if the total is 0."""
    total = own_weight + float(row_weights.sum())
    if not total > 0.0:
        return None
    shares = (row_weights / total).to(dtype=own_flat.dtype)
    merged = shares @ rows if rows.shape[0] else torch.zeros_like(own_flat)
    if own_weight > 0.0:
        merged = merged + own_flat * (own_weight / total)
    return merged


def _compare_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """Lexicographic comparison of two equal-length finite vectors."""
    differ = torch.nonzero(a != b)
    if differ.numel() == 0:
        return 0
    i = int(differ[0, 0])
    return -1 if bool(a[i] < b[i]) else 1


def _strongest(
    rows: torch.Tensor, row_weights: torch.Tensor, senders: Sequence[NodeId] | None, count: int
) -> list[int]:
    """Indices of the ``count`` highest-weight rows, ties broken by sender id, then content,
    so that the choice does not depend on the order of the inputs."""

    def compare(i: int, j: int) -> int:
        wi, wj = float(row_weights[i]), float(row_weights[j])
        if wi != wj:
            return -1 if wi > wj else 1
        if senders is not None and senders[i] != senders[j]:
            return -1 if senders[i].raw < senders[j].raw else 1
        return _compare_rows(rows[i], rows[j])

    order = sorted(range(rows.shape[0]), key=functools.cmp_to_key(compare))
    return order[:count]


# --- the rules ------------------------------------------------------------------------------


def _finite_split(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
    """``(own_flat, finite_rows, own_ok, keep_mask)`` after checking shapes.

    Raises:
        ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
    """
    own_flat, rows = as_rows(own, received, weights)
    keep = finite_rows(rows)
    if not bool(keep.all()):
        rows = rows[keep]
    return own_flat, rows, all_finite(own_flat), keep


def _per_row(values: tuple[Any, ...], k: int, what: str) -> tuple[Any, ...] | None:
    """``values`` if it has one entry per received row, None if empty.

    Raises:
        ValueError: it has some other length.
    """
    if not values:
        return None
    if len(values) != k:
        raise ValueError(f"ctx.{what} has {len(values)} entries for {k} received rows")
    return values


class _SimilarityRule:
    """Shared machinery: history bookkeeping, similarity weights, then :meth:`_combine`."""

    name: str = ""
    gossip: bool = False  # compare against every known history, not only this call's senders

    def __init__(self, *, kappa: float = 1.0, own_trust: float = 1.0, baseline: str = "zero"):
        self.kappa = check_number("merge.kappa", kappa, minimum=0, open_min=True)
        self.own_trust = check_number("merge.own_trust", own_trust, minimum=0)
        if baseline not in BASELINES:
            raise ConfigError("merge.baseline", baseline, f"one of {', '.join(BASELINES)}")
        self.baseline = baseline

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Merge ``own`` with the finite received rows; updates ``ctx.state`` when senders are known.

        Raises:
            ValueError: ``received`` is not ``[k, *own.shape]``, ``weights`` is not ``[k]``,
                or ``ctx.senders`` / ``ctx.rounds`` are non-empty with a length other than k.
            TypeError: ``ctx.state[STATE_KEY]`` is not a :class:`HistoryTable`.
        """
        own_flat, rows, own_ok, keep = _finite_split(own, received, weights)
        k = int(keep.shape[0])
        all_senders = _per_row(ctx.senders, k, "senders")
        all_rounds = _per_row(ctx.rounds, k, "rounds")
        kept = [i for i in range(k) if bool(keep[i])]
        senders = None if all_senders is None else [all_senders[i] for i in kept]
        if senders is None:
            # No identities, no history: this call's update relative to the own model.
            histories = rows - own_flat if own_ok else rows
            row_weights = similarity_weights(histories, kappa=self.kappa)
        else:
            rounds = None if all_rounds is None else [int(all_rounds[i]) for i in kept]
            row_weights = self._tracked_weights(own_flat, own_ok, rows, senders, rounds, ctx)
        merged = self._combine(own_flat, own_ok, rows, row_weights, senders)
        if merged is None:
            return own.clone()
        return merged.reshape(own.shape).to(dtype=own.dtype)

    def _tracked_weights(
        self,
        own_flat: torch.Tensor,
        own_ok: bool,
        rows: torch.Tensor,
        senders: list[NodeId],
        rounds: list[int] | None,
        ctx: MergeContext,
    ) -> torch.Tensor:
        table = history_table(ctx.state)
        size = own_flat.numel()
        order: list[int] = list(range(len(senders)))
        if rounds is not None:  # oldest first, so the newest model ends up as the baseline
            order = sorted(order, key=lambda i: rounds[i])
        for i in order:
            model = rows[i].to(torch.float32)
            round_ = rounds[i] if rounds is not None else 0
            record = table.direct.get(senders[i])
            if record is None or record.last_model.numel() != size:
                if self.baseline == "own" and own_ok:
                    start = model - own_flat.to(torch.float32)
                else:
                    start = torch.zeros(size, dtype=torch.float32)
                table.direct[senders[i]] = DirectHistory(start, model.clone(), round_)
            elif round_ >= record.round:
                record.history = record.history + (model - record.last_model)
                record.last_model = model.clone()
                record.round = round_
        current = list(dict.fromkeys(senders))
        histories = [table.direct[s].history for s in current]
        if self.gossip:
            known = set(current)
            others = sorted((s for s in table.direct if s not in known), key=lambda s: s.raw)
            histories += [table.direct[s].history for s in others]
            distant = sorted(
                (s for s in table.distant if s not in table.direct), key=lambda s: s.raw
            )
            histories += [
                table.distant[s].history
                for s in distant
                if table.distant[s].history.numel() == size
            ]
        if not current:
            return torch.zeros(0, dtype=torch.float64)
        matrix = torch.stack(histories)
        if not all_finite(matrix):  # an accumulation overflowed: that history says nothing
            matrix = torch.where(finite_rows(matrix)[:, None], matrix, torch.zeros_like(matrix))
        weights = similarity_weights(matrix, kappa=self.kappa)
        index = {s: i for i, s in enumerate(current)}
        return weights[torch.tensor([index[s] for s in senders], dtype=torch.long)]

    def _combine(
        self,
        own_flat: torch.Tensor,
        own_ok: bool,
        rows: torch.Tensor,
        row_weights: torch.Tensor,
        senders: list[NodeId] | None,
    ) -> torch.Tensor | None:
        """Similarity-weighted mean of the rows and the trusted own model."""
        return _weighted_mean(own_flat, self.own_trust if own_ok else 0.0, rows, row_weights)


class FoolsGold(_SimilarityRule):
    """FoolsGold on accumulated updates: similarity among this call's senders only.

    Parameters: ``kappa`` (logit confidence, default 1), ``own_trust`` (weight of the own
    model before normalisation, default 1 as in SybilWall; 0 = FoolsGold's server form),
    ``baseline`` (``"zero"`` or ``"own"``, how a new sender's history starts).
    """

    name = "foolsgold"
    gossip = False


class SybilWall(_SimilarityRule):
    """SybilWall: similarity over all k + h known histories, mean over senders and self.

    Same parameters as :class:`FoolsGold`.
    """

    name = "sybilwall"
    gossip = True

    # The HistoryHook (p2pfl.merge.base): the protocol's history gossip feeds these.

    def learn_history(
        self,
        state: MutableMapping[str, Any],
        origin: NodeId,
        round: int,
        distance: int,
        history: torch.Tensor,
    ) -> None:
        """Store a gossiped history ``distance`` hops away (see :func:`record_distant_history`).

        Raises:
            TypeError: ``state[STATE_KEY]`` is not a :class:`HistoryTable`.
        """
        record_distant_history(state, origin, round, distance - 1, history)

    def forget_history(self, state: MutableMapping[str, Any], origin: NodeId) -> None:
        """Drop ``origin``'s gossiped history (see :func:`forget_distant_history`).

        Raises:
            TypeError: ``state[STATE_KEY]`` is not a :class:`HistoryTable`.
        """
        forget_distant_history(state, origin)


class SybilWallMedian(SybilWall):
    """SybilWall weights, then the coordinate-wise median of the own model and the ⌊k/2⌋
    highest-weight senders (a mean when that makes two inputs, as in the reference).

    With a single sender it falls back to SybilWall's weighted mean (the reference averages
    the two models, which is the same thing when there are no distant histories).
    """

    name = "sybilwall_median"

    def _combine(
        self,
        own_flat: torch.Tensor,
        own_ok: bool,
        rows: torch.Tensor,
        row_weights: torch.Tensor,
        senders: list[NodeId] | None,
    ) -> torch.Tensor | None:
        k = rows.shape[0]
        if k <= 1:
            return super()._combine(own_flat, own_ok, rows, row_weights, senders)
        chosen = rows[_strongest(rows, row_weights, senders, k // 2)]
        if own_ok:
            chosen = torch.cat([own_flat[None, :], chosen])
        if chosen.shape[0] <= 2:
            return chosen.mean(dim=0)
        # The lower middle value for an even count, as torch.median in the reference.
        return order_statistics(chosen, [(chosen.shape[0] - 1) // 2])[0]


class SybilWallWeightedMedian(SybilWall):
    """SybilWall weights (own model trusted with ``own_trust``), then the coordinate-wise
    weighted median: per coordinate the first sorted value whose cumulative weight ≥ 0.5.

    With a single sender it falls back to SybilWall's weighted mean, as the reference does.
    """

    name = "sybilwall_weighted_median"

    def _combine(
        self,
        own_flat: torch.Tensor,
        own_ok: bool,
        rows: torch.Tensor,
        row_weights: torch.Tensor,
        senders: list[NodeId] | None,
    ) -> torch.Tensor | None:
        if rows.shape[0] <= 1:
            return super()._combine(own_flat, own_ok, rows, row_weights, senders)
        own_weight = self.own_trust if own_ok else 0.0
        if not own_weight + float(row_weights.sum()) > 0.0:
            return None
        if own_weight > 0.0:
            rows = torch.cat([rows, own_flat[None, :]])
            row_weights = torch.cat([row_weights, torch.tensor([own_weight], dtype=torch.float64)])
        return coordinate_weighted_median(rows, row_weights)


register_merge_rule("foolsgold")(FoolsGold)
register_merge_rule("sybilwall")(SybilWall)
register_merge_rule("sybilwall_median")(SybilWallMedian)
register_merge_rule("sybilwall_weighted_median")(SybilWallWeightedMedian)
