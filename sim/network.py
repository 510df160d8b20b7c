"""Link model: when a frame sent from one node arrives at another, if it arrives at all.

Every directed link is a FIFO pipe, like the TCP connection it stands for:

* **serialisation**: a frame of ``size`` bytes occupies the link for ``size / bandwidth``
  seconds, starting when the link is free; back-to-back frames queue behind each other
  (``bandwidth`` unset: no queueing, zero transfer time);
* **propagation**: then a latency drawn from ``[network.latency]`` plus a jitter drawn from
  ``U(0, jitter)``;
* **order**: a frame never overtakes an earlier frame of the same link;
* **loss**: with probability ``loss`` the frame is lost after it was sent (the sender counts
  its bytes, the receiver never sees it).

Every directed link draws from its own random stream, derived from the run seed and the two
endpoints, so adding traffic on one link never shifts another link's draws. Draws happen in a
fixed order per frame (latency, then jitter if > 0, then loss if > 0), so a scenario without
jitter and loss draws exactly what it did before those existed.
"""

from __future__ import annotations

import numpy as np

from sim.scenario import LatencySpec, NetworkSpec


class LatencyModel:
    """Per-message latency drawn from the scenario's distribution."""

    def __init__(self, spec: LatencySpec, *, seed: int) -> None:
        self.spec = spec
        self._seed = seed
        self._streams: dict[tuple[int, int], np.random.Generator] = {}

    def stream(self, src: int, dst: int) -> np.random.Generator:
        """The random stream of the directed link ``src -> dst``."""
        stream = self._streams.get((src, dst))
        if stream is None:
            stream = np.random.default_rng([self._seed, 7, src, dst])
            self._streams[(src, dst)] = stream
        return stream

    def sample(self, src: int, dst: int) -> float:
        """Seconds for one frame from ``src`` to ``dst``."""
        spec = self.spec
        match spec.dist:
            case "constant":
                return spec.value
            case "uniform":
                return float(self.stream(src, dst).uniform(spec.low, spec.high))
            case "exponential":
                return float(self.stream(src, dst).exponential(spec.mean))
            case "lognormal":
                mu = float(np.log(spec.mean)) - spec.sigma**2 / 2
                return float(self.stream(src, dst).lognormal(mu, spec.sigma))
        raise AssertionError(spec.dist)


class LinkModel:
    """Serialisation, latency, jitter, FIFO order and loss of every directed link."""

    def __init__(self, spec: NetworkSpec, *, seed: int) -> None:
        self.spec = spec
        self.latency = LatencyModel(spec.latency, seed=seed)
        self._free_at: dict[tuple[int, int], float] = {}
        self._last_arrival: dict[tuple[int, int], float] = {}

    def transmit(self, src: int, dst: int, size: int, now: float) -> float | None:
        """Send ``size`` bytes at ``now``; the arrival time, or None if the frame is lost."""
        spec = self.spec
        link = (src, dst)
        start = now
        if spec.bandwidth is not None:
            start = max(now, self._free_at.get(link, now))
            self._free_at[link] = start + size / spec.bandwidth
            start = self._free_at[link]
        arrival = start + self.latency.sample(src, dst)
        if spec.jitter > 0.0:
            arrival += float(self.latency.stream(src, dst).uniform(0.0, spec.jitter))
        arrival = max(arrival, self._last_arrival.get(link, arrival))
        self._last_arrival[link] = arrival
        if spec.loss > 0.0 and float(self.latency.stream(src, dst).random()) < spec.loss:
            return None
        return arrival

    def reset(self, src: int, dst: int) -> None:
        """The connection behind ``src -> dst`` broke: its queue is gone."""
        self._free_at.pop((src, dst), None)
        self._last_arrival.pop((src, dst), None)
