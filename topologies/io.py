"""Topology files: GraphML and plain edge lists.

Loading relabels nodes to ``0..n-1`` in the sorted order of their original labels: by
numeric value when every label is an integer (so ``"2"`` comes before ``"10"`` and a saved
``0..n-1`` graph loads back unchanged), as strings otherwise. Loaded graphs are undirected
and simple: directions are dropped, parallel edges merged and self-loops removed.

Edge-list format: one edge per line as two labels separated by whitespace or a comma; extra
columns are ignored; ``#`` starts a comment; a line holding a single label declares an
isolated node (networkx's own reader skips such lines, so files stay readable by it).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Hashable, Iterable
from os import PathLike
from pathlib import Path

import networkx as nx

from p2pfl.errors import TopologyError

__all__ = [
    "EDGELIST_SUFFIXES",
    "GRAPHML_SUFFIXES",
    "load",
    "load_edgelist",
    "load_graphml",
    "save",
    "save_edgelist",
    "save_graphml",
]

StrPath = str | PathLike[str]

#: File suffixes :func:`load` and :func:`save` treat as GraphML.
GRAPHML_SUFFIXES = (".graphml", ".xml")
#: File suffixes :func:`load` and :func:`save` treat as edge lists.
EDGELIST_SUFFIXES = (".edgelist", ".edges", ".txt", ".csv", ".tsv")

_SCALAR = (str, int, float, bool)
_SEPARATOR = re.compile(r"[,\s]+")


def _sorted_labels(labels: Iterable[Hashable]) -> list[Hashable]:
    labels = list(labels)
    try:
        numbers = [int(str(label)) for label in labels]
    except ValueError:
        return sorted(labels, key=str)
    order = sorted(range(len(labels)), key=lambda i: (numbers[i], str(labels[i])))
    return [labels[i] for i in order]


def _relabel(source: nx.Graph, path: Path) -> nx.Graph:
    """Undirected simple copy of ``source`` with nodes ``0..n-1`` in sorted label order."""
    if source.number_of_nodes() == 0:
        raise TopologyError(f"topology file {str(path)!r} holds no nodes")
    order = _sorted_labels(source.nodes)
    index = {label: i for i, label in enumerate(order)}
    graph = nx.Graph()
    graph.add_nodes_from((index[label], dict(source.nodes[label])) for label in order)
    edges = sorted(
        (min(index[u], index[v]), max(index[u], index[v]), dict(data))
        for u, v, data in source.edges(data=True)
        if u != v
    )
    graph.add_edges_from(edges)
    return graph


def _existing_file(path: StrPath) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TopologyError(f"topology file {str(path)!r} does not exist or is not a file")
    return path


def load_graphml(path: StrPath) -> nx.Graph:
    """Read a GraphML topology and relabel its nodes to ``0..n-1``.

    Args:
        path: The GraphML file.

    Returns:
        The undirected simple graph, keeping node and edge attributes.

    Raises:
        TopologyError: If the file is missing, unreadable, not valid GraphML or has no nodes.
    """
    path = _existing_file(path)
    try:
        source = nx.read_graphml(path)
    except (
        OSError,
        UnicodeDecodeError,
        ET.ParseError,
        nx.NetworkXError,
        KeyError,
        ValueError,
    ) as exc:
        raise TopologyError(f"cannot read GraphML file {str(path)!r}: {exc}") from exc
    return _relabel(source, path)


def load_edgelist(path: StrPath) -> nx.Graph:
    """Read an edge-list topology (format in the module docstring), relabelling to ``0..n-1``.

    Args:
        path: The edge-list file.

    Returns:
        The undirected simple graph.

    Raises:
        TopologyError: If the file is missing, unreadable, not UTF-8 text or has no nodes.
    """
    path = _existing_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read edge-list file {str(path)!r}: {exc}") from exc
    source = nx.Graph()
    for line in text.splitlines():
        tokens = [token for token in _SEPARATOR.split(line.split("#", 1)[0]) if token]
        if len(tokens) == 1:
            source.add_node(tokens[0])
        elif tokens:
            source.add_edge(tokens[0], tokens[1])
    return _relabel(source, path)


def load(path: StrPath) -> nx.Graph:
    """Read a topology file, choosing the format by suffix.

    Args:
        path: A file ending in one of :data:`GRAPHML_SUFFIXES` or :data:`EDGELIST_SUFFIXES`.

    Returns:
        The graph on nodes ``0..n-1``.

    Raises:
        TopologyError: If the suffix is unknown, or the file cannot be loaded.
    """
    suffix = Path(path).suffix.lower()
    if suffix in GRAPHML_SUFFIXES:
        return load_graphml(path)
    if suffix in EDGELIST_SUFFIXES:
        return load_edgelist(path)
    raise TopologyError(
        f"topology file {str(path)!r}: suffix {suffix!r} must be one of "
        f"{', '.join(GRAPHML_SUFFIXES + EDGELIST_SUFFIXES)}"
    )


def _scalar_attributes(data: dict[str, object]) -> dict[str, object]:
    return {
        key: value
        for key, value in data.items()
        if isinstance(value, _SCALAR) and not (isinstance(value, float) and math.isnan(value))
    }


def save_graphml(G: nx.Graph, path: StrPath) -> None:
    """Write ``G`` as GraphML.

    Scalar node, edge and graph attributes (str, int, float, bool) are written; others, such
    as the ``pos`` list of :func:`~topologies.random_graphs.random_geometric`, are skipped
    because GraphML cannot hold them.

    Args:
        G: The graph.
        path: Destination file; its directory must exist.

    Raises:
        OSError: If the file cannot be written.
    """
    graph = nx.Graph()
    graph.graph.update(_scalar_attributes(G.graph))
    graph.add_nodes_from((v, _scalar_attributes(data)) for v, data in G.nodes(data=True))
    graph.add_edges_from((u, v, _scalar_attributes(data)) for u, v, data in G.edges(data=True))
    nx.write_graphml(graph, Path(path))


def save_edgelist(G: nx.Graph, path: StrPath) -> None:
    """Write ``G`` as an edge list: ``u v`` per edge, then one line per isolated node.

    Attributes are not written. Labels must not contain whitespace, commas or ``#``.

    Args:
        G: The graph.
        path: Destination file; its directory must exist.

    Raises:
        TopologyError: If a node label contains whitespace, a comma or ``#``.
        OSError: If the file cannot be written.
    """
    for v in G:
        if _SEPARATOR.search(str(v)) or "#" in str(v) or not str(v):
            raise TopologyError(
                f"save_edgelist: node label {v!r} must be non-empty and hold no whitespace, "
                "comma or '#'"
            )
    lines = [f"{u} {v}" for u, v in G.edges()]
    lines += [str(v) for v in G if G.degree(v) == 0]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def save(G: nx.Graph, path: StrPath) -> None:
    """Write ``G``, choosing the format by suffix (see :func:`load`).

    Args:
        G: The graph.
        path: A file ending in one of :data:`GRAPHML_SUFFIXES` or :data:`EDGELIST_SUFFIXES`.

    Raises:
        TopologyError: If the suffix is unknown, or (edge lists) a label cannot be written.
        OSError: If the file cannot be written.
    """
    suffix = Path(path).suffix.lower()
    if suffix in GRAPHML_SUFFIXES:
        save_graphml(G, path)
    elif suffix in EDGELIST_SUFFIXES:
        save_edgelist(G, path)
    else:
        raise TopologyError(
            f"topology file {str(path)!r}: suffix {suffix!r} must be one of "
            f"{', '.join(GRAPHML_SUFFIXES + EDGELIST_SUFFIXES)}"
        )
