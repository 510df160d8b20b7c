"""Learner throughput: model-steps per second, batched vs one by one, measured in one run.

For each model, B nodes each take ``--steps`` optimiser steps on their own minibatches of
random data shaped like the model's dataset (mlp: 64 features as digits; cnn1d: 40-sample
signals as MNIST-1D; lenet5: 1x28x28 images as MNIST):

* one by one: B :class:`p2pfl.learn.TorchLearner` s, each ``train`` call in turn (what B
  ``p2pfl node`` processes would run, here on one thread);
* batched: one :meth:`p2pfl.learn.batched.BatchedLearner.train` call over the B rows, their
  data as :class:`~p2pfl.learn.batched.Shares` of one pool (what the simulator runs).

A model-step is one node's optimiser step on one minibatch. torch runs on one thread
(``torch.set_num_threads(1)``) in both so that neither gains from cores the other leaves
idle; the ratio is what batching buys per core. Each measurement is the best of
``--repeats`` after one warm-up call.

Usage: ``python bench/learner_throughput.py [--nodes 256] [--steps 5] [--models mlp,cnn1d,lenet5]``
"""

from __future__ import annotations

import argparse
import time

import torch
from sim_throughput import best_per_call

from p2pfl.learn import MinibatchSampler, TorchLearner, build_model
from p2pfl.learn.batched import BatchedLearner, Shares
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten

SHAPES = {
    "mlp": (64,),
    "cnn1d": (40,),
    "lenet5": (1, 28, 28),
    "lenet5-8x8": (1, 8, 8),
    "cifar_cnn": (3, 32, 32),
}
EXAMPLES_PER_NODE = 64
CLASSES = 10


def measure(name: str, nodes: int, steps: int, batch: int, repeats: int) -> tuple[float, float]:
    shape = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(EXAMPLES_PER_NODE, *shape, generator=generator),
            torch.randint(0, CLASSES, (EXAMPLES_PER_NODE,), generator=generator),
        )
        for _ in range(nodes)
    ]
    settings = OptimizerSettings(name="sgd", lr=0.05, momentum=0.9)
    model = build_model(name.split("-")[0], {}, shape, CLASSES, seed=0)
    vectors = flatten(model).unsqueeze(0).repeat(nodes, 1)
    learners = [
        TorchLearner(
            build_model(name.split("-")[0], {}, shape, CLASSES, seed=0),
            data[n],
            data[n],
            batch_size=batch,
            optimizer=settings,
            seed=n,
        )
        for n in range(nodes)
    ]

    def one_by_one() -> None:
        for n, learner in enumerate(learners):
            learner.train(vectors[n], steps)

    batched = BatchedLearner(model, settings, shape)
    assert batched.batched, batched.notice
    samplers = [MinibatchSampler(EXAMPLES_PER_NODE, batch, seed=n) for n in range(nodes)]

    # As the simulator holds them: every node's examples as rows of one pool.
    shares = Shares(
        torch.cat([x for x, _ in data]),
        torch.cat([y for _, y in data]),
        torch.arange(nodes) * EXAMPLES_PER_NODE,
    )

    def together() -> None:
        batched.train(list(range(nodes)), vectors, shares, samplers, steps, [0] * nodes)

    one_by_one()  # warm-up calls
    together()
    best = best_per_call(
        {"one by one": one_by_one, "batched": together},
        calls=1,
        repeats=repeats,
        clock=time.perf_counter,
    )
    work = nodes * steps
    return work / best["one by one"], work / best["batched"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="mlp,cnn1d,lenet5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"B = {args.nodes} nodes, {args.steps} steps each, batch {args.batch_size}, "
        f"SGD with momentum, torch threads = 1, best of {args.repeats}"
    )
    print(f"{'model':<10} {'params':>9} {'one-by-one':>12} {'batched':>12} {'ratio':>7}")
    for name in args.models.split(","):
        params = flatten(build_model(name.split("-")[0], {}, SHAPES[name], CLASSES, seed=0)).numel()
        single, batched = measure(name, args.nodes, args.steps, args.batch_size, args.repeats)
        print(
            f"{name:<10} {params:>9,} {single:>10.0f}/s {batched:>10.0f}/s "
            f"{batched / single:>6.2f}x"
        )


if __name__ == "__main__":
    main()
