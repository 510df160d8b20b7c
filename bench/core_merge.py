"""One dsgd merge of the standard workload, the finite-input entry against the general call.

A node of the standard workload merges, once a round, its own trained vector with its 6
neighbours' (MLP 64-32-10: 2,410 float32 each), weighted by sample counts (64 each). The
core's :class:`~p2pfl.protocol.merging.Merger` hands that merge to ``WeightedMean.merge_finite``
when every input is finite; the baseline here is the same ``Merger`` with the same rule minus
that entry, i.e. the general call (``MergeContext``, per-row finiteness flags, the weights
checked one by one), which the code before the entry took. With ``--baseline TREE`` a third
contender is ``TREE``'s own ``Merger`` and ``weighted`` rule (another checkout, e.g. the
session's starting commit), imported into this same process under their own module objects.
All run in this process in turns, ``--repeat`` times ``--calls`` merges each, and the best time
of each is kept (the least disturbed by other load); the results are checked bit for bit first.

    OMP_NUM_THREADS=1 .venv/bin/python bench/core_merge.py [--calls 5000] [--repeat 10]
        [--baseline TREE]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from sim_throughput import best_per_call

from p2pfl.identity import Identity
from p2pfl.merge import MergeContext
from p2pfl.merge.averaging import WeightedMean
from p2pfl.protocol.merging import Merger
from p2pfl.protocol.messages import ModelUpdate

SIZE = 64 * 32 + 32 + 32 * 10 + 10
DEGREE = 6
SAMPLES = 64


class GeneralOnly:
    """``weighted`` without its finite-input entry: every merge takes the general call."""

    name = "weighted"

    def __init__(self) -> None:
        self._rule = WeightedMean()

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return self._rule(own, received, weights, ctx)


def baseline_merger(tree: Path) -> Any:
    """``TREE``'s ``Merger`` with its ``weighted`` rule; this tree's modules stay as they were."""
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "p2pfl"}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        merging = importlib.import_module("p2pfl.protocol.merging")
        rule = importlib.import_module("p2pfl.merge").make_merge_rule("weighted")
        return merging.Merger(rule, own_weight=float(SAMPLES), layout=None, degree=DEGREE)
    finally:
        sys.path.remove(str(tree))
        for name in [name for name in sys.modules if name.split(".")[0] == "p2pfl"]:
            del sys.modules[name]
        sys.modules.update(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    own = torch.randn(SIZE, generator=generator)
    updates = [
        ModelUpdate(
            sender=Identity.from_seed(bytes([index + 1]) * 32).node_id,
            seq=1,
            round=3,
            samples=SAMPLES,
            degree=DEGREE,
            vector=torch.randn(SIZE, generator=generator),
            digest=bytes([index]) * 32,
        )
        for index in range(DEGREE)
    ]
    mergers = {
        "general": Merger(GeneralOnly(), own_weight=float(SAMPLES), layout=None, degree=DEGREE),
        "finite entry": Merger(
            WeightedMean(), own_weight=float(SAMPLES), layout=None, degree=DEGREE
        ),
    }
    if args.baseline is not None:
        mergers["baseline"] = baseline_merger(args.baseline)
    results = [merger.merge(own, updates, own_round=3) for merger in mergers.values()]
    for result in results[1:]:
        assert torch.equal(results[0].view(torch.int32), result.view(torch.int32))
    best = best_per_call(
        {
            name: partial(merger.merge, own, updates, own_round=3)
            for name, merger in mergers.items()
        },
        calls=args.calls,
        repeats=args.repeat,
    )
    for name, seconds in best.items():
        print(f"{name:>12}: {seconds * 1e6:6.1f} us a merge (best of {args.repeat})")
    for name in mergers:
        if name != "finite entry":
            print(f"ratio {name} / finite entry: {best[name] / best['finite entry']:.2f}x")


if __name__ == "__main__":
    main()
