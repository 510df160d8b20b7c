"""The settings of a protocol core (the ``[protocol]`` table of a scenario or node config)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn, TypeGuard

from p2pfl.codec import WIRE_DTYPES
from p2pfl.errors import ConfigError
from p2pfl.protocol.core import PROTOCOL_MODES

CONFIG_PREFIX = "protocol"
"""Config keys in errors are named ``protocol.<field>``, as in a scenario file."""


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What every protocol mode needs to know; fields a mode does not use are ignored.

    Attributes:
        mode: a key of ``PROTOCOL_MODES`` (``"dsgd"`` or ``"gossip"``).
        rounds: the core stops (emits ``Stop``) after this many rounds (trainings).
        local_steps: local training steps asked for by each ``StartTraining``.
        round_timeout: dsgd: seconds to wait for neighbours' models after own training.
        period: gossip: seconds between pushes.
        period_jitter: gossip: each push interval is ``period * U(1 - j, 1 + j)``.
        fanout: gossip: neighbours a push goes to.
        wire_dtype: element dtype of models on the wire (a key of ``codec.WIRE_DTYPES``).
        max_rounds_ahead: dsgd: models up to this many rounds ahead are buffered, later dropped.
        replay_window: sequence numbers remembered per sender (``wire.ReplayWindow``).
    """

    mode: str = "dsgd"
    rounds: int = 10
    local_steps: int = 10
    round_timeout: float = 30.0
    period: float = 1.0
    period_jitter: float = 0.2
    fanout: int = 1
    wire_dtype: str = "float32"
    max_rounds_ahead: int = 4
    replay_window: int = 1024

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: naming the first wrong key (e.g. ``protocol.fanout``), its value and
                what is allowed.
        """
        if self.mode not in PROTOCOL_MODES:
            _fail("mode", self.mode, f"one of {', '.join(sorted(PROTOCOL_MODES))}")
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("local_steps", self.local_steps, 1)
        _positive_seconds("round_timeout", self.round_timeout)
        _positive_seconds("period", self.period)
        jitter = self.period_jitter
        if not _is_real(jitter) or not 0.0 <= jitter < 1.0:
            _fail("period_jitter", jitter, "a number in [0, 1)")
        _int_at_least("fanout", self.fanout, 1)
        if self.wire_dtype not in WIRE_DTYPES:
            _fail("wire_dtype", self.wire_dtype, f"one of {', '.join(sorted(WIRE_DTYPES))}")
        _int_at_least("max_rounds_ahead", self.max_rounds_ahead, 0)
        _int_at_least("replay_window", self.replay_window, 1)


def _fail(field: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(f"{CONFIG_PREFIX}.{field}", value, allowed)


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(field: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(field, value, f"an integer >= {low}")


def _positive_seconds(field: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        _fail(field, value, "a finite number of seconds > 0")
