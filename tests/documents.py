"""Scenario documents shared by the simulator and live-mode tests."""

from __future__ import annotations

from typing import Any


def small_document(**overrides: Any) -> dict[str, Any]:
    """A scenario that runs in about a second: 8 nodes on a ring, generated data, 3 rounds of
    dsgd; keyword arguments replace top-level entries."""
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


def live_document(**overrides: Any) -> dict[str, Any]:
    """:func:`small_document` for live mode: 4 rounds, timeouts and a horizon in wall seconds."""
    return small_document(
        **{
            "name": "live-small",
            "rounds": 4,
            "protocol": {"mode": "dsgd", "round_timeout": 10.0},
            "horizon": 60.0,
            **overrides,
        }
    )
