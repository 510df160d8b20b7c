"""Garbage collection during a run: automatic collection off, full collections once the
tracked objects have doubled, the interpreter's state restored afterwards."""

from __future__ import annotations

import gc
import weakref

import pytest

from sim.collector import RunCollector
from sim.run import run_scenario


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_run_collects_in_full_and_restores_automatic_collection() -> None:
    assert gc.isenabled()
    seen: list[bool] = []
    result = run_scenario(
        "default",
        overrides=["topology.n=8", "rounds=2"],
        on_round=lambda world: seen.append(gc.isenabled()),
    )
    assert result.rows
    assert seen and not any(seen)  # the run's own schedule, not CPython's
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_cyclic_garbage_is_collected_once_the_tracked_objects_double() -> None:
    with RunCollector(floor=2_000) as collector:
        kept = [[index] for index in range(5_000)]  # survive the first collection
        collector.collect()
        # Survivors are estimated from net allocation counts: close, not exact.
        assert collector._limit >= 0.9 * len(kept)
        dropped = _Cycle()
        gone = weakref.ref(dropped)
        del dropped
        collector.tick()
        assert gone() is not None and collector.collections == 1  # not due yet
        garbage = [_Cycle() for _ in range(2 * len(kept))]
        del garbage  # cycles: refcounting alone frees none of them
        collector.tick()
        assert collector.collections == 2
        assert gone() is None
    assert gc.isenabled()


def test_an_error_in_the_run_restores_the_collection_state() -> None:
    gc.disable()
    try:
        with pytest.raises(RuntimeError), RunCollector():
            raise RuntimeError("boom")
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), RunCollector():
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_objects_the_host_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with RunCollector():
            pass
        assert gc.get_freeze_count() == frozen  # a run does not thaw the host's objects
        assert gc.isenabled()
    finally:
        gc.unfreeze()


def test_entering_a_collector_twice_restores_the_state_once() -> None:
    collector = RunCollector()
    with collector:
        with collector:
            assert not gc.isenabled()
        assert not gc.isenabled()  # still the outer run's schedule
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
