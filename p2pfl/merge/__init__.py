"""Merge rules: how a node combines its own model with the models it received.

Importing this package registers the built-in rules (see :mod:`p2pfl.merge.averaging`);
build one by name with :func:`make_merge_rule`.
"""

from p2pfl.merge import averaging as averaging
from p2pfl.merge.base import (
    MERGE_RULES,
    MergeContext,
    MergeRule,
    make_merge_rule,
    register_merge_rule,
)

__all__ = ["MERGE_RULES", "MergeContext", "MergeRule", "make_merge_rule", "register_merge_rule"]
