"""One simulation run: scenario in, run directory out.

A run directory holds:

* ``scenario.toml``: the resolved scenario, every default written out;
* ``metrics.csv``: one row per node per round (byte-identical for one seed);
* ``events.jsonl``: what happened when, one JSON object a line, each with its virtual
  ``time``: ``disruption`` (a timeline entry fired: its index, kind, nodes/links/groups),
  ``node`` (a node's state became online/offline/dead, with the cause), ``link`` (a link went
  down/up), ``misbehaved`` and ``disconnect`` (from the cores);
* ``nodes.csv`` (node, relay, samples, speed, degree) and ``edges.csv`` (u, v): the topology
  the plots draw (``edges.csv`` is left out above 200,000 edges, and ``summary.json`` says so
  in ``edges_csv``);
* ``summary.json``: totals and final accuracies (of all alive honest nodes, of the largest
  component, of isolated nodes), the number of honest and Byzantine nodes and, for a targeted
  attack, ``attack_success_rate`` (mean over honest nodes of their last model's rate). With a
  server mode (``fedavg``), ``server`` is the server's index (else null) and only the server
  reports rounds, so every accuracy is the global model's: ``mean_test_accuracy`` (= min =
  max) and ``final_accuracy_alive`` are the last global model's accuracy (null if the server
  died), ``final_consensus_distance`` is 0, and ``nodes`` counts the clients and the server;
  the traffic totals cover every node; ``overrides`` holds the dotted keys the run changed
  from the scenario it was given (``--set``, ``--seed``, a sweep's grid values) with their
  values, which title the plots;
* the plots, PNG and SVG (:mod:`sim.plots`), redrawn from these files by ``p2pfl-sim plot``.

Without a directory (``run_scenario(..., out=None)``) nothing is written: the
:class:`RunResult` holds the summary, the per-round summaries and every node's rows in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.learn import derive_seed
from p2pfl.learn.batched import BatchedLearner
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import CoreConfig, make_core
from p2pfl.protocol.peers import AllPeersBut, SortedPeers
from sim.adversaries import Adversary, AttackSuccess, targeted_entry
from sim.disruptions import Disruptions
from sim.engine import Engine
from sim.footprint import check_fits
from sim.interrupts import Interrupted, StopRequest
from sim.metrics import MetricsRecorder, RoundSummary
from sim.network import LinkModel
from sim.population import PhaseHook, Population, build_population, initial_vectors
from sim.scenario import Scenario, apply_overrides, parse_scenario, read_document, to_toml
from sim.world import ONLINE, ProgressHook, World
from topologies import CompleteAdjacency

STREAM_CORE = 10
STREAM_NETWORK = 11


class NodeRound(NamedTuple):
    """One node's round: a row of ``metrics.csv`` (the same columns, in the same order)."""

    round: int
    node: int
    honest: int
    virtual_time: float
    train_loss: float
    test_loss: float
    test_accuracy: float
    distance_to_mean: float
    consensus_distance: float
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    rejected: int
    relay: int
    component: int
    component_size: int
    attack_success: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run produced, in memory.

    Attributes:
        directory: the run directory, or None for a run that wrote no files.
        summary: what ``summary.json`` holds (totals, final accuracies, ``overrides``...).
        rounds: one summary per completed round, in order: mean/min/max test accuracy of the
            honest nodes (NaN for a round not evaluated, see ``metrics.eval_every``),
            consensus distance, nodes reporting, virtual time it completed.
        rows: every node's every round, as ``metrics.csv`` has them, by (round, node).
    """

    directory: Path | None
    summary: dict[str, Any]
    rounds: list[RoundSummary] = field(default_factory=list)
    rows: list[NodeRound] = field(default_factory=list)


def node_rounds(recorder: MetricsRecorder) -> list[NodeRound]:
    """The recorder's rows as :class:`NodeRound`, ordered as ``metrics.csv``."""
    ordered = sorted(recorder.rows, key=lambda row: (row[0], row[1]))
    return [NodeRound._make(row) for row in ordered]


def load_scenario(
    scenario: Scenario | str | Path,
    overrides: Sequence[str] = (),
    *,
    seed: int | None = None,
) -> tuple[Scenario, dict[str, Any]]:
    """Resolve a scenario (a shipped name, a ``.toml`` path or a parsed :class:`Scenario`)
    with ``--set``-style ``overrides`` (``"learner.lr=0.05"``) and a ``seed``.

    Returns:
        The scenario, and the dotted keys in which it differs from the one it was made from,
        with their new values (what titles its plots); empty without overrides.

    Raises:
        ConfigError: the name, the file, an override or the resolved scenario is invalid.
    """
    assignments = [*overrides, *([f"seed={seed}"] if seed is not None else [])]
    if isinstance(scenario, Scenario):
        if not assignments:
            return scenario, {}
        document: dict[str, Any] = tomllib.loads(to_toml(scenario))
        source = "scenario"
    else:
        document, source = read_document(str(scenario))
    resolved = parse_scenario(apply_overrides(document, assignments), source=source)
    if not assignments:
        return resolved, {}
    try:
        base = (
            scenario if isinstance(scenario, Scenario) else parse_scenario(document, source=source)
        )
    except ConfigError:  # only valid with its overrides: name the keys they set
        return resolved, _assigned(resolved, assignments)
    return resolved, scenario_changes(base, resolved)


def scenario_changes(base: Scenario, scenario: Scenario) -> dict[str, Any]:
    """The dotted keys (``learner.lr``, ``disruptions[0].fraction``) whose values differ
    between two scenarios, with ``scenario``'s values (``-`` where it has none)."""
    from sim.plots import differences, flatten

    flat = [flatten(tomllib.loads(to_toml(item))) for item in (base, scenario)]
    return differences(flat)[1]


def _assigned(scenario: Scenario, assignments: Sequence[str]) -> dict[str, Any]:
    from sim.plots import flatten

    flat = flatten(tomllib.loads(to_toml(scenario)))
    keys = [assignment.partition("=")[0].strip() for assignment in assignments]
    return {key: flat.get(key, "-") for key in dict.fromkeys(keys)}


def core_config(scenario: Scenario, population: Population | None = None) -> CoreConfig:
    """The cores' settings; with a server mode, ``population`` names the server's key.

    Raises:
        ConfigError: a protocol setting is invalid.
    """
    server = ""
    if population is not None and population.server is not None:
        server = population.identities[population.server].node_id.hex()
    # The scenario spells rounds and local steps elsewhere; the [protocol] keys are shared.
    return CoreConfig.from_settings(
        scenario.protocol,
        rounds=scenario.rounds,
        local_steps=scenario.learner.local_steps,
        server=server,
    )


def build_engine(
    scenario: Scenario,
    population: Population | None = None,
    *,
    on_round: ProgressHook | None = None,
    on_phase: PhaseHook | None = None,
) -> Engine:
    """Wire a scenario's population, cores, network and metrics into an engine.

    ``on_phase`` is told each setup phase as it begins (see :data:`sim.population.PhaseHook`).

    Raises:
        ConfigError, TopologyError: the scenario is invalid.
    """
    population = population or build_population(scenario, on_phase=on_phase)
    if on_phase is not None:
        on_phase("building cores")
    config = core_config(scenario, population)
    federation = population.federation
    initial = initial_vectors(scenario, population)
    neighbours = neighbour_ids(population)
    cores = [
        make_core(
            config,
            identity=population.identities[node],
            neighbours=neighbours[node],
            vector=initial[node],
            samples=population.samples[node],
            merge=make_merge_rule(scenario.merge.rule, **scenario.merge.params),
            rng=np.random.default_rng(derive_seed(scenario.seed, STREAM_CORE, node)),
            layout=federation.layout,
        )
        for node in range(population.size)
    ]
    trainer = build_trainer(scenario, population)
    test_x, test_y = federation.test.x, federation.test.y
    plan = population.adversaries
    targeted = targeted_entry(plan.specs) if plan is not None else None
    evaluated = scenario.metrics.eval_samples  # None: the whole test set
    eval_x, eval_y = test_x[:evaluated], test_y[:evaluated]
    recorder = MetricsRecorder(
        num_nodes=population.size,
        evaluate=lambda vectors: trainer.evaluate(vectors, eval_x, eval_y),
        honest=population.honest,
        relay=list(population.relay),
        reporting=population.reporting,
        attack_success=AttackSuccess(targeted, (test_x, test_y), trainer.logits)
        if targeted is not None
        else None,
        eval_every=scenario.metrics.eval_every,
        last_round=scenario.rounds - 1,
        evaluation_rows=trainer.evaluation_rows(len(eval_x)),
    )
    disruptions = (
        Disruptions(scenario.disruptions, population, seed=scenario.seed)
        if scenario.disruptions
        else None
    )
    adversary = (
        Adversary(
            plan,
            cores=cores,
            identities=population.identities,
            neighbours=population.neighbours,
            initial=initial,
            seed=scenario.seed,
        )
        if plan is not None and any(plan.byzantine)
        else None
    )
    engine = Engine(
        population,
        cores,
        links=LinkModel(
            scenario.network,
            seed=derive_seed(scenario.seed, STREAM_NETWORK),
            nodes=population.size,
        ),
        trainer=trainer,
        step_time=scenario.learner.step_time,
        horizon=scenario.horizon,
        recorder=recorder,
        disruptions=disruptions,
        adversary=adversary,
        on_round=on_round,
    )
    if trainer.notice is not None:
        engine.log({"event": "learner", "notice": trainer.notice})
    return engine


def build_trainer(scenario: Scenario, population: Population) -> BatchedLearner:
    """The batched learner of a run; if the model cannot batch, one line on stderr says so
    (the engine also writes it to ``events.jsonl``).

    Raises:
        ConfigError: the learner settings are invalid.
    """
    federation = population.federation
    try:
        trainer = BatchedLearner(
            federation.build_model(),
            scenario.learner.optimizer_settings(scenario.rounds),
            federation.input_shape,
        )
    except ConfigError as exc:
        raise ConfigError(f"learner.{exc.key}", exc.value, exc.allowed) from None
    if trainer.notice is not None:
        print(f"p2pfl-sim: {trainer.notice}", file=sys.stderr)
    return trainer


def neighbour_ids(population: Population) -> list[Collection[NodeId]]:
    """Each node's neighbours' ids: for a complete graph a view of one sorted table that all
    cores share (O(n) in all, not O(n^2)), otherwise a list per node."""
    node_ids = population.node_ids
    if isinstance(population.neighbours, CompleteAdjacency):
        universe = SortedPeers(node_ids)
        return [AllPeersBut(universe, own) for own in node_ids]
    return [[node_ids[peer] for peer in peers] for peers in population.neighbours]


def default_run_dir(scenario: Scenario) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(scenario.output_dir) / f"{scenario.name}-seed{scenario.seed}-{stamp}"


def run_scenario(
    scenario: Scenario | str | Path,
    out: Path | None = None,
    *,
    overrides: Sequence[str] = (),
    seed: int | None = None,
    changed: Mapping[str, Any] | None = None,
    on_round: ProgressHook | None = None,
    plots: bool = True,
    stop: StopRequest | None = None,
    force: bool = False,
    on_phase: PhaseHook | None = None,
) -> RunResult:
    """Run a scenario; write its run directory ``out`` (with its plots unless ``plots=False``),
    or nothing when ``out`` is None; return what it measured (:class:`RunResult`).

    ``scenario`` is a parsed :class:`Scenario`, a shipped name or a ``.toml`` path;
    ``overrides`` (``"learner.lr=0.05"``, as ``--set``) and ``seed`` are applied to it
    (:func:`load_scenario`). The keys they changed title the plots and are recorded in
    ``summary["overrides"]``; ``changed`` gives them instead (a caller that resolved the
    scenario itself).

    Before allocating anything, the scenario's memory footprint is estimated
    (:mod:`sim.footprint`) and a scenario that does not fit the machine is refused, unless
    ``force``. ``on_phase`` is told each phase as it begins (setup, then ``"running"``).
    ``summary.json`` is written last: a directory holding it holds a whole run.

    Interrupts (:mod:`sim.interrupts`): once ``stop`` is requested (a signal while the nodes
    run; during set-up a signal raises :class:`KeyboardInterrupt` at once and nothing is
    written), the run ends when the round in progress is complete (every active node has
    recorded it), as if its horizon were reached there; the directory is written with
    ``"interrupted": true`` in the summary. A :class:`KeyboardInterrupt` during the run (a
    second signal, or Ctrl-C without ``stop``) ends it at once: the rounds recorded so far
    are written the same way, and :class:`~sim.interrupts.Interrupted` is raised after.

    Raises:
        ConfigError, TopologyError: the scenario or an override is invalid, the scenario
            does not fit in memory, or ``out`` cannot be a directory.
        Interrupted: a KeyboardInterrupt cut the run; its directory is written.
    """
    started = time.perf_counter()
    scenario, found = load_scenario(scenario, overrides, seed=seed)
    changes = dict(found if changed is None else changed)
    directory = out
    created = make_directory("--out", directory) if directory is not None else False
    stopping: list[int] = []

    def round_done(world: World) -> None:
        if on_round is not None:
            on_round(world)
        if stop is None or not stop.requested:
            return
        completed = len(world.recorder.rounds)
        if not stopping:
            stopping.append(completed + 1)  # the round in progress when the stop was seen
        if completed >= stopping[0]:
            engine.horizon = world.now  # the engine ends before the next later event

    with removed_if_empty(directory, created):
        if on_phase is not None:
            on_phase("estimating memory")
        if not force:
            check_fits(scenario)
        engine = build_engine(scenario, on_round=round_done, on_phase=on_phase)
    if on_phase is not None:
        on_phase("running")
    cut = False
    try:
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            virtual_seconds = engine.run()
    except KeyboardInterrupt:
        cut = True
        engine.recorder.flush()
        virtual_seconds = engine.now
    interrupted = cut or bool(stopping)
    wall_seconds = time.perf_counter() - started
    summary = summarise(scenario, engine, virtual_seconds, wall_seconds, interrupted=interrupted)
    summary["overrides"] = changes
    result = RunResult(
        directory, summary, list(engine.recorder.rounds), node_rounds(engine.recorder)
    )
    if directory is not None:
        write_run(directory, scenario, engine, summary, plots=plots)
    if cut:
        raise Interrupted(interrupted_line(directory, summary))
    return result


def write_run(
    directory: Path, scenario: Scenario, engine: Engine, summary: dict[str, Any], *, plots: bool
) -> None:
    """Write a finished run's files into ``directory``; ``summary.json`` last."""
    (directory / "scenario.toml").write_text(to_toml(scenario))
    (directory / "metrics.csv").write_text(engine.recorder.csv_text())
    skipped = write_topology(engine.population, directory)
    if skipped is not None:
        summary["edges_csv"] = skipped
    with (directory / "events.jsonl").open("w") as handle:
        for entry in engine.events_log:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
    if plots and engine.recorder.rounds:
        from sim.plots import plot_run

        plot_run(directory, overrides=summary["overrides"])
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def interrupted_line(directory: Path | None, summary: dict[str, Any]) -> str:
    """The one line printed after an interrupted run."""
    if directory is None:
        return f"interrupted after {summary['rounds']} rounds (nothing written)"
    return (
        f"interrupted after {summary['rounds']} rounds; wrote {directory} "
        '(summary.json says "interrupted": true)'
    )


def make_directory(key: str, path: Path) -> bool:
    """Create ``path`` (and its parents) as a directory, before any work is done.

    Returns:
        Whether the directory was created here (it did not exist).

    Raises:
        ConfigError: ``path`` is an existing file, or it cannot be created (a parent is a
            file, no permission...); ``key`` names the option that gave it.
    """
    if "\0" in str(path):
        raise ConfigError(key, str(path), "a path without NUL characters")
    if path.exists() and not path.is_dir():
        raise ConfigError(key, str(path), "a directory to write into; this is an existing file")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            key, str(path), f"a directory that can be created ({exc.strerror})"
        ) from None
    return created


@contextlib.contextmanager
def removed_if_empty(directory: Path | None, created: bool) -> Iterator[None]:
    """If the block fails before anything was written, remove the directory made for it, so
    a failed run leaves no empty run directory behind."""
    try:
        yield
    except BaseException:
        if (
            created
            and directory is not None
            and directory.is_dir()
            and not any(directory.iterdir())
        ):
            directory.rmdir()
        raise


MAX_EDGES_WRITTEN = 200_000
"""Above this many edges ``edges.csv`` is not written (the topology plot draws no edges)."""


def write_topology(population: Population, directory: Path) -> str | None:
    """``nodes.csv`` and ``edges.csv``: what the topology plot draws. Writing a dense
    graph's edges is itself quadratic, so above :data:`MAX_EDGES_WRITTEN` edges the file is
    left out; returns why it was, or None."""
    neighbours = population.neighbours
    lines = ["node,relay,samples,speed,degree,honest"]
    honest = population.honest
    for node in range(population.size):
        lines.append(
            f"{node},{int(population.relay[node])},{population.samples[node]},"
            f"{population.speed[node]!r},{len(neighbours[node])},{int(honest[node])}"
        )
    (directory / "nodes.csv").write_text("\n".join(lines) + "\n")
    edge_count = population.edge_count
    if edge_count > MAX_EDGES_WRITTEN:
        return f"not written: {edge_count} edges > {MAX_EDGES_WRITTEN}"
    edges = [(u, v) for u in range(population.size) for v in neighbours[u] if u < v]
    (directory / "edges.csv").write_text("u,v\n" + "".join(f"{u},{v}\n" for u, v in edges))
    return None


def summarise(
    scenario: Scenario,
    world: World,
    virtual_seconds: float,
    wall_seconds: float,
    *,
    interrupted: bool = False,
) -> dict[str, Any]:
    rounds = world.recorder.rounds
    final = rounds[-1] if rounds else None
    node_rounds = len(world.recorder.rows)

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "scenario": scenario.name,
        "nodes": world.population.size,
        "rounds": len(rounds),
        "seed": scenario.seed,
        "mode": scenario.protocol.mode,
        "server": world.population.server,
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
        **final_accuracies(world),
        "bytes_sent": sum(traffic.bytes_sent for traffic in world.traffic),
        "messages_sent": sum(traffic.messages_sent for traffic in world.traffic),
        "rejected": sum(traffic.rejected for traffic in world.traffic),
        **adversary_summary(scenario, world),
        "unfired_disruptions": unfired_disruptions(scenario, world.events_log),
        "interrupted": interrupted,
    }


def unfired_disruptions(scenario: Scenario, events: list[dict[str, Any]]) -> list[int]:
    """Indices of the timeline entries that never fired (the run ended before their time)."""
    fired = {entry.get("index") for entry in events if entry.get("event") == "disruption"}
    return [index for index in range(len(scenario.disruptions)) if index not in fired]


def adversary_summary(scenario: Scenario, world: World) -> dict[str, Any]:
    """Honest/Byzantine counts, the attacks, and the honest nodes' final attack success rate."""
    honest = world.recorder.honest
    last: dict[int, float] = {}
    for row in world.recorder.rows:
        node, rate = row[1], row[-1]
        assert isinstance(node, int) and isinstance(rate, float)
        last[node] = rate
    rates = [last[node] for node in last if honest[node] and math.isfinite(last[node])]
    return {
        "honest_nodes": sum(honest),
        "byzantine_nodes": len(honest) - sum(honest),
        "attacks": [spec.attack for spec in scenario.adversaries],
        "attack_success_rate": sum(rates) / len(rates) if rates else None,
    }


def final_accuracies(world: World) -> dict[str, Any]:
    """Accuracy of each alive node's last recorded model, overall and by final component.

    ``largest_component_accuracy`` averages the nodes of the largest component of the final
    live graph; ``isolated_accuracy`` the nodes left alone (a component of one), None if
    there are none. ``protected_accuracy`` averages the alive honest nodes of which less than
    one third of the topology neighbours are Byzantine (``protected_nodes`` of them): the
    nodes a robust rule can be expected to protect. Relays are included: they hold models
    too. Byzantine nodes are not: every accuracy here is over honest nodes.
    """
    last: dict[int, float] = {}
    for row in world.recorder.rows:
        node, accuracy = row[1], row[6]
        assert isinstance(node, int) and isinstance(accuracy, float)
        last[node] = accuracy
    online = [node for node, state in enumerate(world.status) if state == ONLINE]
    components = world.network.components()
    largest = components[0] if components else []
    isolated = [group[0] for group in components if len(group) == 1]

    honest = world.recorder.honest

    def mean(nodes: list[int]) -> float | None:
        values = [
            last[node]
            for node in nodes
            if honest[node] and node in last and math.isfinite(last[node])
        ]
        return sum(values) / len(values) if values else None

    alive = [node for node, state in enumerate(world.status) if state != "dead"]
    protected = [
        node
        for node in alive
        if honest[node] and 3 * _byzantine_neighbours(world, node) < max(1, _degree(world, node))
    ]
    return {
        "alive_nodes": len(alive),
        "online_nodes": len(online),
        "components": len(components),
        "largest_component_size": len(largest),
        "isolated_nodes": len(isolated),
        "final_accuracy_alive": mean(alive),
        "largest_component_accuracy": mean(largest),
        "isolated_accuracy": mean(isolated),
        "protected_nodes": len(protected),
        "protected_accuracy": mean(protected),
    }


def _degree(world: World, node: int) -> int:
    return len(world.population.neighbours[node])


def _byzantine_neighbours(world: World, node: int) -> int:
    honest = world.recorder.honest
    return sum(not honest[peer] for peer in world.population.neighbours[node])
