"""``p2pfl-sim``: run and validate scenarios, run sweeps, draw and compare runs, list
topologies and shipped scenarios."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import topologies
from p2pfl.errors import ConfigError, TopologyError
from sim.footprint import check_fits, node_count
from sim.interrupts import EXIT_INTERRUPTED, Interrupted, StopRequest, stop_on_signals
from sim.metrics import COLUMNS, RoundSummary
from sim.plots import PLOT_NAMES, X_AXES, compare_runs, describe, plot_run
from sim.run import default_run_dir, interrupted_line, load_scenario, make_directory, run_scenario
from sim.scenario import (
    apply_overrides,
    parse_scenario,
    read_document,
    shipped_scenarios,
    timeline_warnings,
    to_toml,
)
from sim.sweep import DEFAULT_METRICS, parse_grid, plan, run_sweep, summarise_grid
from sim.world import World

EXIT_USAGE = 2


def _add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def _add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="run seed (overrides the scenario's)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl-sim", description="Simulate p2pfl networks in virtual time."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario (a .toml path or a shipped name)")
    run.add_argument(
        "scenario", help="path to a scenario .toml, or a name from `p2pfl-sim scenarios`"
    )
    _add_overrides(run, "override a scenario value, e.g. --set learner.lr=0.05 (repeatable)")
    run.add_argument(
        "--out", type=Path, help="run directory (default: OUTPUT_DIR/NAME-seedS-TIMESTAMP)"
    )
    _add_seed(run)
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
    run.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="also write TensorBoard scalars per round into DIR (needs the tensorboard extra)",
    )
    validate = commands.add_parser(
        "validate", help="check a scenario and print it resolved (every default written out)"
    )
    validate.add_argument("scenario", help="path to a scenario .toml, or a shipped name")
    _add_overrides(validate, "override a scenario value, as for run (repeatable)")
    _add_seed(validate)
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
    _add_overrides(sweep, "override a scenario value for every run (repeatable)")
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
    commands.add_parser(
        "scenarios", help="list shipped scenarios with what each is for, the default first"
    )
    return parser


UNITS = ("B", "kB", "MB", "GB", "TB")


def human_bytes(count: float) -> str:
    """``1234567`` -> ``1.23 MB`` (SI units, as the traffic plot's MB)."""
    value = float(count)
    for unit in UNITS:
        if abs(value) < 1000 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError(count)


def last_accuracy(rounds: Sequence[RoundSummary]) -> str:
    """The mean accuracy of the last evaluated round (``metrics.eval_every`` leaves the
    rounds between evaluations NaN), or ``—`` before the first."""
    for summary in reversed(rounds):
        if math.isfinite(summary.mean_test_accuracy):
            return f"{summary.mean_test_accuracy:.3f}"
    return "—"


def titled(name: str, changed: dict[str, Any]) -> str:
    """``default [learner.lr=0.05, seed=7]``: a run's name with the keys it changed."""
    return f"{name} [{describe(changed)}]" if changed else name


@contextmanager
def shown(progress: Progress) -> Iterator[None]:
    """Show ``progress`` while the block runs; if it fails, erase the bar, so the error
    line printed after it does not follow a half-drawn bar."""
    with progress:
        try:
            yield
        except BaseException:
            progress.live.transient = True
            raise


def run_progress(console: Console, *, quiet: bool) -> Progress:
    """The progress bar of a run: rounds, virtual time, accuracy, traffic, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "t={task.fields[vtime]:.1f}s acc={task.fields[accuracy]} sent={task.fields[sent]}"
        ),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


def _run(args: argparse.Namespace, console: Console, stop: StopRequest) -> int:
    if args.shards is not None and args.shards < 1:
        raise ConfigError("--shards", args.shards, "an integer >= 1")
    scenario, changed = load_scenario(args.scenario, args.overrides, seed=args.seed)
    title = titled(scenario.name, changed)
    warned = timeline_warnings(scenario)
    for line in warned.values():
        print(f"p2pfl-sim: warning: {line}", file=sys.stderr)
    if args.live:
        from sim.live import RAY_HINT, ray_available

        if not ray_available():
            print(f"p2pfl-sim: {RAY_HINT}", file=sys.stderr)
            return EXIT_USAGE
    writer = None
    if args.tensorboard is not None:
        from sim.tensorboard import RoundScalars

        make_directory("--tensorboard", args.tensorboard)
        writer = RoundScalars(args.tensorboard)
    progress = run_progress(console, quiet=args.quiet)
    shown_title = escape(title)  # rich would read "[seed=7]" as markup
    task = progress.add_task(
        shown_title, total=scenario.rounds, vtime=0.0, accuracy="—", sent="0 B"
    )
    seen = [0]

    def on_round(world: World) -> None:
        rounds = world.recorder.settled_rounds()  # never waits for an evaluation
        if len(rounds) == seen[0]:  # called after every node's round: work once per round
            return
        sent = sum(traffic.bytes_sent for traffic in world.traffic)
        if writer is not None:
            writer.write(rounds[seen[0] :], bytes_sent=sent)
        seen[0] = len(rounds)
        progress.update(
            task,
            completed=len(rounds),
            vtime=world.now,
            accuracy=last_accuracy(rounds),
            sent=human_bytes(sent),
        )

    def on_phase(phase: str) -> None:
        progress.update(task, description=f"{shown_title}: {escape(phase)}")

    out = args.out or default_run_dir(scenario)
    try:
        with shown(progress):
            if args.live:
                from sim.live import run_live

                result = run_live(
                    scenario,
                    out,
                    shards=args.shards,
                    ray_address=args.ray_address,
                    on_round=on_round,
                    stop=stop,
                    on_phase=on_phase,
                    changed=changed,
                )
            else:
                result = run_scenario(
                    scenario,
                    out,
                    changed=changed,
                    on_round=on_round,
                    stop=stop,
                    force=args.force,
                    on_phase=on_phase,
                )
            progress.update(task, completed=result.summary["rounds"], description=shown_title)
            if writer is not None and len(result.rounds) > seen[0]:
                # Rounds whose evaluation settled after the last progress callback.
                writer.write(result.rounds[seen[0] :], bytes_sent=result.summary["bytes_sent"])
    finally:
        if writer is not None:
            writer.close()
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
    console.print(summary_table(title, result.summary))
    console.print(f"run directory: {result.directory}")
    console.print(f"plots: {result.directory}/{{{','.join(PLOT_NAMES)}}}.png/.svg")
    if args.tensorboard is not None:
        console.print(f"tensorboard: tensorboard --logdir {args.tensorboard}")
    return 0


SUMMARY_ROWS = (
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
)


def summary_table(title: str, summary: dict[str, Any]) -> Table:
    """A run's summary for people: byte counts in kB/MB, floats to four digits."""
    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_ROWS:
        value = summary.get(key)
        if key.startswith("bytes_") and isinstance(value, int):
            text = human_bytes(value)
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = "—" if value is None else str(value)
        table.add_row(key, text)
    return table


VALIDATE_BUILDS_UP_TO = 10_000
"""``validate`` builds topologies of at most this many nodes (a second or so), which checks
their parameters' ranges and connectivity; larger ones get their kind and types checked."""


def _validate(args: argparse.Namespace) -> int:
    """Parse, apply the overrides, check the topology; print the scenario resolved (TOML).

    Raises:
        ConfigError, TopologyError: the scenario is invalid.
    """
    scenario, _changed = load_scenario(args.scenario, args.overrides, seed=args.seed)
    spec = {"kind": scenario.topology.kind, **scenario.topology_params()}
    nodes = node_count(scenario)
    if nodes is not None and nodes <= VALIDATE_BUILDS_UP_TO:
        topologies.build(spec, require_connected=scenario.topology.require_connected)
    else:
        topologies.registry.resolve(spec)
    for line in timeline_warnings(scenario).values():
        print(f"p2pfl-sim: warning: {line}", file=sys.stderr)
    try:
        check_fits(scenario)
    except ConfigError as exc:  # it may be meant for a larger machine: say so, do not refuse
        print(f"p2pfl-sim: warning: on this machine `run` refuses it: {exc}", file=sys.stderr)
    sys.stdout.write(to_toml(scenario))
    return 0


def _scenarios() -> int:
    names = shipped_scenarios()
    width = max(len(name) for name in names)
    for name in names:
        document, source = read_document(name)
        description = parse_scenario(document, source=source).description
        print(f"{name:<{width}}  {description}")
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
    _base, changed = load_scenario(args.scenario, args.overrides)
    runs = plan(document, source, grid, seeds=args.seeds, out=out, changed=changed)
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
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet,
    )
    task = progress.add_task(name, total=len(runs))
    metrics = tuple(args.metrics or DEFAULT_METRICS)
    with shown(progress):
        table = run_sweep(
            runs,
            source,
            out,
            jobs=args.jobs,
            plots=args.plots,
            metrics=metrics,
            on_done=lambda done, _total: progress.update(task, completed=done),
            name=name,
            resume=args.resume,
            stop=stop,
        )
    keys = [key for key, _ in grid]
    console.print(grid_table(f"{name}: {args.seeds} seed(s) per point", table, keys, metrics))
    console.print(f"{len(runs)} runs in {out}")
    console.print(f"per run: {table.name}; per point: sweep-summary.csv/.md; plot: sweep.png/.svg")
    return 0


def grid_table(title: str, table: Path, keys: Sequence[str], metrics: Sequence[str]) -> Table:
    """Per grid point, each metric's mean ± standard deviation over the seeds."""
    out = Table(title=escape(title))
    for key in keys:
        out.add_column(key, overflow="fold")
    out.add_column("seeds", justify="right")
    for metric in metrics:
        out.add_column(f"{metric} (mean ± std)", justify="right", no_wrap=True)
    for point in summarise_grid(table, keys, metrics):
        out.add_row(
            *(value for _, value in point.values),
            str(point.seeds),
            *(point.stats[metric].text() for metric in metrics),
        )
    return out


def _topologies(console: Console) -> int:
    table = Table(title="topology generators")
    for column in ("kind", "parameter", "type", "default", "allowed"):
        table.add_column(column)
    for row in topologies.describe():
        table.add_row(row.kind, row.param, row.type, row.default, row.allowed)
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """Run one command; bad input is one line on stderr and exit 2, an interrupt exit 130.

    ``run`` and ``sweep`` stop cleanly on SIGINT/SIGTERM (:mod:`sim.interrupts`): they save
    what was done, print one line and exit 130; the other commands exit 130 at once.
    ``console`` is where tables and progress go (default: the terminal).
    """
    args = _parser().parse_args(argv)
    # The models are tiny: torch's intra-op threads only contend with each other (measured
    # on the default scenario, 2 loaded cores: 91 s with 2 threads, 10 s with 1).
    torch.set_num_threads(1)
    console = console or Console()
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
            case "validate":
                return _validate(args)
            case "scenarios":
                return _scenarios()
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
