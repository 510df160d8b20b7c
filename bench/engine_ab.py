"""The engine alone, against a baseline engine, in one process: loop-thread CPU and heap traffic.

Runs the standard workload of ``bench/sim_throughput.py`` (1,000 nodes, 6-regular, dsgd)
alternately with this tree's :mod:`sim.engine` and with ``BASELINE`` (another version of
``sim/engine.py``, e.g. ``/tmp/base5/sim/engine.py``), loaded into the same process beside it;
everything else (cores, learner, recorder) is this tree's. Each run is timed by the loop
thread's CPU (``time.thread_time``; the evaluation worker and the verifier process are not in
it). Prints every run, the best and median of each, the ratio of the bests (baseline / this
tree: above 1 means this tree is faster), the heap entries per node-round, and whether both
engines wrote the same metrics (they must).

Why in one process: on a shared machine the whole-run figures of two processes drift by more
than an engine change is worth; alternating runs in one process see the same load on average,
and the best of several runs is the least disturbed one. Valid only while the baseline engine
fits this tree's other modules (the same constructor and recorder interface).

    .venv/bin/python bench/engine_ab.py BASELINE [--rounds 3] [--repeat 6] [--serial]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's packages, not the ones the venv has installed

import torch  # noqa: E402

import sim.engine  # noqa: E402
import sim.run  # noqa: E402
from bench.sim_throughput import load_module, workload  # noqa: E402
from sim.scenario import parse_scenario  # noqa: E402

NODES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="a sim/engine.py to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--serial", action="store_true", help="workers = False in both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engines = {
        "baseline": load_module(args.baseline, "sim.engine_baseline"),
        "this tree": sim.engine,
    }
    scenario = parse_scenario(workload(NODES, args.rounds))
    node_rounds = NODES * args.rounds
    cpu: dict[str, list[float]] = {label: [] for label in engines}
    digests: dict[str, set[str]] = {label: set() for label in engines}
    entries: dict[str, int] = {}
    for repeat in range(args.repeat):
        order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
        for label in order:
            sim.run.Engine = engines[label].Engine  # type: ignore[attr-defined]
            engine = sim.run.build_engine(scenario)
            engine.workers = not args.serial
            gc.collect()
            start = time.thread_time()
            engine.run()
            spent = time.thread_time() - start
            cpu[label].append(spent)
            digests[label].add(hashlib.sha256(engine.recorder.csv_text().encode()).hexdigest())
            entries[label] = engine._sequence
            print(f"{label:9} #{repeat + 1}: loop-thread CPU {spent:.3f} s", flush=True)
            del engine
    sim.run.Engine = sim.engine.Engine  # type: ignore[attr-defined]
    for label, spent in cpu.items():
        print(
            f"{label:9}: best {min(spent):.3f} s, median {statistics.median(spent):.3f} s, "
            f"{min(spent) / node_rounds * 1e6:.0f} us per node-round (best); "
            f"heap entries {entries[label] / node_rounds:.2f} per node-round"
        )
    best_base, best_this = min(cpu["baseline"]), min(cpu["this tree"])
    print(
        f"ratio of bests (baseline / this tree): {best_base / best_this:.3f}x, "
        f"{(best_base - best_this) / node_rounds * 1e6:.1f} us per node-round saved; "
        f"ratio of medians {statistics.median(cpu['baseline']) / statistics.median(cpu['this tree']):.3f}x"
    )
    same = len(digests["baseline"] | digests["this tree"]) == 1
    print(f"metrics.csv identical across all runs: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
