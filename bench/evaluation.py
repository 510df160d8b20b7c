"""Cost of one round's evaluation on the standard workload, against the plain formulation.

Evaluates 1,000 models (MLP 64-32-10, the standard workload's) on 1,000 shared test examples
with :meth:`p2pfl.learn.batched.BatchedLearner.evaluate`, once scoring the logits with
:func:`p2pfl.learn.functional.score_logits` (class-first log-softmax) and once with the plain
expression it replaces (``F.cross_entropy`` over the last dimension and ``argmax``), in turns,
for several evaluation chunk sizes (``EVAL_BUDGET``: models x examples per chunk). Prints the
thread CPU milliseconds per round (best of ``--repeat``), the ratio, and whether both give the
same bits (they must).

    .venv/bin/python bench/evaluation.py [--nodes 1000] [--examples 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from sim_throughput import best_per_call

from p2pfl.learn import batched, functional
from p2pfl.learn.batched import BatchedLearner
from p2pfl.learn.models import build_model
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten

BUDGETS = (2**12, 2**13, 2**14, 2**15, 2**17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def model(seed: int) -> torch.nn.Module:
        return build_model("mlp", {"hidden": [32]}, (64,), 10, seed=seed)

    learner = BatchedLearner(model(0), OptimizerSettings(name="sgd", lr=0.1), (64,))
    generator = torch.Generator().manual_seed(0)
    vectors = torch.stack([flatten(model(seed)) for seed in range(args.nodes)])
    vectors += torch.randn(vectors.shape, generator=generator) * 0.3  # trained-like spread
    x = torch.randn(args.examples, 64, generator=generator)
    y = torch.randint(0, 10, (args.examples,), generator=generator)
    scorers = {
        "plain": functional._plain_scores,
        "class-first": functional.score_logits,
    }
    print(f"{args.nodes} models x {args.examples} test examples, MLP 64-32-10, one torch thread")
    results: dict[str, Any] = {}

    def contender(name: str, scorer: Callable[..., object]) -> Callable[[], object]:
        def evaluate() -> None:
            batched.score_logits = scorer  # type: ignore[assignment]
            results[name] = learner.evaluate(vectors, x, y)

        return evaluate

    for budget in BUDGETS:
        batched.EVAL_BUDGET = budget
        best = best_per_call(
            {name: contender(name, scorer) for name, scorer in scorers.items()},
            calls=1,
            repeats=args.repeat,
        )
        same = all(
            torch.equal(a, b) for a, b in zip(results["plain"], results["class-first"], strict=True)
        )
        rows = max(1, budget // args.examples)
        print(
            f"EVAL_BUDGET {budget:>7} ({rows:>3} models a chunk): "
            f"plain {best['plain'] * 1e3:6.1f} ms, class-first {best['class-first'] * 1e3:6.1f} ms,"
            f" ratio {best['plain'] / best['class-first']:.2f}x, same bits: {same}"
        )
    batched.score_logits = functional.score_logits


if __name__ == "__main__":
    main()
