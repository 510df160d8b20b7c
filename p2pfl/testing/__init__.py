"""Testing tools for merge rules, wire data, protocol modes and runtime nodes, shipped for
users of p2pfl.

Needs Hypothesis, which the core install does not pull in: ``pip install 'p2pfl-gossip[dev]'``
(or ``pip install hypothesis``). ``import p2pfl`` never imports this package.

Check a merge rule, built-in or your own, against the properties it promises::

    from p2pfl.testing import Promise, check_merge_rule

    def test_my_rule() -> None:
        check_merge_rule(MyRule(), promises={Promise.ORDER_INVARIANCE, Promise.IDENTITY})

A broken promise raises :class:`MergeRuleViolation` (an ``AssertionError``) naming the
property, with a minimal counterexample. The strategies behind the battery are public too:
see :mod:`p2pfl.testing.strategies`.

Run a protocol mode or a merge rule on many nodes in virtual time with the in-memory network
driver :class:`FakeNetwork` (see :mod:`p2pfl.testing.network`)::

    from p2pfl.testing import FakeNetwork

    net = FakeNetwork(3, [(0, 1), (1, 2), (0, 2)], config, vectors=vectors, merge="mean")
    net.start()
    net.run()
    assert all(node.core.finished for node in net.nodes.values())

Run whole runtime nodes (:class:`p2pfl.runtime.node.Node`) without sockets, on trio's
virtual clock, with :class:`MemoryNetwork` (see :mod:`p2pfl.testing.memory`)::

    network = MemoryNetwork()
    node = Node(config, listeners=[network.listen(7001)], policy=MemoryLinks(network))
"""

try:
    import hypothesis as _hypothesis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "p2pfl.testing needs Hypothesis: pip install 'p2pfl-gossip[dev]' (or hypothesis)"
    ) from exc

from p2pfl.testing import strategies as strategies
from p2pfl.testing.battery import (
    PROMISES,
    UNIVERSAL,
    MergeRuleViolation,
    Promise,
    check_merge_rule,
    describe_promises,
    promises_for,
)
from p2pfl.testing.memory import MemoryLinks, MemoryListener, MemoryNetwork
from p2pfl.testing.network import FakeNetwork, FakeNode, identity_of, plus_one, repr_actions
from p2pfl.testing.strategies import (
    IDENTITY_POOL_SIZE,
    TopologySample,
    UpdateSet,
    envelopes,
    held_out_probe,
    identities,
    merge_contexts,
    node_ids,
    param_layouts,
    parameter_vectors,
    pool_identity,
    topologies,
    update_sets,
)

__all__ = [
    "IDENTITY_POOL_SIZE",
    "PROMISES",
    "UNIVERSAL",
    "FakeNetwork",
    "FakeNode",
    "MemoryLinks",
    "MemoryListener",
    "MemoryNetwork",
    "MergeRuleViolation",
    "Promise",
    "TopologySample",
    "UpdateSet",
    "check_merge_rule",
    "describe_promises",
    "envelopes",
    "held_out_probe",
    "identities",
    "identity_of",
    "merge_contexts",
    "node_ids",
    "param_layouts",
    "parameter_vectors",
    "plus_one",
    "pool_identity",
    "promises_for",
    "repr_actions",
    "strategies",
    "topologies",
    "update_sets",
]
