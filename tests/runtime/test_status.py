"""The status endpoint: Prometheus text, the HTTP/1.0 responder, ``p2pfl status``; log records."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfl.cli import format_status, main
from p2pfl.config import DataConfig, LearnerConfig, NodeConfig
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.runtime.logs import TEXT_FORMAT, JsonFormatter, configure_logging, log_event
from p2pfl.runtime.node import Node
from p2pfl.runtime.status import (
    FAMILIES,
    MAX_REQUEST_BYTES,
    REJECT_REASONS,
    Metrics,
    parse_metrics,
    respond,
    serve_status,
)

SAMPLE = re.compile(r'^p2pfl_[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+|NaN)$')


def test_render_is_prometheus_text_with_help_and_type_for_every_family() -> None:
    metrics = Metrics()
    metrics.inc("frames_in_total", 3)
    metrics.inc("frames_rejected_total", label="oversized")
    metrics.inc("bans_total", label="ip")
    metrics.set("last_test_accuracy", 0.875)
    metrics.set("last_test_loss", math.nan)
    metrics.bind("peers_connected", lambda: 2)
    text = metrics.render(node="abc123")
    lines = text.splitlines()
    for family in FAMILIES:
        assert f"# HELP p2pfl_{family.name} {family.help}" in lines
        assert f"# TYPE p2pfl_{family.name} {family.kind}" in lines
    samples = [line for line in lines if not line.startswith("#")]
    assert all(SAMPLE.match(line) for line in samples), [
        line for line in samples if not SAMPLE.match(line)
    ]
    assert 'p2pfl_frames_in_total{node="abc123"} 3' in lines
    assert 'p2pfl_frames_rejected_total{node="abc123",reason="oversized"} 1' in lines
    assert 'p2pfl_bans_total{node="abc123",kind="ip"} 1' in lines
    assert 'p2pfl_last_test_accuracy{node="abc123"} 0.875' in lines
    assert 'p2pfl_last_test_loss{node="abc123"} NaN' in lines
    assert 'p2pfl_peers_connected{node="abc123"} 2' in lines
    # Every rejection reason is always present, so dashboards see zeros, not gaps.
    rejected = [s for s in parse_metrics(text) if s[0] == "p2pfl_frames_rejected_total"]
    assert sorted(s[1]["reason"] for s in rejected) == sorted(REJECT_REASONS)
    assert text.endswith("\n")


def test_undeclared_metrics_are_a_bug() -> None:
    metrics = Metrics()
    with pytest.raises(KeyError):
        metrics.inc("nope")
    with pytest.raises(KeyError):
        metrics.inc("frames_rejected_total", label="made-up")


def test_responder() -> None:
    ok = respond(b"GET /metrics HTTP/1.0\r\n\r\n", lambda: "m 1\n")
    assert ok.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in ok
    assert ok.endswith(b"\r\n\r\nm 1\n")
    assert respond(b"GET / HTTP/1.1\r\n\r\n", str).startswith(b"HTTP/1.0 404")
    assert respond(b"POST /metrics HTTP/1.1\r\n\r\n", str).startswith(b"HTTP/1.0 405")
    assert respond(b"\x00\xff garbage", str).startswith(b"HTTP/1.0 400")


async def test_endpoint_serves_metrics_and_bounds_requests() -> None:
    metrics = Metrics()
    metrics.inc("bytes_out_total", 1234)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def get(request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        data = b""
        async with stream:
            try:
                await stream.send_all(request)
                while chunk := await stream.receive_some():
                    data += chunk
            except trio.BrokenResourceError:
                pass  # the server closed with our excess bytes unread: a reset
        return data

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_status, listeners, metrics.render)
            answer = await get(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            assert b"p2pfl_bytes_out_total 1234" in answer
            huge = await get(b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (4 * MAX_REQUEST_BYTES))
            assert huge.startswith(b"HTTP/1.0 431") or huge == b""
            assert (await get(b"GET /other HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
            nursery.cancel_scope.cancel()


def test_format_status_is_readable() -> None:
    metrics = Metrics()
    metrics.set("last_test_accuracy", 0.91234)
    metrics.inc("frames_rejected_total", 7, label="rate")
    text = format_status(metrics.render(node="abc123"))
    assert text.startswith("node abc123\n")
    assert re.search(r"^  last_test_accuracy +0\.9123$", text, re.M)
    assert re.search(r"^  frames_rejected_total\{reason=rate\} +7$", text, re.M)
    assert "reason=oversized" not in text  # zero labelled series are left out


def test_status_command_exits_2_with_one_line_when_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--address", "127.0.0.1:1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: cannot reach the node's status at 127.0.0.1:1")
    assert err.count("\n") == 1


def test_status_command_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--address", "nowhere"]) == 2
    assert "--address = 'nowhere'" in capsys.readouterr().err


def test_json_logs_are_one_object_per_line() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        log = logging.getLogger("p2pfl.test")
        log_event(log, logging.INFO, "round", "round %d done", 3, round=3, loss=math.nan)
        log.warning("plain %s", "message")
    finally:
        configure_logging("WARNING", "text", io.StringIO())
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "round" and first["level"] == "INFO"
    assert first["message"] == "round 3 done"
    assert first["fields"] == {"round": 3, "loss": None}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first["time"])
    assert second["event"] == "log" and second["fields"] == {}
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


async def test_a_node_logs_each_round_once_as_text_or_as_json(tmp_path: Path) -> None:
    """One record per round, with the core's fields and the evaluation together; the handler
    renders it as a line of text or as one JSON object (log consumers count rounds once)."""
    rounds = 3
    config = NodeConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        key_file=tmp_path / "node.key",
        data=DataConfig(dataset="digits", num_nodes=1, seed=1),
        learner=LearnerConfig(hidden=[8]),
        protocol=CoreConfig(mode="dsgd", rounds=rounds, local_steps=1, round_timeout=5.0),
    )
    node = Node(config, identity=Identity.from_seed(bytes([9]) * 32))
    text, json_lines = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(json_lines)]
    handlers[0].setFormatter(logging.Formatter(TEXT_FORMAT))
    handlers[1].setFormatter(JsonFormatter())
    logger = logging.getLogger("p2pfl.node")
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        with trio.fail_after(60):
            await node.run()
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)
    records = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    round_records = [r for r in records if r["event"] == "round"]
    assert [r["fields"]["round"] for r in round_records] == list(range(rounds))
    for record in round_records:
        fields = record["fields"]
        assert fields["node"] == node.node_id.short()
        assert {"received", "timed_out", "steps"} <= set(fields)  # the core's
        assert {"loss", "test_loss", "test_accuracy", "peers"} <= set(fields)  # the evaluation
        assert f"round={fields['round']} loss=" in record["message"]
    round_lines = re.findall(r"round=(\d+) loss=", text.getvalue())
    assert round_lines == [str(r) for r in range(rounds)]
    assert text.getvalue().count("round=") == rounds
