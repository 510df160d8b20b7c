"""Merge rules: how a node combines its own model with the models it received.

Importing this package registers the built-in rules (see :mod:`p2pfl.merge.averaging`);
build one by name with :func:`make_merge_rule`.
"""

from p2pfl.merge import averaging as averaging
from p2pfl.merge import bristle as bristle
from p2pfl.merge import gossip_rules as gossip_rules
from p2pfl.merge import kernels as kernels
from p2pfl.merge import robust as robust
from p2pfl.merge import sybil as sybil
from p2pfl.merge import variance as variance
from p2pfl.merge.base import (
    MERGE_RULES,
    HistoryHook,
    MergeContext,
    MergeRule,
    history_hook,
    make_merge_rule,
    register_merge_rule,
)
from p2pfl.merge.bristle import Bristle, BristleContextError
from p2pfl.merge.gossip_rules import Balance, ClippedGossip
from p2pfl.merge.kernels import coordinate_median, order_statistics, sort_rows, trimmed_mean
from p2pfl.merge.robust import (
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NearestNeighbourAveraging,
    TrimmedMean,
)
from p2pfl.merge.sybil import (
    HistoryTable,
    history_gossip_weights,
    record_distant_history,
    similarity_weights,
)
from p2pfl.merge.variance import VarianceCorrected

__all__ = ["MERGE_RULES", "MergeContext", "MergeRule", "make_merge_rule", "register_merge_rule"]
__all__ += ["HistoryHook", "history_hook"]
__all__ += [
    "Bristle",
    "BristleContextError",
    "HistoryTable",
    "history_gossip_weights",
    "record_distant_history",
    "similarity_weights",
]
__all__ += [
    "Balance",
    "CenteredClipping",
    "ClippedGossip",
    "CoordinateMedian",
    "GeometricMedian",
    "Krum",
    "MultiKrum",
    "NearestNeighbourAveraging",
    "TrimmedMean",
    "VarianceCorrected",
    "coordinate_median",
    "order_statistics",
    "sort_rows",
    "trimmed_mean",
]
