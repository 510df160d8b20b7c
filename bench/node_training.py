"""A node's training cost: :meth:`p2pfl.learn.TorchLearner.train` per call, its start-up, and
the simulator's call for ``--rows`` nodes of the same model.

One ``TorchLearner`` (what a ``p2pfl node`` process holds) on random data shaped like its
model's dataset (mlp: 64 features as digits, hidden 32; cnn1d: 40-sample signals as MNIST-1D;
lenet5: 1x28x28 images), ``--examples`` training examples, batch ``--batch``, SGD with
momentum 0.9. Each figure is the best of ``--repeats`` measurements of ``--calls`` calls of
``train(vector, --steps)`` after one warm-up call, in thread CPU time (``time.thread_time``,
one torch thread), per call; ``build`` is the CPU time of constructing the learner (the
model's probe included); ``batched`` is one
:meth:`~p2pfl.learn.batched.BatchedLearner.train` call for ``--rows`` nodes (each
``--examples`` examples, their shares of one pool, as the simulator holds them), measured
the same way.

    .venv/bin/python bench/node_training.py [--models mlp,cnn1d,lenet5] [--steps 2]
        [--batch 32] [--calls 200] [--repeats 5] [--rows 16] [--baseline TREE [--repeat N]]

``--baseline TREE`` runs the same command alternately against ``TREE`` (e.g. a checkout of
main) and this tree in fresh processes and prints the ratios of the medians (above 1 means
this tree is faster), as ``bench/sim_throughput.py`` does.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torch.func  # see main()
from sim_throughput import best_per_call, compare

from p2pfl.learn import MinibatchSampler, TorchLearner, build_model
from p2pfl.learn.batched import BatchedLearner, Shares
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten

MODELS = {
    "mlp": ({"hidden": [32]}, (64,)),
    "cnn1d": ({}, (40,)),
    "lenet5": ({}, (1, 28, 28)),
}
CLASSES = 10


def figures_of(models: list[str]) -> dict[str, re.Pattern[str]]:
    figures = {}
    for name in models:
        figures[f"{name} train CPU per call (ms)"] = re.compile(rf"^{name}: train ([0-9.]+) ms")
        figures[f"{name} build CPU (ms)"] = re.compile(rf"^{name}: .* build ([0-9.]+) ms")
        figures[f"{name} batched CPU per call (ms)"] = re.compile(
            rf"^{name}: .* batched ([0-9.]+) ms"
        )
    return figures


def measure(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(CPU milliseconds per train call, CPU milliseconds to build the learner)."""
    options, shape = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, *shape, generator=generator)
    y = torch.randint(0, CLASSES, (args.examples,), generator=generator)
    started = time.thread_time()
    learner = TorchLearner(
        build_model(name, options, shape, CLASSES, seed=0),
        (x, y),
        (x, y),
        batch_size=args.batch,
        optimizer=OptimizerSettings(lr=0.05, momentum=0.9),
        seed=0,
    )
    build = time.thread_time() - started
    vector = learner.train(learner.initial_vector(), args.steps).vector

    def train() -> None:
        nonlocal vector
        vector = learner.train(vector, args.steps).vector

    best = best_per_call({name: train}, calls=args.calls, repeats=args.repeats)[name]
    return best * 1e3, build * 1e3


def measure_batched(name: str, args: argparse.Namespace) -> float:
    """CPU milliseconds of one simulator call training ``--rows`` nodes."""
    options, shape = MODELS[name]
    rows = args.rows
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows * args.examples, *shape, generator=generator)
    y = torch.randint(0, CLASSES, (rows * args.examples,), generator=generator)
    shares = Shares(x, y, torch.arange(rows) * args.examples)
    model = build_model(name, options, shape, CLASSES, seed=0)
    learner = BatchedLearner(model, OptimizerSettings(lr=0.05, momentum=0.9), shape)
    samplers = [MinibatchSampler(args.examples, args.batch, seed=n) for n in range(rows)]
    nodes = list(range(rows))
    vectors = flatten(model).repeat(rows, 1)
    vectors, _ = learner.train(nodes, vectors, shares, samplers, args.steps, [0] * rows)

    def train() -> None:
        nonlocal vectors
        vectors, _ = learner.train(nodes, vectors, shares, samplers, args.steps, [0] * rows)

    calls = max(1, args.calls // 10)
    best = best_per_call({name: train}, calls=calls, repeats=args.repeats)[name]
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn1d,lenet5")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.baseline is not None:
        compare(
            args.baseline, args.repeat, script=__file__, figures_of=figures_of(models), extra=()
        )
        return
    torch.set_num_threads(1)
    # torch.func (a third of a second) is imported above: any node training a module other
    # than a Linear/ReLU stack imports it, at its first training or at its learner's build
    # depending on the version, so "build" times the learner, not that import.
    for name in models:
        train, build = measure(name, args)
        batched = measure_batched(name, args)
        print(
            f"{name}: train {train:.3f} ms CPU per call, build {build:.1f} ms CPU, "
            f"batched {batched:.3f} ms CPU per call of {args.rows} rows"
        )


if __name__ == "__main__":
    main()
