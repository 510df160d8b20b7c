"""Simulator throughput on the standard workload, as a ratio to a floor measured in-process.

Workload: 1,000 nodes on a random 6-regular graph, MLP 64-32-10, 64 generated samples per
node, dsgd, 2 local steps of batch 32, signatures on, 20 rounds.

Floor: what any faithful simulation of that workload must spend, measured here in the same
process right after the run: one Ed25519 sign and one verify per sealed model (one per
node-round; the engine verifies each envelope once however many neighbours receive it) plus
the batched training of every node-round alone. The ratio wall / floor is the engine's
overhead factor; absolute times drift with machine load, the ratio much less.

    .venv/bin/python bench/sim_throughput.py [--nodes 1000] [--rounds 20]
        [--eval-every K] [--eval-samples N] [--no-floor] [--baseline TREE [--repeat N]]

``--eval-every`` / ``--eval-samples`` set ``metrics.eval_every`` / ``metrics.eval_samples``
(defaults: every round, all 1,000 test examples). ``--no-floor`` skips the floor (for runs at
scale, where it would take as long as the run). Peak RSS is the process's (``ru_maxrss``);
CPU seconds are the process's (``time.process_time``, every thread) plus its child
processes' (the engine's frame verifier, :mod:`sim.verifier`), which on a shared machine say
more than wall time; main-thread CPU seconds (``time.thread_time``) are the event loop's
alone, without the evaluation the engine runs in a worker thread or the verification in
its verifier process.

``--serial`` runs everything in the main thread (the engine's ``workers = False``: no worker
thread evaluates rounds, no verifier process checks signatures). ``--baseline TREE`` compares against another source tree (e.g. a ``git archive`` of main):
this script runs the same workload ``--repeat`` times (default 3) alternately in fresh
processes, first with ``TREE`` on ``PYTHONPATH``, then with this tree, and prints each run
and the ratios of the medians (baseline / this tree: above 1 means this tree is faster).
Runs taking turns see the same machine load on average, so the ratio survives a shared
machine better than either figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch

from p2pfl.identity import Identity
from sim.engine import Engine
from sim.run import build_engine
from sim.scenario import parse_scenario

SAMPLES_PER_NODE = 64
TEST_SAMPLES = 1000


def workload(
    nodes: int, rounds: int, eval_every: int = 1, eval_samples: int | None = None
) -> dict[str, object]:
    total = nodes * SAMPLES_PER_NODE + TEST_SAMPLES
    metrics: dict[str, int] = {}
    if eval_every != 1:
        metrics["eval_every"] = eval_every
    if eval_samples is not None:
        metrics["eval_samples"] = eval_samples
    # No [metrics] table by default, so this script also runs against code that has none.
    document: dict[str, object] = {
        "name": "sim-throughput",
        "seed": 1,
        "rounds": rounds,
        "topology": {"kind": "random_regular", "n": nodes, "d": 6},
        "data": {
            "dataset": "gaussian_mixture",
            "params": {"n_samples": total, "dim": 64, "num_classes": 10},
            "partition": "iid",
            "partition_params": {},
            "test_fraction": TEST_SAMPLES / total,
        },
        "learner": {"hidden": [32], "lr": 0.1, "batch_size": 32, "local_steps": 2},
        "protocol": {"mode": "dsgd"},
    }
    if metrics:
        document["metrics"] = metrics
    return document


def measure_floor(engine: Engine, *, models: int, rounds: int, steps: int) -> float:
    """Seconds to sign and verify ``models`` models and train every node of ``engine``'s
    population ``rounds`` times, ``steps`` local steps each, in batched calls."""
    population = engine.population
    identity = Identity.generate()
    header = os.urandom(200)
    signature = identity.sign(header)
    started = time.perf_counter()
    for _ in range(models):
        identity.sign(header)
        identity.node_id.verify(signature, header)
    vectors = population.federation.init_vector.repeat(population.size, 1)
    datasets = population.train_sets
    samplers = [sampler for sampler in population.samplers if sampler is not None]
    nodes = list(range(population.size))
    for round_ in range(rounds):
        vectors, _ = engine.trainer.train(
            nodes, vectors, datasets, samplers, steps, [round_] * population.size
        )
    return time.perf_counter() - started


def children_cpu() -> float:
    """CPU seconds of this process's child processes that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument(
        "--serial", action="store_true", help="no worker thread, no verifier process"
    )
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.baseline is not None:
        compare(args.baseline, args.repeat)
        return
    torch.set_num_threads(1)
    document = workload(args.nodes, args.rounds, args.eval_every, args.eval_samples)
    print(
        f"workload: {args.nodes} nodes, random 6-regular, MLP 64-32-10, dsgd, {args.rounds} rounds"
        f", eval every {args.eval_every} on {args.eval_samples or TEST_SAMPLES} examples"
    )
    build_started, build_cpu = time.perf_counter(), time.process_time()
    shown, started = [0], [0.0]

    def show_rounds(world: Engine) -> None:
        # Long runs show their progress, one line per completed round, through the engine's
        # progress hook (the recorder's own completion hook belongs to the timeline). Never
        # ``recorder.rounds`` here: it waits for the evaluation in flight, so the loop would
        # stall a whole round's evaluation after every round (older trees lack the
        # non-waiting ``settled_rounds``).
        settled_rounds = getattr(world.recorder, "settled_rounds", None)
        settled = len(settled_rounds() if settled_rounds is not None else world.recorder.rounds)
        while shown[0] < settled:
            elapsed = time.perf_counter() - started[0]
            print(f"  round {shown[0]} complete at {elapsed:.1f} s", flush=True)
            shown[0] += 1

    engine = build_engine(
        parse_scenario(document), on_round=show_rounds if args.nodes >= 10_000 else None
    )
    if args.serial:
        engine.workers = False
    build_seconds = time.perf_counter() - build_started
    print(
        f"setup (data, keys, cores): {build_seconds:.2f} s wall, "
        f"{time.process_time() - build_cpu:.2f} s CPU, peak RSS {peak_rss_gib():.2f} GiB"
    )
    started[0], started_cpu = time.perf_counter(), time.process_time()
    started_children = children_cpu()
    started_thread = time.thread_time()
    engine.run()
    wall = time.perf_counter() - started[0]
    if args.nodes >= 10_000:
        show_rounds(engine)  # a round completed by the run's last report
    aside = children_cpu() - started_children  # the verifier, reaped at the run's end
    cpu = time.process_time() - started_cpu + aside
    thread_cpu = time.thread_time() - started_thread
    node_rounds = len(engine.recorder.rows)
    final = engine.recorder.rounds[-1]
    print(
        f"run: {wall:.2f} s wall, {node_rounds} node-rounds, {node_rounds / wall:.0f} node-rounds/s"
    )
    # On a shared machine the process may get a fraction of a core: CPU seconds show what
    # the run would take alone (one torch thread, so at most one core's worth).
    print(
        f"run CPU: {cpu:.2f} s, {node_rounds / cpu:.0f} node-rounds per CPU second"
        f" ({aside:.2f} s of it in child processes)"
    )
    print(f"main-thread CPU: {thread_cpu:.2f} s")
    print(f"peak RSS after the run: {peak_rss_gib():.2f} GiB")
    if not args.no_floor:
        floor = measure_floor(engine, models=node_rounds, rounds=args.rounds, steps=2)
        print(f"floor (sign+verify per model, batched training): {floor:.2f} s")
        print(f"ratio wall/floor: {wall / floor:.2f}")
    print(f"final mean test accuracy: {final.mean_test_accuracy:.3f}")


_FIGURES = {
    "wall": re.compile(r"^run: ([0-9.]+) s wall"),
    "CPU": re.compile(r"^run CPU: ([0-9.]+) s"),
    "main-thread CPU": re.compile(r"^main-thread CPU: ([0-9.]+) s"),
}


def _unit(figure: str) -> str:
    if "RSS" in figure:
        return "GiB"
    return "ms" if figure.endswith("(ms)") else "s"


def load_module(path: Path, name: str) -> ModuleType:
    """The Python file at ``path`` (e.g. another tree's version of a module), imported as a
    separate module ``name`` beside this tree's, without touching ``sys.path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def best_per_call(
    contenders: Mapping[str, Callable[[], object]],
    *,
    calls: int,
    repeats: int,
    clock: Callable[[], float] = time.thread_time,
) -> dict[str, float]:
    """Seconds per call of each contender, by ``clock``: the best over ``repeats`` runs of
    ``calls`` calls, keyed in ``contenders``' order.

    The contenders take turns within each repeat, so on a shared machine they see the same
    load on average, and the best run of each is its least disturbed one. The order of the
    turns is reversed every other repeat (as ``bench/engine_ab.py`` does) so that no side
    always runs first, right after another side has warmed or thrashed the caches. No warm-up
    call is made: callers make their own (most check the contenders' results first)."""
    best = dict.fromkeys(contenders, float("inf"))
    names = list(contenders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            call = contenders[name]
            started = clock()
            for _ in range(calls):
                call()
            best[name] = min(best[name], (clock() - started) / calls)
    return best


def compare(
    baseline: Path,
    repeat: int,
    *,
    script: str = __file__,
    figures_of: dict[str, re.Pattern[str]] = _FIGURES,
    extra: tuple[str, ...] = ("--no-floor",),
) -> None:
    """Run ``script``'s workload (this command's arguments) against ``baseline`` and this tree
    in turns, in fresh processes; print each run's figures and the ratios of the medians."""
    here = Path(script).resolve().parent.parent
    argv = [arg for arg in sys.argv[1:] if arg not in {"--baseline", str(baseline)}]
    if "--repeat" in argv:
        index = argv.index("--repeat")
        del argv[index : index + 2]
    trees = {"baseline": baseline.resolve(), "this tree": here}
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for attempt in range(repeat):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            output = subprocess.run(
                [sys.executable, str(Path(script).resolve()), *extra, *argv],
                cwd=tree,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            found = {}
            for line in output.splitlines():
                for figure, pattern in figures_of.items():
                    match = pattern.match(line)
                    if match:
                        found[figure] = float(match.group(1))
            shown = ", ".join(f"{k} {v:.2f} {_unit(k)}" for k, v in found.items())
            print(f"{name:9} #{attempt + 1}: {shown}")
            for figure, value in found.items():
                figures[name].setdefault(figure, []).append(value)
    for figure in figures_of:
        base, ours = figures["baseline"].get(figure), figures["this tree"].get(figure)
        if base and ours:
            ratio = statistics.median(base) / statistics.median(ours)
            unit = _unit(figure)
            print(
                f"median {figure}: baseline {statistics.median(base):.2f} {unit}, "
                f"this tree {statistics.median(ours):.2f} {unit}, ratio {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
