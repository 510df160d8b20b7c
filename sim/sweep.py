"""Sweeps: one scenario over a grid of values and several seeds, in parallel processes.

Every combination of the ``--grid key=v1,v2,...`` values (keys as for ``--set``, including
``disruptions[0].fraction``) is run with seeds ``seed, seed + 1, ..., seed + N - 1`` (``seed``
from the scenario). Every run gets its own directory ``run-NNN`` under the sweep directory;
``sweep.csv`` is the tidy table (one row per run: its grid values, its seed and its summary
metrics) and ``sweep.png``/``sweep.svg`` the comparison plot (each metric against the first
grid key, one line per combination of the other keys, mean ± std over seeds, seeds as dots).
``sweep-summary.csv`` and ``sweep-summary.md`` hold one row per grid point: each chosen metric's
mean, sample standard deviation (n - 1; empty with one value) and number of runs with a value,
over the point's seeds; ``p2pfl-sim sweep`` prints the same table.

``--resume`` (same ``--out``) reuses every run whose directory already holds a finished run of
the same resolved scenario and runs only the others. SIGINT/SIGTERM stops the workers at once,
writes ``sweep.csv`` (and the plot) for the runs that finished, and exits 130
(:mod:`sim.interrupts`).

Workers are started with ``spawn`` (no state inherited from the parent) and each sets torch
to one thread; runs are independent, so the table is the same whatever ``--jobs`` is, but for
its wall-clock column.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from p2pfl.errors import ConfigError
from sim.footprint import available_bytes, check_fits
from sim.interrupts import Interrupted, StopRequest, children_ignore_sigint, ignore_interrupts
from sim.scenario import apply_overrides, override_path, parse_scenario

SUMMARY_COLUMNS = (
    "mean_test_accuracy",
    "min_test_accuracy",
    "final_accuracy_alive",
    "largest_component_accuracy",
    "isolated_accuracy",
    "protected_accuracy",
    "protected_nodes",
    "largest_component_size",
    "isolated_nodes",
    "alive_nodes",
    "components",
    "final_consensus_distance",
    "rounds",
    "virtual_seconds",
    "bytes_sent",
    "messages_sent",
    "wall_seconds",
)
DEFAULT_METRICS = ("final_accuracy_alive",)
MAX_RUNS = 100_000
"""The most runs one sweep plans (every run's document is built and checked up front)."""


@dataclass(frozen=True, slots=True)
class SweepRun:
    index: int
    values: tuple[tuple[str, Any], ...]
    seed: int
    document: dict[str, Any]
    directory: Path
    base_changes: tuple[tuple[str, Any], ...] = ()
    """What the sweep's ``--set`` changed in the scenario, for every run."""

    @property
    def changed(self) -> dict[str, Any]:
        """The keys this run changed from the scenario: ``--set``, its grid values, seed."""
        return {**dict(self.base_changes), **dict(self.values), "seed": self.seed}


def split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on the commas outside brackets and quotes (``[1,2],[3]`` is two)."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [part.strip() for part in parts]


def parse_grid(assignments: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["a=1,2", "b=x,y,z"]`` → ``[("a", ["1", "2"]), ("b", ["x", "y", "z"])]``.

    Raises:
        ConfigError: an assignment without ``=``, without values, a key given twice, or
            ``seed`` (seeds come from ``--seeds``).
    """
    grid: list[tuple[str, list[str]]] = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        values = [value for value in split_values(raw) if value]
        if not sep or not key.strip() or not values:
            raise ConfigError("--grid", assignment, "key=v1,v2,... e.g. learner.lr=0.05,0.1")
        if any(key.strip() == seen for seen, _ in grid):
            raise ConfigError("--grid", key, "each key once")
        if key.strip() == "seed":
            raise ConfigError(
                "--grid", key, "not seed: use --seeds N (seeds S..S+N-1, S from --set seed=S)"
            )
        grid.append((key.strip(), values))
    return grid


def plan(
    document: dict[str, Any],
    source: str,
    grid: Sequence[tuple[str, list[str]]],
    *,
    seeds: int,
    out: Path,
    changed: dict[str, Any] | None = None,
) -> list[SweepRun]:
    """Every run of the sweep, each document validated; ``changed`` is what the sweep's
    ``--set`` changed (recorded with each run's grid values and seed).

    Raises:
        ConfigError: a grid value makes an invalid scenario, ``seeds`` < 1, or more than
            ``MAX_RUNS`` runs.
    """
    if seeds < 1:
        raise ConfigError("--seeds", seeds, "an integer >= 1")
    total = seeds * math.prod(len(values) for _, values in grid)
    if total > MAX_RUNS:
        raise ConfigError("--grid/--seeds", total, f"a sweep of at most {MAX_RUNS} runs")
    base = parse_scenario(document, source=source)
    runs: list[SweepRun] = []
    keys = [key for key, _ in grid]
    base_changes = tuple((changed or {}).items())
    for combination in itertools.product(*(values for _, values in grid)):
        assigned = [f"{key}={value}" for key, value in zip(keys, combination, strict=True)]
        for offset in range(seeds):
            seed = base.seed + offset
            run_document = apply_overrides(document, [*assigned, f"seed={seed}"])
            parse_scenario(run_document, source=source)
            values = tuple((key, _read_value(run_document, key)) for key in keys)
            index = len(runs)
            directory = out / f"run-{index:03d}"
            runs.append(SweepRun(index, values, seed, run_document, directory, base_changes))
    return runs


def _read_value(document: dict[str, Any], key: str) -> Any:
    """The value a grid key took in the run (from the overridden document)."""
    value: Any = document
    for part in override_path(key):
        value = value[part]
    return value


def run_one(
    document: dict[str, Any],
    source: str,
    directory: str,
    plots: bool,
    changed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One sweep run, in a worker process; returns the run's summary. ``changed`` (its grid
    values and seed) titles its plots and is its summary's ``overrides``."""
    import torch

    torch.set_num_threads(1)
    from sim.run import run_scenario

    scenario = parse_scenario(document, source=source)
    # run_sweep checked the memory estimate against each worker's share of the machine.
    return run_scenario(
        scenario, Path(directory), plots=plots, force=True, changed=changed or {}
    ).summary


def _read_finished(
    runs: Sequence[SweepRun], source: str, summaries: dict[int, dict[str, Any]]
) -> None:
    """Add to ``summaries`` every run of ``runs`` it lacks whose directory says the run
    finished (:func:`finished_summary`), as ``--resume`` and an interrupted sweep need."""
    for run in runs:
        if run.index not in summaries:
            summary = finished_summary(run, source)
            if summary is not None:
                summaries[run.index] = summary


def finished_summary(run: SweepRun, source: str) -> dict[str, Any] | None:
    """The summary of ``run`` if its directory holds a finished run of the same scenario.

    A run directory is finished when it has ``summary.json`` (written last) not marked
    ``interrupted``, and its ``scenario.toml`` is the resolved scenario this run would write,
    so a changed grid or scenario is run again rather than reused.
    """
    from sim.scenario import to_toml

    try:
        summary = json.loads((run.directory / "summary.json").read_text())
        written = (run.directory / "scenario.toml").read_text()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("interrupted"):
        return None
    if written != to_toml(parse_scenario(run.document, source=source)):
        return None
    return summary


def run_sweep(
    runs: Sequence[SweepRun],
    source: str,
    out: Path,
    *,
    jobs: int,
    plots: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    on_done: Callable[[int, int], None] | None = None,
    name: str = "sweep",
    resume: bool = False,
    stop: StopRequest | None = None,
    force: bool = False,
) -> Path:
    """Run every run (``jobs`` spawned processes), write ``sweep.csv`` and the plot.

    Unless ``force``, every run's memory estimate (:mod:`sim.footprint`) must fit in its
    worker's share of the available memory before any run starts. With ``resume``, runs
    whose directory already holds a finished run of the same scenario
    (:func:`finished_summary`) are taken from it and not run again.

    On ``stop`` (polled every :data:`POLL_SECONDS`) or :class:`KeyboardInterrupt`, the
    workers are killed at once (their unfinished runs are lost), ``sweep.csv`` and the plot
    are written for the runs that finished, and :class:`~sim.interrupts.Interrupted` is
    raised.

    Returns:
        The path of ``sweep.csv``.

    Raises:
        ConfigError: ``jobs`` not in 1..4 per CPU, a metric is not a summary column, ``out``
            is a file, or a run does not fit.
        Interrupted: stopped early; its message says how many runs were kept.
    """
    cpus = os.cpu_count() or 1
    if not 1 <= jobs <= 4 * cpus:
        raise ConfigError("--jobs", jobs, f"an integer in 1..{4 * cpus} (4 per CPU)")
    available = available_bytes()
    if not force and available is not None and runs:
        share = available // min(jobs, len(runs))
        for run in runs:
            check_fits(parse_scenario(run.document, source=source), available=share)
    for metric in metrics:
        if metric not in SUMMARY_COLUMNS:
            raise ConfigError("--metric", metric, f"one of {', '.join(SUMMARY_COLUMNS)}")
    from sim.run import make_directory

    make_directory("--out", out)
    summaries: dict[int, dict[str, Any]] = {}
    if resume:
        _read_finished(runs, source, summaries)
    todo = [run for run in runs if run.index not in summaries]
    if on_done is not None and summaries:
        on_done(len(summaries), len(runs))
    interrupted = False
    if todo:
        interrupted = _run_in_workers(
            todo, source, jobs, plots, summaries, len(runs), on_done, stop
        )
    if interrupted:
        # A worker may have written its whole run just before it was stopped, with its result
        # still on the way: the directory says it finished, so the table keeps it.
        _read_finished(todo, source, summaries)
    table = out / "sweep.csv"
    done = [run for run in runs if run.index in summaries]
    write_table(runs, summaries, table)
    keys = [key for key, _ in runs[0].values] if runs else []
    write_grid_summary(summarise_grid(table, keys, metrics), keys, metrics, out)
    if done:
        plot_sweep(table, keys, metrics, out, name=name)
    if interrupted:
        raise Interrupted(
            f"interrupted: {len(done)} of {len(runs)} runs finished, in {table}; "
            "run the same sweep with --resume to run the rest"
        )
    return table


POLL_SECONDS = 0.2
"""How often the sweep's parent looks at the stop request while its workers run."""


def _run_in_workers(
    todo: Sequence[SweepRun],
    source: str,
    jobs: int,
    plots: bool,
    summaries: dict[int, dict[str, Any]],
    total: int,
    on_done: Callable[[int, int], None] | None,
    stop: StopRequest | None,
) -> bool:
    """Run ``todo`` in a process pool, filling ``summaries``; True if stopped early."""
    context = get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=ignore_interrupts)
    stopped = False
    clean = False
    try:
        with children_ignore_sigint():  # the pool starts its processes as work is submitted
            futures = {
                pool.submit(
                    run_one,
                    run.document,
                    source,
                    str(run.directory),
                    plots,
                    run.changed,
                ): run.index
                for run in todo
            }
        pending = set(futures)
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            while pending and not (stop is not None and stop.requested):
                finished, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                for future in finished:
                    summaries[futures[future]] = future.result()
                    if on_done is not None:
                        on_done(len(summaries), total)
        stopped = bool(pending)
        clean = not stopped
    except KeyboardInterrupt:
        stopped = True
    finally:
        if not clean:  # stopped, or a run failed: nothing the workers do now is kept
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
    return stopped


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's worker processes now (SIGTERM), not after their current run.

    Python 3.11 has no public call for it (3.14 adds ``terminate_workers``), so the pool's
    process table is read directly.
    """
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = dict(getattr(pool, "_processes", None) or {})
    for process in processes.values():
        process.terminate()
    for process in processes.values():
        process.join(timeout=2.0)
        if process.is_alive():
            process.kill()


def write_table(runs: Sequence[SweepRun], summaries: dict[int, dict[str, Any]], path: Path) -> None:
    """One row per run that has a summary, in run order."""
    keys = [key for key, _ in runs[0].values] if runs else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["run", *keys, "seed", *SUMMARY_COLUMNS, "directory"])
        for run in runs:
            summary = summaries.get(run.index)
            if summary is None:
                continue
            writer.writerow(
                [
                    run.index,
                    *(_cell(value) for _, value in run.values),
                    run.seed,
                    *(_cell(summary.get(column)) for column in SUMMARY_COLUMNS),
                    run.directory.name,
                ]
            )


@dataclass(frozen=True, slots=True)
class MetricStats:
    """One metric over a grid point's seeds: runs without a value (None, NaN) left out."""

    mean: float | None
    std: float | None
    """Sample standard deviation (n - 1); None with fewer than two values."""
    n: int

    def text(self, digits: int = 4) -> str:
        """``0.8123 ± 0.0121``; ``0.8123`` with one value; ``—`` with none."""
        if self.mean is None:
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.std:.2g}"


@dataclass(frozen=True, slots=True)
class GridPoint:
    """One combination of grid values and its metrics over the seeds run."""

    values: tuple[tuple[str, str], ...]
    seeds: int
    stats: dict[str, MetricStats]


def metric_stats(values: Sequence[float]) -> MetricStats:
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return MetricStats(None, None, 0)
    mean = math.fsum(finite) / len(finite)
    if len(finite) < 2:
        return MetricStats(mean, None, 1)
    variance = math.fsum((value - mean) ** 2 for value in finite) / (len(finite) - 1)
    return MetricStats(mean, math.sqrt(variance), len(finite))


def summarise_grid(table: Path, keys: Sequence[str], metrics: Sequence[str]) -> list[GridPoint]:
    """Group ``sweep.csv``'s runs by their grid values (in run order) and reduce
    each metric over the seeds with :func:`metric_stats`."""
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(tuple((key, row[key]) for key in keys), []).append(row)
    return [
        GridPoint(
            values,
            len(group),
            {
                metric: metric_stats(
                    [float(row[metric]) for row in group if row[metric] not in ("", "None")]
                )
                for metric in metrics
            },
        )
        for values, group in groups.items()
    ]


def write_grid_summary(
    points: Sequence[GridPoint], keys: Sequence[str], metrics: Sequence[str], out: Path
) -> list[Path]:
    """``sweep-summary.csv`` (mean, std, n per metric) and ``sweep-summary.md`` (a table of
    ``mean ± std``) in ``out``."""
    csv_path, md_path = out / "sweep-summary.csv", out / "sweep-summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        stat_columns = [f"{metric}_{part}" for metric in metrics for part in ("mean", "std", "n")]
        writer.writerow([*keys, "seeds", *stat_columns])
        for point in points:
            cells: list[Any] = []
            for metric in metrics:
                stats = point.stats[metric]
                cells += [_cell(stats.mean), _cell(stats.std), stats.n]
            writer.writerow([*(value for _, value in point.values), point.seeds, *cells])
    header = [*keys, "seeds", *(f"{metric} (mean ± std)" for metric in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in points:
        cells_md = [
            *(value for _, value in point.values),
            str(point.seeds),
            *(point.stats[metric].text() for metric in metrics),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells_md) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def plot_sweep(
    table: Path, keys: Sequence[str], metrics: Sequence[str], out: Path, *, name: str = "sweep"
) -> list[Path]:
    """One panel per metric: the metric against the first grid key, a line per combination of
    the other keys; the mean over seeds with the sample standard deviation as an error bar
    (the numbers of ``sweep-summary.csv``), each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    first = keys[0] if keys else "seed"
    others = list(keys[1:])
    xs = list(dict.fromkeys(row[first] for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        series: dict[str, dict[str, list[float]]] = {}
        for row in rows:
            label = ", ".join(f"{key}={row[key]}" for key in others) or metric
            value = float(row[metric]) if row[metric] not in ("", "None") else float("nan")
            series.setdefault(label, {}).setdefault(row[first], []).append(value)
        for offset, (label, points) in enumerate(series.items()):
            shift = (offset - (len(series) - 1) / 2) * 0.06
            positions, means, errors = [], [], []
            for position, x in enumerate(xs):
                values = np.array(points.get(x, []), dtype=float)
                finite = values[np.isfinite(values)]
                ax.scatter(
                    [position + shift] * len(finite), finite, s=10, alpha=0.5, color=f"C{offset}"
                )
                stats = metric_stats([float(value) for value in finite])
                if stats.mean is not None:
                    positions.append(position + shift)
                    means.append(stats.mean)
                    errors.append(stats.std or 0.0)
            ax.errorbar(
                positions,
                means,
                yerr=errors,
                marker="o",
                capsize=3,
                color=f"C{offset}",
                label=label,
            )
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(first)
        ax.set_ylabel(metric.replace("_", " ") + (" (fraction)" if "accuracy" in metric else ""))
        ax.set_title(
            f"{name}: {metric.replace('_', ' ')}\nmean ± std over seeds; dots = seeds", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths = [out / "sweep.png", out / "sweep.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
