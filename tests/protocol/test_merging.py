"""The core's merge step when a rule cannot give its guarantee with the inputs at hand."""

from __future__ import annotations

import torch

from p2pfl.identity import Identity
from p2pfl.merge import make_merge_rule
from p2pfl.protocol.merging import Merger
from p2pfl.protocol.messages import ModelUpdate


def _update(vector: torch.Tensor) -> ModelUpdate:
    return ModelUpdate(
        sender=Identity.from_seed(bytes(32)).node_id,
        seq=0,
        round=0,
        samples=10,
        degree=1,
        vector=vector,
        digest=b"d" * 32,
    )


def test_too_few_inputs_for_krum_keeps_the_own_model_and_counts_it() -> None:
    merger = Merger(make_merge_rule("krum", f=1), own_weight=10.0, layout=None)
    own = torch.zeros(4)
    merged = merger.merge(own, [_update(torch.full((4,), 1e6))], own_round=0)
    assert torch.equal(merged, own)
    assert merged is not own
    assert merger.fallbacks == 1


def test_enough_inputs_for_krum_merges() -> None:
    merger = Merger(make_merge_rule("krum", f=1), own_weight=10.0, layout=None)
    own = torch.zeros(4)
    updates = [_update(torch.full((4,), value)) for value in (0.1, 0.2, 0.15, 0.12, 1e6)]
    merged = merger.merge(own, updates, own_round=0)
    assert merger.fallbacks == 0
    assert float(merged.abs().max()) <= 0.2
