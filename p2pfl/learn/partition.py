"""Partitions of a training set across nodes: IID, the usual non-IID families, and natural.

Every partition takes the labels of the training set, the number of nodes ``n`` and a
``seed``, and returns ``n`` arrays of int64 indices into the labels, one per node, sorted.
Every index appears in exactly one array; node ``i`` gets ``result[i]``. All randomness comes
from ``numpy.random.default_rng(seed)``, so a seed fixes the partition on every host.
``natural`` also takes each example's owner (client, writer) and keeps owners whole.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pfl.checks import check_int, check_number, check_seed
from p2pfl.errors import ConfigError
from p2pfl.learn._config import call_with_params

Partition = list[npt.NDArray[np.int64]]
DEFAULT_MAX_ATTEMPTS = 100


def iid(labels: npt.ArrayLike, n: int, *, seed: int) -> Partition:
    """Shuffle and deal out evenly: node sizes differ by at most one.

    Raises:
        ConfigError: ``n`` is not in ``[1, len(labels)]`` or ``seed`` is negative.
    """
    y = _check_common(labels, n, seed)
    rng = np.random.default_rng(seed)
    return _sorted(np.array_split(rng.permutation(len(y)), n))


def dirichlet(
    labels: npt.ArrayLike,
    n: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 1,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Partition:
    """Label skew: each class is spread over the nodes by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each node few classes; large ``alpha`` (100) approaches IID.
    The whole draw is repeated until every node holds at least ``min_size`` examples.

    Args:
        labels: class label of every training example.
        n: number of nodes.
        alpha: Dirichlet concentration, > 0.
        seed: seed of the numpy generator (non-negative).
        min_size: smallest acceptable node size; 0 accepts the first draw.
        max_attempts: how many draws to try before giving up.

    Raises:
        ConfigError: an argument is out of range, ``n * min_size`` exceeds the number of
            examples, or no draw within ``max_attempts`` met ``min_size`` (raise ``alpha``,
            lower ``min_size`` or use fewer nodes).
    """
    y = _check_common(labels, n, seed)
    check_number("alpha", alpha, minimum=0, open_min=True)
    check_int("min_size", min_size, 0)
    check_int("max_attempts", max_attempts, 1)
    if n * min_size > len(y):
        raise ConfigError(
            "min_size", min_size, f"at most {len(y) // n} for {n} nodes and {len(y)} examples"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_attempts):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n)]
        for members in by_class:
            counts = rng.multinomial(len(members), rng.dirichlet(np.full(n, float(alpha))))
            chunks = np.split(rng.permutation(members), np.cumsum(counts)[:-1])
            for part, chunk in zip(parts, chunks, strict=True):
                part.append(chunk)
        nodes = [np.concatenate(p) for p in parts]
        if min(len(node) for node in nodes) >= min_size:
            return _sorted(nodes)
    raise ConfigError(
        "alpha",
        alpha,
        f"no draw in {max_attempts} attempts gave all {n} nodes >= {min_size} examples; "
        "raise alpha, lower min_size or use fewer nodes",
    )


def shards(labels: npt.ArrayLike, n: int, k: int, *, seed: int) -> Partition:
    """Pathological label skew (McMahan et al.): sort by label, cut ``n * k`` shards, ``k`` per node.

    Ties within a label are broken at random, shard sizes differ by at most one, and shards
    are dealt to nodes at random.

    Raises:
        ConfigError: ``k < 1``, ``n * k`` exceeds the number of examples, or another
            argument is out of range.
    """
    y = _check_common(labels, n, seed)
    check_int("k", k, 1)
    if n * k > len(y):
        raise ConfigError("k", k, f"at most {len(y) // n} for {n} nodes and {len(y)} examples")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    cut = np.array_split(by_label, n * k)
    order = rng.permutation(n * k)
    return _sorted([np.concatenate([cut[s] for s in order[i * k : (i + 1) * k]]) for i in range(n)])


def quantity_skew(labels: npt.ArrayLike, n: int, alpha: float, *, seed: int) -> Partition:
    """Size skew: node shares drawn from Dirichlet(alpha) over nodes, every node >= 1 example.

    Examples are assigned at random, so label proportions stay roughly IID.

    Raises:
        ConfigError: ``alpha <= 0`` or another argument is out of range.
    """
    y = _check_common(labels, n, seed)
    check_number("alpha", alpha, minimum=0, open_min=True)
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.multinomial(len(y) - n, rng.dirichlet(np.full(n, float(alpha))))
    return _sorted(np.split(rng.permutation(len(y)), np.cumsum(sizes)[:-1]))


def natural(
    labels: npt.ArrayLike, n: int, *, seed: int, owners: npt.ArrayLike | None = None
) -> Partition:
    """The data's own split: every owner's examples go to one node, owners dealt round-robin.

    Owners are taken in sorted order of their ids: owner ``j`` (0-based in that order) goes
    to node ``j % n``, so with as many owners as nodes each node holds exactly one owner,
    and with more, node sizes follow the owners'. Nothing is random; ``seed`` is accepted
    for a uniform signature.

    Raises:
        ConfigError: the dataset has no owners, ``owners`` does not match ``labels``, or
            there are fewer owners than nodes (a node would get no data).
    """
    y = _check_common(labels, n, seed)
    if owners is None:
        raise ConfigError(
            "partition",
            "natural",
            "a dataset whose examples carry an owner (synthetic_leaf, npz with a client "
            "array, hf with owner_column); use iid, dirichlet, shards or quantity_skew",
        )
    who = np.asarray(owners)
    if who.shape != y.shape or not np.issubdtype(who.dtype, np.integer):
        raise ConfigError(
            "owners", f"array of {who.dtype} {who.shape}", f"int ids of shape {y.shape}"
        )
    ids, code = np.unique(who, return_inverse=True)
    if len(ids) < n:
        raise ConfigError(
            "partition",
            "natural",
            f"{len(ids)} owners for {n} nodes: at least one owner per data-holding node; "
            "use fewer nodes or another partition",
        )
    node_of = code.reshape(-1) % n
    return _sorted([np.flatnonzero(node_of == i) for i in range(n)])


PARTITIONS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
    "natural": natural,
}
"""Partition functions by name; each is ``fn(labels, n, *, seed, **params)``; those with an
``owners`` parameter also get each example's owner (or ``None``)."""

FIXED_ARGUMENTS = ("labels", "n", "seed", "owners")
"""Arguments a partition gets from the run, never from its ``partition_params``."""


def make_partition(
    name: str,
    labels: npt.ArrayLike,
    n: int,
    /,
    *,
    seed: int,
    owners: npt.ArrayLike | None = None,
    **params: Any,
) -> Partition:
    """Partition ``labels`` over ``n`` nodes with the registered function ``name``.

    Args:
        name: a name in :data:`PARTITIONS`.
        labels: class label of every training example.
        n: number of nodes.
        seed: seed of the partition's draws.
        owners: each example's owner, for partitions that use it (``natural``).
        **params: the partition's own parameters.

    Raises:
        ConfigError: ``name`` is not in :data:`PARTITIONS`, a parameter is unknown, missing
            or out of range.
    """
    if name not in PARTITIONS:
        raise ConfigError("partition", name, f"one of {', '.join(sorted(PARTITIONS))}")
    fixed: dict[str, Any] = {"labels": labels, "n": n, "seed": seed}
    if "owners" in inspect.signature(PARTITIONS[name]).parameters:
        fixed["owners"] = owners
    partition: Partition = call_with_params("partition", name, PARTITIONS[name], params, fixed)
    return partition


def _check_common(labels: npt.ArrayLike, n: int, seed: int) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ConfigError("labels", f"array of {y.dtype} {y.shape}", "a 1-D array of int labels")
    check_int("n", n, 1)
    if n > len(y):
        raise ConfigError("n", n, f"at most the number of examples ({len(y)})")
    check_seed(seed)
    return y.astype(np.int64, copy=False)


def _sorted(parts: list[npt.NDArray[Any]]) -> Partition:
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]
