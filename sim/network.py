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

``[[network.links]]`` entries override any of latency, bandwidth, jitter and loss for the
links between given node pairs (both directions; a later entry wins for a pair).

Every directed link draws from its own random stream, derived from the run seed and the two
endpoints, so adding traffic on one link never shifts another link's draws. Draws happen in a
fixed order per frame (latency, then jitter if > 0, then loss if > 0), so a scenario without
jitter and loss draws exactly what it did before those existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfl.errors import ConfigError
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

    def sample(self, src: int, dst: int, spec: LatencySpec | None = None) -> float:
        """Seconds for one frame from ``src`` to ``dst`` (``spec`` overrides the default)."""
        spec = spec or self.spec
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


@dataclass(frozen=True, slots=True)
class _LinkSettings:
    latency: LatencySpec | None
    bandwidth: float | None
    jitter: float
    loss: float


class LinkModel:
    """Serialisation, latency, jitter, FIFO order and loss of every directed link."""

    def __init__(self, spec: NetworkSpec, *, seed: int, nodes: int | None = None) -> None:
        """Build the model; ``nodes`` bounds the indices ``[[network.links]]`` may name.

        Raises:
            ConfigError: an override names a node outside ``0..nodes-1``.
        """
        self.spec = spec
        self.latency = LatencyModel(spec.latency, seed=seed)
        self._free_at: dict[tuple[int, int], float] = {}
        self._last_arrival: dict[tuple[int, int], float] = {}
        self._default = _LinkSettings(None, spec.bandwidth, spec.jitter, spec.loss)
        self._fixed: float | None = None
        """The latency of every link when that is all there is to compute (set below)."""
        self._overrides: dict[tuple[int, int], _LinkSettings] = {}
        for index, override in enumerate(spec.links):
            for u, v in override.between:
                if nodes is not None and max(u, v) >= nodes:
                    raise ConfigError(
                        f"network.links[{index}].between", [u, v], f"node indices in 0..{nodes - 1}"
                    )
                settings = _LinkSettings(
                    override.latency,
                    override.bandwidth if override.bandwidth is not None else spec.bandwidth,
                    override.jitter if override.jitter is not None else spec.jitter,
                    override.loss if override.loss is not None else spec.loss,
                )
                self._overrides[(u, v)] = self._overrides[(v, u)] = settings
        if (
            not self._overrides
            and spec.latency.dist == "constant"
            and spec.bandwidth is None
            and spec.jitter == 0.0
        ):
            # Every frame takes the same time and draws nothing but its loss: arrivals on a
            # link never go back (now never does, and float addition is monotone), so FIFO
            # order holds without the per-link bookkeeping.
            self._fixed = spec.latency.value

    def transmit(self, src: int, dst: int, size: int, now: float) -> float | None:
        """Send ``size`` bytes at ``now``; the arrival time, or None if the frame is lost."""
        if self._fixed is not None:
            loss = self._default.loss
            if loss > 0.0 and float(self.latency.stream(src, dst).random()) < loss:
                return None
            return now + self._fixed
        link = (src, dst)
        settings = self._overrides.get(link, self._default) if self._overrides else self._default
        start = now
        if settings.bandwidth is not None:
            start = max(now, self._free_at.get(link, now))
            self._free_at[link] = start + size / settings.bandwidth
            start = self._free_at[link]
        arrival = start + self.latency.sample(src, dst, settings.latency)
        if settings.jitter > 0.0:
            arrival += float(self.latency.stream(src, dst).uniform(0.0, settings.jitter))
        arrival = max(arrival, self._last_arrival.get(link, arrival))
        self._last_arrival[link] = arrival
        if settings.loss > 0.0 and float(self.latency.stream(src, dst).random()) < settings.loss:
            return None
        return arrival

    def reset(self, src: int, dst: int) -> None:
        """The connection behind ``src -> dst`` broke: its queue is gone."""
        self._free_at.pop((src, dst), None)
        self._last_arrival.pop((src, dst), None)
