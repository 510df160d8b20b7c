"""The learner settings, one schema for a simulated scenario's ``[learner]`` and a node's.

``sim.scenario.LearnerSpec`` extends :class:`LearnerSettings` with the simulator-only keys
(``local_steps``, ``step_time``, ``init``) and ``p2pfl.config`` reads a node's ``[learner]``
table with :func:`parse_learner_settings`, so a node runs exactly the learner that was
simulated. Types are strict (:class:`p2pfl.schema.Strict`): ``lr = "0.1"`` or
``hidden = ["32"]`` is refused, not converted (an int is accepted where a number is
expected), and no number is infinite or NaN.

Keys (defaults in brackets):

* ``model`` [``"mlp"``]: a name in :data:`p2pfl.learn.models.MODELS` or
  ``"python:package.module:factory"`` (runs that module's code); ``model_params`` [{}] are
  the factory's keyword arguments; ``hidden`` is a shortcut for ``model_params.hidden`` of
  ``mlp`` (the default mlp is ``hidden = [32]``).
* ``optimizer`` [``"sgd"``] | ``"adam"`` | ``"adamw"`` | ``"sam"``; ``lr`` [0.1];
  ``momentum`` [0] and ``nesterov`` [false] (sgd, sam); ``weight_decay`` [0] (L2 for
  sgd/sam/adam, decoupled for adamw); ``betas`` [[0.9, 0.999]] and ``eps`` [1e-8]
  (adam/adamw); ``rho`` [unset: 0.05] (sam: the ascent radius; SAM's update is SGD's, at the
  gradient of the ascent point, see :mod:`p2pfl.learn.optim`).
* ``lr_schedule`` [``"constant"``] | ``"step"`` (``lr_step_size`` rounds [1], ``lr_gamma``
  [0.1]) | ``"cosine"`` (down to ``lr_min`` [0] over the run's rounds).
* ``optimizer_state`` [``"keep"``] | ``"reset"``: see :mod:`p2pfl.learn.optim`.
* ``batch_size`` [32].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from p2pfl.learn.models import MODELS, PYTHON_PREFIX
from p2pfl.learn.optim import (
    DEFAULT_RHO,
    RANGES,
    OptimizerSettings,
    momentum_refusal,
    nesterov_refusal,
)
from p2pfl.schema import Strict, config_error

DEFAULT_HIDDEN = (32,)


def _in_range(key: str) -> Any:
    """The pydantic bounds of optimiser setting ``key``, from :data:`p2pfl.learn.optim.RANGES`
    (which :class:`~p2pfl.learn.optim.OptimizerSettings` checks too)."""
    bounds = RANGES[key]
    low, high = bounds.minimum, bounds.maximum
    return Field(
        gt=low if bounds.open_min else None,
        ge=None if bounds.open_min else low,
        lt=high if bounds.open_max else None,
        le=None if bounds.open_max else high,
        allow_inf_nan=False,
    )


class LearnerSettings(Strict):
    """The ``[learner]`` keys shared by scenarios and node configs."""

    model: str = "mlp"
    model_params: dict[str, Any] = Field(default_factory=dict)
    hidden: list[int] | None = Field(
        default=None, description="mlp hidden widths (shortcut for model_params.hidden)"
    )
    optimizer: Literal["sgd", "adam", "adamw", "sam"] = "sgd"
    lr: Annotated[float, _in_range("lr")] = 0.1
    momentum: Annotated[float, _in_range("momentum")] = 0.0
    nesterov: bool = False
    weight_decay: Annotated[float, _in_range("weight_decay")] = 0.0
    betas: list[Annotated[float, _in_range("betas")]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2
    )
    eps: Annotated[float, _in_range("eps")] = 1e-8
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_step_size: int = Field(default=1, ge=1, description="rounds between step decays")
    lr_gamma: Annotated[float, _in_range("lr_gamma")] = 0.1
    lr_min: Annotated[float, _in_range("lr_min")] = 0.0
    optimizer_state: Literal["keep", "reset"] = "keep"
    batch_size: int = Field(default=32, ge=1)
    rho: Annotated[float | None, _in_range("rho")] = Field(
        default=None, description="sam: ascent step radius (unset: 0.05)"
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in MODELS and not _is_python_factory(model):
            raise ValueError(f"one of {', '.join(MODELS)} or 'python:package.module:factory'")
        return model

    # Field validators (not one model validator) so that an error names its own key; each
    # reads only fields declared before it, which pydantic has validated already.
    @field_validator("hidden")
    @classmethod
    def _hidden_for_mlp(cls, hidden: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if hidden is None:
            return hidden
        if any(width < 1 for width in hidden):
            raise ValueError("hidden layer widths must be >= 1")
        if info.data.get("model", "mlp") != "mlp":
            raise ValueError(f"only for model 'mlp' (model is {info.data.get('model')!r})")
        if "hidden" in info.data.get("model_params", {}):
            raise ValueError("give hidden or model_params.hidden, not both")
        return hidden

    @field_validator("momentum")
    @classmethod
    def _momentum_for_sgd(cls, momentum: float, info: ValidationInfo) -> float:
        refusal = momentum_refusal(info.data.get("optimizer", "sgd"), momentum)
        if refusal is not None:
            raise ValueError(refusal)
        return momentum

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        optimizer = info.data.get("optimizer", "sgd")
        refusal = nesterov_refusal(optimizer, info.data.get("momentum", 0.0), nesterov)
        if refusal is not None:
            raise ValueError(refusal)
        return nesterov

    @field_validator("rho")
    @classmethod
    def _rho_for_sam(cls, rho: float | None, info: ValidationInfo) -> float | None:
        if rho is not None and info.data.get("optimizer", "sgd") != "sam":
            raise ValueError(
                f"only for optimizer 'sam' (optimizer is {info.data.get('optimizer')!r})"
            )
        return rho

    def model_parameters(self) -> dict[str, Any]:
        """The factory's keyword arguments (``hidden`` folded in for ``mlp``)."""
        params = dict(self.model_params)
        if self.model == "mlp" and "hidden" not in params:
            params["hidden"] = list(DEFAULT_HIDDEN if self.hidden is None else self.hidden)
        return params

    def optimizer_settings(self, total_rounds: int) -> OptimizerSettings:
        """The optimiser these keys describe, for a run of ``total_rounds`` rounds.

        Raises:
            ConfigError: ``total_rounds`` below 1.
        """
        beta1, beta2 = self.betas
        return OptimizerSettings(
            name=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            betas=(beta1, beta2),
            eps=self.eps,
            lr_schedule=self.lr_schedule,
            lr_step_size=self.lr_step_size,
            lr_gamma=self.lr_gamma,
            lr_min=self.lr_min,
            total_rounds=total_rounds,
            state_policy=self.optimizer_state,
            rho=DEFAULT_RHO if self.rho is None else self.rho,
        )


def parse_learner_settings(table: Mapping[str, Any], prefix: str = "learner") -> LearnerSettings:
    """Check a ``[learner]`` table.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range; the message
            names ``prefix.key``.
    """
    try:
        return LearnerSettings.model_validate(dict(table))
    except ValidationError as exc:
        raise config_error(exc, LearnerSettings, prefix=prefix) from None


def _is_python_factory(name: str) -> bool:
    module, _, attribute = name.removeprefix(PYTHON_PREFIX).partition(":")
    return name.startswith(PYTHON_PREFIX) and bool(module) and bool(attribute)
