"""Link model: how long a frame takes from one node to another, in virtual seconds.

Every directed link draws its latencies from its own random stream, derived from the run seed
and the two endpoints, so adding traffic on one link never shifts another link's draws.
"""

from __future__ import annotations

import numpy as np

from sim.scenario import LatencySpec


class LatencyModel:
    """Per-message latency drawn from the scenario's distribution."""

    def __init__(self, spec: LatencySpec, *, seed: int) -> None:
        self.spec = spec
        self._seed = seed
        self._streams: dict[tuple[int, int], np.random.Generator] = {}

    def _stream(self, src: int, dst: int) -> np.random.Generator:
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
                return float(self._stream(src, dst).uniform(spec.low, spec.high))
            case "exponential":
                return float(self._stream(src, dst).exponential(spec.mean))
            case "lognormal":
                mu = float(np.log(spec.mean)) - spec.sigma**2 / 2
                return float(self._stream(src, dst).lognormal(mu, spec.sigma))
        raise AssertionError(spec.dist)
