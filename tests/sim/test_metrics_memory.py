"""A completed round's memory: distances computed in chunks (same bits), freed models handed
back to the system."""

from __future__ import annotations

import os

import pytest
import torch

from sim import metrics
from sim.metrics import MetricsRecorder, Traffic


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(("nodes", "size"), [(1, 5), (37, 4810), (1000, 2410)])
def test_chunked_distances_equal_the_whole_stack_expression(
    monkeypatch: pytest.MonkeyPatch, nodes: int, size: int
) -> None:
    generator = torch.Generator().manual_seed(nodes)
    vectors = torch.randn(nodes, size, generator=generator) * torch.rand(nodes, 1) * 10
    expected = (vectors - vectors.mean(dim=0)).pow(2).sum(dim=1).to(torch.float64)
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK", size * 7)  # 7 rows a chunk
    assert torch.equal(metrics._distances_to_mean(vectors), expected)


def test_a_large_round_trims_the_heap_once_stacked_and_once_evaluated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(metrics, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(metrics, "TRIM_BYTES", 3 * 10 * 4)  # three nodes' 10 floats

    def recorder(nodes: int) -> MetricsRecorder:
        evaluate = lambda v: (torch.zeros(len(v)), torch.zeros(len(v)))  # noqa: E731
        return MetricsRecorder(num_nodes=nodes, evaluate=evaluate)

    for nodes, expected in ((2, 0), (3, 2)):
        trims.clear()
        record = recorder(nodes)
        for node in range(nodes):
            record.record(
                0, node, now=1.0, train_loss=0.0, vector=torch.ones(10), traffic=Traffic()
            )
        assert len(record.rows) == nodes
        assert len(trims) == expected


@pytest.mark.skipif(metrics._MALLOC_TRIM is None, reason="glibc only")
def test_trim_heap_returns_freed_small_tensors_to_the_system() -> None:
    # Many small tensors (a round's models), freed but for every 50th, which pins the heap's
    # top: glibc keeps the freed pages resident until trimmed.
    models = [torch.ones(2410) for _ in range(20_000)]
    kept = models[::50]
    del models
    before = _rss_bytes()
    metrics.trim_heap()
    assert before - _rss_bytes() > 50 << 20
    assert len(kept) == 400


def test_the_estimate_counts_a_stacked_round_and_an_evaluation_chunk() -> None:
    from p2pfl.learn.batched import EVAL_BUDGET
    from sim import footprint
    from sim.scenario import parse_scenario

    assert footprint.EVAL_CHUNK_EXAMPLES == EVAL_BUDGET
    document = {"name": "e", "rounds": 1, "topology": {"kind": "ring", "n": 500}}
    estimate = footprint.estimate(parse_scenario(document))
    assert estimate is not None
    stack = 500 * estimate.params * 4
    assert stack < estimate.evaluation < stack + (64 << 20)
    assert "evaluation" in estimate.describe()


def test_an_interrupt_while_a_round_settles_loses_none_of_its_rows() -> None:
    """A second Ctrl-C can land while the loop takes an evaluation's result: the round stays
    queued, and the flush that saves the run still writes its rows, once."""
    from concurrent.futures import Future
    from typing import Any

    class InterruptedOnce(Future[Any]):
        interrupted = False

        def result(self, timeout: float | None = None) -> Any:
            if not InterruptedOnce.interrupted:
                InterruptedOnce.interrupted = True
                raise KeyboardInterrupt
            return super().result(timeout)

    class Executor:
        def submit(self, function: Any, *args: Any) -> Future[Any]:
            future = InterruptedOnce()
            future.set_result(function(*args))
            return future

    evaluate = lambda v: (torch.zeros(len(v)), torch.ones(len(v)))  # noqa: E731
    record = MetricsRecorder(num_nodes=2, evaluate=evaluate)
    record.executor = Executor()  # type: ignore[assignment]
    record.record(0, 0, now=1.0, train_loss=0.0, vector=torch.ones(4), traffic=Traffic())
    with pytest.raises(KeyboardInterrupt):
        record.record(0, 1, now=1.0, train_loss=0.0, vector=torch.ones(4), traffic=Traffic())
    assert [row[1] for row in record.rows] == [0, 1]
    assert len(record.rounds) == 1


def test_a_large_round_is_evaluated_in_trimmed_slices_with_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2pfl.learn.batched import BatchedLearner
    from p2pfl.learn.models import build_model
    from p2pfl.learn.optim import OptimizerSettings

    model = build_model("mlp", {"hidden": [8]}, (16,), 4, seed=0)
    learner = BatchedLearner(model, OptimizerSettings(name="sgd", lr=0.1), (16,))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 16, generator=generator)  # 21 rows scored together
    y = torch.randint(0, 4, (1500,), generator=generator)
    rows = learner.evaluation_rows(len(x))
    assert rows == 21
    nodes = 200
    size = sum(p.numel() for p in model.parameters())
    vectors = torch.randn(nodes, size, generator=generator) * 0.5
    whole_loss, whole_accuracy = learner.evaluate(vectors, x, y)

    calls: list[int] = []
    trims: list[int] = []

    def evaluate(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(batch.shape[0])
        return learner.evaluate(batch, x, y)

    monkeypatch.setattr(metrics, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(metrics, "EVALUATION_SLICE_BYTES", 50 * size * 4)  # 50 models a slice
    recorder = MetricsRecorder(num_nodes=nodes, evaluate=evaluate, evaluation_rows=rows)
    losses, accuracies = recorder._evaluate(0, vectors)
    assert calls == [42] * 4 + [32]  # multiples of 21 rows, about 50 models each
    assert len(trims) == len(calls) - 1
    assert losses == whole_loss.tolist() and accuracies == whole_accuracy.tolist()

    calls.clear()
    unknown = MetricsRecorder(num_nodes=nodes, evaluate=evaluate)  # rows unknown: one call
    assert unknown._evaluate(0, vectors) == (whole_loss.tolist(), whole_accuracy.tolist())
    assert calls == [nodes]
