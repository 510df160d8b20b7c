"""The examples/loopback network as three real processes: SIGTERM, intact checkpoints, resume."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from p2pfl.checkpoint import CheckpointHeader, checkpoint_path, load_checkpoint, read_header
from p2pfl.cli import main as cli_main
from p2pfl.errors import DecodeError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "loopback"
START_TIMEOUT = 120.0  # three interpreters importing torch on a small machine
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
NODES = (1, 2, 3)
T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def poll(what: str, check: Callable[[], T | None], procs: list[subprocess.Popen[bytes]]) -> T:
    """Call ``check`` until it returns a value; fail at the deadline or if a process died."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        value = check()
        if value is not None:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process {proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {START_TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)


def checkpoint_at_least(path: Path, round_: int) -> CheckpointHeader | None:
    try:
        header, _ = read_header(path)
    except (FileNotFoundError, DecodeError):
        return None
    return header if header.round >= round_ else None


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def start_node(work: Path, index: int, procs: list[subprocess.Popen[bytes]]) -> Path:
    runs = len(list(work.glob(f"node{index}.*.log")))
    log = work / f"node{index}.{runs}.log"
    with log.open("wb") as sink:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "p2pfl.cli",
                    "node",
                    "--config",
                    str(work / f"node{index}.toml"),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
        )
    return log


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [proc.wait(timeout=STOP_TIMEOUT) for proc in procs]


def prepare(tmp_path: Path) -> Path:
    """Copy the example, give it free ports, and make the keys with the CLI."""
    work = tmp_path / "loopback"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("*.key", "*.pub", "state"))
    ports = dict(zip(NODES, free_ports(len(NODES)), strict=True))
    for index in NODES:
        config = work / f"node{index}.toml"
        text = config.read_text()
        for other, port in ports.items():
            text = text.replace(f"127.0.0.1:710{other}", f"127.0.0.1:{port}")
        # Enough rounds that SIGTERM lands mid-run; a short wait for absent peers on restart.
        text = re.sub(r"(?m)^rounds = \d+$", "rounds = 100000", text)
        text = re.sub(r"(?m)^startup_timeout = .*$", "startup_timeout = 2.0", text)
        config.write_text(text)
    for index in NODES:
        assert cli_main(["keygen", "--out", str(work / f"node{index}.key")]) == 0
        assert (work / f"node{index}.key").stat().st_mode & 0o777 == 0o600
    return work


def test_loopback_nodes_stop_on_sigterm_and_resume(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    work = prepare(tmp_path)
    checkpoints = {i: checkpoint_path(work / "state" / f"node{i}") for i in NODES}
    logs = {i: start_node(work, i, processes) for i in NODES}

    for index in NODES:
        poll(
            f"node{index} checkpoint of round >= 2",
            lambda index=index: checkpoint_at_least(checkpoints[index], 2),
            processes,
        )
    assert stop(processes) == [0, 0, 0], [logs[i].read_text()[-2000:] for i in NODES]

    for index in NODES:
        saved = load_checkpoint(checkpoints[index])  # magic, sizes and digest verified
        assert saved.round >= 2
        assert checkpoints[index].stat().st_mode & 0o777 == 0o600
        assert "stopped (received SIGTERM)" in logs[index].read_text()

    # Restart node 1 alone: it resumes from its checkpoint, round and model.
    header, _ = read_header(checkpoints[1])
    restarted: list[subprocess.Popen[bytes]] = []
    log = start_node(work, 1, restarted)
    processes.extend(restarted)
    resumed = poll(
        "resumed log line",
        lambda: re.search(r"resumed round=(\d+) digest=([0-9a-f]{64})", log.read_text()),
        restarted,
    )
    assert int(resumed.group(1)) == header.round
    assert resumed.group(2) == header.sha256.hex()
    first_round = poll(
        "first round line",
        lambda: re.search(r"\bround=(\d+) loss=", log.read_text()),
        restarted,
    )
    assert int(first_round.group(1)) == header.round, log.read_text()[-3000:]
    assert stop(restarted) == [0], log.read_text()[-3000:]
