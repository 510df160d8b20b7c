"""A node's leftovers and stops: temporary checkpoint files, consistent resume, and saying so
when its neighbours are gone (issue 12, defect 5)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from p2pfl.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from p2pfl.config import DataConfig, LearnerConfig, MergeConfig, NodeConfig, PeerConfig
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity
from p2pfl.protocol import CoreConfig
from p2pfl.protocol.events import TrainingFinished
from p2pfl.runtime.node import Node
from p2pfl.testing import MemoryLinks, MemoryNetwork
from tests.runtime.support import GatedLearner

RUN_TIMEOUT = 60.0
ME = Identity.from_seed(bytes([50]) * 32)
OTHER = Identity.from_seed(bytes([51]) * 32)


def config(tmp_path: Path, **changes: object) -> NodeConfig:
    base = NodeConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        key_file=tmp_path / "node.key",
        checkpoint_dir=tmp_path / "state",
        startup_timeout=10.0,
        data=DataConfig(dataset="digits", num_nodes=1, seed=1),
        learner=LearnerConfig(hidden=[8]),
        protocol=CoreConfig(mode="dsgd", rounds=5, local_steps=1, round_timeout=5.0),
        merge=MergeConfig(rule="weighted"),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_temporary_files_of_an_interrupted_save_are_removed_at_start(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.checkpoint_dir is not None
    first = Node(cfg, identity=ME)
    save_checkpoint(
        checkpoint_path(cfg.checkpoint_dir),
        round=2,
        vector=first.core.vector,
        node=ME.node_id.hex(),
    )
    # What a kill -9 between writing and renaming leaves behind.
    leftovers = [cfg.checkpoint_dir / ".model.ckpt.k3j2h1", cfg.checkpoint_dir / ".model.ckpt.x"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    unrelated = cfg.checkpoint_dir / "notes.txt"
    unrelated.write_text("kept")
    node = Node(cfg, identity=ME)
    assert not any(leftover.exists() for leftover in leftovers)
    assert unrelated.read_text() == "kept"
    assert node.start_round == 2  # the checkpoint itself is untouched


async def test_the_round_logged_at_stop_is_the_round_saved_and_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop that arrives while the loop is about to act on a finished round still writes
    that round's checkpoint, so the stop line and the next start agree."""
    cfg = config(tmp_path)
    assert cfg.checkpoint_dir is not None
    learner = GatedLearner(cfg.build_learner(), threading.Event())
    node = Node(cfg, identity=ME, learner=learner)
    caplog.set_level(logging.INFO, logger="p2pfl.node")
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await trio.to_thread.run_sync(learner.started.wait)
            # The round's training result is queued for the loop, and the stop comes before
            # the loop runs again: it handles the event, then meets the cancellation.
            vector = node.core.vector + 0.5
            node._events_send.send_nowait(TrainingFinished(vector, 0.25, 1))
            node.request_stop("test stop")
            learner.gate.set()
    stopped = [r for r in caplog.records if getattr(r, "event", None) == "stopped"]
    assert len(stopped) == 1
    logged_round = stopped[0].fields["round"]  # type: ignore[attr-defined]
    assert logged_round == node.core.round == 1
    saved = load_checkpoint(checkpoint_path(cfg.checkpoint_dir))
    assert saved.round == logged_round
    assert torch.equal(saved.vector, node.core.vector)
    resumed = Node(cfg, identity=ME, learner=learner)
    assert resumed.resumed_from == logged_round


async def test_a_node_whose_neighbour_is_gone_says_so_and_trains_alone(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
    threads_inline: None,
) -> None:
    network = MemoryNetwork()
    own_port, absent_port = 7300, 7301  # nothing listens on the neighbour's port
    me, other = sorted((ME, OTHER), key=lambda i: i.node_id)  # this node dials
    cfg = config(
        tmp_path,
        listen_port=own_port,
        startup_timeout=0.5,
        peers=(PeerConfig("127.0.0.1", absent_port, other.node_id),),
        protocol=CoreConfig(mode="dsgd", rounds=3, local_steps=1, round_timeout=5.0),
    )
    links = MemoryLinks(network)
    node = Node(cfg, identity=me, listeners=[network.listen(own_port)], policy=links)
    caplog.set_level(logging.INFO, logger="p2pfl.node")
    with trio.fail_after(RUN_TIMEOUT):  # virtual seconds
        await node.run()
    assert node.core.finished
    assert links.dials and set(links.dials) == {absent_port}  # it kept trying the neighbour
    events = [getattr(r, "event", None) for r in caplog.records]
    incomplete = [r for r in caplog.records if getattr(r, "event", None) == "startup_incomplete"]
    assert len(incomplete) == 1
    message = incomplete[0].getMessage()
    assert f"127.0.0.1:{absent_port}: cannot connect (Connection refused)" in message
    assert "training alone" in message
    alone = [r for r in caplog.records if getattr(r, "event", None) == "alone"]
    assert len(alone) == 1, events  # said once, not every round
    assert "gone or finished" in alone[0].getMessage()


async def test_a_checkpoint_dir_that_stops_being_writable_stops_the_node_with_its_key(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    assert cfg.checkpoint_dir is not None
    learner = GatedLearner(cfg.build_learner(), threading.Event())
    node = Node(cfg, identity=ME, learner=learner)
    with trio.fail_after(RUN_TIMEOUT), pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await trio.to_thread.run_sync(learner.started.wait)
            shutil.rmtree(cfg.checkpoint_dir)
            cfg.checkpoint_dir.write_text("a file where the directory was")
            learner.gate.set()
    errors, rest = caught.value.split(ConfigError)
    assert rest is None and errors is not None
    leaf: BaseException = errors
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    message = str(leaf)
    assert message.startswith("node.checkpoint_dir = ")
    assert "saving round 1 failed" in message
