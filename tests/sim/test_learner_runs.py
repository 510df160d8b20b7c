"""Scenarios with other models and optimisers: a user's model, CNNs, the BatchNorm fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from p2pfl.config import config_from_dict
from sim.cli import main
from sim.run import run_scenario
from sim.scenario import parse_scenario
from tests.sim.conftest import SmallDocument

LEARNER = {"lr": 0.01, "batch_size": 16, "local_steps": 3, "optimizer": "adam"}


def _run(document: dict[str, object], out: Path) -> tuple[str, list[dict[str, object]]]:
    run_scenario(parse_scenario(document), out, plots=False)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return (out / "metrics.csv").read_text(), events


def test_own_model_from_examples_runs_deterministically_and_batches(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    learner = {
        **LEARNER,
        "model": "python:examples.my_model:factory",
        "model_params": {"width": 12},
    }
    document = small_document(learner=learner)
    first, events = _run(document, tmp_path / "a")
    second, _ = _run(document, tmp_path / "b")
    assert first == second
    assert not [event for event in events if event.get("event") == "learner"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["mean_test_accuracy"] > 0.5  # 4 separable classes; chance is 0.25


def test_cnn1d_with_momentum_and_cosine_schedule(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    learner = {
        "model": "cnn1d",
        "model_params": {"channels": [4]},
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "lr_schedule": "cosine",
        "optimizer_state": "reset",
        "batch_size": 16,
        "local_steps": 3,
    }
    metrics, _ = _run(small_document(learner=learner), tmp_path / "run")
    assert len(metrics.splitlines()) == 1 + 8 * 3


class BatchNormNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.linear(x))))  # type: ignore[no-any-return]


def batchnorm_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    assert num_classes == 4
    return BatchNormNet(input_shape[0])


def test_batchnorm_model_trains_one_by_one_and_says_so_in_the_run_log(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    learner = {**LEARNER, "model": "python:tests.sim.test_learner_runs:batchnorm_model"}
    metrics, events = _run(small_document(learner=learner), tmp_path / "run")
    notices = [event for event in events if event.get("event") == "learner"]
    assert len(notices) == 1
    assert "one node at a time" in str(notices[0]["notice"])
    assert len(metrics.splitlines()) == 1 + 8 * 3


def test_node_config_takes_the_scenarios_learner_keys(small_document: SmallDocument) -> None:
    shared = {
        "model": "cnn1d",
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.01,
        "betas": [0.8, 0.99],
        "lr_schedule": "step",
        "lr_step_size": 5,
        "lr_gamma": 0.5,
        "optimizer_state": "reset",
        "batch_size": 8,
    }
    scenario = parse_scenario(small_document(learner={**shared, "local_steps": 2}))
    node = config_from_dict(
        {
            "node": {"listen": "127.0.0.1:0", "key_file": "node.key"},
            "data": {"dataset": "digits"},
            "learner": shared,
            "protocol": {"rounds": scenario.rounds},
        },
        base_dir=Path("."),
    )
    assert node.learner.optimizer_settings(3) == scenario.learner.optimizer_settings(3)
    assert node.learner.model_parameters() == scenario.learner.model_parameters()


def test_absurd_model_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", "default", "--set", "learner.hidden=[1000000000]", "--out", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl-sim: error: learner.model = 'mlp': a model of at most")
    assert err.count("\n") == 1
