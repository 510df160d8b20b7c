"""Shared pytest configuration: Hypothesis profiles, and the ``threads_inline`` fixture for
runtime nodes on trio's virtual clock.

Select a profile with ``HYPOTHESIS_PROFILE=ci pytest`` (default ``dev``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import settings

T = TypeVar("T")

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=False, print_blob=True)
settings.register_profile("nightly", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def threads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work a node hands to a worker thread (training, evaluation, checkpoints) runs in the
    trio thread instead, between two checkpoints.

    On ``MockClock(autojump_threshold=0)`` a node waiting for its worker thread leaves every
    task blocked, so the clock would jump to the next deadline (a redial, a round timeout)
    while the thread works, by as much as the machine is slow; inline, virtual time stands
    still while a node trains and a run is the same on any machine. Not for learners that
    block their thread (``tests.runtime.support.GatedLearner``).
    """

    async def run_sync(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
