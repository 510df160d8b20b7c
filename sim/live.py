"""Live mode: a scenario run by trio runtime nodes over real TCP, in shards, placed by Ray.

Theory of operation
-------------------
The nodes of a scenario are split into K *shards* (contiguous blocks of node indices); a shard
(:class:`sim.live_shard.Shard`) runs its nodes on one trio loop. The driver here talks to
every shard through a small handle with five calls (``bind``, ``start``, ``poll``,
``command``, ``close``), of which there are three kinds:

* :class:`RayShard`: the shard lives in a Ray actor, on the machine Ray picks (``ray.init()``
  on this machine, or the cluster at ``--ray-address`` / ``RAY_ADDRESS`` started with
  ``ray start``); it binds on the actor's node IP (``ray.util.get_node_ip_address()``);
* :class:`ProcessShard`: the shard is a plain process, ``python -m sim.live shard``, speaking
  JSON lines on stdin/stdout, started with any command prefix (``ssh host``,
  ``ip netns exec NS``): no Ray needed;
* :class:`LocalShard`: the shard runs in this process (tests, small runs).

A run has two phases, so that no node dials an address not yet bound: every shard binds one
listener per node (port 0) and reports its addresses; the driver sends the whole address
book to every shard, which then builds and starts its nodes. The driver then polls the shards
(every ``POLL_INTERVAL`` seconds) for per-node per-round records (round, node, wall seconds
since the start, training loss, the merged vector as float32 bytes, traffic counters) and
feeds them to the same :class:`~sim.metrics.MetricsRecorder` a virtual run uses, so the run
directory has the same files, columns and summary keys. ``virtual_time`` holds wall seconds
since the start, and ``summary.json`` says ``"clock": "wall"``.

Disruptions: :class:`LiveWorld` is a :class:`sim.world.World`, as the engine is, so the
scenario's timeline (:mod:`sim.disruptions`) is the same code as in a virtual run, fired by the
wall clock; each primitive becomes a shard command through the runtime:

===========  =================================================================================
crash        ``stop``: the node's loop ends (``request_stop``); its connections close, so its
remove       neighbours see the disconnect at once whatever ``detect_after`` says
leave        ``leave``: the node stops, its checkpoint kept (neighbours always see it go);
             with ``for_good``, ``depart``: the node stops gracefully, its core told
             ``LeaveRequested`` (its goodbye sent), and never comes back
join         ``join``: a left node starts again on the same port, resumed from its checkpoint
cut/restore  ``cut``/``restore`` at both ends: the connection is closed and neither end dials
partition    or accepts the other until the link is restored
heal
churn        leave/join as above, timed by the wall clock
battery      not supported live (the runtime has no hook before a training): logged, ignored
===========  =================================================================================

The run ends when every node has finished or died; or, as a virtual run ends when no event is
left, once a node has finished and every other node is finished, dead or *idle* (its core
waits with no deadline: ``modest`` nodes not sampled near the end never finish) in every poll
for ``QUIET_SECONDS``; or when nothing runs and no disruption is pending.

Every shard is closed at the end, on error and on timeout (the wall limit: the scenario's
``horizon``, read as wall seconds, or a bound derived from its rounds and timeouts), each
close bounded in time; Ray actors are killed after their close.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import heapq
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from p2pfl.errors import ConfigError
from sim.disruptions import Disruptions
from sim.interrupts import Interrupted, StopRequest, ignore_interrupts
from sim.metrics import MetricsRecorder, Traffic
from sim.population import PhaseHook, Population, build_population
from sim.run import (
    RunResult,
    build_trainer,
    default_run_dir,
    interrupted_line,
    make_directory,
    node_rounds,
    removed_if_empty,
    summarise,
    write_topology,
)
from sim.scenario import BatterySpec, Scenario, parse_scenario, to_toml
from sim.world import DEAD, ONLINE, ProgressHook, Timeline, WorldState

POLL_INTERVAL = 0.2
QUIET_SECONDS = 0.5
"""A run with a finished node ends once every node stayed finished, dead or idle this long."""
RPC_TIMEOUT = 120.0
"""Seconds the driver waits for one shard call (binding loads the data: allow for it)."""
CLOSE_TIMEOUT = 10.0
RAY_HINT = "live mode needs Ray: pip install 'p2pfl-gossip[ray]'"


class LiveRunError(RuntimeError):
    """A shard failed (its traceback is in the message) or did not answer in time."""


def ray_available() -> bool:
    """Whether Ray can be imported (the ``ray`` extra is installed)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def assign(size: int, shards: int) -> list[list[int]]:
    """Nodes ``0..size-1`` in ``shards`` contiguous blocks of near-equal size (none empty).

    Raises:
        ValueError: ``shards`` below 1.
    """
    if shards < 1:
        raise ValueError(f"shards = {shards}: at least 1")
    shards = min(shards, size)
    base, extra = divmod(size, shards)
    blocks, start = [], 0
    for index in range(shards):
        end = start + base + (1 if index < extra else 0)
        blocks.append(list(range(start, end)))
        start = end
    return blocks


def shard_document(scenario: Scenario) -> str:
    """The scenario as TOML for a shard: everything but the disruptions (the driver's)."""
    return to_toml(scenario.model_copy(update={"disruptions": []}))


def scenario_from_text(text: str) -> Scenario:
    return parse_scenario(tomllib.loads(text), source="shard scenario")


def default_wall_limit(scenario: Scenario) -> float:
    """Wall seconds a live run may take: ``horizon`` if set, else a generous bound."""
    if scenario.horizon is not None:
        return scenario.horizon
    from sim.live_shard import STARTUP_TIMEOUT

    protocol = scenario.protocol
    per_round = max(
        protocol.round_timeout,
        protocol.period * (1 + protocol.period_jitter),
        protocol.ping_timeout,
    )
    return STARTUP_TIMEOUT + 2 * scenario.rounds * per_round + 60.0


# -- shard handles ---------------------------------------------------------------------------


class ShardHandle(Protocol):
    nodes: list[int]

    def bind(self) -> dict[int, str]: ...

    def start(self, book: dict[int, str], started_at: float) -> None: ...

    def poll(self) -> dict[str, Any]: ...

    def command(self, name: str, node: int, peer: int | None = None) -> None: ...

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None: ...


class LocalShard:
    """A shard in this process."""

    def __init__(
        self,
        scenario: Scenario,
        nodes: list[int],
        host: str = "127.0.0.1",
        *,
        checkpoints: bool = False,
        population: Population | None = None,
    ) -> None:
        from sim.live_shard import Shard

        self.nodes = list(nodes)
        self.shard = Shard(
            scenario, self.nodes, host, checkpoints=checkpoints, population=population
        )

    def bind(self) -> dict[int, str]:
        return self.shard.bind()

    def start(self, book: dict[int, str], started_at: float) -> None:
        self.shard.start(book, started_at)

    def poll(self) -> dict[str, Any]:
        return self.shard.poll()

    def command(self, name: str, node: int, peer: int | None = None) -> None:
        self.shard.command(name, node, peer)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        self.shard.close(timeout)


class RayShard:
    """A shard in a Ray actor (see :func:`ray_shards`)."""

    def __init__(self, actor: Any, nodes: list[int]) -> None:
        self.actor = actor
        self.nodes = list(nodes)

    def _get(self, ref: Any, timeout: float = RPC_TIMEOUT) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise LiveRunError(f"shard {self.nodes} did not answer in {timeout:g} s") from exc
        except ray.exceptions.RayError as exc:
            raise LiveRunError(f"shard {self.nodes} failed: {exc}") from exc

    def bind(self) -> dict[int, str]:
        return {
            int(node): str(address) for node, address in self._get(self.actor.bind.remote()).items()
        }

    def start(self, book: dict[int, str], started_at: float) -> None:
        self._get(self.actor.start.remote(book, started_at))

    def poll(self) -> dict[str, Any]:
        result: dict[str, Any] = self._get(self.actor.poll.remote())
        return result

    def command(self, name: str, node: int, peer: int | None = None) -> None:
        self._get(self.actor.command.remote(name, node, peer))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        import ray

        try:
            self._get(self.actor.close.remote(timeout), timeout=timeout * 2 + 5)
        except LiveRunError:
            pass
        finally:
            ray.kill(self.actor)


class _ShardActor:
    """The body of the Ray actor: a :class:`~sim.live_shard.Shard` on the actor's node IP."""

    def __init__(self, scenario_text: str, nodes: list[int], checkpoints: bool) -> None:
        import ray

        from sim.live_shard import Shard

        torch.set_num_threads(1)
        host = ray.util.get_node_ip_address()
        self.shard = Shard(scenario_from_text(scenario_text), nodes, host, checkpoints=checkpoints)

    def bind(self) -> dict[int, str]:
        return self.shard.bind()

    def start(self, book: dict[int, str], started_at: float) -> None:
        self.shard.start(book, started_at)

    def poll(self) -> dict[str, Any]:
        return self.shard.poll()

    def command(self, name: str, node: int, peer: int | None) -> None:
        self.shard.command(name, node, peer)

    def close(self, timeout: float) -> None:
        self.shard.close(timeout)


def ray_shards(
    scenario: Scenario, blocks: list[list[int]], *, checkpoints: bool = False
) -> list[RayShard]:
    """One Ray actor per block, spread over the cluster; Ray must be initialised.

    Each actor reserves ``min(1, CPUs / shards)`` CPUs, so K shards fit on a small machine.
    """
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    per_shard = max(0.01, min(1.0, cpus / len(blocks)))
    actor_class = ray.remote(_ShardActor)
    text = shard_document(scenario)
    handles = []
    for block in blocks:
        actor = actor_class.options(
            num_cpus=per_shard,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        ).remote(text, block, checkpoints)
        handles.append(RayShard(actor, block))
    return handles


class ProcessShard:
    """A shard as a plain process (``python -m sim.live shard``) behind ``prefix``.

    ``prefix`` runs it elsewhere, e.g. ``["ip", "netns", "exec", "ns1"]`` or
    ``["ssh", "host"]`` (the scenario file must then exist at the same path there).
    """

    def __init__(
        self,
        scenario: Scenario,
        nodes: list[int],
        host: str,
        *,
        prefix: Sequence[str] = (),
        python: str = sys.executable,
        checkpoints: bool = False,
    ) -> None:
        self.nodes = list(nodes)
        handle, path = tempfile.mkstemp(prefix="p2pfl-live-", suffix=".toml")
        with os.fdopen(handle, "w") as file:
            file.write(shard_document(scenario))
        self._scenario_file = Path(path)
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        argv = [
            *prefix,
            python,
            "-m",
            "sim.live",
            "shard",
            "--scenario",
            path,
            "--nodes",
            ",".join(str(node) for node in self.nodes),
            "--host",
            host,
        ]
        if checkpoints:
            argv.append("--checkpoints")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_lines, daemon=True)
        self._reader.start()

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-4000:]

    def _receive(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise LiveRunError(f"shard {self.nodes} did not answer in {timeout:g} s") from None
        if line is None:
            raise LiveRunError(f"shard {self.nodes} exited:\n{self._stderr_tail()}")
        message = json.loads(line)
        if "error" in message:
            raise LiveRunError(f"shard {self.nodes} failed: {message['error']}")
        return message["ok"]

    def _call(self, command: str, timeout: float = RPC_TIMEOUT, **args: Any) -> Any:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"cmd": command, **args}) + "\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise LiveRunError(f"shard {self.nodes} exited:\n{self._stderr_tail()}") from exc
        return self._receive(timeout)

    def bind(self) -> dict[int, str]:
        bound = self._receive(RPC_TIMEOUT)
        return {int(node): str(address) for node, address in bound.items()}

    def start(self, book: dict[int, str], started_at: float) -> None:
        self._call("start", book={str(k): v for k, v in book.items()}, started_at=started_at)

    def poll(self) -> dict[str, Any]:
        return decode_report(self._call("poll"))

    def command(self, name: str, node: int, peer: int | None = None) -> None:
        self._call("command", name=name, node=node, peer=peer)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        try:
            if self.process.poll() is None:
                self._call("close", timeout=timeout * 2 + 5, close_timeout=timeout)
        except LiveRunError:
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
            self._scenario_file.unlink(missing_ok=True)
            self._stderr.close()


def encode_report(report: dict[str, Any]) -> dict[str, Any]:
    """A shard poll result as JSON-able data (vectors base64)."""
    records = [
        {**record, "vector": base64.b64encode(record["vector"]).decode("ascii")}
        for record in report["records"]
    ]
    return {**report, "records": records}


def decode_report(report: dict[str, Any]) -> dict[str, Any]:
    records = [
        {**record, "vector": base64.b64decode(record["vector"])} for record in report["records"]
    ]
    traffic = {int(node): counters for node, counters in report["traffic"].items()}
    return {**report, "records": records, "traffic": traffic}


# -- the world the timeline acts on -----------------------------------------------------


class LiveWorld(WorldState):
    """The :class:`sim.world.World` of a live run: the state metrics and the disruption
    timeline read, fed by the shards' reports; the primitives turn into shard commands and
    the timeline's scheduled entries fire by the wall clock (:meth:`fire_due`)."""

    def __init__(
        self,
        population: Population,
        recorder: MetricsRecorder,
        owners: dict[int, ShardHandle],
        *,
        disruptions: Timeline | None = None,
        on_round: ProgressHook | None = None,
    ) -> None:
        super().__init__(population, recorder, disruptions=disruptions, on_round=on_round)
        self.finished = [False] * population.size
        self._owners = owners
        self._heap: list[tuple[float, int, object]] = []
        self._sequence = 0

    # -- the timeline's clock -------------------------------------------------------------

    def schedule(self, at: float, payload: object) -> None:
        """Hand ``payload`` to the timeline's ``fire`` once ``now`` reaches ``at``."""
        heapq.heappush(self._heap, (at, self._sequence, payload))
        self._sequence += 1

    def pending(self) -> bool:
        """Something scheduled has not fired yet."""
        return bool(self._heap)

    def fire_due(self) -> None:
        """Fire everything scheduled up to ``now``, in time order."""
        while self._heap and self._heap[0][0] <= self.now and self.disruptions is not None:
            _, _, payload = heapq.heappop(self._heap)
            self.disruptions.fire(self, payload)

    # -- the shards' reports ----------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        """A node's round record from a shard."""
        self.record_round(
            int(record["node"]),
            int(record["round"]) + 1,
            at=float(record["time"]),
            loss=float(record["loss"]),
            vector=torch.frombuffer(bytearray(record["vector"]), dtype=torch.float32),
            traffic=Traffic(*(int(value) for value in record["traffic"])),
        )

    def is_finished(self, node: int) -> bool:
        """The node's shard reported it finished (ran all its rounds)."""
        return self.finished[node]

    # -- the primitives ---------------------------------------------------------------------

    def _send(self, name: str, node: int, peer: int | None = None) -> None:
        self._owners[node].command(name, node, peer)

    def farewell(self, node: int) -> float:
        """The node leaves for good: the shard stops it gracefully, so its core is told
        ``LeaveRequested`` and its goodbye flushed; take it down now (it is on its way)."""
        if self.status[node] is ONLINE and not self.finished[node]:
            self._send("depart", node)
        return self.now

    def take_down(
        self, node: int, *, dead: bool, notify_after: float | None, cause: str, disruption: int
    ) -> bool:
        before = self.network.take_down(node, dead=dead, cause=cause, disruption=disruption)
        if before is None:
            return False
        self._send("stop" if dead else "leave", node)
        if before is ONLINE:
            self.recorder.set_active(node, False)
        return True

    def bring_up(self, node: int, *, cause: str, disruption: int) -> bool:
        if not self.network.bring_up(node, cause=cause, disruption=disruption):
            return False
        self.recorder.set_active(node, True)
        self._send("join", node)
        return True

    def cut_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        if self.network.cut_link(u, v, reason=reason, disruption=disruption):
            self._send("cut", u, v)
            self._send("cut", v, u)

    def restore_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        if self.network.restore_link(u, v, reason=reason, disruption=disruption):
            self._send("restore", u, v)
            self._send("restore", v, u)


# -- the run ---------------------------------------------------------------------------------


def run_live(
    scenario: Scenario,
    out: Path | None = None,
    *,
    shards: int | None = None,
    ray_address: str | None = None,
    handles: Sequence[ShardHandle] | None = None,
    on_round: ProgressHook | None = None,
    plots: bool = True,
    wall_limit: float | None = None,
    ray_init: dict[str, Any] | None = None,
    stop: StopRequest | None = None,
    on_phase: PhaseHook | None = None,
    changed: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run ``scenario`` live and write its run directory (the format of a virtual run).

    Args:
        scenario: the scenario.
        out: the run directory (default: as a virtual run's).
        shards: number of Ray actors (default: the cluster's CPUs, at most one per node).
        ray_address: the Ray cluster (default: ``RAY_ADDRESS``, else a local Ray instance).
        handles: shards already made (``LocalShard``, ``ProcessShard``...): no Ray; they
            must cover every node once, and are closed here.
        on_round: progress hook, called with the world after every node's round.
        plots: also draw the plots.
        wall_limit: stop after this many wall seconds (default :func:`default_wall_limit`).
        ray_init: extra ``ray.init`` keyword arguments (when this call starts Ray).
        stop: once requested (:mod:`sim.interrupts`), the run ends at the next poll: the
            records the shards hold are taken, every shard is closed and the directory is
            written with ``"interrupted": true``. A :class:`KeyboardInterrupt` while the
            nodes run does the same, and :class:`~sim.interrupts.Interrupted` is raised after.
        on_phase: told each phase as it begins (building the population, starting Ray and
            the shards, binding, starting the nodes, ``"running"``): progress while the
            shards start, which takes seconds.
        changed: the keys the run changed from its scenario (titles, ``summary["overrides"]``).

    Raises:
        ConfigError, TopologyError: the scenario is invalid.
        ImportError: Ray is needed (no ``handles``) and not installed.
        ConfigError: the Ray cluster at ``ray_address`` cannot be reached.
        LiveRunError: a shard failed or stopped answering (every shard is closed first).
        Interrupted: a KeyboardInterrupt cut the run; its directory is written.
    """
    started_wall = time.perf_counter()
    directory = out or default_run_dir(scenario)
    created = make_directory("--out", directory)
    shard_handles: list[ShardHandle] = list(handles) if handles is not None else []
    ray_started: list[bool] = []

    def finish() -> None:
        _close_all(shard_handles)
        if ray_started:
            import ray

            ray.shutdown()

    with removed_if_empty(directory, created), contextlib.ExitStack() as cleanup:
        cleanup.callback(finish)
        phase = on_phase or (lambda _name: None)
        population = build_population(scenario, on_phase=on_phase)
        if handles is None:
            phase("starting Ray")
            import ray

            if not ray.is_initialized():
                options = {"include_dashboard": False, "log_to_driver": True, **(ray_init or {})}
                try:
                    ray.init(address=ray_address, **options)
                except (ConnectionError, ray.exceptions.RayError) as exc:
                    raise ConfigError(
                        "--ray-address",
                        ray_address or os.environ.get("RAY_ADDRESS"),
                        f"a reachable Ray cluster ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}); with token authentication set "
                        "RAY_AUTH_MODE=token, or use 'auto' on a cluster node",
                    ) from exc
                ray_started.append(True)
            count = shards or int(ray.cluster_resources().get("CPU", 1.0))
            blocks = assign(population.size, max(1, count))
            phase(f"starting {len(blocks)} shard actors")
            shard_handles += ray_shards(scenario, blocks, checkpoints=_needs_checkpoints(scenario))
        world, timed_out, interrupted = _drive(
            scenario,
            population,
            shard_handles,
            on_round,
            wall_limit or default_wall_limit(scenario),
            stop,
            phase,
        )
    wall_seconds = time.perf_counter() - started_wall
    (directory / "scenario.toml").write_text(to_toml(scenario))
    (directory / "metrics.csv").write_text(world.recorder.csv_text())
    summary = summarise(
        scenario, world, world.now, wall_seconds, interrupted=interrupted is not None
    )
    summary["clock"] = "wall"
    summary["overrides"] = dict(changed or {})
    summary["live"] = {
        "shards": len(shard_handles),
        "timed_out": timed_out,
        "ray_address": ray_address or os.environ.get("RAY_ADDRESS"),
    }
    with (directory / "events.jsonl").open("w") as handle:
        for entry in world.events_log:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
    write_topology(population, directory)
    if plots and world.recorder.rounds:
        from sim.plots import plot_run

        plot_run(directory, overrides=summary["overrides"])
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if interrupted == "cut":
        raise Interrupted(interrupted_line(directory, summary))
    return RunResult(directory, summary, list(world.recorder.rounds), node_rounds(world.recorder))


def _needs_checkpoints(scenario: Scenario) -> bool:
    return any(spec.kind in {"leave", "join", "churn"} for spec in scenario.disruptions)


def _drive(
    scenario: Scenario,
    population: Population,
    handles: list[ShardHandle],
    on_round: ProgressHook | None,
    wall_limit: float,
    stop: StopRequest | None = None,
    on_phase: PhaseHook | None = None,
) -> tuple[LiveWorld, bool, str | None]:
    """Start the shards and feed their records to the recorder until the run ends.

    Returns:
        The world, whether the wall limit ended the run, and why it was interrupted:
        ``"stop"`` (``stop`` requested), ``"cut"`` (:class:`KeyboardInterrupt`) or None.
    """
    owners = {node: handle for handle in handles for node in handle.nodes}
    if sorted(owners) != list(range(population.size)) or sum(len(h.nodes) for h in handles) != len(
        owners
    ):
        raise ValueError("the shards must hold every node of the scenario exactly once")
    federation = population.federation
    trainer = build_trainer(scenario, population)
    test_x, test_y = federation.test.x, federation.test.y
    recorder = MetricsRecorder(
        num_nodes=population.size,
        evaluate=lambda vectors: trainer.evaluate(vectors, test_x, test_y),
        relay=list(population.relay),
        reporting=population.reporting,
    )
    disruptions = (
        Disruptions(scenario.disruptions, population, seed=scenario.seed)
        if scenario.disruptions
        else None
    )
    world = LiveWorld(population, recorder, owners, disruptions=disruptions, on_round=on_round)
    for index, spec in enumerate(scenario.disruptions):
        if isinstance(spec, BatterySpec):
            world.log({"event": "unsupported", "index": index, "kind": spec.kind})
            print(f"p2pfl-sim: live mode ignores disruptions[{index}] (battery)", file=sys.stderr)

    phase = on_phase or (lambda _name: None)
    book: dict[int, str] = {}
    for number, handle in enumerate(handles, start=1):
        phase(f"binding shard {number}/{len(handles)} (loads its data)")
        book.update(handle.bind())
    started_at = time.time()
    phase(f"starting {population.size} nodes")
    for handle in handles:
        handle.start(book, started_at)
    phase("running")
    if world.disruptions is not None:
        world.disruptions.start(world)
    deadline = time.monotonic() + wall_limit
    timed_out = False
    interrupted: str | None = None
    try:
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            timed_out = _poll_until_done(world, handles, started_at, deadline, wall_limit, stop)
    except KeyboardInterrupt:
        interrupted = "cut"
    if interrupted is None and stop is not None and stop.requested:
        interrupted = "stop"
    if interrupted is not None:
        world.log({"event": "interrupted"})
    world.now = time.time() - started_at
    for handle in handles:  # rounds reported while the run ended
        for record in handle.poll()["records"]:
            world.record(record)
    world.recorder.flush()
    return world, timed_out, interrupted


def _poll_until_done(
    world: LiveWorld,
    handles: list[ShardHandle],
    started_at: float,
    deadline: float,
    wall_limit: float,
    stop: StopRequest | None,
) -> bool:
    """Poll the shards until the run ends (see the module docstring) or ``stop`` is
    requested; True if the wall limit ended it."""
    size = world.population.size
    quiet_since: float | None = None
    if stop is not None:
        # ray.init installs a SIGTERM handler that exits at once, losing the run: the run's
        # own handler must be the one a signal finds.
        stop.reinstall()
    while stop is None or not stop.requested:
        world.now = time.time() - started_at
        world.fire_due()
        records: list[dict[str, Any]] = []
        running = 0
        idle: set[int] = set()
        for handle in handles:
            report = handle.poll()
            if report["errors"]:
                raise LiveRunError(f"shard {handle.nodes} failed:\n" + "\n".join(report["errors"]))
            records.extend(report["records"])
            for node, counters in report["traffic"].items():
                world.traffic[int(node)] = Traffic(*(int(value) for value in counters))
            for node in report["finished"]:
                world.finished[int(node)] = True
            running += len(report["running"])
            idle.update(int(node) for node in report.get("idle", ()))
        for record in sorted(records, key=lambda record: (record["time"], record["node"])):
            world.record(record)
        if all(world.finished[node] or world.status[node] is DEAD for node in range(size)):
            return False
        if running == 0 and not world.pending():
            return False
        settled = any(world.finished) and all(
            world.finished[node] or world.status[node] is DEAD or node in idle
            for node in range(size)
        )
        if not settled or records or world.pending():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_SECONDS:
            return False  # nothing left to happen: the nodes still running wait for nobody
        if time.monotonic() > deadline:
            world.log({"event": "timeout", "wall_limit": wall_limit})
            print(
                f"p2pfl-sim: live run stopped at its wall limit ({wall_limit:g} s)", file=sys.stderr
            )
            return True
        time.sleep(POLL_INTERVAL)
    return False


def _close_all(handles: Sequence[ShardHandle]) -> None:
    """Close every shard in parallel, each bounded by ``CLOSE_TIMEOUT``."""
    threads = [
        threading.Thread(target=_close_quietly, args=(handle,), daemon=True) for handle in handles
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3 * CLOSE_TIMEOUT + 10)


def _close_quietly(handle: ShardHandle) -> None:
    try:
        handle.close(CLOSE_TIMEOUT)
    except Exception as exc:  # closing must reach every shard
        print(f"p2pfl-sim: closing shard {handle.nodes}: {exc}", file=sys.stderr)


# -- the shard process ------------------------------------------------------------------


def shard_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sim.live shard``: one shard speaking JSON lines on stdin/stdout.

    It binds, prints ``{"ok": {node: "host:port", ...}}``, then answers one line per command
    line: ``{"cmd": "start", "book": {...}, "started_at": T}``, ``{"cmd": "poll"}`` (records
    with base64 vectors), ``{"cmd": "command", "name": ..., "node": N, "peer": M}``,
    ``{"cmd": "close"}``. Replies are ``{"ok": ...}`` or ``{"error": "..."}``. End of input
    closes the shard.
    """
    parser = argparse.ArgumentParser(prog="python -m sim.live shard")
    parser.add_argument("--scenario", required=True, help="scenario TOML (disruptions ignored)")
    parser.add_argument("--nodes", required=True, help="comma-separated node indices")
    parser.add_argument("--host", required=True, help="the address to bind (and be reached at)")
    parser.add_argument("--checkpoints", action="store_true", help="keep checkpoints (join)")
    args = parser.parse_args(argv)
    ignore_interrupts()  # the driver closes its shards; a terminal's Ctrl-C is for the driver
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from sim.live_shard import Shard

    scenario = scenario_from_text(Path(args.scenario).read_text())
    nodes = [int(node) for node in args.nodes.split(",") if node.strip()]
    shard = Shard(scenario, nodes, args.host, checkpoints=args.checkpoints)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        try:
            reply({"ok": {str(k): v for k, v in shard.bind().items()}})
        except Exception as exc:  # reported to the driver
            reply({"error": repr(exc)})
            return 1
        for line in sys.stdin:
            message = json.loads(line)
            command = message.get("cmd")
            try:
                match command:
                    case "start":
                        book = {int(k): v for k, v in message["book"].items()}
                        shard.start(book, float(message["started_at"]))
                        reply({"ok": None})
                    case "poll":
                        report = encode_report(shard.poll())
                        report["traffic"] = {str(k): v for k, v in report["traffic"].items()}
                        reply({"ok": report})
                    case "command":
                        shard.command(message["name"], int(message["node"]), message.get("peer"))
                        reply({"ok": None})
                    case "close":
                        shard.close(float(message.get("close_timeout", CLOSE_TIMEOUT)))
                        reply({"ok": None})
                        return 0
                    case _:
                        reply({"error": f"unknown command {command!r}"})
            except Exception as exc:  # reported to the driver
                reply({"error": repr(exc)})
    finally:
        shard.close(CLOSE_TIMEOUT)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "shard":
        print(
            "usage: python -m sim.live shard --scenario FILE --nodes 0,1 --host IP", file=sys.stderr
        )
        return 2
    return shard_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
