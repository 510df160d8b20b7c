"""``p2pfl-sim``: run scenarios, list topologies and shipped scenarios."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import topologies
from p2pfl.errors import ConfigError, TopologyError
from sim.engine import Engine
from sim.run import run_scenario
from sim.scenario import apply_overrides, parse_scenario, read_document, shipped_scenarios

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl-sim", description="Simulate p2pfl networks in virtual time."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario (a .toml path or a shipped name)")
    run.add_argument(
        "scenario", help="path to a scenario .toml, or a name from `p2pfl-sim scenarios`"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario value, e.g. --set learner.lr=0.05 (repeatable)",
    )
    run.add_argument(
        "--out", type=Path, help="run directory (default: OUTPUT_DIR/NAME-seedS-TIMESTAMP)"
    )
    run.add_argument("--seed", type=int, help="run seed (overrides the scenario's)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("topologies", help="list topology generators and their parameters")
    commands.add_parser("scenarios", help="list shipped scenarios, the default first")
    return parser


def _run(args: argparse.Namespace, console: Console) -> int:
    document, source = read_document(args.scenario)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    scenario = parse_scenario(apply_overrides(document, overrides), source=source)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("t={task.fields[vtime]:.1f}s acc={task.fields[accuracy]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
        transient=False,
    )
    task = progress.add_task(scenario.name, total=scenario.rounds, vtime=0.0, accuracy="-")

    def on_round(engine: Engine) -> None:
        rounds = engine.recorder.rounds
        accuracy = f"{rounds[-1].mean_test_accuracy:.3f}" if rounds else "-"
        progress.update(task, completed=len(rounds), vtime=engine.now, accuracy=accuracy)

    with progress:
        result = run_scenario(scenario, args.out, on_round=on_round)
        on_round_final = result.summary
        progress.update(task, completed=on_round_final["rounds"])
    table = Table(title=f"{scenario.name}: {result.directory}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "nodes",
        "rounds",
        "mode",
        "merge_rule",
        "mean_test_accuracy",
        "min_test_accuracy",
        "final_consensus_distance",
        "virtual_seconds",
        "wall_seconds",
        "node_rounds_per_second",
        "messages_sent",
        "bytes_sent",
        "rejected",
        "seed",
    ):
        value = result.summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    return 0


def _topologies(console: Console) -> int:
    table = Table(title="topology generators")
    for column in ("kind", "parameter", "type", "default", "allowed"):
        table.add_column(column)
    for row in topologies.describe():
        table.add_row(row.kind, row.param, row.type, row.default, row.allowed)
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The models are tiny: torch's intra-op threads only contend with each other (measured
    # on the default scenario, 2 loaded cores: 91 s with 2 threads, 10 s with 1).
    torch.set_num_threads(1)
    console = Console()
    try:
        match args.command:
            case "run":
                return _run(args, console)
            case "topologies":
                return _topologies(console)
            case "scenarios":
                print("\n".join(shipped_scenarios()))
                return 0
    except (ConfigError, TopologyError) as exc:
        print(f"p2pfl-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
