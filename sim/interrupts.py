"""Stopping a run or a sweep on SIGINT/SIGTERM without losing what was done.

Theory of operation
-------------------
The CLI installs :func:`stop_on_signals` around a command. While the work is in a section
that can stop cleanly (:meth:`StopRequest.deferred`: a run's rounds, a sweep's workers), the
first SIGINT or SIGTERM only sets the :class:`StopRequest`, which the work polls at points
where stopping leaves consistent files: a virtual run at the end of the round in progress, a
live run at its next poll, a sweep at once (its unfinished runs are killed, its finished ones
kept). Outside such a section (loading data, building a graph: nothing done yet to keep), or
at a second signal for a user who will not wait, the signal raises :class:`KeyboardInterrupt`
where the program is; a run cut that way still writes what its recorder holds.

Whoever stops early and has saved its work raises or reports :class:`Interrupted`, whose
message is the one line the CLI prints before exiting with :data:`EXIT_INTERRUPTED`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

EXIT_INTERRUPTED = 130
"""Exit status after an interrupt (128 + SIGINT, the shell's convention)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal after saving what was done; the message says what and where."""


@dataclass
class StopRequest:
    """Set by the first SIGINT/SIGTERM; polled by runs and sweeps."""

    requested: bool = False
    signal_name: str = ""
    deferring: bool = False
    """True inside :meth:`deferred`: a signal then requests a stop instead of raising."""
    handler: Callable[[int, FrameType | None], None] | None = None
    """The handler :func:`stop_on_signals` installed (for :meth:`reinstall`)."""

    def request(self, signum: int) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def reinstall(self) -> None:
        """Make this request's handler the one for SIGINT/SIGTERM again, after a library
        replaced it (Ray does, at ``ray.init``). Only from the main thread."""
        if self.handler is not None and threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                signal.signal(number, self.handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A section that polls :attr:`requested` and stops cleanly by itself."""
        previous = self.deferring
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = previous


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded request inside its
    :meth:`~StopRequest.deferred` sections the first time, and raise
    :class:`KeyboardInterrupt` otherwise; the previous handlers are restored on exit.

    Must be entered from the main thread (Python delivers signals only there).
    """
    stop = StopRequest()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.requested or not stop.deferring:
            raise KeyboardInterrupt
        stop.request(signum)

    stop.handler = handle
    previous = {number: signal.signal(number, handle) for number in SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_interrupts() -> None:
    """Worker processes ignore SIGINT: a terminal's Ctrl-C reaches the whole process group,
    and the parent alone decides what stops (it terminates its workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started within the block ignore SIGINT from their first instruction.

    An ignored signal stays ignored across ``exec``, and Python then installs no handler of
    its own, so a spawned worker still importing its modules is not killed by a terminal's
    Ctrl-C with a traceback (:func:`ignore_interrupts` runs only once it has imported them).
    The block should be short: this process ignores SIGINT too while it runs. Outside the
    main thread (where handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
