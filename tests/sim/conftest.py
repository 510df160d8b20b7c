from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sim.scenario import Scenario, parse_scenario


def _small_document(**overrides: Any) -> dict[str, Any]:
    """A scenario that runs in about a second: 8 nodes, generated data, 3 rounds."""
    document: dict[str, Any] = {
        "name": "small",
        "seed": 5,
        "rounds": 3,
        "topology": {"kind": "ring", "n": 8},
        "data": {
            "dataset": "gaussian_mixture",
            "params": {"n_samples": 400, "dim": 8, "num_classes": 4},
            "partition": "iid",
            "partition_params": {},
        },
        "learner": {"hidden": [8], "lr": 0.1, "batch_size": 16, "local_steps": 3},
        "protocol": {"mode": "dsgd"},
    }
    document.update(overrides)
    return document


SmallDocument = Callable[..., dict[str, Any]]


@pytest.fixture
def small_document() -> SmallDocument:
    """Factory of small scenario documents; keyword arguments replace top-level entries."""
    return _small_document


@pytest.fixture
def small_scenario() -> Scenario:
    return parse_scenario(_small_document())
