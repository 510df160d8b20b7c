"""MoDeST experiments of docs/experiments.md: communication, 80 % unresponsive, churn.

    python -m sim.experiments.modest compare       # modest vs dsgd vs gossip, 100 nodes
    python -m sim.experiments.modest unresponsive  # 80 % of the nodes go silent at round 10
    python -m sim.experiments.modest churn         # nodes leave and come back
    python -m sim.experiments.modest all

Each writes ``docs/figures/modest-<name>.png`` and a JSON of its numbers next to it
(``--out`` changes the directory) and prints a table. Runs go through ``sim.run.build_engine``,
so they are ordinary scenarios (the documents are built below); disruptions use the scenario
timeline (``[[disruptions]]``). Bytes are counted by the engine per sent frame (header, view
piggyback and payload), summed over all nodes; a hook on every ``SaveCheckpoint`` samples that
sum with the virtual time, so "bytes until accuracy X" is the sum at the virtual time the
round that first reached X was complete.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.run import build_engine
from sim.scenario import Scenario, parse_scenario
from sim.world import World

FIGURES = Path("docs/figures")
TARGETS = (0.80, 0.85, 0.90)
N = 100

LEARNER = {"hidden": [32], "lr": 0.1, "batch_size": 32, "local_steps": 20}
DATA = {"dataset": "digits", "partition": "dirichlet", "partition_params": {"alpha": 0.5}}
MODEST = {
    "mode": "modest",
    "sample_size": 10,
    "aggregators": 1,
    "success_fraction": 1.0,
    "min_models": 3,
    "ping_timeout": 0.5,
    "aggregation_timeout": 2.0,
    "ack_timeout": 3.0,
    "view_entries": 8,
    # Bounded piggybacks spread last-active rounds too slowly for the reference's 50 rounds
    # to be safe at n/s = 10 (views diverge after round ~50, see docs); pings skip dead peers.
    "inactivity_threshold": 1000,
}


def document(name: str, protocol: dict[str, Any], rounds: int, **extra: Any) -> dict[str, Any]:
    """A 100-node digits scenario; modest bootstraps a complete view, the others a BA graph."""
    topology = (
        {"kind": "complete", "n": N}
        if protocol["mode"] == "modest"
        else {"kind": "barabasi_albert", "n": N, "m": 2}
    )
    return {
        "name": name,
        "seed": 1,
        "rounds": rounds,
        "topology": topology,
        "data": DATA,
        "learner": LEARNER,
        "protocol": protocol,
        "merge": {"rule": "mean"},
        **extra,
    }


@dataclass
class Outcome:
    name: str
    rounds: list[tuple[int, float, float, int]]
    """(round, virtual time the round was complete, mean test accuracy, nodes reporting)"""
    traffic: list[tuple[float, int]]
    """(virtual time, bytes sent by all nodes so far), sampled at every checkpoint"""
    total_bytes: int
    virtual_seconds: float
    wall_seconds: float

    def bytes_at(self, at: float) -> int:
        sent = 0
        for when, total in self.traffic:
            if when > at:
                break
            sent = total
        return sent

    def reach(self, target: float) -> tuple[float, int] | None:
        """(virtual seconds, bytes) when the mean accuracy first reached ``target``."""
        for _round, at, accuracy, _nodes in self.rounds:
            if accuracy >= target:
                return at, self.bytes_at(at)
        return None

    def summary(self) -> dict[str, Any]:
        reached = {f"{target:.2f}": self.reach(target) for target in TARGETS}
        return {
            "name": self.name,
            "rounds": len(self.rounds),
            "final_accuracy": self.rounds[-1][2] if self.rounds else None,
            "best_accuracy": max((row[2] for row in self.rounds), default=None),
            "total_bytes": self.total_bytes,
            "virtual_seconds": self.virtual_seconds,
            "wall_seconds": round(self.wall_seconds, 1),
            "reach": {
                key: None if value is None else {"seconds": value[0], "bytes": value[1]}
                for key, value in reached.items()
            },
        }


def run(scenario: Scenario) -> Outcome:
    traffic: list[tuple[float, int]] = []

    def sample(world: World) -> None:
        traffic.append((world.now, sum(t.bytes_sent for t in world.traffic)))

    started = time.perf_counter()
    engine = build_engine(scenario, on_round=sample)
    virtual = engine.run()
    rounds = [
        (summary.round, summary.virtual_time, summary.mean_test_accuracy, summary.nodes)
        for summary in sorted(engine.recorder.rounds, key=lambda summary: summary.round)
    ]
    return Outcome(
        scenario.name,
        rounds,
        traffic,
        sum(t.bytes_sent for t in engine.traffic),
        virtual,
        time.perf_counter() - started,
    )


def plot_accuracy(
    outcomes: Sequence[Outcome], path: Path, title: str, *, events: Sequence[float] = ()
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for outcome in outcomes:
        times = [row[1] for row in outcome.rounds]
        accuracy = [row[2] for row in outcome.rounds]
        by_time.plot(times, accuracy, label=outcome.name)
        by_bytes.plot([outcome.bytes_at(at) / 1e6 for at in times], accuracy, label=outcome.name)
    for at in events:
        by_time.axvline(at, color="grey", linestyle="--", linewidth=1)
    by_time.set_xlabel("virtual seconds")
    by_bytes.set_xlabel("MB sent by all nodes")
    by_bytes.set_xscale("log")
    for axis in (by_time, by_bytes):
        axis.set_ylabel("mean test accuracy of the round's models")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(outcomes: Sequence[Outcome], out: Path, name: str) -> list[dict[str, Any]]:
    rows = [outcome.summary() for outcome in outcomes]
    (out / f"modest-{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        reach = ", ".join(
            f"{key}: "
            + (
                "never"
                if value is None
                else f"{value['seconds']:.1f}s {value['bytes'] / 1e6:.1f}MB"
            )
            for key, value in row["reach"].items()
        )
        print(
            f"{row['name']:<28} rounds {row['rounds']:>3}  final {row['final_accuracy']:.3f}  "
            f"best {row['best_accuracy']:.3f}  {row['total_bytes'] / 1e6:8.1f} MB  "
            f"{row['virtual_seconds']:7.1f} vs  {row['wall_seconds']:6.1f} s wall  | {reach}"
        )
    return rows


def compare(out: Path) -> None:
    outcomes = [
        run(parse_scenario(document("modest s=10 a=1", MODEST, rounds=60))),
        run(
            parse_scenario(
                document(
                    "modest, inactivity 50 (ref.)",
                    {**MODEST, "inactivity_threshold": 50},
                    rounds=80,
                )
            )
        ),
        run(
            parse_scenario(
                document("dsgd (BA m=2)", {"mode": "dsgd", "round_timeout": 5.0}, rounds=50)
            )
        ),
        run(
            parse_scenario(
                document(
                    "gossip (BA m=2, fanout 1)",
                    {"mode": "gossip", "period": 0.25, "fanout": 1},
                    rounds=120,
                )
            )
        ),
    ]
    rows = report(outcomes, out, "compare")
    modest, _reference, *baselines = rows
    for target in ("0.85", "0.90"):
        mine = modest["reach"][target]
        for row in baselines:
            theirs = row["reach"][target]
            if mine and theirs:
                print(
                    f"to {target}: {row['name']} sends {theirs['bytes'] / mine['bytes']:.1f}x the "
                    f"bytes of modest, in {theirs['seconds'] / mine['seconds']:.2f}x the time"
                )
    plot_accuracy(
        outcomes,
        out / "modest-compare.png",
        "100 nodes, digits (Dirichlet 0.5): modest vs dsgd vs gossip",
    )


def unresponsive(out: Path) -> None:
    crash = {
        "kind": "crash",
        "round": 10,
        "trigger": "first",
        "fraction": 0.8,
        "choose": "random",
        "detect_after": float("inf"),
    }
    outcomes = [
        run(parse_scenario(document("modest, no failure", MODEST, rounds=80))),
        run(
            parse_scenario(
                document("modest, 80% silent at round 10", MODEST, rounds=80, disruptions=[crash])
            )
        ),
        run(
            parse_scenario(
                document(
                    "dsgd, 80% silent at round 10",
                    {"mode": "dsgd", "round_timeout": 5.0},
                    rounds=30,
                    disruptions=[crash],
                )
            )
        ),
    ]
    report(outcomes, out, "unresponsive")
    crashed = outcomes[1].rounds[10][1] if len(outcomes[1].rounds) > 10 else 0.0
    plot_accuracy(
        outcomes,
        out / "modest-unresponsive.png",
        "80% of 100 nodes become unresponsive (silent crash) at round 10",
        events=[crashed],
    )


def churn(out: Path) -> None:
    def churning(graceful: bool) -> dict[str, Any]:
        return {
            "kind": "churn",
            "at": 2.0,
            "fraction": 0.5,
            "mean_online": 10.0,
            "mean_offline": 5.0,
            "graceful": graceful,
        }

    # generated churn goes on until a node has run all its rounds, which a modest node that
    # is not sampled near the end never does: the horizon ends these runs.
    horizon = {"horizon": 120.0}
    outcomes = [
        run(parse_scenario(document("modest, no churn", MODEST, rounds=80, **horizon))),
        run(
            parse_scenario(
                document(
                    "modest, 50% churn (graceful)",
                    MODEST,
                    rounds=80,
                    disruptions=[churning(True)],
                    **horizon,
                )
            )
        ),
        run(
            parse_scenario(
                document(
                    "modest, 50% churn (silent)",
                    MODEST,
                    rounds=80,
                    disruptions=[churning(False)],
                    **horizon,
                )
            )
        ),
    ]
    report(outcomes, out, "churn")
    plot_accuracy(
        outcomes,
        out / "modest-churn.png",
        "modest with half of the nodes churning (online ~Exp(10 s), offline ~Exp(5 s))",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["compare", "unresponsive", "churn", "all"])
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = ["compare", "unresponsive", "churn"] if args.experiment == "all" else [args.experiment]
    for name in chosen:
        print(f"== {name}")
        {"compare": compare, "unresponsive": unresponsive, "churn": churn}[name](args.out)


if __name__ == "__main__":
    main()
