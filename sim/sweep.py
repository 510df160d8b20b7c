"""Sweeps: one scenario over a grid of values and several seeds, in parallel processes.

Every combination of the ``--grid key=v1,v2,...`` values (keys as for ``--set``, including
``disruptions[0].fraction``) is run with seeds ``seed, seed + 1, ..., seed + N - 1`` (``seed``
from the scenario). Every run gets its own directory ``run-NNN`` under the sweep directory;
``sweep.csv`` is the tidy table (one row per run: its grid values, its seed and its summary
metrics) and ``sweep.png``/``sweep.svg`` the comparison plot (each metric against the first
grid key, one line per combination of the other keys, mean over seeds with their spread).

Workers are started with ``spawn`` (no state inherited from the parent) and each sets torch
to one thread; runs are independent, so the table is the same whatever ``--jobs`` is, but for
its wall-clock column.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from p2pfl.errors import ConfigError
from sim.footprint import available_bytes, check_fits
from sim.scenario import apply_overrides, override_path, parse_scenario

SUMMARY_COLUMNS = (
    "mean_test_accuracy",
    "min_test_accuracy",
    "final_accuracy_alive",
    "largest_component_accuracy",
    "isolated_accuracy",
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


@dataclass(frozen=True, slots=True)
class SweepRun:
    index: int
    values: tuple[tuple[str, Any], ...]
    seed: int
    document: dict[str, Any]
    directory: Path


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
        ConfigError: an assignment without ``=``, without values, or a key given twice.
    """
    grid: list[tuple[str, list[str]]] = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        values = [value for value in split_values(raw) if value]
        if not sep or not key.strip() or not values:
            raise ConfigError("--grid", assignment, "key=v1,v2,... e.g. learner.lr=0.05,0.1")
        if any(key.strip() == seen for seen, _ in grid):
            raise ConfigError("--grid", key, "each key once")
        grid.append((key.strip(), values))
    return grid


def plan(
    document: dict[str, Any],
    source: str,
    grid: Sequence[tuple[str, list[str]]],
    *,
    seeds: int,
    out: Path,
) -> list[SweepRun]:
    """Every run of the sweep, each document validated.

    Raises:
        ConfigError: a grid value makes an invalid scenario, or ``seeds`` < 1.
    """
    if seeds < 1:
        raise ConfigError("--seeds", seeds, "an integer >= 1")
    base = parse_scenario(document, source=source)
    runs: list[SweepRun] = []
    keys = [key for key, _ in grid]
    for combination in itertools.product(*(values for _, values in grid)):
        assigned = [f"{key}={value}" for key, value in zip(keys, combination, strict=True)]
        for offset in range(seeds):
            seed = base.seed + offset
            run_document = apply_overrides(document, [*assigned, f"seed={seed}"])
            parse_scenario(run_document, source=source)
            values = tuple((key, _read_value(run_document, key)) for key in keys)
            index = len(runs)
            runs.append(SweepRun(index, values, seed, run_document, out / f"run-{index:03d}"))
    return runs


def _read_value(document: dict[str, Any], key: str) -> Any:
    """The value a grid key took in the run (from the overridden document)."""
    value: Any = document
    for part in override_path(key):
        value = value[part]
    return value


def run_one(document: dict[str, Any], source: str, directory: str, plots: bool) -> dict[str, Any]:
    """One sweep run, in a worker process; returns the run's summary."""
    import torch

    torch.set_num_threads(1)
    from sim.run import run_scenario

    scenario = parse_scenario(document, source=source)
    # run_sweep checked the memory estimate against each worker's share of the machine.
    return run_scenario(scenario, Path(directory), plots=plots, force=True).summary


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
    force: bool = False,
) -> Path:
    """Run every run (``jobs`` spawned processes), write ``sweep.csv`` and the plot.

    Unless ``force``, every run's memory estimate (:mod:`sim.footprint`) must fit in its
    worker's share of the available memory before any run starts.

    Returns:
        The path of ``sweep.csv``.

    Raises:
        ConfigError: ``jobs`` < 1, a metric is not a summary column, or a run does not fit.
    """
    if jobs < 1:
        raise ConfigError("--jobs", jobs, "an integer >= 1")
    available = available_bytes()
    if not force and available is not None and runs:
        share = available // min(jobs, len(runs))
        for run in runs:
            check_fits(parse_scenario(run.document, source=source), available=share)
    for metric in metrics:
        if metric not in SUMMARY_COLUMNS:
            raise ConfigError("--metric", metric, f"one of {', '.join(SUMMARY_COLUMNS)}")
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[int, dict[str, Any]] = {}
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(run_one, run.document, source, str(run.directory), plots): run.index
            for run in runs
        }
        for future in as_completed(futures):
            summaries[futures[future]] = future.result()
            if on_done is not None:
                on_done(len(summaries), len(runs))
    table = out / "sweep.csv"
    write_table(runs, summaries, table)
    keys = [key for key, _ in runs[0].values] if runs else []
    plot_sweep(table, keys, metrics, out, name=name)
    return table


def write_table(runs: Sequence[SweepRun], summaries: dict[int, dict[str, Any]], path: Path) -> None:
    keys = [key for key, _ in runs[0].values] if runs else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["run", *keys, "seed", *SUMMARY_COLUMNS, "directory"])
        for run in runs:
            summary = summaries[run.index]
            writer.writerow(
                [
                    run.index,
                    *(_cell(value) for _, value in run.values),
                    run.seed,
                    *(_cell(summary.get(column)) for column in SUMMARY_COLUMNS),
                    run.directory.name,
                ]
            )


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
    the other keys; the mean over seeds, with each seed's value as a dot."""
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
            positions, means = [], []
            for position, x in enumerate(xs):
                values = np.array(points.get(x, []), dtype=float)
                finite = values[np.isfinite(values)]
                ax.scatter(
                    [position + shift] * len(finite), finite, s=10, alpha=0.5, color=f"C{offset}"
                )
                if len(finite):
                    positions.append(position + shift)
                    means.append(float(finite.mean()))
            ax.plot(positions, means, marker="o", color=f"C{offset}", label=label)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(first)
        ax.set_ylabel(metric.replace("_", " ") + (" (fraction)" if "accuracy" in metric else ""))
        ax.set_title(f"{name}: {metric.replace('_', ' ')} (mean over seeds; dots = seeds)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths = [out / "sweep.png", out / "sweep.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
