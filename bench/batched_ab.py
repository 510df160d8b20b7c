"""The simulator's batched training, another tree's ``BatchedLearner`` against this one's, in
one process: old and new calls alternate, best of ``--repeats``.

``TREE/p2pfl/learn/batched.py`` is loaded as a separate module beside this tree's (it imports
the rest of p2pfl from this tree, so only that file's code differs: the step loop, the
gradient paths and, there, the training loss). Each side trains ``--rows`` nodes of
``--model`` (their shares of one pool, as the simulator holds them) for ``--steps`` local
steps of batch ``--batch`` per call; a figure is the best over ``--repeats`` rounds of the
mean thread CPU time of ``--calls`` calls. Both sides start from the same vectors and sampler
seeds; the script also says whether their results are bit-identical.

    .venv/bin/python bench/batched_ab.py --baseline TREE [--model mlp] [--rows 1000]
        [--steps 2] [--batch 32] [--calls 5] [--repeats 15]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from node_training import CLASSES, MODELS
from sim_throughput import best_per_call, load_module

from p2pfl.learn import MinibatchSampler, build_model
from p2pfl.learn import batched as this_tree
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten

EXAMPLES = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    options, shape = MODELS[args.model]
    rows = args.rows
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows * EXAMPLES, *shape, generator=generator)
    y = torch.randint(0, CLASSES, (rows * EXAMPLES,), generator=generator)
    settings = OptimizerSettings(lr=0.05)
    start = torch.stack(
        [flatten(build_model(args.model, options, shape, CLASSES, seed=n)) for n in range(8)]
    )
    start = start.repeat(-(-rows // 8), 1)[:rows]
    baseline = load_module(args.baseline / "p2pfl" / "learn" / "batched.py", "baseline_batched")
    sides: dict[str, dict[str, Any]] = {}
    for name, module in (("baseline", baseline), ("this tree", this_tree)):
        learner = module.BatchedLearner(
            build_model(args.model, options, shape, CLASSES, seed=0), settings, shape
        )
        shares = module.Shares(x, y, torch.arange(rows) * EXAMPLES)
        samplers = [MinibatchSampler(EXAMPLES, args.batch, seed=n) for n in range(rows)]
        sides[name] = {"learner": learner, "shares": shares, "samplers": samplers}

    def contender(side: dict[str, Any]) -> Callable[[], Any]:
        return lambda: side["learner"].train(
            list(range(rows)), start, side["shares"], side["samplers"], args.steps, [0] * rows
        )

    contenders = {name: contender(side) for name, side in sides.items()}
    # The warm-up, and the bit-identity check.
    results = {name: call() for name, call in contenders.items()}
    same = all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))
    best = best_per_call(contenders, calls=args.calls, repeats=args.repeats)
    base, ours = best["baseline"], best["this tree"]
    print(
        f"{args.model}, {rows} rows, {args.steps} steps of batch {args.batch}: first call bit-identical: {same}"
    )
    print(
        f"baseline {base * 1e3:.2f} ms CPU per call, this tree {ours * 1e3:.2f} ms, ratio {base / ours:.3f}x"
    )


if __name__ == "__main__":
    main()
