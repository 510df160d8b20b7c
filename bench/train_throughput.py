"""Batched training cost of the standard workload, per node-round, as the engine pays it.

Builds the engine of ``bench/sim_throughput.py``'s workload (random 6-regular graph, 64
generated samples per node, MLP 64-32-10, 2 local steps of batch 32) and times the engine's
deferred training alone: every data-holding node parks a training of the run's local steps
and ``Engine._train_parked`` runs them (sampling, minibatch gathers, forward, backward,
optimiser step, the per-node records), ``--rounds`` times after one warm-up. Prints the
median CPU (``time.thread_time``) and wall milliseconds per round and the CPU microseconds
per node-round. Nothing else of the simulation runs, so the figure is the training's own.

    .venv/bin/python bench/train_throughput.py [--nodes 1000] [--rounds 20] [--momentum M]
        [--baseline TREE [--repeat N]]

``--momentum`` trains with SGD momentum (optimiser state carried between rounds).
``--baseline TREE`` runs the same command alternately against ``TREE`` and this tree in fresh
processes and prints the ratios of the medians, as ``bench/sim_throughput.py`` does.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch
from sim_throughput import compare, workload

from sim.engine import _ParkedTraining
from sim.run import build_engine
from sim.scenario import parse_scenario

FIGURES = {
    "train CPU per round (ms)": re.compile(r"^train: ([0-9.]+) ms CPU"),
    "train wall per round (ms)": re.compile(r"^train: [0-9.]+ ms CPU, ([0-9.]+) ms wall"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.baseline is not None:
        compare(args.baseline, args.repeat, script=__file__, figures_of=FIGURES, extra=())
        return
    torch.set_num_threads(1)
    document = workload(args.nodes, 3)
    learner = document["learner"]
    assert isinstance(learner, dict)
    if args.momentum:
        learner["momentum"] = args.momentum
    engine = build_engine(parse_scenario(document))
    steps = int(learner["local_steps"])
    population = engine.population
    nodes = [node for node in range(population.size) if population.samplers[node] is not None]
    vector = population.federation.init_vector

    def park(round_: int) -> None:
        for node in nodes:
            engine._parked[node] = _ParkedTraining(vector, steps, round_)

    park(0)
    engine._train_parked()  # warm-up
    cpu, wall = [], []
    for round_ in range(1, args.rounds + 1):
        engine._trained.clear()
        park(round_)
        started, started_cpu = time.perf_counter(), time.thread_time()
        engine._train_parked()
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    per_round = statistics.median(cpu)
    print(
        f"workload: {len(nodes)} nodes training, MLP 64-32-10, {steps} steps of batch "
        f"{learner['batch_size']}, momentum {args.momentum}, {args.rounds} rounds"
    )
    print(
        f"train: {per_round * 1e3:.1f} ms CPU, {statistics.median(wall) * 1e3:.1f} ms wall "
        f"per round (median); {per_round / len(nodes) * 1e6:.1f} us CPU per node-round"
    )


if __name__ == "__main__":
    main()
