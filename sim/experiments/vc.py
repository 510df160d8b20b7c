"""Vanishing variance and variance-corrected averaging (docs/experiments.md).

    python -m sim.experiments.vc variance   # per-tensor variance of k averaged initialisations
    python -m sim.experiments.vc accuracy   # accuracy over time: GL, GL + VC, FedAvg; 3 seeds
    python -m sim.experiments.vc all

``variance`` averages k independently initialised models with the ``mean`` rule and with
``variance_corrected`` (``base = "mean"``, target ``others``: the mean variance of the
averaged models) and prints each weight tensor's population variance relative to one model's,
for the MLP of these experiments (64-32-10, PyTorch's default Linear initialisation) and for
LeNet-5's ``conv1`` (Conv2d(1, 6, 5), Xavier-uniform: Var = 2/(25+150) = 0.011429).

``accuracy`` runs the scenarios built below on digits, Dirichlet(0.5) label skew, 50 nodes,
for each of ``--seeds`` seeds (default 3): gossip learning (GL) as ``dsgd`` on a random
8-regular graph (as the reference's ``GL`` preset) with independent initialisation per node
(``learner.init = "independent"``), merged by ``mean`` and by ``variance_corrected`` (β = 0.5,
target ``others``); the same graph with one shared initialisation and ``mean``; and the
federated reference, ``fedavg`` (one server, the 50 nodes as its clients, a shared
initialisation, sample-weighted averaging), with every client sampled each round and with
C = 0.2 (10 clients a round). GL curves are the nodes' mean test accuracy, FedAvg curves the
global model's. Writes ``docs/figures/vc-variance.png``, ``docs/figures/vc-accuracy.png``
(mean over seeds, min-max band) and JSON (every seed's curve) next to them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from p2pfl.learn import mlp
from p2pfl.merge import MergeContext, make_merge_rule
from p2pfl.params import ParamLayout, flatten, layout_of
from sim.run import build_engine
from sim.scenario import parse_scenario

FIGURES = Path("docs/figures")
KS = (1, 2, 4, 8, 16, 32)
MLP_SIZES = [64, 32, 10]
LENET_CONV1 = (6, 1, 5, 5)


def _population_variance(values: torch.Tensor) -> float:
    flat = values.to(torch.float64).reshape(-1)
    return float(((flat - flat.mean()) ** 2).mean())


def _weight_spans(layout: ParamLayout) -> list[tuple[str, slice]]:
    return [(slot.name, slot.span) for slot in layout.slots if len(slot.shape) >= 2]


def _conv1_models(k: int) -> list[torch.Tensor]:
    models = []
    for seed in range(k):
        generator = torch.Generator().manual_seed(1000 + seed)
        weight = torch.empty(LENET_CONV1)
        fan_in, fan_out = 1 * 25, 6 * 25
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform
        weight.uniform_(-bound, bound, generator=generator)
        models.append(torch.cat([weight.reshape(-1), torch.zeros(6)]))
    return models


def variance_table() -> dict[str, Any]:
    mean_rule = make_merge_rule("mean")
    vc_rule = make_merge_rule("variance_corrected", base="mean")
    cases: dict[str, tuple[ParamLayout, Any]] = {
        "mlp": (
            layout_of(mlp(MLP_SIZES, seed=0)),
            lambda k: [flatten(mlp(MLP_SIZES, seed=500 + seed)) for seed in range(k)],
        ),
        "lenet_conv1": (
            ParamLayout.from_shapes([("conv1.weight", LENET_CONV1), ("conv1.bias", (6,))]),
            _conv1_models,
        ),
    }
    table: dict[str, Any] = {}
    for name, (layout, draw) in cases.items():
        spans = _weight_spans(layout)
        single = {tensor: _population_variance(draw(1)[0][span]) for tensor, span in spans}
        rows = []
        for k in KS:
            models = draw(k)
            context = MergeContext(layout=layout)
            own, received = models[0], torch.stack(models[1:]) if k > 1 else models[0][:0, None]
            if k == 1:
                averaged = corrected = own
            else:
                weights = torch.ones(k - 1)
                averaged = mean_rule(own, received, weights, context)
                corrected = vc_rule(own, received, weights, context)
            for tensor, span in spans:
                rows.append(
                    {
                        "k": k,
                        "tensor": tensor,
                        "single": single[tensor],
                        "mean": _population_variance(averaged[span]),
                        "vc": _population_variance(corrected[span]),
                    }
                )
        table[name] = rows
    return table


def plot_variance(table: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6.0 * len(table), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], table.items(), strict=True):
        tensors = list(dict.fromkeys(row["tensor"] for row in rows))
        for index, tensor in enumerate(tensors):
            mine = [row for row in rows if row["tensor"] == tensor]
            ks = [row["k"] for row in mine]
            ax.plot(ks, [row["mean"] / row["single"] for row in mine], "o-", color=f"C{index}",
                    label=f"{tensor}: mean of k")  # fmt: skip
            ax.plot(ks, [row["vc"] / row["single"] for row in mine], "s--", color=f"C{index}",
                    label=f"{tensor}: variance-corrected")  # fmt: skip
        ax.plot(KS, [1 / k for k in KS], ":", color="gray", label="1/k")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("k independently initialised models averaged")
        ax.set_ylabel("variance / variance of one model")
        ax.set_title(f"{name}: per-tensor weight variance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "vc-variance.png", dpi=110)
    plt.close(fig)


def document(
    name: str,
    topology: dict[str, Any],
    merge: dict[str, Any],
    init: str,
    protocol: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "seed": 1,
        "rounds": 40,
        "topology": topology,
        "data": {
            "dataset": "digits",
            "partition": "dirichlet",
            "partition_params": {"alpha": 0.5},
        },  # fmt: skip
        "learner": {"hidden": [32], "lr": 0.1, "batch_size": 32, "local_steps": 5, "init": init},
        # round_timeout as these figures were made (the scenario default was 5 s then)
        "protocol": {"round_timeout": 5.0, **(protocol or {"mode": "dsgd"})},
        "merge": merge,
    }


REGULAR = {"kind": "random_regular", "n": 50, "d": 8}
VC = {"rule": "variance_corrected", "params": {"beta": 0.5, "target": "others"}}
FEDAVG = {"rule": "weighted"}  # FedAvg: the average weighted by the clients' sample counts
RUNS = {
    "GL (8-regular), independent init, mean": document(
        "vc-mean", REGULAR, {"rule": "mean"}, "independent"
    ),
    "GL (8-regular), independent init, variance-corrected": document(
        "vc-vc", REGULAR, VC, "independent"
    ),
    "GL (8-regular), shared init, mean": document("vc-shared", REGULAR, {"rule": "mean"}, "shared"),
    "FL: FedAvg, all 50 clients a round": document(
        "vc-fedavg", REGULAR, FEDAVG, "shared", {"mode": "fedavg", "sample_fraction": 1.0}
    ),
    "FL: FedAvg, C = 0.2 (10 clients a round)": document(
        "vc-fedavg-c02", REGULAR, FEDAVG, "shared", {"mode": "fedavg", "sample_fraction": 0.2}
    ),
}
SEEDS = 3

Curve = list[tuple[int, float]]


def accuracy_runs(seeds: int = SEEDS) -> dict[str, list[Curve]]:
    """Every run's accuracy curve for seeds 1..``seeds`` (the FedAvg runs: the global model's)."""
    curves: dict[str, list[Curve]] = {}
    for label, doc in RUNS.items():
        for seed in range(1, seeds + 1):
            engine = build_engine(parse_scenario({**doc, "seed": seed}))
            engine.run()
            curve = [(s.round, s.mean_test_accuracy) for s in engine.recorder.rounds]
            curves.setdefault(label, []).append(curve)
            print(f"{label}, seed {seed}: final {curve[-1][1]:.3f}", flush=True)
    return curves


def plot_accuracy(curves: dict[str, list[Curve]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, (label, runs) in enumerate(curves.items()):
        rounds = [r + 1 for r, _ in runs[0]]
        values = torch.tensor([[a for _, a in run] for run in runs], dtype=torch.float64)
        style = "--" if label.startswith("FL") else "-"
        ax.plot(rounds, values.mean(dim=0), style, color=f"C{index}", label=label)
        low, high = values.min(dim=0).values, values.max(dim=0).values
        ax.fill_between(rounds, low, high, color=f"C{index}", alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (GL: mean over nodes; FL: global model)")
    ax.set_title(
        f"digits, 50 nodes, Dirichlet(0.5), {len(next(iter(curves.values())))} seeds "
        "(mean, min-max band)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "vc-accuracy.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.vc")
    parser.add_argument("what", choices=("variance", "accuracy", "all"))
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 1..N per run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.what in ("variance", "all"):
        table = variance_table()
        for name, rows in table.items():
            print(f"\n{name}: k, tensor, Var(one), Var(mean of k), Var(VC)")
            for row in rows:
                print(f"{row['k']:3d} {row['tensor']:16s} {row['single']:.6f} "
                      f"{row['mean']:.6f} {row['vc']:.6f}")  # fmt: skip
        plot_variance(table, args.out)
        (args.out / "vc-variance.json").write_text(json.dumps(table, indent=1) + "\n")
    if args.what in ("accuracy", "all"):
        curves = accuracy_runs(args.seeds)
        plot_accuracy(curves, args.out)
        (args.out / "vc-accuracy.json").write_text(json.dumps(curves, indent=1) + "\n")


if __name__ == "__main__":
    main()
