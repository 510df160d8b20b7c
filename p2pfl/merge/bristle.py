"""Bristle: per-class, performance-based integration of the output layer (ALGORITHMS.md §3).

Theory of operation
-------------------
Bristle assumes transfer learning: every layer but the output layer is a frozen, shared
feature extractor, so only the output layer is compared and integrated. Here that layer is
the **last** 2-D slot of ``ctx.layout`` (a ``Linear`` weight ``[C, H]``) together with the
``[C]`` slot that directly follows it, if any (its bias). Class ``c`` is row ``c`` of the
weight plus ``bias[c]`` (the reference, in DL4J, stores one column per class). Every other
slot of the result is the own model's, unchanged.

One merge, following the reference version at commit 042b329 step by step:

1. ``n`` = the own vector (already trained by the caller).
2. Prioritiser: ``d_j = ‖m_j − n‖₂`` on the output layer. With fewer than
   ``min_screening`` (20) new models the ranking is padded with the most recent older ones,
   kept in ``ctx.state``; they only take places in the ranking and are never integrated.
   The ``exploitation`` (50) closest new models are kept, plus ``exploration`` (5) drawn at
   random from the remaining new ones with a ``torch.Generator`` kept in ``ctx.state``
   (seeded with ``seed`` on first use; no global RNG).
3. Per-class recall ``r_own`` of ``n`` and ``r_p`` of each kept peer from ``ctx.probe``; a
   peer's candidate is ``n`` with its output layer swapped in. Classes whose own recall is
   NaN (no local held-out examples) are *foreign*; the others are *own* classes.
4. Selected classes of peer p: all own classes, or, if the driver declared ``p``'s class
   count in ``ctx.state[CLASS_COUNTS_KEY]`` and it is below C, the own classes among p's
   top-``count`` classes by ``r_p``.
5. For each selected class ``c``: ``diff = 10·|r_own − r_p|``; the sequential-attack penalty
   ``P_p(c) = Σ max(0, 2·(r_own(c) − r_q(c)))`` over the peers q before p (peers ordered by
   sender id, or by distance when ids are unknown); score
   ``s = diff^(3 + r_own)`` if ``r_p > r_own`` else ``−diff^(4 + r_own)·(1 + P)``; the
   bounded score is ``max(−100, s)``.
6. ``certainty_p = max(0, mean − std)`` of ``r_p`` over the selected classes (population
   std; 0 if none is selected).
7. ``w_p(c) = max(0, 10·σ(s_bounded/100) − 4)·certainty_p``.
8. Own class c: ``W_c = (n_c + Σ_p w_p(c)·m_{p,c}) / (1 + Σ_p w_p(c))``.
9. Foreign class c: with ``W_p = max(0, 10·σ(Σ_c s_unbounded/100) − 4)·certainty_p``,
   ``W_c = (n_c + Σ_p W_p·m_{p,c}) / (1 + Σ_p W_p)``.

Rows holding NaN or infinity are left out before step 2. If the own vector is not finite
the probe cannot judge anything; the result is then the plain mean of the finite rows. The
sample-count ``weights`` argument is not used.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import torch

from p2pfl.checks import check_int
from p2pfl.errors import LocalProtocolError
from p2pfl.identity import NodeId
from p2pfl.merge.base import MergeContext, register_merge_rule
from p2pfl.merge.sybil import _finite_split, _per_row
from p2pfl.params import ParamLayout, TensorSlot

RNG_KEY = "bristle.rng"
"""``ctx.state`` key of the exploration generator."""
RECENT_KEY = "bristle.recent"
"""``ctx.state`` key of the recent output layers used to pad the ranking."""
CLASS_COUNTS_KEY = "bristle.class_counts"
"""Optional ``ctx.state`` entry the driver may set: ``Mapping[NodeId, int]`` of declared class counts."""

SCORE_FLOOR = -100.0


class BristleContextError(LocalProtocolError, ValueError):
    """The driver called Bristle without the probe or parameter layout it needs."""


def output_layer(layout: ParamLayout) -> tuple[TensorSlot, TensorSlot | None]:
    """The output layer's weight slot (the last 2-D slot) and its bias slot, if it has one.

    The bias is the slot right after the weight when its shape is ``[C]``.

    Raises:
        BristleContextError: the layout has no 2-D slot.
    """
    slots = layout.slots
    for i in range(len(slots) - 1, -1, -1):
        if slots[i].ndim == 2:
            weight = slots[i]
            after = slots[i + 1] if i + 1 < len(slots) else None
            bias = after if after is not None and after.shape == (weight.shape[0],) else None
            return weight, bias
    raise BristleContextError("bristle needs a layout whose last Linear layer is the output layer")


def _classes(flat: torch.Tensor, weight: TensorSlot, bias: TensorSlot | None) -> torch.Tensor:
    """``[..., C, H(+1)]``: per class its weight row and, if present, its bias."""
    lead = flat.shape[:-1]
    rows = flat[..., weight.span].reshape(*lead, *weight.shape)
    if bias is None:
        return rows
    return torch.cat([rows, flat[..., bias.span].reshape(*lead, weight.shape[0], 1)], dim=-1)


def _write_classes(
    flat: torch.Tensor, classes: torch.Tensor, weight: TensorSlot, bias: TensorSlot | None
) -> None:
    """Inverse of :func:`_classes` for one vector, in place (only on our own copies)."""
    hidden = weight.shape[1]
    flat[weight.span] = classes[:, :hidden].reshape(-1).to(flat.dtype)
    if bias is not None:
        flat[bias.span] = classes[:, hidden].to(flat.dtype)


class Bristle:
    """Bristle's prioritiser and per-class integrator on the output layer.

    Parameters: ``exploitation`` (closest models kept, default 50), ``exploration`` (random
    others kept, default 5), ``min_screening`` (ranking padded with older models up to this
    many, default 20), ``seed`` (of the exploration generator, default 0). Needs
    ``ctx.layout`` and ``ctx.probe``.
    """

    name: str = "bristle"
    requires: tuple[str, ...] = ("layout", "probe")

    def __init__(
        self,
        *,
        exploitation: int = 50,
        exploration: int = 5,
        min_screening: int = 20,
        seed: int = 0,
    ) -> None:
        self.exploitation = check_int("merge.exploitation", exploitation, 1)
        self.exploration = check_int("merge.exploration", exploration, 0)
        self.min_screening = check_int("merge.min_screening", min_screening, 0)
        self.seed = check_int("merge.seed", seed, 0)

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        """Integrate the received output layers class by class; see the module docstring.

        Raises:
            BristleContextError: ``ctx.probe`` or ``ctx.layout`` is missing, or the layout
                has no 2-D slot.
            ValueError: ``received`` is not ``[k, *own.shape]``, ``weights`` is not ``[k]``,
                ``ctx.senders`` has a length other than k, the layout's size is not the
                vector's, or the probe does not return ``[C]`` recalls.
        """
        if ctx.probe is None:
            raise BristleContextError(
                "bristle needs ctx.probe (per-class recall on local held-out data); "
                "choose another merge rule for nodes without held-out data"
            )
        if ctx.layout is None:
            raise BristleContextError("bristle needs ctx.layout to find the output layer")
        own_flat, rows, own_ok, keep = _finite_split(own, received, weights)
        if ctx.layout.size != own_flat.numel():
            raise ValueError(
                f"layout describes {ctx.layout.size} values, the vector has {own_flat.numel()}"
            )
        weight_slot, bias_slot = output_layer(ctx.layout)
        all_senders = _per_row(ctx.senders, int(keep.shape[0]), "senders")
        senders = None
        if all_senders is not None:
            senders = [s for s, ok in zip(all_senders, keep.tolist(), strict=True) if ok]
        if not own_ok:
            if rows.shape[0] == 0:
                return own.clone()
            return rows.mean(dim=0).reshape(own.shape).to(dtype=own.dtype)
        if rows.shape[0] == 0:
            return own.clone()

        own_cls = _classes(own_flat, weight_slot, bias_slot).to(torch.float64)
        peer_cls = _classes(rows, weight_slot, bias_slot).to(torch.float64)
        chosen = self._prioritise(own_cls, peer_cls, senders, ctx)
        if not chosen:
            return own.clone()
        peers = peer_cls[chosen]

        r_own = self._recall(ctx, own_flat, weight_slot.shape[0])
        candidates = own_flat.unsqueeze(0).repeat(len(chosen), 1)
        candidates[:, weight_slot.span] = rows[chosen][:, weight_slot.span]
        if bias_slot is not None:
            candidates[:, bias_slot.span] = rows[chosen][:, bias_slot.span]
        r_peer = torch.stack([self._recall(ctx, c, weight_slot.shape[0]) for c in candidates])

        counts = ctx.state.get(CLASS_COUNTS_KEY)
        chosen_senders = None if senders is None else [senders[i] for i in chosen]
        class_weights = integration_weights(
            r_own, r_peer, _declared_counts(counts, chosen_senders, len(chosen))
        )
        merged_cls = (own_cls + torch.einsum("pc,pch->ch", class_weights, peers)) / (
            1.0 + class_weights.sum(dim=0)
        )[:, None]
        out = own_flat.clone()
        _write_classes(out, merged_cls, weight_slot, bias_slot)
        return out.reshape(own.shape)

    def _recall(self, ctx: MergeContext, vector: torch.Tensor, classes: int) -> torch.Tensor:
        assert ctx.probe is not None
        recall = torch.as_tensor(ctx.probe(vector)).detach().to(torch.float64).reshape(-1)
        if recall.numel() != classes:
            raise ValueError(f"probe returned {recall.numel()} recalls for {classes} classes")
        return recall

    def _prioritise(
        self,
        own_cls: torch.Tensor,
        peer_cls: torch.Tensor,
        senders: list[NodeId] | None,
        ctx: MergeContext,
    ) -> list[int]:
        """Indices of the rows to integrate, in canonical peer order (step 2).

        Also records this call's output layers as the most recent older models.
        """
        k = peer_cls.shape[0]
        distances = torch.linalg.vector_norm((peer_cls - own_cls).reshape(k, -1), dim=1)
        recent = ctx.state.get(RECENT_KEY)
        if not isinstance(recent, deque) or recent.maxlen != self.min_screening:
            recent = deque(recent if isinstance(recent, deque) else (), maxlen=self.min_screening)
            ctx.state[RECENT_KEY] = recent
        padding = [
            old
            for old in list(recent)[::-1][: max(0, self.min_screening - k)]
            if old.shape == own_cls.shape
        ]
        old_distances = [float(torch.linalg.vector_norm(old - own_cls)) for old in padding]

        def tie(i: int) -> tuple[bytes, int]:
            return (senders[i].raw if senders is not None else b"", i)

        ranking: list[tuple[float, int, tuple[bytes, int]]] = [
            (float(distances[i]), 0, tie(i)) for i in range(k)
        ] + [(d, 1, (b"", j)) for j, d in enumerate(old_distances)]
        ranking.sort()
        new_in_order = [entry[2][1] for entry in ranking if entry[1] == 0]
        exploit = [entry[2][1] for entry in ranking[: self.exploitation] if entry[1] == 0]
        exploited = set(exploit)
        rest = [i for i in new_in_order if i not in exploited]
        explore: list[int] = []
        if rest and self.exploration > 0:
            rng = ctx.state.get(RNG_KEY)
            if not isinstance(rng, torch.Generator):
                rng = torch.Generator().manual_seed(self.seed)
                ctx.state[RNG_KEY] = rng
            picks = torch.randperm(len(rest), generator=rng)[: self.exploration]
            explore = [rest[int(j)] for j in picks]
        for i in range(k):
            recent.append(peer_cls[i].clone())
        chosen = exploit + explore
        # Peer order for the sequential-attack penalty: by sender id, else by distance.
        return sorted(chosen, key=lambda i: (tie(i)[0], float(distances[i]), i))


def _declared_counts(counts: object, senders: list[NodeId] | None, n: int) -> list[int | None]:
    if senders is None or not isinstance(counts, Mapping):
        return [None] * n
    out: list[int | None] = []
    for sender in senders:
        value = counts.get(sender)
        out.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return out


def integration_weights(
    r_own: torch.Tensor, r_peer: torch.Tensor, counts: list[int | None] | None = None
) -> torch.Tensor:
    """Bristle's per-peer, per-class integration weights (steps 4–9).

    Args:
        r_own: ``[C]`` own recall per class; NaN marks a foreign class.
        r_peer: ``[m, C]`` recall per class of each peer, rows in penalty order.
        counts: each peer's declared class count, or None for "all classes".

    Returns:
        A float64 ``[m, C]`` tensor: ``w_p(c)`` in own-class columns, ``W_p`` in foreign ones.

    Raises:
        ValueError: the shapes disagree.
    """
    m, num_classes = r_peer.shape if r_peer.ndim == 2 else (-1, -1)
    if r_own.shape != (num_classes,) or (counts is not None and len(counts) != m):
        raise ValueError(
            f"need r_own [C] and r_peer [m, C], got {tuple(r_own.shape)}, {tuple(r_peer.shape)}"
        )
    r_own = r_own.to(torch.float64)
    own_class = torch.isfinite(r_own)
    r_peer = torch.nan_to_num(r_peer.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    mine = torch.where(own_class, r_own, torch.zeros_like(r_own))

    selected = own_class.expand(m, num_classes).clone()
    for p, count in enumerate(counts or [None] * m):
        if count is not None and count < num_classes:
            top = torch.argsort(r_peer[p], descending=True, stable=True)[: max(0, count)]
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[top] = True
            selected[p] &= mask

    diff = 10.0 * (mine - r_peer).abs()
    drop = torch.where(own_class, (2.0 * (mine - r_peer)).clamp(min=0.0), torch.zeros_like(r_peer))
    penalty = torch.cumsum(drop, dim=0) - drop  # Σ over the peers before p
    better = r_peer > mine
    score = torch.where(better, diff.pow(3.0 + mine), -diff.pow(4.0 + mine) * (1.0 + penalty))
    score = torch.where(selected, score, torch.zeros_like(score))
    bounded = score.clamp(min=SCORE_FLOOR)

    chosen_recall = torch.where(selected, r_peer, torch.zeros_like(r_peer))
    n_selected = selected.sum(dim=1).to(torch.float64)
    mean = chosen_recall.sum(dim=1) / n_selected.clamp(min=1.0)
    var = (torch.where(selected, r_peer - mean[:, None], torch.zeros_like(r_peer)) ** 2).sum(
        dim=1
    ) / n_selected.clamp(min=1.0)
    certainty = torch.where(
        n_selected > 0, (mean - var.sqrt()).clamp(min=0.0), torch.zeros_like(mean)
    )

    per_class = (10.0 * torch.sigmoid(bounded / 100.0) - 4.0).clamp(min=0.0) * certainty[:, None]
    per_class = torch.where(selected, per_class, torch.zeros_like(per_class))
    per_peer = (10.0 * torch.sigmoid(score.sum(dim=1) / 100.0) - 4.0).clamp(min=0.0) * certainty
    return torch.where(own_class, per_class, per_peer[:, None].expand(m, num_classes))


register_merge_rule("bristle")(Bristle)
