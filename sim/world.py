"""The state of the simulated world that both drivers keep: who is up, which links are down.

:class:`NetworkState` is the bookkeeping shared by the virtual-time engine
(:class:`sim.engine.Engine`) and live mode (:class:`sim.live.LiveWorld`): every node's status
(*online*, *offline* or *dead*), the links that are down with the reasons they are down (a
link is up again only when its last reason is removed), and the connected components of the
live graph (online nodes, links up), labelled lazily and cached until the next change.

It changes only state and logs node and link changes (through the ``log`` callable it is
given); what a change means to the nodes (notifications, shard commands) is the driver's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from topologies import CompleteAdjacency

ONLINE = "online"
OFFLINE = "offline"
DEAD = "dead"


def link_key(u: int, v: int) -> tuple[int, int]:
    """The undirected link u-v as (smaller, larger)."""
    return (u, v) if u < v else (v, u)


class NetworkState:
    """Node status, links down and why, and component labels over a fixed topology."""

    def __init__(
        self, neighbours: Sequence[Sequence[int]], log: Callable[[dict[str, Any]], None]
    ) -> None:
        self.neighbours = neighbours
        self.status = [ONLINE] * len(neighbours)
        self._not_online = 0
        self._log = log
        self._down_links: dict[tuple[int, int], set[str]] = {}
        self._components: tuple[list[int], list[int]] | None = None

    # -- reading ----------------------------------------------------------------------------

    def all_up(self) -> bool:
        """Every node online and every link up (O(1))."""
        return not self._not_online and not self._down_links

    def link_up(self, u: int, v: int) -> bool:
        return not self._down_links.get(link_key(u, v))

    def reachable(self, u: int, v: int) -> bool:
        """Both ends online and the link between them up."""
        status = self.status
        return status[u] is ONLINE and status[v] is ONLINE and self.link_up(u, v)

    def reachable_if_up(self, node: int, neighbour: int) -> bool:
        """``neighbour`` is online and the link to it up (whatever ``node``'s own state)."""
        return self.status[neighbour] is ONLINE and self.link_up(node, neighbour)

    def down_links(self, reason: str) -> list[tuple[int, int]]:
        """The links that are down for ``reason``, sorted."""
        return sorted(key for key, reasons in self._down_links.items() if reason in reasons)

    # -- changing ---------------------------------------------------------------------------

    def take_down(self, node: int, *, dead: bool, cause: str, disruption: int) -> str | None:
        """Mark ``node`` offline or dead and log it; its previous status, or None if it was
        down already (a kill of an offline node still makes it dead)."""
        before = self.status[node]
        if before is DEAD or (before is OFFLINE and not dead):
            return None
        self.status[node] = DEAD if dead else OFFLINE
        self._not_online += before is ONLINE
        self._log({"event": "node", "node": node, "state": self.status[node], "cause": cause,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return before

    def bring_up(self, node: int, *, cause: str, disruption: int) -> bool:
        """Mark an offline node online and log it; False if it is online already or dead."""
        if self.status[node] is not OFFLINE:
            return False
        self.status[node] = ONLINE
        self._not_online -= 1
        self._log({"event": "node", "node": node, "state": ONLINE, "cause": cause,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    def cut_link(self, u: int, v: int, *, reason: str, disruption: int) -> bool:
        """Add ``reason`` to the reasons link u-v is down; True (and logged) if it was up."""
        key = link_key(u, v)
        reasons = self._down_links.setdefault(key, set())
        was_up = not reasons
        reasons.add(reason)
        if not was_up:
            return False
        self._log({"event": "link", "link": list(key), "state": "down", "cause": reason,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    def restore_link(self, u: int, v: int, *, reason: str, disruption: int) -> bool:
        """Remove ``reason``; True (and logged) if no reason is left: the link is up again."""
        key = link_key(u, v)
        reasons = self._down_links.get(key)
        if not reasons or reason not in reasons:
            return False
        reasons.discard(reason)
        if reasons:
            return False
        del self._down_links[key]
        self._log({"event": "link", "link": list(key), "state": "up", "cause": reason,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    # -- components -------------------------------------------------------------------------

    def component_of(self, node: int) -> tuple[int, int]:
        """(smallest node index, size) of ``node``'s component of the live graph."""
        if self._components is None:
            self._components = self._label_components()
        labels, sizes = self._components
        return labels[node], sizes[node]

    def components(self) -> list[list[int]]:
        """The components of the live graph (online nodes, links up), largest first."""
        groups: dict[int, list[int]] = {}
        for node in range(len(self.status)):
            if self.status[node] is ONLINE:
                groups.setdefault(self.component_of(node)[0], []).append(node)
        return sorted(groups.values(), key=lambda group: (-len(group), group[0]))

    def _label_components(self) -> tuple[list[int], list[int]]:
        size = len(self.status)
        if isinstance(self.neighbours, CompleteAdjacency) and not self._down_links:
            # Any set of online nodes of a complete graph is one component: O(n), not O(n^2).
            online = [node for node in range(size) if self.status[node] is ONLINE]
            root = online[0] if online else 0
            labels = [root if self.status[node] is ONLINE else node for node in range(size)]
            sizes = [len(online) if self.status[node] is ONLINE else 0 for node in range(size)]
            return labels, sizes
        parent = list(range(size))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node in range(size):
            if self.status[node] is not ONLINE:
                continue
            for neighbour in self.neighbours[node]:
                if neighbour > node and self.reachable(node, neighbour):
                    a, b = find(node), find(neighbour)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        roots = [find(node) for node in range(size)]
        counts: dict[int, int] = {}
        for node, root in enumerate(roots):
            if self.status[node] is ONLINE:
                counts[root] = counts.get(root, 0) + 1
        return roots, [counts.get(root, 0) for root in roots]
