"""Signatures of sent frames checked in a verifier process (sim.verifier) beside the loop.

The engine parses each frame it sends in the loop and hands the signature to a child
process; a delivery waits for its frame's verdict. These tests check that a bad signature is
still caught before any core sees the frame, that the process never outlives a run (normal
end, exception, Ctrl-C, the engine's process dying), and that it changes no metric.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import sim.engine
from p2pfl.errors import BadSignature
from p2pfl.identity import Identity
from p2pfl.protocol.events import MessageReceived
from p2pfl.wire import Envelope, MessageKind, decode_frame, encode_frame, parse_frame, seal
from sim.engine import Engine
from sim.run import build_engine
from sim.scenario import parse_scenario
from sim.verifier import VerifierProcess
from tests.documents import small_document
from tests.sim.test_interrupts import (
    ANNOUNCING_CLI,
    _check_interrupted_run,
    scenario_file,
    started,
)

ROOT = Path(__file__).resolve().parents[2]
SIGNER = Identity.from_seed(bytes(range(32)))


def _gone(pid: int) -> bool:
    """The process has ended and been reaped (or is a zombie nobody waits for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _engine(**overrides: Any) -> Engine:
    engine = build_engine(parse_scenario(small_document(**overrides)))
    engine.verify_aside_after = 0  # the process from the first frame on
    return engine


class _Recording(VerifierProcess):
    """Remembers each submitted signature's ticket and every process started; writes records
    to the child only when a verdict is awaited, so a delivery that did not wait would find
    its verdict unknown."""

    started: list[_Recording] = []

    def __init__(self) -> None:
        super().__init__(batch=1 << 30)
        self.tickets: dict[bytes, int] = {}
        _Recording.started.append(self)

    def submit(self, key: bytes, signature: bytes, signed: bytes) -> int:
        ticket = super().submit(key, signature, signed)
        self.tickets[signature] = ticket
        return ticket


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[_Recording]:
    _Recording.started = []
    monkeypatch.setattr(sim.engine, "VerifierProcess", _Recording)
    return _Recording.started


def _watch_deliveries(engine: Engine, seen: list[tuple[int, Envelope]]) -> None:
    """Record every message a core is handed, with the verdicts known at that moment."""
    for core in engine.cores:
        handle = core.handle

        def watched(event: Any, *, now: float, handle: Any = handle) -> Any:
            if isinstance(event, MessageReceived):
                verifier = engine._verifier
                known = -1 if verifier is None else verifier.known
                seen.append((known, event.envelope))
            return handle(event, now=now)

        core.handle = watched  # type: ignore[method-assign]


def test_parse_frame_checks_all_but_the_signature() -> None:
    envelope = seal(SIGNER, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"model")
    frame = encode_frame(envelope)
    parsed, signed = parse_frame(frame)
    parsed.sender.verify(parsed.signature, signed)
    assert parsed == decode_frame(frame)
    forged = encode_frame(dataclasses.replace(envelope, signature=bytes(64)))
    unchecked, signed = parse_frame(forged)  # the signature is the caller's to check
    with pytest.raises(BadSignature):
        unchecked.sender.verify(unchecked.signature, signed)
    with pytest.raises(BadSignature):
        decode_frame(forged)
    payload_changed = bytearray(frame)
    payload_changed[-1] ^= 1
    with pytest.raises(BadSignature, match="digest"):
        parse_frame(payload_changed)


def test_every_delivery_waits_for_its_verdict_and_the_process_ends(
    recording: list[_Recording],
) -> None:
    engine = _engine()
    seen: list[tuple[int, Envelope]] = []
    _watch_deliveries(engine, seen)
    engine.run()
    [verifier] = recording
    assert seen and verifier.submitted > 0
    for known, envelope in seen:
        assert known > verifier.tickets[envelope.signature], "a frame used before its verdict"
    assert verifier.known == verifier.submitted  # frames nobody received were checked too
    assert _gone(verifier.pid)


def test_records_split_between_reads_are_verified_in_order() -> None:
    # One write larger than the pipe (1 MiB): the child's first read ends inside a record,
    # whose rest comes with the next read. A bad signature after that point is still named
    # at its own ticket, and every one before it verifies.
    messages = [index.to_bytes(4, "big") * 30 for index in range(6_000)]  # 221-byte records
    signatures = [SIGNER.sign(message) for message in messages]
    bad = 5_000
    signatures[bad] = bytes([signatures[bad][0] ^ 1]) + signatures[bad][1:]
    verifier = VerifierProcess(batch=1 << 30)  # everything in one write, at the first wait
    try:
        for message, signature in zip(messages, signatures, strict=True):
            verifier.submit(SIGNER.node_id.raw, signature, message)
        verifier.wait(bad - 1)
        assert verifier.known == bad
        with pytest.raises(BadSignature):
            verifier.wait(bad)
    finally:
        verifier.close()
    assert _gone(verifier.pid)


class _Tamper:
    """Byzantine node 0 flips one bit of the signature of every frame it sends after its
    first (which goes out intact, so the run is under way when the bad one comes)."""

    def __init__(self, nodes: int) -> None:
        self.byzantine: Sequence[bool] = [node == 0 for node in range(nodes)]
        self.tampered: set[bytes] = set()
        self._first: Envelope | None = None

    def forge(self, node: int, receiver: int, envelope: Envelope) -> Envelope:
        if self._first is None or self._first is envelope:
            self._first = envelope
            return envelope
        signature = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
        self.tampered.add(signature)
        return dataclasses.replace(envelope, signature=signature)


@pytest.mark.parametrize("aside", [True, False], ids=["verifier process", "in the loop"])
def test_a_tampered_frame_is_caught_before_any_core_sees_it(
    recording: list[_Recording], aside: bool
) -> None:
    engine = _engine()
    engine.workers = aside
    tamper = _Tamper(len(engine.cores))
    engine.adversary = tamper
    seen: list[tuple[int, Envelope]] = []
    _watch_deliveries(engine, seen)
    with pytest.raises(AssertionError, match="invalid frame: signature from .* does not verify"):
        engine.run()
    assert tamper.tampered and seen
    assert not [envelope for _, envelope in seen if envelope.signature in tamper.tampered]
    if aside:
        [verifier] = recording
        assert tamper.tampered <= set(verifier.tickets)  # checked by the process, not inline
        assert _gone(verifier.pid)
    else:
        assert recording == []


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_the_process_ends_when_the_run_is_cut(
    recording: list[_Recording], error: type[BaseException]
) -> None:
    engine = _engine(rounds=50)
    handle = engine.cores[3].handle
    calls = [0]

    def failing(event: Any, *, now: float) -> Any:
        calls[0] += 1
        if calls[0] == 40:  # well into the run: frames submitted, some awaiting a verdict
            raise error("cut")
        return handle(event, now=now)

    engine.cores[3].handle = failing  # type: ignore[method-assign]
    with pytest.raises(error, match="cut"):
        engine.run()
    [verifier] = recording
    assert verifier.submitted > 0
    assert _gone(verifier.pid)


def _child_of_an_engine_that_dies(submits: str) -> tuple[int, str]:
    """Run an engine process that submits records (``submits``: Python lines using ``v``) and
    ends without closing its verifier, as if killed; wait until the child is gone too.
    Returns the child's pid and the engine process's stderr, which the child shares."""
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from sim.verifier import VerifierProcess\n"
        f"{submits}"
        "print(v.pid, flush=True)\n"
        "os._exit(0)  # no close(): as if killed\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    pid, deadline = int(output.stdout), time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid, output.stderr


def test_the_process_ends_when_its_engine_process_dies() -> None:
    pid, _ = _child_of_an_engine_that_dies(
        "v = VerifierProcess()\nv.submit(bytes(32), bytes(64), b'x' * 100)\n"
    )
    assert _gone(pid)


def test_the_process_ends_quietly_when_its_engine_dies_with_records_written() -> None:
    # Records already in the pipe are verified after the engine is gone; the verdicts have
    # nowhere to go, and the child must end without a traceback on the shared terminal.
    pid, stderr = _child_of_an_engine_that_dies(
        "v = VerifierProcess(batch=1)\n"
        "for _ in range(200):\n"
        "    v.submit(bytes(32), bytes(64), b'x' * 100)\n"
    )
    assert _gone(pid)
    assert "Traceback" not in stderr, stderr


def test_results_are_identical_with_the_process_on_and_off(recording: list[_Recording]) -> None:
    document = small_document(
        rounds=4,
        disruptions=[
            {"kind": "cut", "links": [[0, 1]], "at": 0.2},
            {"kind": "crash", "nodes": [6], "at": 0.6},
        ],
    )
    texts = []
    for workers, after in ((False, 0), (True, 0), (True, 10)):
        engine = build_engine(parse_scenario(document))
        engine.workers = workers
        engine.verify_aside_after = after
        engine.run()
        texts.append((engine.recorder.csv_text(), engine.now))
    assert texts[0] == texts[1] == texts[2]
    assert [verifier.known for verifier in recording] == [
        verifier.submitted for verifier in recording
    ]
    assert len(recording) == 2 and recording[1].submitted < recording[0].submitted


def test_a_verifier_names_the_first_bad_signature_in_order() -> None:
    good = seal(SIGNER, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"a")
    _, signed = parse_frame(encode_frame(good))
    verifier = VerifierProcess(batch=4)
    try:
        tickets = [verifier.submit(SIGNER.node_id.raw, good.signature, signed) for _ in range(3)]
        bad = verifier.submit(SIGNER.node_id.raw, bytes(64), signed)
        # All four verdicts are in the pipe before the third is waited for (as when the
        # loop lags the child): the later rejection is raised with its own ticket only.
        unread, deadline = bytearray(4), time.monotonic() + 30
        while fcntl.ioctl(verifier._from, termios.FIONREAD, unread) == 0 and (
            struct.unpack("i", unread)[0] < 4
        ):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        verifier.wait(tickets[-1])
        assert verifier.known == 3
        with pytest.raises(BadSignature, match="does not verify"):
            verifier.wait(bad)
    finally:
        verifier.close()
    assert _gone(verifier.pid)


def test_the_child_ignores_a_terminals_ctrl_c() -> None:
    # Ctrl-C reaches the whole process group; the engine's process decides what stops, and
    # the child must not die with a traceback of its own (even while still starting).
    envelope = seal(SIGNER, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"a")
    _, signed = parse_frame(encode_frame(envelope))
    verifier = VerifierProcess()
    try:
        os.kill(verifier.pid, signal.SIGINT)
        verifier.wait(verifier.submit(SIGNER.node_id.raw, envelope.signature, signed))
        assert verifier.known == 1
    finally:
        verifier.close()
    assert _gone(verifier.pid)


VERIFYING_CLI = (
    "import sim.engine\n"
    "sim.engine.VERIFY_ASIDE_AFTER_FRAMES = 0  # the verifier process from the run's start\n"
    + ANNOUNCING_CLI
)


@pytest.mark.timeout(120)
def test_ctrl_c_to_the_process_group_stops_the_run_and_the_verifier(tmp_path: Path) -> None:
    scenario = scenario_file(tmp_path / "endless.toml")
    out = tmp_path / "run"
    argv = ["-c", VERIFYING_CLI, "run", str(scenario), "--out", str(out), "--quiet"]
    with started(argv) as process:
        process.wait_for_line("ROUND", timeout=60)
        found = subprocess.run(
            ["pgrep", "-P", str(process.popen.pid), "-f", "sim.verifier"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(found) == 1, found
        pid = int(found[0])
        os.killpg(process.popen.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        code, err = process.finish(timeout=60)
    _check_interrupted_run(out, code, err)  # one line on stderr: no traceback from the child
    assert _gone(pid)


def test_a_verifier_that_will_not_start_leaves_verification_in_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = _engine()
    reference.workers = False
    reference.run()

    def refuse() -> VerifierProcess:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(sim.engine, "VerifierProcess", refuse)
    engine = _engine()
    engine.adversary = _Tamper(len(engine.cores))
    with pytest.raises(AssertionError, match="does not verify"):  # still checked, in the loop
        engine.run()
    engine = _engine()
    engine.run()
    assert engine.recorder.csv_text() == reference.recorder.csv_text()
    assert [entry["event"] for entry in engine.events_log] == ["verifier_unavailable"]


def test_a_record_of_another_key_or_signature_length_is_refused_before_it_is_queued() -> None:
    verifier = VerifierProcess()
    try:
        with pytest.raises(ValueError, match="32-byte key and a 64-byte signature"):
            verifier.submit(b"k" * 32, b"s" * 63, b"message")
        with pytest.raises(ValueError, match="got 31 and 64"):
            verifier.submit(b"k" * 31, b"s" * 64, b"message")
        assert verifier.submitted == 0
    finally:
        verifier.close()
