"""Compressed updates: bytes to reach an accuracy, per payload codec (docs/experiments.md).

    python -m sim.experiments.codecs run      # every codec x 3 seeds; JSON next to the figure
    python -m sim.experiments.codecs report   # the table and docs/figures/codecs-bytes.png

The workload: generated MNIST-1D (10,000 examples, 10% held out as the common test set), 32
nodes on a Barabasi-Albert graph (m = 2), Dirichlet(0.5) label skew, an MLP [256, 256]
(79,114 parameters, 316 KB as float32) trained with momentum SGD, ``dsgd`` with the
``weighted`` merge, 30 rounds. Each codec runs with seeds 1..3. Delta codecs run with
``keyframe_every = 0`` (the links lose nothing here, so one keyframe per node suffices; the
default of 20 would add a dense model every 20 rounds).

For each run we record, per round, the bytes all nodes have sent so far (whole frames:
header, signature and payload, as the links carry them) and the nodes' mean test accuracy.
``report`` prints, per codec: the bytes to first reach the target accuracy (90% of the
dense runs' final mean accuracy), the final accuracy, and the compression ratio (dense
bytes / codec bytes over the whole run, and over rounds 1.. only, i.e. without the first
messages, which are the delta codecs' keyframes), and names the most compressing codec whose
final accuracy is within 1 point of dense.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from sim.run import build_engine
from sim.scenario import parse_scenario

FIGURES = Path("docs/figures")
RESULTS = FIGURES / "codecs.json"
SEEDS = 3
TARGET_SHARE = 0.9
"""The target accuracy is this share of dense's final mean accuracy."""
LOSS_POINTS = 0.01
"""The accuracy loss, against dense, at which the compression ratio is reported."""

BASE: dict[str, Any] = {
    "name": "codecs",
    "rounds": 30,
    "topology": {"kind": "barabasi_albert", "n": 32, "m": 2},
    "data": {
        "dataset": "mnist1d",
        "params": {"n_samples": 10000},
        "partition": "dirichlet",
        "partition_params": {"alpha": 0.5},
        "test_fraction": 0.1,
    },
    "learner": {
        "model": "mlp",
        "hidden": [256, 256],
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "batch_size": 32,
        "local_steps": 10,
    },
    "merge": {"rule": "weighted"},
}

CODECS: dict[str, dict[str, Any]] = {
    "dense": {"codec": "dense"},
    "int8": {"codec": "int8"},
    "topk 10%": {"codec": "topk", "codec_fraction": 0.1},
    "topk 10%, no EF": {"codec": "topk", "codec_fraction": 0.1, "error_feedback": False},
    "topk 1%": {"codec": "topk", "codec_fraction": 0.01},
    "topk 1%, no EF": {"codec": "topk", "codec_fraction": 0.01, "error_feedback": False},
    "topk 30%": {"codec": "topk", "codec_fraction": 0.3},
    "fedzip 30%": {"codec": "fedzip", "codec_fraction": 0.3},
    "fedzip 10%": {"codec": "fedzip", "codec_fraction": 0.1},
    "fedzip 3%": {"codec": "fedzip", "codec_fraction": 0.03},
    "fedzip 1%": {"codec": "fedzip", "codec_fraction": 0.01},
    "fedzip 100% (k-means only)": {"codec": "fedzip", "codec_fraction": 1.0},
    "fedzip 100%, 16 centroids": {"codec": "fedzip", "codec_fraction": 1.0, "codec_clusters": 16},
}

Curve = list[tuple[int, int, float]]
"""(round, bytes sent by all nodes up to and including it, mean test accuracy)."""


def document(protocol: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        **BASE,
        "seed": seed,
        "protocol": {"mode": "dsgd", "keyframe_every": 0, **protocol},
    }


def run_one(protocol: dict[str, Any], seed: int) -> Curve:
    engine = build_engine(parse_scenario(document(protocol, seed)))
    engine.run()
    sent: dict[int, int] = defaultdict(int)
    for row in csv.DictReader(io.StringIO(engine.recorder.csv_text())):
        sent[int(row["round"])] += int(row["bytes_sent"])
    return [(s.round, sent[s.round], s.mean_test_accuracy) for s in engine.recorder.rounds]


def run_all(seeds: int, only: list[str] | None = None) -> dict[str, list[Curve]]:
    curves: dict[str, list[Curve]] = {}
    for label, protocol in CODECS.items():
        if only and label not in only:
            continue
        for seed in range(1, seeds + 1):
            curve = run_one(protocol, seed)
            curves.setdefault(label, []).append(curve)
            _, total, final = curve[-1]
            print(f"{label}, seed {seed}: {total:,} bytes, final accuracy {final:.4f}", flush=True)
    return curves


def _bytes_to(curve: Curve, target: float) -> int | None:
    return next((sent for _, sent, accuracy in curve if accuracy >= target), None)


def summarise(curves: dict[str, list[Curve]]) -> dict[str, Any]:
    dense_final = statistics.mean(run[-1][2] for run in curves["dense"])
    dense_bytes = statistics.mean(run[-1][1] for run in curves["dense"])
    dense_later = statistics.mean(run[-1][1] - run[0][1] for run in curves["dense"])
    target = TARGET_SHARE * dense_final
    rows: list[dict[str, Any]] = []
    for label, runs in curves.items():
        reached = [_bytes_to(run, target) for run in runs]
        finals = [run[-1][2] for run in runs]
        total = statistics.mean(run[-1][1] for run in runs)
        rows.append(
            {
                "codec": label,
                "final_accuracy": statistics.mean(finals),
                "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "bytes": total,
                "ratio": dense_bytes / total,
                # Rounds 1.. only: without round 0, whose messages are the delta codecs'
                # keyframes (whole models), this is the ratio of one update message.
                "ratio_after_first": dense_later
                / statistics.mean(run[-1][1] - run[0][1] for run in runs),
                "bytes_to_target": (
                    statistics.mean(b for b in reached if b is not None)
                    if all(b is not None for b in reached)
                    else None
                ),
                "seeds_reaching_target": sum(b is not None for b in reached),
            }
        )
    within = [r for r in rows if r["final_accuracy"] >= dense_final - LOSS_POINTS]
    best = max(within, key=lambda r: r["ratio"])
    return {"target": target, "dense_final": dense_final, "rows": rows, "best_within_1pt": best}


def report(curves: dict[str, list[Curve]]) -> dict[str, Any]:
    summary = summarise(curves)
    print(
        f"target accuracy {summary['target']:.4f} "
        f"({TARGET_SHARE:.0%} of dense's final {summary['dense_final']:.4f})"
    )
    print(
        "| codec | final accuracy (mean ± std, 3 seeds) | bytes sent | ratio "
        "| ratio after round 0 | bytes to target |"
    )
    print("|---|---|---|---|---|---|")
    for row in summary["rows"]:
        to_target = row["bytes_to_target"]
        reached = (
            f"{to_target / 1e6:,.1f} MB"
            if to_target is not None
            else f"not reached ({row['seeds_reaching_target']}/{SEEDS} seeds)"
        )
        print(
            f"| {row['codec']} | {row['final_accuracy']:.4f} ± {row['final_accuracy_std']:.4f} "
            f"| {row['bytes'] / 1e6:,.1f} MB | {row['ratio']:.1f}x "
            f"| {row['ratio_after_first']:.1f}x | {reached} |"
        )
    best = summary["best_within_1pt"]
    print(
        f"most compressing codec within {LOSS_POINTS * 100:.0f} point of dense: {best['codec']} "
        f"({best['ratio']:.1f}x, final accuracy {best['final_accuracy']:.4f})"
    )
    return summary


def plot(curves: dict[str, list[Curve]], summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14.0, 5.6))
    colours = {label: plt.get_cmap("tab20")(index % 20) for index, label in enumerate(curves)}
    for label, runs in curves.items():
        sent = torch.tensor([[b for _, b, _ in run] for run in runs], dtype=torch.float64)
        accuracy = torch.tensor([[a for _, _, a in run] for run in runs], dtype=torch.float64)
        style = "--" if "no EF" in label else "-"
        left.plot(
            sent.mean(dim=0) / 1e6, accuracy.mean(dim=0), style, color=colours[label], label=label
        )
    left.axhline(summary["target"], color="grey", linewidth=0.8, linestyle=":")
    left.set_xscale("log")
    left.set_xlabel("bytes sent by all nodes so far (MB, log scale)")
    left.set_ylabel("mean test accuracy over nodes")
    left.set_title(f"accuracy against traffic (mean of {SEEDS} seeds); dotted: target")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    for row in summary["rows"]:
        right.errorbar(
            row["ratio"],
            row["final_accuracy"],
            yerr=row["final_accuracy_std"],
            fmt="o",
            color=colours[row["codec"]],
        )
        right.annotate(
            row["codec"],
            (row["ratio"], row["final_accuracy"]),
            xytext=(5, 3),
            textcoords="offset points",
            fontsize=7,
        )
    right.axhline(summary["dense_final"] - LOSS_POINTS, color="grey", linewidth=0.8, linestyle=":")
    right.set_xscale("log")
    right.set_xlabel("compression ratio over the run (dense bytes / codec bytes, log)")
    right.set_ylabel("final mean test accuracy (± std over seeds)")
    right.set_title("dotted: 1 point below dense")
    right.grid(alpha=0.3)
    fig.suptitle("MNIST-1D, 32 nodes (BA m=2), Dirichlet(0.5), MLP [256, 256], dsgd, 30 rounds")
    fig.tight_layout()
    fig.savefig(out / "codecs-bytes.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.codecs")
    parser.add_argument("what", choices=("run", "report", "all"))
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 1..N per codec")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(CODECS),
        help="run only this codec (repeatable); its results go to codecs-<n>.json beside "
        "codecs.json, and report reads them all",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.what in ("run", "all"):
        curves = run_all(args.seeds, args.only)
        name = RESULTS.name
        if args.only:
            name = f"{RESULTS.stem}-{len(list(args.out.glob(RESULTS.stem + '*.json')))}.json"
        (args.out / name).write_text(json.dumps(curves) + "\n")
    if args.what in ("report", "all"):
        found: dict[str, list[Curve]] = {}
        for path in sorted(args.out.glob(RESULTS.stem + "*.json")):
            found.update(json.loads(path.read_text()))
        curves = {label: found[label] for label in CODECS if label in found}
        summary = report(curves)
        plot(curves, summary, args.out)


if __name__ == "__main__":
    main()
