"""Fixtures shared by the runtime tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch
import trio

T = TypeVar("T")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Nodes in one process train in worker threads: one torch thread each, as a node runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def threads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work a node hands to a worker thread (training, evaluation, checkpoints) runs in the
    trio thread instead, between two checkpoints.

    On ``MockClock(autojump_threshold=0)`` a node waiting for its worker thread leaves every
    task blocked, so the clock would jump to the next deadline (a redial, a round timeout)
    while the thread works, by as much as the machine is slow; inline, virtual time stands
    still while a node trains and a run is the same on any machine. Not for learners that
    block their thread (:class:`tests.runtime.support.GatedLearner`).
    """

    async def run_sync(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
