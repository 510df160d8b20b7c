"""``p2pfl-sim``: run scenarios and sweeps, draw and compare runs, list topologies and
shipped scenarios."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import topologies
from p2pfl.errors import ConfigError, TopologyError
from sim.engine import Engine
from sim.interrupts import EXIT_INTERRUPTED, Interrupted, StopRequest, stop_on_signals
from sim.metrics import COLUMNS
from sim.plots import PLOT_NAMES, X_AXES, compare_runs, plot_run
from sim.run import interrupted_line, make_directory, run_scenario
from sim.scenario import (
    apply_overrides,
    parse_scenario,
    read_document,
    shipped_scenarios,
    timeline_warnings,
)
from sim.sweep import DEFAULT_METRICS, parse_grid, plan, run_sweep

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
    run.add_argument(
        "--force", action="store_true", help="run even if the memory estimate exceeds the machine"
    )
    run.add_argument(
        "--live",
        action="store_true",
        help="run the trio runtime over real TCP, nodes in shards on Ray (docs/live.md)",
    )
    run.add_argument("--shards", type=int, help="--live: Ray actors (default: the cluster's CPUs)")
    run.add_argument(
        "--ray-address", help="--live: a Ray cluster started with `ray start` (default: local)"
    )
    plot = commands.add_parser("plot", help="redraw the plots of a run directory")
    plot.add_argument("run_dir", type=Path, help="a run directory (holds metrics.csv)")
    plot.add_argument(
        "--at",
        dest="times",
        type=float,
        action="append",
        metavar="SECONDS",
        help="virtual time of a topology panel (repeatable; default: start, disruptions, end)",
    )
    plot.add_argument("--x", choices=X_AXES, default="seconds", help="x axis (default: seconds)")
    compare = commands.add_parser("compare", help="overlay the accuracy of several runs")
    compare.add_argument("run_dirs", type=Path, nargs="+", help="run directories")
    compare.add_argument(
        "--out", type=Path, default=Path("."), help="where compare.png/svg go (default: .)"
    )
    compare.add_argument("--x", choices=X_AXES, default="seconds", help="x axis (default: seconds)")
    sweep = commands.add_parser(
        "sweep", help="run a scenario over a grid of values and seeds in parallel"
    )
    sweep.add_argument("scenario", help="path to a scenario .toml, or a shipped name")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a key and its values, e.g. --grid disruptions[0].fraction=0.1,0.2 (repeatable)",
    )
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    sweep.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario value for every run (repeatable)",
    )
    sweep.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        metavar="NAME",
        help="summary column(s) to plot (repeatable; default final_accuracy_alive)",
    )
    sweep.add_argument("--out", type=Path, help="sweep directory (default: runs/sweep-NAME-TIME)")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="with the --out of an earlier sweep: run only the runs it has not finished",
    )
    sweep.add_argument("--plots", action="store_true", help="also draw every run's plots")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("topologies", help="list topology generators and their parameters")
    commands.add_parser("scenarios", help="list shipped scenarios, the default first")
    return parser


def _run(args: argparse.Namespace, console: Console, stop: StopRequest) -> int:
    if args.shards is not None and args.shards < 1:
        raise ConfigError("--shards", args.shards, "an integer >= 1")
    document, source = read_document(args.scenario)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    scenario = parse_scenario(apply_overrides(document, overrides), source=source)
    warned = timeline_warnings(scenario)
    for line in warned.values():
        print(f"p2pfl-sim: warning: {line}", file=sys.stderr)
    if args.live:
        from sim.live import RAY_HINT, ray_available

        if not ray_available():
            print(f"p2pfl-sim: {RAY_HINT}", file=sys.stderr)
            return EXIT_USAGE
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
        rounds = engine.recorder.settled_rounds()  # never waits for an evaluation
        accuracy = f"{rounds[-1].mean_test_accuracy:.3f}" if rounds else "-"
        progress.update(task, completed=len(rounds), vtime=engine.now, accuracy=accuracy)

    with progress:
        if args.live:
            from sim.live import run_live

            result = run_live(
                scenario,
                args.out,
                shards=args.shards,
                ray_address=args.ray_address,
                on_round=on_round,  # type: ignore[arg-type]
                stop=stop,
            )
        else:
            result = run_scenario(
                scenario,
                args.out,
                on_round=on_round,
                stop=stop,
                force=args.force,
                on_phase=lambda phase: progress.update(
                    task, description=f"{scenario.name}: {phase}"
                ),
            )
        progress.update(task, completed=result.summary["rounds"])
    for index in result.summary["unfired_disruptions"]:
        if index not in warned and not result.summary["interrupted"]:
            kind = scenario.disruptions[index].kind
            print(
                f"p2pfl-sim: warning: disruptions[{index}] ({kind}) never fired: the run "
                f"ended at t = {result.summary['virtual_seconds']:g} s, before its time",
                file=sys.stderr,
            )
    if result.summary["interrupted"]:
        print(f"p2pfl-sim: {interrupted_line(result.directory, result.summary)}", file=sys.stderr)
        return EXIT_INTERRUPTED
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
    console.print(f"plots: {result.directory}/{{{','.join(PLOT_NAMES)}}}.png/.svg")
    return 0


def _check_run_dir(directory: Path) -> None:
    """Refuse a directory that holds no ``metrics.csv`` written by a run.

    Raises:
        ConfigError: no ``metrics.csv``, or one that is not UTF-8 or has other columns.
    """
    path = directory / "metrics.csv"
    if not path.is_file():
        raise ConfigError("RUN_DIR", str(directory), "a run directory holding metrics.csv")
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "RUN_DIR", str(directory), f"a run directory with a readable metrics.csv ({exc})"
        ) from None
    if header != ",".join(COLUMNS):
        raise ConfigError(
            "RUN_DIR",
            str(directory),
            "a run directory whose metrics.csv has the columns a run writes "
            f"({', '.join(COLUMNS[:3])}, ...)",
        )


def _plot(args: argparse.Namespace, console: Console) -> int:
    _check_run_dir(args.run_dir)
    paths = plot_run(args.run_dir, topology_times=args.times, x=args.x)
    console.print(f"wrote {len(paths)} files to {args.run_dir}")
    return 0


def _compare(args: argparse.Namespace, console: Console) -> int:
    for directory in args.run_dirs:
        _check_run_dir(directory)
    make_directory("--out", args.out)
    paths = compare_runs(args.run_dirs, args.out, x=args.x)
    console.print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def _sweep(args: argparse.Namespace, console: Console, stop: StopRequest) -> int:
    if args.resume and args.out is None:
        raise ConfigError("--resume", True, "give the --out of the sweep to resume")
    document, source = read_document(args.scenario)
    document = apply_overrides(document, list(args.overrides))
    grid = parse_grid(args.grid)
    name = str(document.get("name", "sweep"))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(str(document.get("output_dir", "runs"))) / f"sweep-{name}-{stamp}"
    runs = plan(document, source, grid, seeds=args.seeds, out=out)
    warnings = {
        line
        for run in runs
        for line in timeline_warnings(parse_scenario(run.document, source=source)).values()
    }
    for line in sorted(warnings):
        print(f"p2pfl-sim: warning: {line}", file=sys.stderr)
    progress = Progress(
        TextColumn("[bold]sweep {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    task = progress.add_task(name, total=len(runs))
    with progress:
        table = run_sweep(
            runs,
            source,
            out,
            jobs=args.jobs,
            plots=args.plots,
            metrics=tuple(args.metrics or DEFAULT_METRICS),
            on_done=lambda done, _total: progress.update(task, completed=done),
            name=name,
            resume=args.resume,
            stop=stop,
        )
    console.print(f"{len(runs)} runs; table {table}; plot {out / 'sweep.png'}")
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
    """Run one command; bad input is one line on stderr and exit 2, an interrupt exit 130.

    ``run`` and ``sweep`` stop cleanly on SIGINT/SIGTERM (:mod:`sim.interrupts`): they save
    what was done, print one line and exit 130; the other commands exit 130 at once.
    """
    args = _parser().parse_args(argv)
    # The models are tiny: torch's intra-op threads only contend with each other (measured
    # on the default scenario, 2 loaded cores: 91 s with 2 threads, 10 s with 1).
    torch.set_num_threads(1)
    console = Console()
    try:
        match args.command:
            case "run":
                with stop_on_signals() as stop:
                    return _run(args, console, stop)
            case "plot":
                return _plot(args, console)
            case "compare":
                return _compare(args, console)
            case "sweep":
                with stop_on_signals() as stop:
                    return _sweep(args, console, stop)
            case "topologies":
                return _topologies(console)
            case "scenarios":
                print("\n".join(shipped_scenarios()))
                return 0
    except (ConfigError, TopologyError) as exc:
        print(f"p2pfl-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # an optional dependency of the chosen dataset: its install hint
        print(f"p2pfl-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"p2pfl-sim: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("p2pfl-sim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
