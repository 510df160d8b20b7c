"""One-byte SPSA against dsgd on MNIST-1D (docs/experiments.md, "One-byte SPSA").

    python -m sim.experiments.spsa compare     # docs/figures/spsa-compare.png (+ .json)

16 nodes on a complete graph (``spsa`` needs every node to hear every other), MNIST-1D
(4,000 examples, IID shares), an MLP 40-32-10 (1,642 parameters), seeds 1, 2, 3. ``spsa``
runs :data:`SPSA_STEPS` steps of :data:`SPSA`; ``dsgd`` runs :data:`DSGD_ROUNDS` rounds of
:data:`DSGD_LOCAL_STEPS` SGD steps with the same learning rate, batch and data. Both go through
``sim.run.build_engine`` (ordinary scenarios, built below). After each ``spsa`` run every
node's model digest is checked to be one and the same.

Bytes are every frame every node sent (headers and signatures included), summed over all
nodes; *minibatches* are the minibatches of 32 examples a node drew (an SGD step draws one,
an SPSA step ``spsa_samples``, each measured at two points). The figure shows the mean over
the seeds and the range between the lowest and the highest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.engine import Engine
from sim.experiments.modest import Outcome, run
from sim.scenario import parse_scenario

FIGURES = Path("docs/figures")
SEEDS = (1, 2, 3)
N = 16
DATA = {
    "dataset": "mnist1d",
    "params": {"n_samples": 4000},
    "partition": "iid",
    "partition_params": {},
}
HIDDEN = [32]
LR = 0.1
BATCH = 32
SPSA_SAMPLES = 16
SPSA = {
    "mode": "spsa",
    "spsa_samples": SPSA_SAMPLES,
    "spsa_lr": 0.1,
    "spsa_clip": 8.0,
    "spsa_eps": 1e-3,
    "round_timeout": 5.0,
}
SPSA_STEPS = 1500
DSGD_ROUNDS = 300
DSGD_LOCAL_STEPS = 10
EVAL_EVERY = {"spsa": 50, "dsgd": 5}


def document(mode: str, seed: int) -> dict[str, Any]:
    """The scenario of one run."""
    spsa = mode == "spsa"
    return {
        "name": f"{mode}-seed{seed}",
        "seed": seed,
        "rounds": SPSA_STEPS if spsa else DSGD_ROUNDS,
        "topology": {"kind": "complete", "n": N},
        "data": DATA,
        "learner": {
            "hidden": HIDDEN,
            "lr": LR,
            "batch_size": BATCH,
            "local_steps": 1 if spsa else DSGD_LOCAL_STEPS,
        },
        "protocol": SPSA if spsa else {"mode": "dsgd", "round_timeout": 5.0},
        "merge": {"rule": "mean"},
        "metrics": {"eval_every": EVAL_EVERY[mode]},
    }


@dataclass
class Run:
    mode: str
    seed: int
    outcome: Outcome
    identical: bool | None
    """spsa: whether every node ended with the same model digest."""

    @property
    def batches_per_round(self) -> int:
        return SPSA_SAMPLES if self.mode == "spsa" else DSGD_LOCAL_STEPS

    def points(self) -> list[tuple[int, int, float]]:
        """(minibatches per node, bytes sent by all nodes, mean accuracy) per evaluated round."""
        return [
            ((round_ + 1) * self.batches_per_round, self.outcome.bytes_at(at), accuracy)
            for round_, at, accuracy, _nodes in self.outcome.rounds
            if accuracy == accuracy  # rounds not evaluated are NaN
        ]


def run_one(mode: str, seed: int) -> Run:
    identical: list[bool] = []

    def check(engine: Engine) -> None:
        if mode == "spsa":
            identical.append(len({getattr(core, "digest", None) for core in engine.cores}) == 1)

    outcome = run(parse_scenario(document(mode, seed)), after=check)
    return Run(mode, seed, outcome, identical[0] if identical else None)


def summary(runs: Sequence[Run]) -> list[dict[str, Any]]:
    rows = []
    for item in runs:
        points = item.points()
        rounds = len(item.outcome.rounds)
        rows.append(
            {
                "mode": item.mode,
                "seed": item.seed,
                "rounds": rounds,
                "final_accuracy": points[-1][2],
                "best_accuracy": max(point[2] for point in points),
                "total_bytes": item.outcome.total_bytes,
                "bytes_per_node_per_round": item.outcome.total_bytes / (N * rounds),
                "minibatches_per_node": points[-1][0],
                "identical_models": item.identical,
                "wall_seconds": round(item.outcome.wall_seconds, 1),
            }
        )
    return rows


def plot(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (by_bytes, by_batches) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, label in (("dsgd", "dsgd (full models)"), ("spsa", "spsa (one byte per sample)")):
        mine = [item.points() for item in runs if item.mode == mode]
        length = min(len(points) for points in mine)
        accuracy = np.array([[point[2] for point in points[:length]] for points in mine])
        sent = np.array([[point[1] for point in points[:length]] for points in mine]).mean(0)
        batches = [point[0] for point in mine[0][:length]]
        mean, low, high = accuracy.mean(0), accuracy.min(0), accuracy.max(0)
        for axis, x in ((by_bytes, sent / 1e6), (by_batches, batches)):
            (line,) = axis.plot(x, mean, label=f"{label}, {len(mine)} seeds")
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("MB sent by all 16 nodes")
    by_batches.set_xlabel("minibatches of 32 drawn per node")
    for axis in (by_bytes, by_batches):
        axis.set_ylabel("mean test accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("One-byte SPSA vs dsgd: MNIST-1D, MLP 40-32-10, 16 nodes (complete graph)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def compare(out: Path, seeds: Sequence[int]) -> None:
    runs = [run_one(mode, seed) for mode in ("dsgd", "spsa") for seed in seeds]
    rows = summary(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spsa-compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(runs, out / "spsa-compare.png")
    for row in rows:
        print(
            f"{row['mode']:<5} seed {row['seed']}  rounds {row['rounds']:>5}  "
            f"final {row['final_accuracy']:.3f}  best {row['best_accuracy']:.3f}  "
            f"{row['total_bytes'] / 1e6:8.1f} MB  "
            f"{row['bytes_per_node_per_round']:9.0f} B/node/round  "
            f"identical {row['identical_models']}  {row['wall_seconds']:6.1f} s"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["compare"])
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args(argv)
    compare(args.out, args.seeds)


if __name__ == "__main__":
    main()
