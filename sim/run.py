"""One simulation run: scenario in, run directory out.

A run directory holds ``scenario.toml`` (the resolved scenario, every default written out),
``metrics.csv`` (one row per node per round) and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.learn import derive_seed
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import CoreConfig, make_core
from sim.batched import BatchedMLP
from sim.engine import Engine
from sim.metrics import MetricsRecorder
from sim.network import LatencyModel
from sim.population import Population, build_population
from sim.scenario import Scenario, to_toml

STREAM_CORE = 10
STREAM_NETWORK = 11


@dataclass(frozen=True, slots=True)
class RunResult:
    directory: Path
    summary: dict[str, Any]


def core_config(scenario: Scenario) -> CoreConfig:
    protocol = scenario.protocol
    config = CoreConfig(
        mode=protocol.mode,
        rounds=scenario.rounds,
        local_steps=scenario.learner.local_steps,
        round_timeout=protocol.round_timeout,
        period=protocol.period,
        period_jitter=protocol.period_jitter,
        fanout=protocol.fanout,
        wire_dtype=protocol.wire_dtype,
        max_rounds_ahead=protocol.max_rounds_ahead,
    )
    config.validate()
    return config


def build_engine(
    scenario: Scenario,
    population: Population | None = None,
    *,
    on_round: Callable[[Engine], None] | None = None,
) -> Engine:
    """Wire a scenario's population, cores, network and metrics into an engine.

    Raises:
        ConfigError, TopologyError: the scenario is invalid.
    """
    population = population or build_population(scenario)
    config = core_config(scenario)
    federation = population.federation
    cores = [
        make_core(
            config,
            identity=population.identities[node],
            neighbours=[
                population.identities[peer].node_id for peer in population.neighbours[node]
            ],
            vector=federation.init_vector.clone(),
            samples=len(federation.train_parts[node]),
            merge=make_merge_rule(scenario.merge.rule, **scenario.merge.params),
            rng=np.random.default_rng(derive_seed(scenario.seed, STREAM_CORE, node)),
            layout=federation.layout,
        )
        for node in range(population.size)
    ]
    trainer = BatchedMLP(federation.layout, lr=scenario.learner.lr)
    test_x, test_y = federation.test.x, federation.test.y
    recorder = MetricsRecorder(
        num_nodes=population.size,
        evaluate=lambda vectors: trainer.evaluate(vectors, test_x, test_y),
    )
    return Engine(
        population,
        cores,
        latency=LatencyModel(
            scenario.network.latency, seed=derive_seed(scenario.seed, STREAM_NETWORK)
        ),
        trainer=trainer,
        step_time=scenario.learner.step_time,
        horizon=scenario.horizon,
        recorder=recorder,
        on_round=on_round,
    )


def default_run_dir(scenario: Scenario) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(scenario.output_dir) / f"{scenario.name}-seed{scenario.seed}-{stamp}"


def run_scenario(
    scenario: Scenario,
    out: Path | None = None,
    *,
    on_round: Callable[[Engine], None] | None = None,
) -> RunResult:
    """Run ``scenario`` and write its run directory.

    Raises:
        ConfigError, TopologyError: the scenario is invalid.
    """
    started = time.perf_counter()
    engine = build_engine(scenario, on_round=on_round)
    virtual_seconds = engine.run()
    wall_seconds = time.perf_counter() - started
    directory = out or default_run_dir(scenario)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scenario.toml").write_text(to_toml(scenario))
    (directory / "metrics.csv").write_text(engine.recorder.csv_text())
    summary = summarise(scenario, engine, virtual_seconds, wall_seconds)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if engine.events_log:
        with (directory / "events.jsonl").open("w") as handle:
            for entry in engine.events_log:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
    return RunResult(directory, summary)


def summarise(
    scenario: Scenario, engine: Engine, virtual_seconds: float, wall_seconds: float
) -> dict[str, Any]:
    rounds = engine.recorder.rounds
    final = rounds[-1] if rounds else None
    node_rounds = len(engine.recorder.rows)

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "scenario": scenario.name,
        "nodes": engine.population.size,
        "rounds": len(rounds),
        "seed": scenario.seed,
        "mode": scenario.protocol.mode,
        "merge_rule": scenario.merge.rule,
        "mean_test_accuracy": finite(final.mean_test_accuracy) if final else None,
        "min_test_accuracy": finite(final.min_test_accuracy) if final else None,
        "max_test_accuracy": finite(final.max_test_accuracy) if final else None,
        "final_consensus_distance": final.consensus_distance if final else None,
        "virtual_seconds": virtual_seconds,
        "wall_seconds": round(wall_seconds, 3),
        "node_rounds": node_rounds,
        "node_rounds_per_second": round(node_rounds / wall_seconds, 1)
        if wall_seconds > 0
        else None,
        "bytes_sent": sum(traffic.bytes_sent for traffic in engine.traffic),
        "messages_sent": sum(traffic.messages_sent for traffic in engine.traffic),
        "rejected": sum(traffic.rejected for traffic in engine.traffic),
    }
