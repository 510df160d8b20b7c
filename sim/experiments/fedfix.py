"""Time-triggered (FedFix-style) against count-triggered gossip under lognormal device speeds.

    python -m sim.experiments.fedfix        # docs/figures/fedfix-gossip.png (+ .json), 3 seeds

Generated MNIST-1D (8,000 examples, 1,000 held out as the common test set), split over 32
nodes on a Barabási-Albert graph (m = 2) with Dirichlet(0.5) label skew, the ``mlp`` [32], 10
local steps of batch 32 at lr 0.1, the ``weighted`` merge. A local step takes 0.05 virtual
seconds at speed 1 and each node's speed is lognormal with sigma 1 (median 1), so a training
takes 0.5 s at the median (fastest over slowest speed: 43x to 146x for seeds 1-3).
Every run lasts 60 virtual seconds (``horizon``; ``rounds`` is too large for anyone to
finish, so every node keeps its pace to the end). Two protocols, seeds 1..3:

* **count-triggered**: ``gossip`` as shipped: every 0.5 s (jitter 0.2) a node pushes its model
  to 2 random neighbours; a node merges (sample-count weights) whenever something arrived and
  its training is done, then trains again;
* **time-triggered**: ``gossip`` with ``merge_trigger = "time"``, ``merge_interval = 1.0``: a
  node trains back to back, pushes each trained model to 2 random neighbours (at most every
  0.2 s), and merges every second whatever arrived, with the unbiased weights of
  :mod:`p2pfl.protocol.timed`; and the same with ``merge_interval = 4.0``, about the slowest
  nodes' training time, where fewer ticks must be capped.

Every 2 virtual seconds the nodes' current models are snapshotted and, after the run, evaluated
on the test set: the figure shows the mean test accuracy over nodes and the consensus distance
of the snapshots against virtual time (mean over seeds, min-max band). The JSON adds each
time-triggered run's share of capped ticks and the mean ratio of applied weight to data share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.protocol.gossip import GossipCore
from sim.engine import Engine
from sim.experiments.dfedsam import DATA, LEARNER, band
from sim.run import build_engine
from sim.scenario import parse_scenario
from sim.world import World

FIGURES = Path("docs/figures")
SEEDS = 3
HORIZON = 60.0
SNAPSHOT_EVERY = 2.0
PROTOCOLS: dict[str, dict[str, Any]] = {
    "count-triggered gossip": {"period": 0.5},
    "time-triggered gossip (FedFix-style)": {
        "merge_trigger": "time",
        "merge_interval": 1.0,
        "period": 0.25,
    },
    "time-triggered, merge_interval 4 s": {
        "merge_trigger": "time",
        "merge_interval": 4.0,
        "period": 0.25,
    },
}


def document(protocol: dict[str, Any], seed: int) -> dict[str, Any]:
    """The scenario of one run."""
    return {
        "name": "fedfix",
        "seed": seed,
        "rounds": 1_000_000,
        "horizon": HORIZON,
        "topology": {"kind": "barabasi_albert", "n": 32, "m": 2},
        "data": DATA,
        "learner": {**LEARNER, "step_time": 0.05},
        "protocol": {"mode": "gossip", "fanout": 2, "period_jitter": 0.2, **protocol},
        "merge": {"rule": "weighted"},
        "devices": {"speed": {"dist": "lognormal", "sigma": 1.0}},
        # evaluated from the snapshots instead (the per-round rows would evaluate every training)
        "metrics": {"eval_every": 1_000_000, "eval_samples": 1},
    }


def one_run(protocol: dict[str, Any], seed: int) -> dict[str, Any]:
    """Accuracy and consensus of the snapshots, and the time-triggered weight ledger."""
    snapshots: list[tuple[float, torch.Tensor]] = []

    def snapshot(world: World) -> None:
        due = SNAPSHOT_EVERY * (len(snapshots) + 1)
        if world.now >= due:  # the engine's cores: the models every node holds now
            snapshots.append((due, torch.stack([core.vector for core in engine.cores])))

    engine = build_engine(parse_scenario(document(protocol, seed)), on_round=snapshot)
    engine.run()
    test = engine.population.federation.test
    times, accuracy, consensus = [], [], []
    for at, vectors in snapshots:
        _, accuracies = engine.trainer.evaluate(vectors, test.x, test.y)
        times.append(at)
        accuracy.append(float(accuracies.mean()))
        consensus.append(float(((vectors - vectors.mean(dim=0)) ** 2).sum(dim=1).mean()))
    run: dict[str, Any] = {"seed": seed, "time": times, "accuracy": accuracy}
    run["consensus"] = consensus
    run["trainings"] = sum(engine.trainings_started)
    run["bytes_sent_per_node"] = sum(t.bytes_sent for t in engine.traffic) / len(engine.traffic)
    timed = [core.timed for core in engine.cores if isinstance(core, GossipCore)]
    if all(ledger is not None for ledger in timed):
        ledgers = [ledger for ledger in timed if ledger is not None]
        run["capped_tick_share"] = sum(x.clipped for x in ledgers) / sum(x.ticks for x in ledgers)
        run["applied_over_share"] = _applied_over_share(engine)
    return run


def _applied_over_share(engine: Engine) -> float:
    """Mean over (node, neighbour) of the weight applied per tick over the data share."""
    samples = engine.population.samples
    index = {core.node_id: i for i, core in enumerate(engine.cores)}
    ratios = []
    for i, core in enumerate(engine.cores):
        assert isinstance(core, GossipCore) and core.timed is not None
        neighbours = [index[peer] for peer in core.timed.applied]
        total = samples[i] + sum(samples[p] for p in engine.population.neighbours[i])
        for j, peer in zip(neighbours, core.timed.applied, strict=True):
            share = samples[j] / total
            ratios.append(core.timed.applied[peer] / (core.timed.ticks * share))
    return float(np.mean(ratios))


def plot(results: dict[str, list[dict[str, Any]]], out: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy_ax, consensus_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for index, (label, runs) in enumerate(results.items()):
        length = min(len(run["time"]) for run in runs)
        times = runs[0]["time"][:length]
        color = f"C{index}"
        band(accuracy_ax, times, [run["accuracy"][:length] for run in runs], color, label)
        band(consensus_ax, times, [run["consensus"][:length] for run in runs], color, label)
    accuracy_ax.set_ylabel("mean test accuracy over nodes")
    consensus_ax.set_ylabel("consensus distance (1/n) sum ||x_i - mean||^2")
    consensus_ax.set_yscale("log")
    for ax in (accuracy_ax, consensus_ax):
        ax.set_xlabel("virtual seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"MNIST-1D, 32 nodes (BA m = 2), Dirichlet(0.5), lognormal speeds (sigma 1); "
        f"{seeds} seeds, mean, min-max band"
    )
    fig.tight_layout()
    fig.savefig(out / "fedfix-gossip.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.fedfix")
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 1..N per protocol")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, Any]]] = {}
    for label, protocol in PROTOCOLS.items():
        for seed in range(1, args.seeds + 1):
            run = one_run(protocol, seed)
            results.setdefault(label, []).append(run)
            extra = ""
            if "capped_tick_share" in run:
                extra = (
                    f" capped ticks {run['capped_tick_share']:.3f}"
                    f" applied/share {run['applied_over_share']:.3f}"
                )
            print(
                f"{label:38s} seed {seed}: accuracy at {run['time'][-1]:.0f} s "
                f"{run['accuracy'][-1]:.3f} consensus {run['consensus'][-1]:.4f} "
                f"trainings {run['trainings']} bytes/node {run['bytes_sent_per_node']:,.0f}"
                + extra,
                flush=True,
            )
    plot(results, args.out, args.seeds)
    (args.out / "fedfix-gossip.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
