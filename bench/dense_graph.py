"""Dense-graph throughput: push gossip on a complete graph, as a ratio to a floor.

Workload (``bench/scenarios/gossip-complete-1437.toml``): 1,437 nodes on a complete graph,
digits shared out IID one example per node, MLP 64-64-10, ``gossip`` with fanout 1, 10
rounds, every node evaluated on the 360-example test set after every round.
``--scenario bench/scenarios/gossip-complete-400.toml`` runs the 400-node variant.

Floor: the same as ``bench/sim_throughput.py``'s, measured in this process right after the
run: one Ed25519 sign and one verify per model sent, plus the batched training of every
node-round alone. Peak RSS is the process's high-water mark (``ru_maxrss``), taken before the
floor is measured.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dense_graph.py [--scenario PATH] [--profile N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time
from pathlib import Path

import torch
from sim_throughput import measure_floor

from sim.run import build_engine
from sim.scenario import parse_scenario, read_document

DEFAULT = Path(__file__).parent / "scenarios" / "gossip-complete-1437.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=DEFAULT)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    document, source = read_document(str(args.scenario))
    scenario = parse_scenario(document, source=source)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    build_started = time.perf_counter()
    engine = build_engine(scenario)
    build_seconds = time.perf_counter() - build_started
    started = time.perf_counter()
    engine.run()
    wall = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    node_rounds = len(engine.recorder.rows)
    messages = sum(traffic.messages_sent for traffic in engine.traffic)
    floor = measure_floor(
        engine, models=messages, rounds=scenario.rounds, steps=scenario.learner.local_steps
    )
    final = engine.recorder.rounds[-1]
    print(
        f"workload: {scenario.name}: {engine.population.size} nodes, "
        f"{scenario.topology.kind}, {scenario.protocol.mode}, {scenario.rounds} rounds"
    )
    print(f"setup (graph, data, keys, cores): {build_seconds:.2f} s")
    print(
        f"run: {wall:.2f} s wall, {node_rounds} node-rounds, {node_rounds / wall:.0f} node-rounds/s"
    )
    print(f"peak RSS: {peak_mb:.0f} MB")
    print(f"floor (sign+verify per model sent, batched training): {floor:.2f} s")
    print(f"ratio wall/floor: {wall / floor:.2f}")
    print(f"final mean test accuracy: {final.mean_test_accuracy:.3f}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
