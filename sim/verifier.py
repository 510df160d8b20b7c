"""Checking the signatures of sent frames in a second process, beside the simulator's loop.

Theory of operation
-------------------
The engine frames every envelope it sends and checks the frame as a receiver would. All of
that check but the Ed25519 signature stays in the loop (:func:`p2pfl.wire.parse_frame`);
the signature, about a tenth of a serial run, goes to a :class:`VerifierProcess`: a child
Python process (no shared GIL) that verifies ``(public key, signature, signed bytes)``
records in the order they were submitted and answers one verdict byte per record. Each
record gets a *ticket* (its position in that order); the engine asks :meth:`wait` for a
frame's ticket before it hands the frame to a receiving core, so nothing is used before its
verdict is known, and for the last ticket at the end of a run, so a frame nobody received
is checked as well. A rejected signature raises :class:`p2pfl.errors.BadSignature` (the
engine turns it into the same ``AssertionError`` as an inline check): the verdict bytes
carry no reason, so the record is verified once more in this process to name it.

The stream to the child: records ``key (32 bytes) | u32 length | signature (64) | signed
bytes`` (the length counts the signature and the signed bytes, which libsodium takes as one
buffer), written in batches of :data:`BATCH_FRAMES` (and whenever a verdict is awaited
for a record still in the batch); back: one byte per record, ``1`` verified, ``0`` not.
The child reads whatever the pipe holds (up to :data:`READ_BYTES`), verifies every whole
record in it and answers their verdicts in one write: per record it costs one Ed25519
verification and a few slices, not two buffered reads and a write.
Before writing more, the engine reads verdicts until at most :data:`MAX_UNREAD` are
unread, so the child can always write its answers (a pipe holds 64 KiB) and keep reading:
neither side can block the other for good.

Lifetime: the child exits when its standard input reaches end of file, which happens when
:meth:`close` closes it and also when the engine's process dies in any way (the kernel
closes its pipes), so no verifier outlives its engine. :meth:`close` kills a child that
still has records to verify (a run cut by an exception or Ctrl-C does not wait for them).
The child ignores SIGINT from its first instruction: a terminal's Ctrl-C reaches the whole
process group, and the engine's process decides what stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path

from p2pfl.errors import BadSignature
from p2pfl.identity import NODE_ID_BYTES, SIGNATURE_BYTES, NodeId, verifies_attached
from sim.interrupts import children_ignore_sigint, ignore_interrupts

RECORD = struct.Struct(">32sI")
"""The fixed part of a record: public key, then the length of the signature and the signed
bytes that follow it."""
ANSWER_EVERY = 16
"""Verdicts the child answers per write while it works through what it read: a read can hold
a round's burst of a thousand records (tens of milliseconds of work), and the engine may be
waiting for the first of them."""
VERIFIED = 1
"""The verdict byte of a signature that verifies (anything else: it does not)."""
BATCH_FRAMES = 256
"""Records written to the child per write (fewer when a verdict is awaited). Each write wakes
the child, and a woken child can take the loop's core for a while: 5 rounds of the standard
workload at load average 5 spent 0.69 s of wall time in 160 writes of 32 records, 0.04-0.08 s
in 20 writes of 256, for 15-23 waits on verdicts either way (the loop delivers a frame's six
copies more slowly than the child verifies the next frame)."""
MAX_UNREAD = 16_384
"""Verdicts the child may have written that the engine has not read (a quarter of a pipe)."""
PIPE_BYTES = 1 << 20
"""The pipe to the child (Linux, up to ``/proc/sys/fs/pipe-max-size``): a round of the
standard workload writes 1,000 records of 221 bytes in a burst, which the loop should be
able to write while the child is still starting (50-105 ms) or behind, without blocking;
the default 64 KiB pipe holds about 300."""
READ_BYTES = PIPE_BYTES
"""The most the child reads from its pipe at once: the pipe's size."""
CLOSE_TIMEOUT = 10.0
"""Seconds :meth:`VerifierProcess.close` waits for a child that has nothing left to do."""

_ROOT = Path(__file__).resolve().parent.parent
# The child imports this module from the same source tree as its parent, whatever the
# parent's working directory or the installed package.
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import sim.verifier as v; v.serve()"


class VerifierProcess:
    """A child process verifying frame signatures in submission order; see the module."""

    def __init__(self, *, batch: int = BATCH_FRAMES) -> None:
        with children_ignore_sigint():
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(_ROOT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._to = self._process.stdin.fileno()
        if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux: room for a round's burst of records
            with contextlib.suppress(OSError):  # above the user's limit: keep the default
                fcntl.fcntl(self._to, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._from = self._process.stdout.fileno()
        self._batch = batch
        self._buffer = bytearray()
        # A deque: a round's burst can leave thousands unanswered, read back a few at a time.
        self._records: deque[tuple[bytes, bytes, bytes]] = deque()
        """The records from ticket :attr:`known` on, to name the reason of a rejection."""
        self.submitted = 0
        """Tickets handed out."""
        self._written = 0
        """Records written to the child."""
        self.known = 0
        """Verdicts taken, every one of them ``verified`` (tickets below this are checked)."""
        self._early = bytearray()
        """Verdicts read past the ticket waited for: a later rejection is raised only when
        its own ticket is waited for."""

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    def submit(self, key: bytes, signature: bytes, signed: bytes) -> int:
        """Queue a signature check of ``signed``; returns its ticket for :meth:`wait`.

        Raises:
            ValueError: ``key`` is not 32 bytes or ``signature`` not 64 (the child splits a
                record by these lengths, so another length would check other bytes).
        """
        if len(key) != NODE_ID_BYTES or len(signature) != SIGNATURE_BYTES:
            raise ValueError(
                f"a record needs a {NODE_ID_BYTES}-byte key and a {SIGNATURE_BYTES}-byte "
                f"signature, got {len(key)} and {len(signature)}"
            )
        buffer = self._buffer
        buffer += RECORD.pack(key, len(signature) + len(signed))
        buffer += signature
        buffer += signed
        self._records.append((key, signature, signed))
        ticket = self.submitted
        self.submitted += 1
        if self.submitted - self._written >= self._batch:
            self._write()
        return ticket

    def wait(self, ticket: int) -> None:
        """Return once the verdict of ``ticket`` (and of every earlier one) is known.

        Raises:
            BadSignature: a signature up to ``ticket`` does not verify.
            RuntimeError: the child exited before answering.
        """
        if ticket >= self._written:
            self._write()
        self._read_until(ticket + 1)

    def close(self) -> None:
        """End the child: at once if it still has records to verify, else once it has read
        the end of its input. Safe to call more than once."""
        process = self._process
        if process.returncode is not None:
            return
        if self.known < self.submitted:
            process.kill()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()  # unbuffered: nothing left to flush into a broken pipe
        try:
            process.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    def _write(self) -> None:
        if self._written - self.known > MAX_UNREAD:
            self._read_until(self._written - MAX_UNREAD)
        view = memoryview(self._buffer)
        try:
            while view:
                view = view[os.write(self._to, view) :]
        except BrokenPipeError as exc:
            raise self._gone() from exc
        finally:
            view.release()
        del self._buffer[:]
        self._written = self.submitted

    def _read_until(self, count: int) -> None:
        while self.known + len(self._early) < count:
            verdicts = os.read(self._from, 65536)
            if not verdicts:
                raise self._gone()
            self._early += verdicts
        taken = count - self.known
        if taken <= 0:
            return
        due = self._early[:taken]
        if due.count(VERIFIED) != taken:
            first = next(i for i, verdict in enumerate(due) if verdict != VERIFIED)
            raise self._rejected(*self._records[first])
        del self._early[:taken]
        self.known = count
        for _ in range(taken):
            self._records.popleft()

    def _rejected(self, key: bytes, signature: bytes, signed: bytes) -> Exception:
        try:
            NodeId(key).verify(signature, signed)
        except BadSignature as exc:
            return exc
        return RuntimeError("the frame verifier process rejected a signature that verifies")

    def _gone(self) -> RuntimeError:
        status = self._process.poll()
        return RuntimeError(f"the frame verifier process exited early (status {status})")


def serve() -> None:
    """The child's loop: answer each record from standard input with one verdict byte, until
    the input ends."""
    ignore_interrupts()
    source = sys.stdin.fileno()
    sink = sys.stdout.fileno()
    head, unpack_from = RECORD.size, RECORD.unpack_from
    pending, verdicts = bytearray(), bytearray()
    while True:
        chunk = os.read(source, READ_BYTES)
        if not chunk:
            return  # the end of the input (a partial record left: the engine died mid-write)
        pending += chunk
        offset, size = 0, len(pending)
        view = memoryview(pending)
        try:
            while size - offset >= head:
                key, length = unpack_from(pending, offset)
                end = offset + head + length
                if end > size:
                    break  # the rest of this record is still in the pipe
                verdicts.append(
                    VERIFIED if verifies_attached(key, view[offset + head : end]) else 0
                )
                offset = end
                if len(verdicts) == ANSWER_EVERY:
                    _write_all(sink, verdicts)
                    verdicts.clear()
            if verdicts:
                _write_all(sink, verdicts)
                verdicts.clear()
        except BrokenPipeError:
            return  # the engine is gone (killed, or its run stopped): nobody reads verdicts
        finally:
            view.release()  # before the bytearray is resized below
        del pending[:offset]


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
