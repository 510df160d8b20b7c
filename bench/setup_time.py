"""Setup time of the standard workload at scale: graph, data, keys and cores, phase by phase.

Builds the engine of ``bench/sim_throughput.py``'s workload (random 6-regular graph, 64
generated samples per node, MLP 64-32-10, dsgd) and runs nothing. Prints each setup phase's
CPU seconds, the total CPU and wall seconds and the peak RSS (``ru_maxrss``).

    .venv/bin/python bench/setup_time.py [--nodes 100000] [--baseline TREE [--repeat N]]

``--baseline TREE`` runs the same command alternately against ``TREE`` and this tree in fresh
processes and prints the ratios of the medians, as ``bench/sim_throughput.py`` does.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from sim_throughput import compare, peak_rss_gib, workload

from sim.run import build_engine
from sim.scenario import parse_scenario

FIGURES = {
    "setup CPU": re.compile(r"^setup: ([0-9.]+) s CPU"),
    "setup wall": re.compile(r"^setup: [0-9.]+ s CPU, ([0-9.]+) s wall"),
    "peak RSS": re.compile(r"^peak RSS: ([0-9.]+) GiB"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.baseline is not None:
        compare(args.baseline, args.repeat, script=__file__, figures_of=FIGURES, extra=())
        return
    torch.set_num_threads(1)
    started, started_cpu = time.perf_counter(), time.process_time()
    last = [started_cpu, "parsing the scenario"]

    def phase(name: str) -> None:
        now = time.process_time()
        print(f"  {last[1]}: {now - last[0]:.2f} s CPU", flush=True)
        last[:] = [now, name]

    build_engine(parse_scenario(workload(args.nodes, 3, eval_every=3)), on_phase=phase)
    phase("")
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    print(f"setup: {cpu:.2f} s CPU, {wall:.2f} s wall, {args.nodes} nodes")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
