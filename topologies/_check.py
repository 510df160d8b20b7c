"""Argument checks shared by the generators (private).

What an integer or a number is comes from :mod:`p2pfl.checks` (one definition for configs,
scenarios and generators); only the wording is the generators' own.

Every check raises :class:`~p2pfl.errors.TopologyError` with a message of the form
``"<family>: <name> = <value> must satisfy <rule> (<context>)"``, so a user reading it knows
which argument to change and what to choose instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import networkx as nx
import numpy as np

from p2pfl.checks import is_int, is_real
from p2pfl.errors import TopologyError

#: How many derived seeds a ``connected=True`` generator tries before giving up.
MAX_CONNECT_ATTEMPTS = 100


def fail(family: str, name: str, value: object, rule: str, **context: object) -> TopologyError:
    """Build the error for an argument that breaks ``rule``.

    Args:
        family: Generator name, e.g. ``"barabasi_albert"``.
        name: Argument name, e.g. ``"m"``.
        value: The rejected value.
        rule: The allowed range, e.g. ``"1 <= m < n"``.
        **context: Other arguments the rule refers to, shown in parentheses.

    Returns:
        The error, for the caller to raise.
    """
    message = f"{family}: {name} = {value!r} must satisfy {rule}"
    if context:
        message += " (" + ", ".join(f"{key} = {val!r}" for key, val in context.items()) + ")"
    return TopologyError(message)


def check_int(family: str, name: str, value: object) -> int:
    """Return ``value`` if it is an int (bools are not).

    Raises:
        TopologyError: If ``value`` is not an int.
    """
    if not is_int(value):
        raise TopologyError(f"{family}: {name} = {value!r} must be an int")
    return operator.index(value)


def check_at_least(family: str, name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``.

    Raises:
        TopologyError: If ``value`` is not an int or is below ``minimum``.
    """
    number = check_int(family, name, value)
    if number < minimum:
        raise fail(family, name, number, f"{name} >= {minimum}")
    return number


def check_real(family: str, name: str, value: object) -> float:
    """Return ``value`` as a finite float (ints are accepted, bools are not).

    Raises:
        TopologyError: If ``value`` is not a finite real number.
    """
    if not is_real(value):
        raise TopologyError(f"{family}: {name} = {value!r} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise fail(family, name, value, f"{name} is finite")
    return number


def check_probability(family: str, name: str, value: object) -> float:
    """Return ``value`` as a float in ``[0, 1]``.

    Raises:
        TopologyError: If ``value`` is not a number in ``[0, 1]``.
    """
    number = check_real(family, name, value)
    if not 0.0 <= number <= 1.0:
        raise fail(family, name, value, f"0 <= {name} <= 1")
    return number


def check_bool(family: str, name: str, value: object) -> bool:
    """Return ``value`` if it is a bool.

    Raises:
        TopologyError: If ``value`` is not a bool.
    """
    if not isinstance(value, bool | np.bool_):
        raise TopologyError(f"{family}: {name} = {value!r} must be a bool")
    return bool(value)


def check_seed(family: str, seed: object) -> int | None:
    """Return ``seed`` if it is None or a non-negative int.

    Raises:
        TopologyError: If ``seed`` is neither None nor a non-negative int.
    """
    if seed is None:
        return None
    if not is_int(seed):
        raise TopologyError(f"{family}: seed = {seed!r} must be None or a non-negative int")
    return check_at_least(family, "seed", seed, 0)


def derived_seed(seed: int | None, attempt: int) -> int | None:
    """Seed for resampling attempt ``attempt`` of a generator called with ``seed``.

    Attempt 0 uses ``seed`` itself, so a first sample that already satisfies the caller equals
    the graph drawn without resampling. Later attempts mix ``(seed, attempt)`` through a
    :class:`numpy.random.SeedSequence`, so nearby seeds give unrelated streams.
    """
    if seed is None or attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


def canonical(n: int, edges: Iterable[tuple[int, int]], source: nx.Graph | None = None) -> nx.Graph:
    """A fresh graph on nodes ``0..n-1`` (inserted in order) with ``edges`` in sorted order.

    The canonical insertion order makes neighbour iteration depend only on the edge set, so
    two calls that draw the same graph also iterate it the same way.

    Args:
        n: Number of nodes.
        edges: Edges between integers in ``0..n-1``; self-loops are dropped.
        source: If given, node attributes are copied from it (nodes ``0..n-1``).

    Returns:
        The new graph.
    """
    graph = nx.Graph()
    if source is None:
        graph.add_nodes_from(range(n))
    else:
        graph.add_nodes_from((v, dict(source.nodes[v])) for v in range(n))
    graph.add_edges_from(sorted({(min(u, v), max(u, v)) for u, v in edges if u != v}))
    return graph
