"""In-memory links for trio runtime nodes: whole nodes, no sockets, on trio's virtual clock.

Theory of operation
-------------------
:class:`~p2pfl.testing.network.FakeNetwork` drives protocol *cores* with no runtime at all.
This module is for testing the *runtime* (:class:`p2pfl.runtime.node.Node`: its handshakes,
dials, redials, bans, peer exchange) without the operating system's network, so that a test
runs in one trio run on ``trio.testing.MockClock(autojump_threshold=0)`` and waits for
nothing on the wall clock: a node's timeouts and backoffs take no real time, and the order of
events does not depend on the machine's load.

A :class:`MemoryNetwork` plays one host's TCP: :meth:`MemoryNetwork.listen` gives a
:class:`MemoryListener` on a port number (a node's ``listeners``), and
:meth:`MemoryNetwork.connect` a connected stream pair to whatever listens there, or
:class:`ConnectionRefusedError` as a refused TCP connect. Each node gets a
:class:`MemoryLinks`, its :class:`~p2pfl.runtime.policy.LinkPolicy`: dials go through the
network, and links to the keys in :attr:`MemoryLinks.cut_peers` are down (neither dialled
nor accepted), as the live simulator's disruptions cut them. Streams carry no addresses, so
per-IP defences see no IP: test those over real sockets on 127.0.0.1.

Example, two nodes (``config_a``/``config_b`` list each other as peers on ports 7001/7002)::

    import trio
    import trio.testing

    from p2pfl.runtime.node import Node
    from p2pfl.testing import MemoryLinks, MemoryNetwork

    async def main() -> None:
        network = MemoryNetwork()
        a = Node(config_a, listeners=[network.listen(7001)], policy=MemoryLinks(network))
        b = Node(config_b, listeners=[network.listen(7002)], policy=MemoryLinks(network))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

Training runs in worker threads, and while a thread works every task waits, so the
autojumping clock moves on to the next deadline: a test that must not see round timeouts
during a training holds its trainings (e.g. behind a :class:`threading.Event`) or sets
timeouts longer than the run.
"""

from __future__ import annotations

import errno
import math
import os

import trio
import trio.testing

from p2pfl.identity import NodeId

__all__ = ["MemoryLinks", "MemoryListener", "MemoryNetwork"]


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections come from :meth:`MemoryNetwork.connect`."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.closed = False
        """The node closed it: connects to its port are refused."""

    def deliver(self, stream: trio.abc.Stream) -> None:
        """Queue ``stream`` for the next :meth:`accept`."""
        self._send.send_nowait(stream)

    async def accept(self) -> trio.abc.Stream:
        """The next connection to this listener's port.

        Raises:
            trio.ClosedResourceError: the listener is closed.
        """
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        """Close the listener; later connects to its port are refused."""
        self.closed = True
        self._receive.close()
        await trio.lowlevel.checkpoint()


class MemoryNetwork:
    """One host's ports, joined by in-memory streams (see the module docstring)."""

    def __init__(self) -> None:
        self.listeners: dict[int, MemoryListener] = {}

    def listen(self, port: int) -> MemoryListener:
        """A new listener on ``port`` (it replaces a closed one, as a node that joins again
        binds its old port)."""
        listener = self.listeners[port] = MemoryListener()
        return listener

    def connect(self, port: int) -> trio.abc.Stream:
        """A stream to the listener on ``port``, like a TCP connect on one host.

        Raises:
            ConnectionRefusedError: nothing listens on ``port``.
        """
        listener = self.listeners.get(port)
        if listener is None or listener.closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        ours, theirs = trio.testing.memory_stream_pair()
        listener.deliver(theirs)
        return ours


class MemoryLinks:
    """One node's :class:`~p2pfl.runtime.policy.LinkPolicy` on a :class:`MemoryNetwork`:
    dials reach the network's listeners (the host part of an address is ignored); links to
    the keys in :attr:`cut_peers` are down."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.cut_peers: set[NodeId] = set()
        """Peers whose link is down: neither dialled nor accepted."""
        self.dials: list[int] = []
        """The ports dialled so far, in order."""

    def link_up(self, peer: NodeId) -> bool:
        """Whether the link to ``peer`` is up (``peer`` is not in :attr:`cut_peers`)."""
        return peer not in self.cut_peers

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        """A stream to the listener on ``port``.

        Raises:
            ConnectionRefusedError: nothing listens on ``port``.
        """
        await trio.lowlevel.checkpoint()
        self.dials.append(port)
        return self.network.connect(port)
