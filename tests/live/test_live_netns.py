"""Two hosts, one shard each: network namespaces joined by a veth pair, real TCP across it.

The test makes two network namespaces (``ip netns``), joins them with a veth pair
(10.231.7.1/24 and 10.231.7.2/24) and runs one shard process in each (``ip netns exec NS
python -m sim.live shard``). The scenario is a ring of 8 nodes with the even nodes in one
namespace and the odd ones in the other, so *every* link crosses the veth: a node can only
complete its rounds with models from the other namespace. Skipped where namespaces cannot be
made (not root, no ``ip``, no permission); the namespaces are always deleted.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.live import ProcessShard, run_live
from sim.scenario import parse_scenario
from tests.documents import live_document

RUN_TIMEOUT = 90
SUBNET = "10.231.7"
ROUNDS = 4


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[list[tuple[str, str, str]]]:
    """Two (namespace, veth device, address) joined by a veth pair; deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    tag = os.getpid() % 100000
    names = (f"p2pfl-live-{tag}-a", f"p2pfl-live-{tag}-b")
    veth = (f"p2pa{tag}", f"p2pb{tag}")
    created: list[str] = []
    try:
        for name in names:
            made = _ip("netns", "add", name)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
            created.append(name)
        steps = [
            ("link", "add", veth[0], "type", "veth", "peer", "name", veth[1]),
            ("link", "set", veth[0], "netns", names[0]),
            ("link", "set", veth[1], "netns", names[1]),
        ]
        for index, (name, device) in enumerate(zip(names, veth, strict=True)):
            steps += [
                ("-n", name, "addr", "add", f"{SUBNET}.{index + 1}/24", "dev", device),
                ("-n", name, "link", "set", device, "up"),
                ("-n", name, "link", "set", "lo", "up"),
            ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(step)}): {done.stderr}")
        yield [
            (name, device, f"{SUBNET}.{index + 1}")
            for index, (name, device) in enumerate(zip(names, veth, strict=True))
        ]
    finally:
        for name in created:
            _ip("netns", "del", name)


def _veth_tx_bytes(namespace: str, device: str) -> int:
    done = subprocess.run(
        ["ip", "-n", namespace, "-j", "-s", "link", "show", device],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return int(json.loads(done.stdout)[0]["stats64"]["tx"]["bytes"])


@pytest.mark.timeout(RUN_TIMEOUT)
def test_shards_in_two_namespaces_train_across_the_veth(
    namespaces: list[tuple[str, str, str]], tmp_path: Path
) -> None:
    scenario = parse_scenario(live_document(name="netns", rounds=ROUNDS))
    blocks = [[0, 2, 4, 6], [1, 3, 5, 7]]
    handles = []
    try:
        for (namespace, _device, address), block in zip(namespaces, blocks, strict=True):
            prefix = ["ip", "netns", "exec", namespace]
            handles.append(ProcessShard(scenario, block, address, prefix=prefix))
        result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
        tx_bytes = [_veth_tx_bytes(namespace, device) for namespace, device, _ in namespaces]
    finally:
        for handle in handles:  # run_live closed them; this only reaps stragglers
            if handle.process.poll() is None:
                handle.process.kill()
                handle.process.wait(10)

    summary = result.summary
    assert summary["rounds"] == ROUNDS and not summary["live"]["timed_out"]
    with (result.directory / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 * ROUNDS
    last = {int(row["node"]): row for row in rows if int(row["round"]) == ROUNDS - 1}
    assert sorted(last) == list(range(8))
    # Every neighbour of every node is in the other namespace: all its frames crossed.
    for node, row in last.items():
        assert int(row["messages_received"]) >= 2 * (ROUNDS - 1), (node, row)
        assert int(row["bytes_received"]) > 0
    sent_by = [
        sum(int(last[node]["bytes_sent"]) for node in block) for block in blocks
    ]  # per namespace
    for side in range(2):
        assert tx_bytes[side] >= sent_by[side] > 0, (tx_bytes, sent_by)
    print(f"veth tx bytes {tx_bytes}; node bytes sent per namespace {sent_by}")
