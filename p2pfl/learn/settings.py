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
from p2pfl.learn.optim import DEFAULT_RHO, OptimizerSettings
from p2pfl.schema import Strict, config_error

DEFAULT_HIDDEN = (32,)


class LearnerSettings(Strict):
    """The ``[learner]`` keys shared by scenarios and node configs."""

    model: str = "mlp"
    model_params: dict[str, Any] = Field(default_factory=dict)
    hidden: list[int] | None = Field(
        default=None, description="mlp hidden widths (shortcut for model_params.hidden)"
    )
    optimizer: Literal["sgd", "adam", "adamw", "sam"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2
    )
    eps: float = Field(default=1e-8, gt=0.0, allow_inf_nan=False)
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_step_size: int = Field(default=1, ge=1, description="rounds between step decays")
    lr_gamma: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    lr_min: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    optimizer_state: Literal["keep", "reset"] = "keep"
    batch_size: int = Field(default=32, ge=1)
    rho: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="sam: ascent step radius (unset: 0.05)",
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
        if momentum and info.data.get("optimizer", "sgd") not in ("sgd", "sam"):
            raise ValueError("0 unless optimizer is 'sgd' or 'sam' (adam and adamw have betas)")
        return momentum

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and not info.data.get("momentum"):
            raise ValueError("true only with optimizer 'sgd' or 'sam' and momentum > 0")
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
