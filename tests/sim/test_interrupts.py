"""SIGINT/SIGTERM keep what was done (issue 12, defect 6).

Every test drives a real `p2pfl-sim` process (or a live-mode driver) with real signals:
a run writes its directory marked interrupted and exits 130; a sweep kills its workers at
once, writes `sweep.csv` for the finished runs, and `--resume` runs only the rest. Each
process is started in its own session and killed by the test if it is still there.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sim.interrupts import EXIT_INTERRUPTED, stop_on_signals
from sim.scenario import parse_scenario, to_toml

ROOT = Path(__file__).resolve().parents[2]
NODES = 6
ENDLESS: dict[str, Any] = {
    "name": "endless",
    "seed": 2,
    "rounds": 100000,
    "topology": {"kind": "ring", "n": NODES},
    "data": {
        "dataset": "gaussian_mixture",
        "params": {"n_samples": 240, "dim": 4, "num_classes": 2},
        "partition": "iid",
        "partition_params": {},
    },
    "learner": {"hidden": [4], "local_steps": 1},
}
"""A scenario that runs until it is stopped (a round takes milliseconds)."""


def scenario_file(path: Path, **changes: Any) -> Path:
    path.write_text(to_toml(parse_scenario({**ENDLESS, **changes})))
    return path


ANNOUNCING_CLI = """\
import sys
import sim.cli as cli

real = cli.run_scenario


def announcing(scenario, out, *, on_round=None, **options):
    # Test scaffolding: say on stdout when the first round is complete, so the test
    # signals a run that is under way (not one still loading its data).
    said = []

    def hook(engine):
        on_round(engine)
        if engine.recorder.rounds and not said:
            said.append(True)
            print("ROUND", flush=True)

    return real(scenario, out, on_round=hook, **options)


cli.run_scenario = announcing
sys.exit(cli.main(sys.argv[1:]))
"""
LIVE_DRIVER = """\
import sys
from pathlib import Path

from sim.cli import EXIT_USAGE
from sim.interrupts import EXIT_INTERRUPTED, stop_on_signals
from sim.live import LocalShard, assign, run_live
from sim.run import interrupted_line
from sim.scenario import parse_scenario, read_document

document, source = read_document(sys.argv[1])
scenario = parse_scenario(document, source=source)
said = []


def hook(world):
    if world.recorder.rounds and not said:
        said.append(True)
        print("ROUND", flush=True)


with stop_on_signals() as stop:
    handles = [LocalShard(scenario, block) for block in assign(scenario.topology.n, 2)]
    result = run_live(scenario, Path(sys.argv[2]), handles=handles, on_round=hook, stop=stop)
if result.summary["interrupted"]:
    print("p2pfl-sim: " + interrupted_line(result.directory, result.summary), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
sys.exit(0 if EXIT_USAGE else 1)
"""


class Process:
    """A child process in its own session, its stdout lines collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.popen = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.strip())

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.2) == text:
                    return
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
        raise AssertionError(f"no {text!r} line within {timeout} s: {self.stderr()}")

    def finish(self, timeout: float) -> tuple[int, str]:
        code = self.popen.wait(timeout)
        return code, self.stderr()

    def stderr(self) -> str:
        if self.popen.poll() is None or self.popen.stderr is None:
            return ""
        return self.popen.stderr.read()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def started(argv: list[str]) -> Iterator[Process]:
    process = Process(argv)
    try:
        yield process
    finally:
        process.kill()


def _metrics_rounds(directory: Path) -> dict[int, int]:
    with (directory / "metrics.csv").open() as handle:
        counts: dict[int, int] = {}
        for row in csv.DictReader(handle):
            counts[int(row["round"])] = counts.get(int(row["round"]), 0) + 1
    return counts


def _check_interrupted_run(directory: Path, code: int, err: str) -> dict[str, object]:
    assert code == EXIT_INTERRUPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfl-sim: interrupted after"), err
    assert str(directory) in lines[0]
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["interrupted"] is True
    rounds = summary["rounds"]
    assert isinstance(rounds, int) and 1 <= rounds < 100000
    counts = _metrics_rounds(directory)
    assert sorted(counts) == list(range(len(counts)))
    # The rounds done when the stop came are whole; only nodes that had run ahead can leave
    # a last round with fewer rows (as at a horizon).
    assert all(count == NODES for count in list(counts.values())[:-1])
    for name in ("scenario.toml", "events.jsonl", "nodes.csv", "edges.csv", "accuracy.png"):
        assert (directory / name).is_file(), name
    return summary


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_run_writes_the_rounds_done_and_exits_130(
    tmp_path: Path, signum: signal.Signals
) -> None:
    scenario = scenario_file(tmp_path / "endless.toml")
    out = tmp_path / "run"
    with started(["-c", ANNOUNCING_CLI, "run", str(scenario), "--out", str(out), "--quiet"]) as p:
        p.wait_for_line("ROUND", timeout=60)
        os.kill(p.popen.pid, signum)
        code, err = p.finish(timeout=60)
    _check_interrupted_run(out, code, err)


@pytest.mark.timeout(120)
def test_signal_during_a_live_run_writes_its_directory(tmp_path: Path) -> None:
    scenario = scenario_file(
        tmp_path / "endless-live.toml", horizon=90.0, protocol={"round_timeout": 10.0}
    )
    out = tmp_path / "live"
    with started(["-c", LIVE_DRIVER, str(scenario), str(out)]) as process:
        process.wait_for_line("ROUND", timeout=60)
        os.kill(process.popen.pid, signal.SIGINT)
        code, err = process.finish(timeout=60)
    summary = _check_interrupted_run(out, code, err)
    assert summary["clock"] == "wall"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert {"event": "interrupted"} in [{"event": e["event"]} for e in events]


def _workers(pid: int) -> set[int]:
    """The worker processes of the pool of process ``pid`` (not its resource tracker)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in command:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _finished_runs(out: Path) -> dict[str, int]:
    """Run directory name -> mtime (ns) of its summary.json, for the finished runs."""
    return {
        path.parent.name: path.stat().st_mtime_ns for path in sorted(out.glob("run-*/summary.json"))
    }


@pytest.mark.timeout(240)
def test_sweep_stops_its_workers_keeps_finished_runs_and_resumes(tmp_path: Path) -> None:
    scenario = scenario_file(tmp_path / "short.toml", rounds=30)
    out = tmp_path / "sweep"
    argv = ["-m", "sim.cli", "sweep", str(scenario), "--grid", "learner.lr=0.1,0.2"]
    argv += ["--seeds", "3", "--jobs", "2", "--out", str(out), "--quiet"]
    with started(argv) as process:
        deadline = time.monotonic() + 120
        while not _finished_runs(out):
            assert time.monotonic() < deadline and process.popen.poll() is None
            time.sleep(0.05)
        workers = _workers(process.popen.pid)
        assert workers
        os.killpg(process.popen.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        signalled = time.monotonic()
        while any(_alive(pid) for pid in workers) and time.monotonic() - signalled < 5:
            time.sleep(0.02)
        stopped_after = time.monotonic() - signalled
        code, err = process.finish(timeout=60)
    assert stopped_after < 2.0, f"workers still running {stopped_after:.1f} s after SIGINT"
    assert code == EXIT_INTERRUPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0], err
    finished = _finished_runs(out)
    assert 1 <= len(finished) < 6
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["directory"] for row in rows) == sorted(finished)

    with started([*argv, "--resume"]) as process:
        code, err = process.finish(timeout=180)
    assert code == 0, err
    after = _finished_runs(out)
    assert len(after) == 6
    assert {name: after[name] for name in finished} == finished  # not run again
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(row["final_accuracy_alive"] for row in rows)


def test_reinstall_takes_back_the_signals_a_library_replaced() -> None:
    """ray.init replaces the SIGTERM handler with one that exits at once; live mode takes
    it back before its nodes run, so SIGTERM still saves the run."""
    with stop_on_signals() as stop:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.reinstall()
        assert signal.getsignal(signal.SIGTERM) is stop.handler
        assert signal.getsignal(signal.SIGINT) is stop.handler
    assert signal.getsignal(signal.SIGTERM) is not stop.handler


def test_an_interrupted_sweep_keeps_a_run_its_worker_wrote_just_before_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a Ctrl-C can hit: a worker has written its whole run, but its result has not
    reached the parent when the workers are stopped. The table still lists that run."""
    import sim.sweep as sweep
    from sim.interrupts import Interrupted

    document = parse_scenario({**ENDLESS, "rounds": 2}).model_dump(mode="json")
    out = tmp_path / "sweep"
    runs = sweep.plan(document, "<test>", [("learner.lr", ["0.1", "0.2"])], seeds=1, out=out)

    def stopped_after_one_run(todo: Any, source: str, *args: Any) -> bool:
        sweep.run_one(todo[0].document, source, str(todo[0].directory), False, todo[0].changed)
        return True  # stopped, and the finished run's result never came back

    monkeypatch.setattr(sweep, "_run_in_workers", stopped_after_one_run)
    with pytest.raises(Interrupted, match="1 of 2 runs finished"):
        sweep.run_sweep(runs, "<test>", out, jobs=2)
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["directory"] for row in rows] == [runs[0].directory.name]
    assert rows[0]["final_accuracy_alive"]
