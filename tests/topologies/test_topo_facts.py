"""Facts: Metropolis–Hastings weights, spectral gap, diameter, degree statistics."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import topologies as T
import topologies.facts as facts_module
from p2pfl.errors import TopologyError
from topologies.facts import (
    _diameter_bounded,
    _slem_dense,
    _slem_sparse,
    facts,
)


@st.composite
def small_graphs(draw: st.DrawFn) -> nx.Graph:
    n = draw(st.integers(1, 12))
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((u, v) for u, v in draw(st.lists(pairs, max_size=40)) if u != v)
    return graph


@given(small_graphs())
def test_mh_weights_symmetric_doubly_stochastic(graph: nx.Graph) -> None:
    weights = T.metropolis_hastings_weights(graph)
    n = graph.number_of_nodes()
    assert weights.shape == (n, n)
    np.testing.assert_allclose(weights, weights.T, atol=0)
    np.testing.assert_allclose(weights.sum(axis=0), np.ones(n), atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), np.ones(n), atol=1e-12)
    assert (weights >= 0).all()
    assert (np.diag(weights) > 0).all()
    off_support = ~(nx.to_numpy_array(graph, nodelist=range(n)) > 0) & ~np.eye(n, dtype=bool)
    assert (weights[off_support] == 0).all()


@given(small_graphs())
def test_spectral_gap_in_range_and_zero_iff_disconnected(graph: nx.Graph) -> None:
    gap = T.spectral_gap(graph)
    assert 0.0 <= gap <= 1.0
    assert (gap > 1e-12) == nx.is_connected(graph)


@given(small_graphs())
def test_diameter_matches_networkx(graph: nx.Graph) -> None:
    if nx.is_connected(graph):
        assert T.diameter(graph) == nx.diameter(graph)
        assert _diameter_bounded(graph) == nx.diameter(graph)
    else:
        assert T.diameter(graph) == math.inf


def test_mh_weights_known_values() -> None:
    weights = T.metropolis_hastings_weights(T.line(3))  # degrees 1, 2, 1
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(weights, expected)


def test_mh_weights_follow_node_labels_not_insertion_order() -> None:
    graph = nx.Graph([(2, 1), (1, 0)])
    np.testing.assert_allclose(
        T.metropolis_hastings_weights(graph), T.metropolis_hastings_weights(T.line(3))
    )


def test_spectral_gap_orders_topologies() -> None:
    n = 16
    complete, expo, ring = (
        T.spectral_gap(T.complete(n)),
        T.spectral_gap(T.exponential(n)),
        T.spectral_gap(T.ring(n)),
    )
    assert complete == pytest.approx(1.0)
    assert complete > expo > ring > 0
    # MH on a ring: W = I/3 + (shift + shift^T)/3, so lambda_2 = 1/3 + 2/3 cos(2 pi / n).
    assert ring == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)), rel=1e-9)
    assert T.spectral_gap(nx.Graph([(0, 1), (2, 3)])) == 0.0
    assert T.spectral_gap(T.complete(1)) == 1.0


SPARSE_CASES = {
    "ring": T.ring(150),
    "line": T.line(120),
    "star": T.star(150),
    "barabasi_albert": T.barabasi_albert(150, 2, seed=1),
    "watts_strogatz": T.watts_strogatz(150, 4, 0.02, seed=1),
    "two_cliques": T.two_cliques(120),
    # MH on K_{20,20} has lambda_2 = 1/21 but lambda_n = -19/21: the SLEM is at the bottom
    "bipartite": nx.complete_bipartite_graph(20, 20),
}


@pytest.mark.parametrize("lanczos_maxiter", [100, 1], ids=["lanczos", "shift_invert"])
@pytest.mark.parametrize("name", SPARSE_CASES)
def test_sparse_spectral_gap_matches_dense(
    name: str, lanczos_maxiter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # maxiter=1 makes plain Lanczos give up, forcing the shift-invert path.
    monkeypatch.setattr(facts_module, "_LANCZOS_MAXITER", lanczos_maxiter)
    graph = SPARSE_CASES[name]
    sparse = _slem_sparse(graph)
    assert sparse is not None
    assert 1 - sparse == pytest.approx(1 - _slem_dense(graph), rel=1e-6, abs=1e-12)


def test_spectral_gap_uses_sparse_solver_above_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = T.barabasi_albert(120, 2, seed=4)
    dense = T.spectral_gap(graph)
    monkeypatch.setattr(facts_module, "DENSE_EIGEN_LIMIT", 50)
    monkeypatch.setattr(facts_module, "_slem_dense", None)  # any dense call would fail
    assert T.spectral_gap(graph) == pytest.approx(dense, rel=1e-9)


def test_diameter_and_degree_stats() -> None:
    assert T.diameter(T.ring(9)) == 4
    assert T.diameter(T.complete(5)) == 1
    assert T.diameter(T.complete(1)) == 0
    assert T.diameter(T.two_cliques(10)) == 3
    assert T.diameter(T.torus(6, 8)) == 3 + 4
    stats = T.degree_stats(T.star(5))
    assert (stats.min, stats.max, stats.mean) == (1, 4, 1.6)
    assert stats.std == pytest.approx(np.std([4, 1, 1, 1, 1]))


def test_facts_summary() -> None:
    summary = facts(T.ring(8))
    assert (summary.nodes, summary.edges, summary.connected, summary.components) == (8, 8, True, 1)
    assert summary.degree == T.DegreeStats(2, 2, 2.0, 0.0)
    assert summary.diameter == 4
    assert summary.spectral_gap == pytest.approx(T.spectral_gap(T.ring(8)))
    broken = facts(nx.Graph([(0, 1), (2, 3)]))
    assert (broken.connected, broken.components, broken.diameter, broken.spectral_gap) == (
        False,
        2,
        math.inf,
        0.0,
    )


def test_facts_reject_empty_and_directed_graphs() -> None:
    for call in (T.graph_facts, T.spectral_gap, T.diameter, T.degree_stats):
        with pytest.raises(TopologyError, match="no nodes"):
            call(nx.Graph())
    with pytest.raises(TopologyError, match="DiGraph"):
        T.metropolis_hastings_weights(nx.DiGraph([(0, 1)]))
    assert T.metropolis_hastings_weights(nx.Graph()).shape == (0, 0)
