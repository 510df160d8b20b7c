"""Helpers shared by the runtime tests."""

from __future__ import annotations

import threading

import torch

from p2pfl.learn.base import EvalResult, Learner, TrainResult
from p2pfl.params import ParamLayout

GATE_TIMEOUT = 90.0


class GatedLearner:
    """A learner whose training number ``gate_at`` (0-based) waits, in its worker thread,
    for ``gate`` to open; ``started`` is set when that training begins."""

    def __init__(self, inner: Learner, gate: threading.Event, gate_at: int = 0) -> None:
        self.inner = inner
        self.gate = gate
        self.gate_at = gate_at
        self.trainings = 0
        self.started = threading.Event()

    @property
    def layout(self) -> ParamLayout:
        return self.inner.layout

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def initial_vector(self) -> torch.Tensor:
        return self.inner.initial_vector()

    def train(self, vector: torch.Tensor, steps: int, *, round: int | None = None) -> TrainResult:
        if self.trainings == self.gate_at:
            self.started.set()
            assert self.gate.wait(GATE_TIMEOUT), "the gate never opened"
        self.trainings += 1
        return self.inner.train(vector, steps, round=round)

    def evaluate(self, vector: torch.Tensor) -> EvalResult:
        return self.inner.evaluate(vector)
