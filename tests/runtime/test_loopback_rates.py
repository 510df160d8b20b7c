"""The examples/loopback configs at any round pace: honest nodes never strike each other.

Issue 12, defect 1: with short local training the three example nodes exchanged more frames
per second than a fixed per-second limit allowed, struck and banned each other, and ran the
rest alone. The rate limit is now sized from the protocol (a per-round allowance); here the
three example configs, unchanged except for ports, ``rounds`` and ``local_steps = 1``, run
with the default limits in one trio run over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfl.cli import main as cli_main
from p2pfl.config import load_config
from p2pfl.runtime.node import Node

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "loopback"
NODES = (1, 2, 3)
ROUNDS = 1000
RUN_TIMEOUT = 300.0


class RoundRecords(logging.Handler):
    """Keeps the fields of every ``round`` record, per node (one record per round)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rounds: dict[str, list[dict[str, Any]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "round":
            fields = getattr(record, "fields", {})
            self.rounds.setdefault(fields["node"], []).append(dict(fields))


@pytest.fixture
def round_records() -> Iterator[RoundRecords]:
    handler = RoundRecords()
    logger = logging.getLogger("p2pfl.node")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def loopback_nodes(
    tmp_path: Path, rounds: int, protocol: str = "", mode: str = "dsgd", learner: str = ""
) -> list[Node]:
    """The example's three nodes on ports bound now, ``rounds`` rounds of one local step,
    ``protocol`` appended to each ``[protocol]`` table (``learner`` to each ``[learner]``)."""
    work = tmp_path / "loopback"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("*.key", "*.pub", "state"))
    listeners = {i: await trio.open_tcp_listeners(0, host="127.0.0.1") for i in NODES}
    ports = {i: int(ls[0].socket.getsockname()[1]) for i, ls in listeners.items()}
    for index in NODES:
        assert cli_main(["keygen", "--out", str(work / f"node{index}.key")]) == 0
        config = work / f"node{index}.toml"
        text = config.read_text()
        for other, port in ports.items():
            text = text.replace(f"127.0.0.1:710{other}", f"127.0.0.1:{port}")
        text = re.sub(r"(?m)^rounds = \d+$", f"rounds = {rounds}", text)
        text = re.sub(r"(?m)^local_steps = \d+$", "local_steps = 1" + protocol, text)
        text = text.replace('mode = "dsgd"', f'mode = "{mode}"')
        text = text.replace("batch_size = 32", "batch_size = 32" + learner)
        config.write_text(text)
    return [Node(load_config(work / f"node{i}.toml"), listeners=listeners[i]) for i in NODES]


async def run_all(nodes: list[Node]) -> None:
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.run)


def check_every_round_merged(nodes: list[Node], records: RoundRecords, rounds: int) -> None:
    for node in nodes:
        assert node.core.finished
        assert node.stats["misbehaviour"] == 0, node.stats
        assert node.metrics.get("strikes_total") == 0
        assert len(node.key_bans) == 0 and len(node.ip_bans) == 0
        own = records.rounds[node.node_id.short()]
        assert [r["round"] for r in own] == list(range(rounds))
        # Every round closed with both neighbours' models, none on the timeout.
        assert all(r["received"] == 2 and r["timed_out"] == 0 for r in own), [
            r for r in own if r["received"] != 2 or r["timed_out"]
        ][:3]


async def test_loopback_configs_run_1000_fast_rounds_without_strikes(
    tmp_path: Path, round_records: RoundRecords
) -> None:
    nodes = await loopback_nodes(tmp_path, ROUNDS)
    start = trio.current_time()
    await run_all(nodes)
    elapsed = trio.current_time() - start
    print(f"\n{ROUNDS} rounds on 3 nodes in {elapsed:.1f} s ({ROUNDS / elapsed:.0f} rounds/s)")
    check_every_round_merged(nodes, round_records, ROUNDS)


async def test_gossip_pushing_every_few_milliseconds_draws_no_strikes(tmp_path: Path) -> None:
    """Gossip's allowance follows its period: 200 pushes a second are the protocol's pace."""
    nodes = await loopback_nodes(
        tmp_path, 300, "\nperiod = 0.005\nperiod_jitter = 0.2", mode="gossip"
    )
    await run_all(nodes)
    for node in nodes:
        assert node.core.finished
        assert node.stats["misbehaviour"] == 0, node.stats
        assert node.stats["messages_received"] > 300  # the pushes did arrive
