"""The [learner] schema shared by scenarios and node configs: strict, one line per mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2pfl.errors import ConfigError
from p2pfl.learn.settings import LearnerSettings, parse_learner_settings
from sim.scenario import LearnerSpec


def test_defaults_are_plain_sgd_on_the_32_unit_mlp() -> None:
    settings = parse_learner_settings({})
    assert settings.model == "mlp" and settings.model_parameters() == {"hidden": [32]}
    optimizer = settings.optimizer_settings(10)
    assert (optimizer.name, optimizer.lr, optimizer.momentum) == ("sgd", 0.1, 0.0)
    assert optimizer.state_names == ()


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"hidden": ["32"]}, "learner.hidden[0] = '32': an integer, not a string"),
        ({"lr": "0.1"}, "learner.lr = '0.1': a finite number > 0, not a string"),
        ({"batch_size": 3.0}, "learner.batch_size = 3.0:"),
        ({"nesterov": 1}, "learner.nesterov = 1:"),
        ({"hidden": [0]}, "learner.hidden = [0]: hidden layer widths must be >= 1"),
        ({"model": "cnn1d", "hidden": [8]}, "learner.hidden = [8]: only for model 'mlp'"),
        ({"nesterov": True}, "learner.nesterov = True: true only with"),
        ({"optimizer": "adam", "momentum": 0.5}, "learner.momentum = 0.5: 0 unless"),
        ({"betas": [0.9, 1.0]}, "learner.betas[1] = 1.0:"),
        ({"lr_schedule": "linear"}, "learner.lr_schedule = 'linear':"),
        ({"optimizer_state": "drop"}, "learner.optimizer_state = 'drop':"),
        ({"model": "python:no_colon"}, "learner.model = 'python:no_colon':"),
        ({"local_steps": 3}, "learner.local_steps = 3: not a key of [learner]"),
        ({"rho": 0.05}, "learner.rho = 0.05: only for optimizer 'sam'"),
        ({"optimizer": "sam", "rho": 0.0}, "learner.rho = 0.0:"),
    ],
)
def test_mistakes_name_the_key_in_one_line(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_learner_settings(table)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(expected), str(info.value)


def test_sam_is_sgd_with_a_rho() -> None:
    table = {"optimizer": "sam", "rho": 0.02, "momentum": 0.9, "nesterov": True}
    optimizer = parse_learner_settings(table).optimizer_settings(5)
    assert (optimizer.name, optimizer.rho, optimizer.momentum) == ("sam", 0.02, 0.9)
    assert optimizer.state_names == ("momentum_buffer",)


def test_the_scenario_learner_is_the_shared_schema_plus_simulator_keys() -> None:
    assert issubclass(LearnerSpec, LearnerSettings)
    extra = set(LearnerSpec.model_fields) - set(LearnerSettings.model_fields)
    assert extra == {"local_steps", "step_time", "init"}


def test_p2pfl_imports_without_the_simulator_extras() -> None:
    code = (
        "import sys, p2pfl, p2pfl.learn, p2pfl.config, p2pfl.learn.batched;"
        "print(sorted(m for m in ('sim', 'sklearn', 'matplotlib', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "table",
    [
        {"lr": 0.0},
        {"momentum": 1.0},
        {"weight_decay": -1.0},
        {"eps": 0.0},
        {"lr_gamma": 0.0},
        {"lr_min": -0.5},
        {"betas": [0.9, 1.0]},
        {"optimizer": "sam", "rho": 0.0},
        {"optimizer": "adam", "momentum": 0.5},
        {"momentum": 0.0, "nesterov": True},
        {"lr_step_size": 0},
    ],
)
def test_a_node_config_and_the_python_optimiser_refuse_alike(table: dict[str, object]) -> None:
    """One rule and one wording per optimiser setting, whether it comes from a [learner]
    table or from OptimizerSettings in Python (a TorchLearner built by hand)."""
    from p2pfl.learn.optim import OptimizerSettings

    with pytest.raises(ConfigError) as from_table:
        parse_learner_settings(table)
    arguments = {"name" if key == "optimizer" else key: value for key, value in table.items()}
    if "betas" in arguments:
        arguments["betas"] = tuple(arguments["betas"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as from_python:
        OptimizerSettings(**arguments)  # type: ignore[arg-type]
    assert str(from_table.value) == f"learner.{from_python.value}"
