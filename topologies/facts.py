"""Facts about a topology that predict how fast gossip averages on it.

Theory of operation: one gossip-averaging step on a graph is ``x <- W x`` with the
Metropolis–Hastings matrix ``W`` (symmetric, doubly stochastic, using only each node's and
its neighbours' degrees). The distance to consensus shrinks per step by the second largest
eigenvalue magnitude (SLEM) of ``W``, so the *spectral gap* ``1 - SLEM`` is the speed of
consensus: 1 on a complete graph, about ``(2 pi / n)**2 / 3`` on a ring, 0 when the graph is
disconnected (consensus is never reached).

Matrices index nodes in sorted order when the nodes are exactly ``0..n-1`` (every generator
in :mod:`topologies` and every loader in :mod:`topologies.io` produces such graphs), and in
``list(G)`` order otherwise. Self-loops are ignored throughout.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import networkx as nx
import numpy as np

from p2pfl.errors import TopologyError

__all__ = [
    "centrality",
    "DENSE_EIGEN_LIMIT",
    "DegreeStats",
    "GraphFacts",
    "degree_stats",
    "diameter",
    "facts",
    "metropolis_hastings_weights",
    "spectral_gap",
]

#: Up to this many nodes the spectral gap uses a dense eigendecomposition (exact, O(n^3));
#: above it, a sparse Lanczos solver (scipy) on the deflated matrix ``W - J/n``.
DENSE_EIGEN_LIMIT = 1000
#: Restarts allowed to plain Lanczos before the shift-invert fallback (see ``_slem_sparse``).
_LANCZOS_MAXITER = 100


@dataclass(frozen=True, slots=True)
class DegreeStats:
    """Minimum, maximum, mean and (population) standard deviation of node degrees."""

    min: int
    max: int
    mean: float
    std: float


@dataclass(frozen=True, slots=True)
class GraphFacts:
    """Summary of a topology.

    Attributes:
        nodes: Number of nodes.
        edges: Number of edges (self-loops excluded).
        connected: Whether the graph is connected.
        components: Number of connected components.
        degree: Degree statistics.
        diameter: Longest shortest path in hops; ``math.inf`` if disconnected.
        spectral_gap: ``1 - SLEM`` of the Metropolis–Hastings matrix; 0 if disconnected.
    """

    nodes: int
    edges: int
    connected: bool
    components: int
    degree: DegreeStats
    diameter: int | float
    spectral_gap: float


def _check_graph(graph: nx.Graph, what: str, *, allow_empty: bool = False) -> None:
    if graph.is_directed() or graph.is_multigraph():
        raise TopologyError(
            f"{what}: expected an undirected simple graph (nx.Graph), got {type(graph).__name__}"
        )
    if not allow_empty and graph.number_of_nodes() == 0:
        raise TopologyError(f"{what}: the graph has no nodes; a topology needs n >= 1")


def _node_order(graph: nx.Graph) -> list[Hashable]:
    nodes = list(graph)
    n = len(nodes)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in nodes) and set(nodes) == set(
        range(n)
    ):
        return list(range(n))
    return nodes


def _degrees(graph: nx.Graph, nodes: list[Hashable]) -> np.ndarray:
    return np.array([len(graph[v]) - (v in graph[v]) for v in nodes], dtype=np.int64)


@dataclass(frozen=True, slots=True)
class _Edges:
    """Edges of a graph as index arrays (one entry per undirected edge, no self-loops)."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    degree: np.ndarray


def _edges(graph: nx.Graph) -> _Edges:
    nodes = _node_order(graph)
    index = {v: i for i, v in enumerate(nodes)}
    pairs = np.array(
        [(index[u], index[v]) for u, v in graph.edges() if u != v], dtype=np.int64
    ).reshape(-1, 2)
    return _Edges(len(nodes), pairs[:, 0], pairs[:, 1], _degrees(graph, nodes))


def _mh_entries(edges: _Edges) -> tuple[np.ndarray, np.ndarray]:
    """Metropolis–Hastings weight of each edge, and the diagonal."""
    values = 1.0 / (1.0 + np.maximum(edges.degree[edges.rows], edges.degree[edges.cols]))
    off_diagonal_sum = np.zeros(edges.n)
    np.add.at(off_diagonal_sum, edges.rows, values)
    np.add.at(off_diagonal_sum, edges.cols, values)
    return values, 1.0 - off_diagonal_sum


def metropolis_hastings_weights(G: nx.Graph) -> np.ndarray:
    """Metropolis–Hastings gossip matrix of ``G``.

    ``W[i, j] = 1 / (1 + max(deg_i, deg_j))`` for each edge ``{i, j}``, ``W[i, i] = 1 -
    sum_{j != i} W[i, j]``, and 0 elsewhere. ``W`` is symmetric and doubly stochastic with a
    positive diagonal.

    Args:
        G: An undirected graph.

    Returns:
        A dense ``(n, n)`` float64 array, rows and columns in the node order described in the
        module docstring.

    Raises:
        TopologyError: If ``G`` is directed or a multigraph.
    """
    _check_graph(G, "metropolis_hastings_weights", allow_empty=True)
    edges = _edges(G)
    values, diagonal = _mh_entries(edges)
    weights = np.zeros((edges.n, edges.n))
    weights[edges.rows, edges.cols] = values
    weights[edges.cols, edges.rows] = values
    weights[np.arange(edges.n), np.arange(edges.n)] = diagonal
    return weights


def _slem_dense(G: nx.Graph) -> float:
    eigenvalues = np.linalg.eigvalsh(metropolis_hastings_weights(G))  # ascending; last is 1
    return float(max(abs(eigenvalues[0]), abs(eigenvalues[-2])))


def _slem_sparse(G: nx.Graph) -> float | None:
    """SLEM by sparse eigensolvers; None if they do not converge.

    First Lanczos on ``W - J/n`` (whose largest magnitude eigenvalue is the SLEM): fast
    unless the gap is tiny, as on long rings and paths. Then shift-invert on ``L = I - W``
    for ``lambda_2 = 1 - mu_2(L)`` (a sparse factorisation, cheap on exactly those
    low-dimensional graphs), checking the bottom of the spectrum only when Gershgorin's bound
    ``lambda_n >= 2 min(W_ii) - 1`` does not already rule it out.
    """
    from scipy.sparse import coo_array, identity
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    edges = _edges(G)
    n = edges.n
    values, diagonal = _mh_entries(edges)
    diag_index = np.arange(n)
    matrix = coo_array(
        (
            np.concatenate([values, values, diagonal]),
            (
                np.concatenate([edges.rows, edges.cols, diag_index]),
                np.concatenate([edges.cols, edges.rows, diag_index]),
            ),
        ),
        shape=(n, n),
    ).tocsc()
    start = np.random.default_rng(0).standard_normal(n)  # fixed: same graph, same digits

    def deflated(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(-1)
        return np.asarray(matrix @ x - x.mean())

    operator = LinearOperator((n, n), matvec=deflated, dtype=np.float64)
    try:
        (top,) = eigsh(
            operator,
            k=1,
            which="LM",
            ncv=min(32, n - 1),
            maxiter=_LANCZOS_MAXITER,
            v0=start - start.mean(),
            return_eigenvectors=False,
        )
        return float(abs(top))
    except ArpackNoConvergence:
        pass
    laplacian = identity(n, format="csc") - matrix
    try:
        mu = eigsh(laplacian, k=2, sigma=-1e-3, which="LM", v0=start, return_eigenvectors=False)
        second = 1.0 - float(np.sort(mu)[1])
        if second >= 1.0 - 2.0 * float(diagonal.min()):
            return second
        (bottom,) = eigsh(
            matrix,
            k=1,
            which="SA",
            ncv=min(32, n - 1),
            maxiter=10 * _LANCZOS_MAXITER,
            v0=start,
            return_eigenvectors=False,
        )
    except ArpackNoConvergence:
        return None
    return max(second, -float(bottom))


def spectral_gap(G: nx.Graph) -> float:
    """``1 - SLEM`` of the Metropolis–Hastings matrix of ``G``.

    SLEM is the second largest eigenvalue magnitude. The gap is in ``(0, 1]`` for a connected
    graph, 1 for a single node or a complete graph, and 0 for a disconnected graph. Graphs
    above :data:`DENSE_EIGEN_LIMIT` nodes use scipy's sparse solvers when scipy is installed
    (falling back to the dense solver if they do not converge).

    Args:
        G: An undirected graph.

    Returns:
        The spectral gap.

    Raises:
        TopologyError: If ``G`` has no nodes, or is directed or a multigraph.
    """
    _check_graph(G, "spectral_gap")
    n = G.number_of_nodes()
    if not nx.is_connected(G):
        return 0.0
    if n == 1:
        return 1.0
    slem: float | None = None
    if n > DENSE_EIGEN_LIMIT:
        try:
            slem = _slem_sparse(G)
        except ImportError:
            slem = None
    if slem is None:
        slem = _slem_dense(G)
    return min(1.0, max(0.0, 1.0 - slem))


def _diameter_bounded(G: nx.Graph) -> int:
    """Exact diameter of a connected graph by eccentricity bounding, BFS in scipy.

    The algorithm of Takes and Kosters (2011), as in ``nx.diameter(usebounds=True)``, with
    each BFS run by ``scipy.sparse.csgraph`` and the bound updates vectorised: a ring of
    10,000 nodes, where bounding prunes nothing, takes seconds instead of minutes.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import breadth_first_order

    edges = _edges(G)
    n = edges.n
    if 2 * len(edges.rows) == n * (n - 1):
        return 1 if n > 1 else 0
    adjacency = coo_array(
        (
            np.ones(2 * len(edges.rows)),
            (
                np.concatenate([edges.rows, edges.cols]),
                np.concatenate([edges.cols, edges.rows]),
            ),
        ),
        shape=(n, n),
    ).tocsr()
    everyone = np.arange(n)

    def distances(source: int) -> np.ndarray:
        # BFS tree from scipy, then depths by pointer jumping: O(n log depth) in numpy.
        _, tree = breadth_first_order(adjacency, source, directed=True)
        parent: np.ndarray = np.asarray(tree, dtype=np.int64)
        parent[source] = source
        depth: np.ndarray = (parent != everyone).astype(np.int64)
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                return depth
            depth += depth[parent]
            parent = grandparent

    degree = edges.degree
    lower = np.zeros(n, dtype=np.int64)
    upper = np.full(n, n, dtype=np.int64)
    candidates = np.ones(n, dtype=bool)
    max_lower, max_upper = 0, 0
    current = int(np.argmax(degree))
    high = False
    while True:
        dist = distances(current)
        eccentricity = int(dist.max())
        lower = np.where(
            candidates, np.maximum(lower, np.maximum(dist, eccentricity - dist)), lower
        )
        upper = np.where(candidates, np.minimum(upper, eccentricity + dist), upper)
        max_lower = max(max_lower, int(lower[candidates].max()))
        max_upper = max(max_upper, int(upper[candidates].max()))
        ruled_out = ((upper <= max_lower) & (2 * lower >= max_upper)) | (lower == upper)
        candidates &= ~ruled_out
        if not candidates.any():
            return max_lower
        high = not high
        # Next source: the candidate with the largest upper bound (or smallest lower bound),
        # ties to the highest degree, then the smallest index.
        bound = upper if high else -lower
        key = np.where(candidates, bound * (n + 1) + degree, np.iinfo(np.int64).min)
        current = int(np.argmax(key))


def diameter(G: nx.Graph) -> int | float:
    """Longest shortest path of ``G`` in hops.

    A disconnected graph has infinite diameter: this returns ``math.inf`` rather than
    raising, so a summary of a broken topology can still be printed.

    Eccentricity bounding makes this a handful of BFS runs on most graphs; on graphs where
    every node has the same eccentricity (ring, torus, exponential graph) it degrades to one
    BFS per node, about 10-30 s at 10,000 nodes.

    Args:
        G: An undirected graph.

    Returns:
        The diameter as an int, or ``math.inf`` if ``G`` is disconnected.

    Raises:
        TopologyError: If ``G`` has no nodes, or is directed or a multigraph.
    """
    _check_graph(G, "diameter")
    if not nx.is_connected(G):
        return math.inf
    try:
        return _diameter_bounded(G)
    except ImportError:
        return int(nx.diameter(G, usebounds=True))


def degree_stats(G: nx.Graph) -> DegreeStats:
    """Minimum, maximum, mean and population standard deviation of the degrees of ``G``.

    Args:
        G: An undirected graph.

    Returns:
        The degree statistics (self-loops not counted).

    Raises:
        TopologyError: If ``G`` has no nodes, or is directed or a multigraph.
    """
    _check_graph(G, "degree_stats")
    degree = _degrees(G, list(G))
    return DegreeStats(
        min=int(degree.min()),
        max=int(degree.max()),
        mean=float(degree.mean()),
        std=float(degree.std()),
    )


def facts(G: nx.Graph) -> GraphFacts:
    """All facts about ``G``: size, connectivity, degrees, diameter and spectral gap.

    Args:
        G: An undirected graph.

    Returns:
        The facts.

    Raises:
        TopologyError: If ``G`` has no nodes, or is directed or a multigraph.
    """
    _check_graph(G, "facts")
    components = nx.number_connected_components(G)
    return GraphFacts(
        nodes=G.number_of_nodes(),
        edges=G.number_of_edges() - nx.number_of_selfloops(G),
        connected=components == 1,
        components=components,
        degree=degree_stats(G),
        diameter=diameter(G),
        spectral_gap=spectral_gap(G),
    )


EXACT_BETWEENNESS_UP_TO = 500
"""Above this many nodes betweenness is estimated from this many sampled sources."""


def centrality(G: nx.Graph, measure: str, *, seed: int = 0) -> dict[Hashable, float]:
    """``degree``, ``betweenness`` (sampled above 500 nodes, seeded) or ``eigenvector`` of
    every node.

    Raises:
        TopologyError: ``measure`` is not one of the three.
    """
    match measure:
        case "degree":
            return {node: float(degree) for node, degree in G.degree()}
        case "betweenness":
            size = G.number_of_nodes()
            sample = None if size <= EXACT_BETWEENNESS_UP_TO else EXACT_BETWEENNESS_UP_TO
            return dict(nx.betweenness_centrality(G, k=sample, seed=seed % 2**32))
        case "eigenvector":
            try:
                return dict(nx.eigenvector_centrality(G, max_iter=2000, tol=1e-9))
            except nx.PowerIterationFailedConvergence:
                return dict(nx.eigenvector_centrality_numpy(G))
    raise TopologyError(f"centrality measure {measure!r}: one of degree, betweenness, eigenvector")
