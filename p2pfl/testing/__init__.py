"""Testing tools for merge rules and wire data, shipped for users of p2pfl.

Needs Hypothesis, which the core install does not pull in: ``pip install 'p2pfl-gossip[dev]'``
(or ``pip install hypothesis``). ``import p2pfl`` never imports this package.

Check a merge rule, built-in or your own, against the properties it promises::

    from p2pfl.testing import Promise, check_merge_rule

    def test_my_rule() -> None:
        check_merge_rule(MyRule(), promises={Promise.ORDER_INVARIANCE, Promise.IDENTITY})

A broken promise raises :class:`MergeRuleViolation` (an ``AssertionError``) naming the
property, with a minimal counterexample. The strategies behind the battery are public too:
see :mod:`p2pfl.testing.strategies`.
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
    "MergeRuleViolation",
    "Promise",
    "TopologySample",
    "UpdateSet",
    "check_merge_rule",
    "describe_promises",
    "envelopes",
    "held_out_probe",
    "identities",
    "merge_contexts",
    "node_ids",
    "param_layouts",
    "parameter_vectors",
    "pool_identity",
    "promises_for",
    "strategies",
    "topologies",
    "update_sets",
]
