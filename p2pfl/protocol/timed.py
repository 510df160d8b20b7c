"""Time-triggered merging with unbiased weights (FedFix-style), for ``gossip``.

Theory of operation
-------------------
With ``protocol.merge_trigger = "time"`` a gossip node trains back to back, pushes each
freshly trained model to ``fanout`` neighbours (at most once per ``period * (1 -
period_jitter)``, the cadence the runtime's rate limits allow), and merges on a fixed clock:
every ``merge_interval`` seconds (Δ) after ``Started``, whatever has arrived since the last
tick, however many or few models that is. A training that finishes after a tick merged into
the model it started from carries its own change over: ``x <- x + (trained - start)``.

Weights (FedFix, Fraboni et al. 2023, read for a peer-to-peer node). A neighbour ``j`` with
``n_j`` samples has the data share ``p_j = n_j / (n_own + sum_k n_k)`` among this node and its
neighbours heard from. Its models arrive as a stream of rate ``lambda_j`` (its training speed
times ``fanout / degree_j``), so a tick sees ``c_j`` arrivals with ``E[c_j] = lambda_j * Δ``
(a stationary stream). The tick merges ``j``'s newest model with the Horvitz-Thompson weight

    w_j = p_j * c_j / (lambda_j_hat * Δ),    lambda_j_hat = A_j / (now - started_at)

where ``A_j`` counts every model of ``j`` this node has accepted so far; so ``E[w_j]`` is
``p_j`` whatever ``j``'s speed (exactly for a known rate, up to the estimate's error, which
shrinks as arrivals accumulate, for the measured one). The merge is
``x <- (1 - sum w) * x + sum_j w_j * x_j``, passed to the merge rule as the received models'
weights and ``own_weight = 1 - sum w``, so the own model's expected weight is its own share.
A tick where ``sum w > 1`` (a slow neighbour with a large share arrived) scales the weights
down to sum to 1 (own weight 0, never negative: the merge stays a convex combination) and
owes each sender the weight it could not apply, added at that sender's next arrival, so the
long-run mean weight is still the share; :attr:`TimedMerging.clipped` counts such ticks.
The owed weight stays bounded only if ``p_j <= q_j`` (the chance that a tick sees ``j``) on
the whole: choose ``merge_interval`` at least about the slow neighbours' training time. Counting arrivals at the receiver (not a rate the sender declares)
means no peer can raise its own weight by lying.

Count-triggered gossip (the default) merges whenever something arrived, with plain
sample-count weights, so a neighbour that pushes twice as often weighs in twice as often.
:attr:`TimedMerging.plain` records, for comparison, the weight each merge would have given
each sender under that rule (``n_j / (n_own + sum of the senders merged)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pfl.identity import NodeId
from p2pfl.protocol.messages import ModelUpdate

MERGE_TRIGGERS = ("count", "time")
"""The values of ``protocol.merge_trigger``."""


class TimedMerging:
    """One node's merge clock, arrival counts and weight ledger."""

    __slots__ = (
        "applied",
        "clipped",
        "interval",
        "next_at",
        "plain",
        "started_at",
        "ticks",
        "_samples",
        "_owed",
        "_since_tick",
        "_total",
    )

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.started_at = 0.0
        self.next_at: float | None = None
        """When the next tick is due (None before ``Started`` and after the last training)."""
        self.ticks = 0
        """Ticks so far, with or without arrivals."""
        self.clipped = 0
        """Ticks whose weights summed above 1 and were scaled down."""
        self.applied: dict[NodeId, float] = {}
        """Per sender, the sum of the weights its models were merged with."""
        self.plain: dict[NodeId, float] = {}
        """Per sender, the sum of the weights count-triggered merging would have given."""
        self._samples: dict[NodeId, int] = {}
        self._total: dict[NodeId, int] = {}
        self._since_tick: dict[NodeId, int] = {}
        self._owed: dict[NodeId, float] = {}

    def begin(self, now: float) -> None:
        """Start the clock: the first tick is one interval after ``now``."""
        self.started_at = now
        self.next_at = now + self.interval

    def stop(self) -> None:
        """No more ticks (the node ran its last training)."""
        self.next_at = None

    def due(self, now: float) -> bool:
        """Whether a tick is due at ``now``; if so, the clock moves to the next one."""
        if self.next_at is None or now < self.next_at:
            return False
        # A late wake-up (a busy driver) merges once but counts every interval it covers.
        while self.next_at <= now:
            self.next_at += self.interval
            self.ticks += 1
        return True

    def arrived(self, update: ModelUpdate) -> None:
        """Count one accepted model of ``update.sender``."""
        sender = update.sender
        self._samples[sender] = update.samples
        self._total[sender] = self._total.get(sender, 0) + 1
        self._since_tick[sender] = self._since_tick.get(sender, 0) + 1

    def weights(
        self, updates: Sequence[ModelUpdate], now: float, own_samples: float
    ) -> tuple[list[float], float]:
        """The merge weights of ``updates`` (the newest model of each sender since the last
        tick) and the own weight, per the module docstring; resets the per-tick counts."""
        known = own_samples + sum(self._samples.values())
        elapsed = now - self.started_at
        weights: list[float] = []
        plain_total = own_samples + sum(update.samples for update in updates)
        for update in updates:
            sender = update.sender
            share = self._samples[sender] / known if known > 0 else 0.0
            count = self._since_tick.get(sender, 0)
            total = self._total.get(sender, 0)
            # lambda_hat * interval = total * interval / elapsed; the weight divides by it.
            weight = share * count * elapsed / (total * self.interval) if total else 0.0
            weights.append(weight)
            plain = update.samples / plain_total if plain_total > 0 else 0.0
            self.plain[sender] = self.plain.get(sender, 0.0) + plain
        self._since_tick.clear()
        # Weight a tick could not apply (the sum was capped at 1) is owed to the sender and
        # added at its next arrival, so its long-run mean weight stays its share.
        wanted = [
            weight + self._owed.pop(update.sender, 0.0)
            for update, weight in zip(updates, weights, strict=True)
        ]
        mass = sum(wanted)
        weights = wanted
        if mass > 1.0:
            self.clipped += 1
            weights = [weight / mass for weight in wanted]
            for update, want, weight in zip(updates, wanted, weights, strict=True):
                self._owed[update.sender] = want - weight
            mass = 1.0
        for update, weight in zip(updates, weights, strict=True):
            self.applied[update.sender] = self.applied.get(update.sender, 0.0) + weight
        return weights, max(1.0 - mass, 0.0)
