"""The one checker for integer and number settings, and the one wording of their ranges.

Config files and scenarios are checked by pydantic schemas (:mod:`p2pfl.schema`); plain
function arguments that come from a config (a merge rule's parameters, a dataset builder's,
a partition's) are checked here. Both describe a range in the same words, so
``an integer >= 1`` or ``a finite number in (0, 1]`` reads alike wherever it was found.

What counts as an integer: any integral value (``int``, numpy integers, anything with
``__index__``) except a boolean. A number: any real (``int``, ``float``, numpy scalars)
except a boolean. ``"3"`` is neither: values are never converted from text.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import SupportsIndex, TypeGuard

from p2pfl.errors import ConfigError


def is_int(value: object) -> TypeGuard[SupportsIndex]:
    """Whether ``value`` is an integer (booleans are not)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]  # the question being asked
    except TypeError:
        return False
    return True


def is_real(value: object) -> TypeGuard[numbers.Real]:
    """Whether ``value`` is a real number, finite or not (booleans are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_range(minimum: int | None = None, maximum: int | None = None) -> str:
    """How an integer range reads in an error: ``an integer >= 1``, ``an integer in [0, 9]``."""
    return _described("an integer", minimum, maximum, open_min=False, open_max=False)


def number_range(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
    unit: str = "",
) -> str:
    """How a finite number's range reads in an error: ``a finite number > 0``,
    ``a finite number of seconds > 0``, ``a finite number in (0, 1]``."""
    what = f"a finite number of {unit}" if unit else "a finite number"
    return _described(what, minimum, maximum, open_min=open_min, open_max=open_max)


def _described(
    what: str, low: float | None, high: float | None, *, open_min: bool, open_max: bool
) -> str:
    if low is not None and high is not None:
        left, right = "(" if open_min else "[", ")" if open_max else "]"
        return f"{what} in {left}{_text(low)}, {_text(high)}{right}"
    if low is not None:
        return f"{what} {'>' if open_min else '>='} {_text(low)}"
    if high is not None:
        return f"{what} {'<' if open_max else '<='} {_text(high)}"
    return what


def check_int(
    key: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``.

    Raises:
        ConfigError: it is not; the message names ``key`` and the allowed range.
    """
    if is_int(value):
        number = operator.index(value)
        if (minimum is None or number >= minimum) and (maximum is None or number <= maximum):
            return number
    raise ConfigError(key, value, int_range(minimum, maximum))


def check_seed(seed: object, key: str = "seed") -> int:
    """``seed`` as an ``int`` if it is a non-negative integer (numpy's ``SeedSequence`` rule).

    Raises:
        ConfigError: it is not.
    """
    return check_int(key, seed, 0)


def check_number(
    key: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    unit: str = "",
) -> float:
    """``value`` as a ``float`` if it is a finite number within the bounds (``open_min`` /
    ``open_max`` exclude the bound itself).

    Raises:
        ConfigError: it is not; the message names ``key`` and the allowed range.
    """
    if is_real(value):
        number = float(value)
        above = minimum is None or (number > minimum if open_min else number >= minimum)
        below = maximum is None or (number < maximum if open_max else number <= maximum)
        if math.isfinite(number) and above and below:
            return number
    allowed = number_range(minimum, maximum, open_min=open_min, open_max=open_max, unit=unit)
    raise ConfigError(key, value, allowed)


def _text(bound: float) -> str:
    """A bound as written in a config (``1`` rather than ``1.0``)."""
    if isinstance(bound, int):
        return str(bound)
    return str(int(bound)) if bound.is_integer() and abs(bound) < 1e15 else repr(bound)
