"""What a world outside a node decides about its links: the policy a node is built with.

A :class:`~p2pfl.runtime.node.Node` asks its :class:`LinkPolicy` two things and nothing
else:

* :meth:`LinkPolicy.link_up`: whether the link to a peer is up in the world's view. A node
  neither dials a peer whose link is down nor accepts a connection from it (the handshake is
  refused like that of a key the node does not know). A world that takes a link down while a
  connection is open also closes that connection (:meth:`Node.close_link
  <p2pfl.runtime.node.Node.close_link>`); the node redials by its own rules once the link is
  up again.
* :meth:`LinkPolicy.open_stream`: how to dial, i.e. a connected byte stream to a peer's
  listening address.

``p2pfl node`` uses :class:`OpenLinks` (every link up, plain TCP). The live simulator
(:mod:`sim.live_shard`) injects a policy whose links its disruptions cut and restore.
"""

from __future__ import annotations

from typing import Protocol

import trio

from p2pfl.identity import NodeId


class LinkPolicy(Protocol):
    """The hooks a node calls about its links (see the module docstring)."""

    def link_up(self, peer: NodeId) -> bool:
        """Whether the link to ``peer`` is up; a down link is neither dialled nor accepted."""
        ...

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        """A connected stream to ``host:port``.

        Raises:
            OSError: the connection failed (refused, unreachable, a host that does not
                resolve); the node logs why and redials later.
        """
        ...


class OpenLinks:
    """Every link is up; dials are TCP connections (what ``p2pfl node`` runs with)."""

    def link_up(self, peer: NodeId) -> bool:
        return True

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)
