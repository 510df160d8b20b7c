"""Two-dimensional lattices: grid and torus.

Cell ``(r, c)`` of a ``rows x cols`` lattice is node ``r * cols + c``, so nodes are
``0..n-1`` with ``n = rows * cols`` in row-major order.
"""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx

from topologies._check import canonical, check_at_least

__all__ = ["grid", "torus"]


def _lattice_edges(rows: int, cols: int, *, periodic: bool) -> Iterator[tuple[int, int]]:
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            if c + 1 < cols or periodic:
                yield here, r * cols + (c + 1) % cols
            if r + 1 < rows or periodic:
                yield here, ((r + 1) % rows) * cols + c


def grid(rows: int, cols: int) -> nx.Graph:
    """Rectangular grid: each cell is linked to its 4-neighbours inside the grid.

    Args:
        rows: Number of rows, ``rows >= 1``.
        cols: Number of columns, ``cols >= 1``.

    Returns:
        The grid on ``rows * cols`` nodes, cell ``(r, c)`` labelled ``r * cols + c``.

    Raises:
        TopologyError: If ``rows`` or ``cols`` is not an int ``>= 1``.
    """
    rows = check_at_least("grid", "rows", rows, 1)
    cols = check_at_least("grid", "cols", cols, 1)
    return canonical(rows * cols, _lattice_edges(rows, cols, periodic=False))


def torus(rows: int, cols: int) -> nx.Graph:
    """Periodic grid: every node has degree 4 (rows and columns wrap around).

    Args:
        rows: Number of rows, ``rows >= 3``.
        cols: Number of columns, ``cols >= 3``.

    Returns:
        The torus on ``rows * cols`` nodes, cell ``(r, c)`` labelled ``r * cols + c``.

    Raises:
        TopologyError: If ``rows`` or ``cols`` is not an int ``>= 3`` (with fewer, wrapping
            edges coincide and the torus is no longer 4-regular; use ``grid`` or ``ring``).
    """
    rows = check_at_least("torus", "rows", rows, 3)
    cols = check_at_least("torus", "cols", cols, 3)
    return canonical(rows * cols, _lattice_edges(rows, cols, periodic=True))
