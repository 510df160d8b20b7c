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


TIMELINE: list[dict[str, Any]] = [
    {"kind": "cut", "links": [[0, 1]], "at": 0.2},
    {"kind": "leave", "nodes": [5], "at": 0.4},
    {"kind": "crash", "nodes": [7], "at": 0.6},
    {"kind": "join", "nodes": [5], "at": 1.2},
    {"kind": "restore", "at": 1.4},
]
"""Timed disruptions of every kind live mode applies, within the first 1.5 s of a run of
:func:`small_document`'s ring: link 0-1 cut and restored, node 5 leaving and joining, node 7
crashing."""


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
