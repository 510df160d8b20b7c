"""The engine's loop.

The copies of a frame that arrive at one instant share one heap entry (``Engine._deliver``):
every core must see exactly the events, in exactly the order and at exactly the times, it
sees with one heap entry per copy (``engine.batch_copies = False``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from p2pfl.protocol.events import Event, MessageReceived
from sim.engine import Engine
from sim.run import build_engine
from sim.scenario import parse_scenario
from tests.documents import TIMELINE, small_document

Trace = list[tuple[float, int, str, bytes | None]]


def _traced_run(document: dict[str, Any], *, batch: bool) -> tuple[Engine, Trace]:
    engine = build_engine(parse_scenario(document))
    engine.batch_copies = batch
    engine.link_log = []
    trace: Trace = []
    for index, core in enumerate(engine.cores):

        def handle(
            event: Event, *, now: float, index: int = index, inner: Callable[..., Any] = core.handle
        ) -> Any:
            sender = event.peer.raw if isinstance(event, MessageReceived) else None
            trace.append((now, index, type(event).__name__, sender))
            return inner(event, now=now)

        core.handle = handle  # type: ignore[method-assign]
    engine.run()
    return engine, trace


def _document(
    protocol: dict[str, Any], network: dict[str, Any], disruptions: list[dict[str, Any]]
) -> Any:
    return small_document(
        seed=11,
        rounds=6,
        topology={"kind": "random_regular", "n": 12, "d": 4},
        protocol={"round_timeout": 0.5, **protocol},
        network=network,
        disruptions=disruptions,
    )


CHURN: list[dict[str, Any]] = [
    {"kind": "churn", "at": 0.1, "nodes": [2, 9], "mean_online": 0.3, "mean_offline": 0.2},
    {"kind": "partition", "round": 3, "groups": [[0, 1, 2, 3, 4]]},
    {"kind": "heal", "round": 5, "trigger": "first"},
]

CASES = {
    "constant latency, loss, timeline": (
        {"mode": "dsgd"},
        {"latency": {"dist": "constant", "value": 0.01}, "loss": 0.2},
        TIMELINE,
    ),
    "constant latency, link overrides, churn and partition": (
        {"mode": "dsgd"},
        {
            "latency": {"dist": "constant", "value": 0.02},
            "links": [{"between": [[0, 1], [3, 5], [4, 7]], "latency": {"value": 0.005}}],
        },
        CHURN,
    ),
    "random latency, jitter, bandwidth, loss, churn": (
        {"mode": "dsgd"},
        {
            "latency": {"dist": "uniform", "low": 0.0, "high": 0.02},
            "jitter": 0.01,
            "bandwidth": 2e6,
            "loss": 0.1,
        },
        CHURN,
    ),
    "dsgd gossip steps, no latency, timeline": (
        {"mode": "dsgd", "gossip_steps": 2},
        {"latency": {"dist": "constant", "value": 0.0}},
        TIMELINE,
    ),
    "gossip fanout 3, constant latency, churn": (
        {"mode": "gossip", "fanout": 3},
        {"latency": {"dist": "constant", "value": 0.01}},
        CHURN,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_copies_reach_every_core_in_the_order_of_one_entry_per_copy(case: str) -> None:
    protocol, network, disruptions = CASES[case]
    document = _document(protocol, network, disruptions)
    batched, batched_trace = _traced_run(document, batch=True)
    single, single_trace = _traced_run(document, batch=False)
    assert batched_trace == single_trace
    assert batched.link_log == single.link_log
    assert batched.events_log == single.events_log
    assert batched.recorder.csv_text() == single.recorder.csv_text()
    assert [t.snapshot() for t in batched.traffic] == [t.snapshot() for t in single.traffic]
    assert batched.now == single.now
    delivered = sum(1 for _, _, kind, _ in batched_trace if kind == "MessageReceived")
    assert delivered > 50
    if network["latency"]["dist"] == "constant":
        # The comparison is not vacuous: copies did share heap entries.
        assert batched._sequence < single._sequence - delivered // 2


class _PastTimeline:
    """A timeline that, once the first node completes a round, schedules something a moment
    in the past (nothing real does: the engine's guard for it must still keep the order)
    and, when a node completes its third round, kills every node, ending the run."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.scheduled = False

    def start(self, world: Any) -> None:
        pass

    def fire(self, world: Any, payload: object) -> None:
        self.trace.append((world.now, -1, str(payload), None))

    def on_progress(self, world: Any, node: int, completed: int) -> None:
        if not self.scheduled:
            self.scheduled = True
            world.schedule(world.now - 0.001, "in the past")
        if completed == 3:
            for other in range(world.population.size):
                world.take_down(other, dead=True, notify_after=0.0, cause="t", disruption=0)

    def on_round_complete(self, world: Any, round_index: int) -> None:
        pass

    def may_train(self, world: Any, node: int) -> bool:
        return True


def _run_with_past(batch: bool) -> tuple[Engine, Trace, list[str]]:
    document = _document({"mode": "dsgd"}, {"latency": {"dist": "constant", "value": 0.01}}, [])
    engine = build_engine(parse_scenario(document))
    engine.batch_copies = batch
    trace: Trace = []
    engine.disruptions = _PastTimeline(trace)
    requeued: list[str] = []
    deliver = engine._deliver

    def spy(at: float, sequence: int, delivery: Any) -> None:
        deliver(at, sequence, delivery)
        if any(item is delivery for *_, item in engine._heap):
            ended = engine._finished >= len(engine.cores)
            requeued.append("end" if ended else "earlier")

    engine._deliver = spy  # type: ignore[method-assign]
    for index, core in enumerate(engine.cores):

        def handle(
            event: Event, *, now: float, index: int = index, inner: Callable[..., Any] = core.handle
        ) -> Any:
            trace.append((now, index, type(event).__name__, None))
            return inner(event, now=now)

        core.handle = handle  # type: ignore[method-assign]
    engine.run()
    return engine, trace, requeued


def test_copies_give_way_to_an_earlier_entry_and_stay_queued_when_the_run_ends() -> None:
    batched, batched_trace, requeued = _run_with_past(batch=True)
    single, single_trace, _ = _run_with_past(batch=False)
    assert batched_trace == single_trace
    assert any(node == -1 for _, node, _, _ in batched_trace)
    # Both ways out of a batch were taken: an earlier entry, and the end of the run.
    assert requeued == ["earlier", "end"], requeued
    left_batched = sum(
        len(item.receivers) if hasattr(item, "receivers") else 1 for *_, item in batched._heap
    )
    assert left_batched == len(single._heap)
