"""Deterministic classic topologies: ring, line, star and complete graph.

All generators label nodes ``0..n-1`` and return an undirected :class:`networkx.Graph`.
The complete graph also has an implicit form, :func:`complete_adjacency`: its neighbour
lists without the n(n-1)/2 edges, for callers that only count and sample neighbours.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import networkx as nx

from p2pfl.views import IndexedView
from topologies._check import canonical, check_at_least

__all__ = ["AllBut", "CompleteAdjacency", "complete", "complete_adjacency", "line", "ring", "star"]


def ring(n: int) -> nx.Graph:
    """Cycle ``0 - 1 - ... - (n-1) - 0``; every node has degree 2.

    Args:
        n: Number of nodes, ``n >= 3``.

    Returns:
        The ring.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 3`` (smaller cycles are not simple graphs;
            use ``line`` instead).
    """
    n = check_at_least("ring", "n", n, 3)
    return canonical(n, ((i, (i + 1) % n) for i in range(n)))


def line(n: int) -> nx.Graph:
    """Path ``0 - 1 - ... - (n-1)``.

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        The path graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("line", "n", n, 1)
    return canonical(n, ((i, i + 1) for i in range(n - 1)))


def star(n: int) -> nx.Graph:
    """Star with hub 0 linked to every other node.

    Args:
        n: Number of nodes including the hub, ``n >= 1``.

    Returns:
        The star graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("star", "n", n, 1)
    return canonical(n, ((0, i) for i in range(1, n)))


def complete(n: int) -> nx.Graph:
    """Complete graph: every node has degree ``n - 1``.

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        The complete graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("complete", "n", n, 1)
    return canonical(n, itertools.combinations(range(n), 2))


class AllBut(IndexedView[int]):
    """The sorted nodes ``0..n-1`` but ``node``: a complete graph's neighbour list in O(1)."""

    __slots__ = ("n", "node")

    def __init__(self, n: int, node: int) -> None:
        self.n = n
        self.node = node

    def __len__(self) -> int:
        return self.n - 1

    def _item(self, index: int) -> int:
        return index if index < self.node else index + 1

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(range(self.node), range(self.node + 1, self.n))

    def __contains__(self, other: object) -> bool:
        return isinstance(other, int) and 0 <= other < self.n and other != self.node

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class CompleteAdjacency(IndexedView[AllBut]):
    """The neighbour lists of the complete graph on ``n`` nodes, computed on access."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def _item(self, index: int) -> AllBut:
        return AllBut(self.n, index)

    @property
    def edge_count(self) -> int:
        return self.n * (self.n - 1) // 2


def complete_adjacency(n: int) -> CompleteAdjacency:
    """The complete graph's neighbour lists, without building its edges.

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        A sequence whose entry i is the sorted nodes other than i.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    return CompleteAdjacency(check_at_least("complete", "n", n, 1))
