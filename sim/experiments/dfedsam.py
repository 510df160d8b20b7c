"""DFedSAM and DFedSAM-MGS against plain dsgd: consensus distance and accuracy (docs/experiments.md).

    python -m sim.experiments.dfedsam        # docs/figures/dfedsam-mgs.png (+ .json), 3 seeds

Generated MNIST-1D (8,000 examples, 1,000 held out as the common test set), split over 32
nodes with Dirichlet(0.5) label skew (~220 examples a node), the ``mlp`` [32], 10 local steps
of batch 32 at lr 0.1, ``dsgd`` with the ``weighted`` merge, 30 rounds, on a ring and on a
Barabási-Albert graph (m = 2). Five runs per graph and seed (seeds 1..3):

* ``dsgd``: SGD, one exchange a round;
* ``dsgd, Q = 4``: SGD, four exchanges a round (``protocol.gossip_steps = 4``), to separate the
  effect of the extra gossip from that of SAM;
* ``DFedSAM``: ``learner.optimizer = "sam"``, ``rho = 0.05``, one exchange;
* ``DFedSAM-MGS, Q = 2`` and ``Q = 4``: SAM with two and four exchanges a round.

The figure has one row per graph: mean test accuracy over the nodes, and the consensus
distance (mean squared distance of the nodes' models to their mean, after the round's last
merge), each against the round, mean over seeds with a min-max band. A round with Q exchanges
sends Q times the bytes: the JSON and the printed table carry each run's bytes sent per node.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim.run import build_engine
from sim.scenario import parse_scenario

FIGURES = Path("docs/figures")
SEEDS = 3
ROUNDS = 30
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "ring": {"kind": "ring", "n": 32},
    "BA (m = 2)": {"kind": "barabasi_albert", "n": 32, "m": 2},
}
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "dsgd": ({}, 1),
    "dsgd, Q = 4": ({}, 4),
    "DFedSAM": ({"optimizer": "sam", "rho": 0.05}, 1),
    "DFedSAM-MGS, Q = 2": ({"optimizer": "sam", "rho": 0.05}, 2),
    "DFedSAM-MGS, Q = 4": ({"optimizer": "sam", "rho": 0.05}, 4),
}


DATA: dict[str, Any] = {
    "dataset": "mnist1d",
    "params": {"n_samples": 8000},
    "partition": "dirichlet",
    "partition_params": {"alpha": 0.5},
    "test_fraction": 0.125,
}
"""MNIST-1D, 1,000 test examples, Dirichlet(0.5) label skew (shared with the fedfix runs)."""
LEARNER: dict[str, Any] = {"hidden": [32], "lr": 0.1, "batch_size": 32, "local_steps": 10}


def document(
    topology: dict[str, Any], learner: dict[str, Any], steps: int, seed: int
) -> dict[str, Any]:
    """The scenario of one run."""
    return {
        "name": "dfedsam",
        "seed": seed,
        "rounds": ROUNDS,
        "topology": topology,
        "data": DATA,
        "learner": {**LEARNER, **learner},
        "protocol": {"mode": "dsgd", "gossip_steps": steps},
        "merge": {"rule": "weighted"},
    }


Run = dict[str, Any]


def run_all(seeds: int) -> dict[str, dict[str, list[Run]]]:
    """Every (graph, variant) run's accuracy and consensus curves and bytes, seeds 1..N."""
    results: dict[str, dict[str, list[Run]]] = {}
    for graph, topology in TOPOLOGIES.items():
        for label, (learner, steps) in VARIANTS.items():
            for seed in range(1, seeds + 1):
                engine = build_engine(parse_scenario(document(topology, learner, steps, seed)))
                engine.run()
                rounds = engine.recorder.rounds
                sent = sum(t.bytes_sent for t in engine.traffic) / len(engine.traffic)
                run: dict[str, Any] = {
                    "seed": seed,
                    "accuracy": [r.mean_test_accuracy for r in rounds],
                    "consensus": [r.consensus_distance for r in rounds],
                    "bytes_sent_per_node": sent,
                }
                results.setdefault(graph, {}).setdefault(label, []).append(run)
                print(
                    f"{graph:10s} {label:20s} seed {seed}: accuracy {run['accuracy'][-1]:.3f} "
                    f"consensus {run['consensus'][-1]:.4f} bytes/node {sent:,.0f}",
                    flush=True,
                )
    return results


def band(ax: Any, x: Sequence[float], runs: list[list[float]], color: str, label: str) -> None:
    """Mean over runs with a min-max band."""
    values = np.array(runs, dtype=np.float64)
    ax.plot(x, values.mean(axis=0), color=color, label=label)
    ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15, lw=0)


def plot(results: dict[str, dict[str, list[Run]]], out: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for row, (graph, variants) in enumerate(results.items()):
        accuracy_ax, consensus_ax = axes[row]
        for index, (label, runs) in enumerate(variants.items()):
            rounds = list(range(1, len(runs[0]["accuracy"]) + 1))
            color = f"C{index}"
            band(accuracy_ax, rounds, [r["accuracy"] for r in runs], color, label)
            band(consensus_ax, rounds, [r["consensus"] for r in runs], color, label)
        accuracy_ax.set_ylabel("mean test accuracy over nodes")
        consensus_ax.set_ylabel("consensus distance (1/n) sum ||x_i - mean||^2")
        consensus_ax.set_yscale("log")
        for ax, what in ((accuracy_ax, "accuracy"), (consensus_ax, "consensus distance")):
            ax.set_title(f"{graph}, 32 nodes: {what}")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        "MNIST-1D, Dirichlet(0.5), mlp [32]: dsgd vs DFedSAM vs DFedSAM-MGS "
        f"({seeds} seeds, mean, min-max band)"
    )
    fig.tight_layout()
    fig.savefig(out / "dfedsam-mgs.png", dpi=110)
    plt.close(fig)


def summary(results: dict[str, dict[str, list[Run]]]) -> list[str]:
    """One table line per (graph, variant): final accuracy and consensus, bytes per node."""
    lines = []
    for graph, variants in results.items():
        for label, runs in variants.items():
            accuracy = np.array([r["accuracy"][-1] for r in runs])
            consensus = np.array([r["consensus"][-1] for r in runs])
            sent = np.mean([r["bytes_sent_per_node"] for r in runs])
            lines.append(
                f"| {graph} | {label} | {accuracy.mean():.3f} ± {accuracy.std():.3f} | "
                f"{consensus.mean():.4f} ± {consensus.std():.4f} | {sent / 1e6:.2f} MB |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.dfedsam")
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 1..N per run")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the figure from the JSON of a past run"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.replot:
        results = json.loads((args.out / "dfedsam-mgs.json").read_text())
        plot(results, args.out, len(next(iter(next(iter(results.values())).values()))))
        return
    results = run_all(args.seeds)
    plot(results, args.out, args.seeds)
    (args.out / "dfedsam-mgs.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| graph | run | final accuracy | final consensus distance | bytes sent / node |")
    print("|---|---|---|---|---|")
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
