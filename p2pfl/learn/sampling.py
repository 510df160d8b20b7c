"""Seeded minibatch order shared by every trainer of a node's data.

A sampler walks a shuffled order of the node's examples and reshuffles when it runs out,
carrying its place across calls. The one-by-one :class:`~p2pfl.learn.TorchLearner` and the
simulator's batched trainer both draw from it, so they see the same examples in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.checks import check_int

SEED_MASK = 2**64 - 1


class MinibatchSampler:
    """Indices of successive minibatches over ``num_samples`` examples."""

    __slots__ = ("_cursor", "_generator", "_order", "batch_size", "num_samples")

    def __init__(self, num_samples: int, batch_size: int, *, seed: int) -> None:
        """Start a fresh walk.

        Args:
            num_samples: examples available, >= 1.
            batch_size: examples per batch, >= 1; capped at ``num_samples``.
            seed: generator seed (any int, reduced modulo 2**64).

        Raises:
            ConfigError: ``num_samples`` or ``batch_size`` below 1.
        """
        check_int("num_samples", num_samples, 1)
        check_int("batch_size", batch_size, 1)
        self.num_samples = num_samples
        self.batch_size = min(batch_size, num_samples)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed & SEED_MASK)
        self._order = torch.empty(0, dtype=torch.int64)
        self._cursor = num_samples  # at the end of an (empty) order: the first take shuffles

    def next_batch(self) -> Tensor:
        """The next ``batch_size`` example indices (int64)."""
        return self._take(self.batch_size)

    def next_batches(self, count: int) -> Tensor:
        """The next ``count`` batches as one ``[count, batch_size]`` int64 tensor: the very
        indices ``count`` calls of :meth:`next_batch` would return, drawn in one call (a
        batched trainer takes all of a training's steps at once)."""
        return self._take(count * self.batch_size).view(count, self.batch_size)

    def _take(self, needed: int) -> Tensor:
        """The next ``needed`` indices of the walk, reshuffling whenever the order runs out."""
        parts = []
        while needed:
            if self._cursor == self.num_samples:
                self._order = torch.randperm(self.num_samples, generator=self._generator)
                self._cursor = 0
            cursor = self._cursor
            take = min(needed, self.num_samples - cursor)
            # A whole fresh order is returned as it is (nobody writes to it) instead of sliced.
            parts.append(
                self._order if take == self.num_samples else self._order[cursor : cursor + take]
            )
            self._cursor = cursor + take
            needed -= take
        if not parts:
            return self._order[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
