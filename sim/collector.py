"""Garbage collection while a simulation runs: full collections when the tracked objects
have doubled, instead of CPython's generational schedule.

Why: a node's state (received models, replay windows, heap entries, optimiser state) lives
from one of its events to its next, and between them every other node has its events. At
1,000 nodes that is short enough for most of it to die in the young generations; at 10,000
it survives them and is promoted to the oldest one, which CPython scans in full each time a
quarter more objects have been promoted since the last full scan. Measured on the standard
workload (3 rounds, loop thread's CPU in the collector, ``gc.callbacks``): 18 us per
node-round at 1,000 nodes, 97 us at 10,000 (10 full collections of ~0.2 s each, the rest
young ones), about a tenth of the loop's CPU there (docs/benchmarks.md, "Scale (session 5)").
The run itself makes no cyclic garbage on that workload (a run with collection off found
none at its end), but a scenario may (an adversary's forged envelopes, a core's exception
paths), so collection is not simply turned off.

What :class:`RunCollector` does instead, for the length of a run: the objects the setup
built are frozen out of every scan (``gc.freeze``: cores, data, keys; they live as long as
the run) unless the host program froze objects of its own (unfreezing at the end would thaw
those too), automatic collection is off, and :meth:`RunCollector.tick` (called by the engine
once per node-round and once per timer) runs one full collection when the net number of
tracked objects allocated since the last one (``gc.get_count()[0]``, which counts
allocations less frees while collection is off) exceeds the number that survived it, or
:data:`FLOOR`. The survivors are counted, not listed: those of the previous collection plus
the net allocations since, less what the collection found unreachable. So the
collector scans each surviving object about once per doubling (amortised O(1) per object,
like CPython's rule but without its four-fold rescans and its young-generation passes), and
cyclic garbage never holds more than as many objects as the run keeps alive (or
:data:`FLOOR`). 10,000 nodes: 18 us per node-round in the collector. Collection never changes
what a run computes; only when memory is returned.
"""

from __future__ import annotations

import gc
from types import TracebackType

FLOOR = 100_000
"""Tracked objects allocated (net) before the first full collection of a run, and the least
between two: small runs would otherwise collect every few hundred allocations."""


class RunCollector:
    """The collection policy of one run (see the module docstring); a context manager that
    restores the interpreter's collection state (enabled or not, and what was frozen) on
    exit. Entering it again while it is active changes nothing."""

    def __init__(self, floor: int = FLOOR) -> None:
        self.floor = floor
        self.collections = 0
        """Full collections run so far (for tests and benchmarks)."""
        self._limit = floor
        self._survivors = 0
        self._was_enabled = False
        self._froze = False
        self._depth = 0

    def __enter__(self) -> RunCollector:
        self._depth += 1
        if self._depth > 1:
            return self
        self._was_enabled = gc.isenabled()
        gc.disable()
        # gc.unfreeze() thaws everything frozen: freeze only if the host froze nothing.
        self._froze = gc.get_freeze_count() == 0
        if self._froze:
            gc.freeze()
        self._survivors = 0
        self._limit = self.floor
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth:
            return
        if self._froze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()

    def tick(self) -> None:
        """Collect in full if the tracked objects allocated since the last collection exceed
        those that survived it (or :attr:`floor`); O(1) otherwise."""
        if gc.get_count()[0] > self._limit:
            self.collect()

    def collect(self) -> None:
        """One full collection now; the next is due when as many objects again are added."""
        added = gc.get_count()[0]
        unreachable = gc.collect()
        self.collections += 1
        # Counted, not listed: a list of every survivor costs 8 bytes each at the run's peak.
        self._survivors = max(0, self._survivors + added - unreachable)
        self._limit = max(self.floor, self._survivors)
