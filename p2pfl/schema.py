"""The rules every settings table follows, and how a broken rule reads.

Scenarios (:mod:`sim.scenario`) and node configs (:mod:`p2pfl.config`) are both checked by
pydantic models derived from :class:`Strict`; :func:`config_error` turns pydantic's first
complaint into one :class:`~p2pfl.errors.ConfigError` line that names the dotted key, the
value and what is allowed, in the words of a TOML file and of :mod:`p2pfl.checks`
(``protocol.fanout = 0: an integer >= 1``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from p2pfl.checks import int_range, number_range
from p2pfl.errors import ConfigError

STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
"""Unknown keys are errors, nothing is converted, no float is infinite or NaN."""


class Strict(BaseModel):
    """Base of every settings table: unknown keys are errors, and values are never coerced.

    Strict mode takes a value only as the type it is written as: ``"0.1"`` is not a number,
    ``1`` is not ``true``, ``2.0`` is not an integer (an integer is still a float: ``lr = 1``).
    No float is infinite or NaN, except where a field says so (``allow_inf_nan=True``).
    """

    model_config = STRICT


class Unit:
    """Field metadata naming the unit of a number, for error messages (``Seconds``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


Seconds = Annotated[float, Field(gt=0.0), Unit("seconds")]
"""A finite duration > 0 seconds."""


def registered(names: Callable[[], Collection[str]]) -> AfterValidator:
    """Field metadata taking a name only if the registry ``names()`` holds it (looked up when
    a value is checked, so a plug-in registered after import is found):
    ``mode: Annotated[str, registered(lambda: PROTOCOL_MODES)]``."""

    def check(name: str) -> str:
        known = names()
        if name not in known:
            raise ValueError(f"one of {', '.join(sorted(known))}")
        return name

    return AfterValidator(check)


class Elided:
    """Stands for a value too large to print in a one-line error."""

    def __repr__(self) -> str:
        return "{...}"


TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean: true or false",
    "string_type": "a string (in quotes)",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
}
"""What a strict type error asks for, in the words of a TOML file."""

_BOUNDS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
}


def config_error(
    exc: ValidationError,
    root: type[BaseModel],
    *,
    prefix: str = "",
    source: str = "",
    elide_tables: bool = True,
) -> ConfigError:
    """The first problem of ``exc`` (raised validating ``root``) as a one-line ConfigError.

    Args:
        exc: what pydantic raised.
        root: the model that was validated; errors are explained from its fields.
        prefix: the dotted key of ``root``'s table (``"protocol"``), or ``""`` at the top.
        source: the file the table came from, written before the key (``"x.toml: rounds"``).
        elide_tables: print a table value as ``{...}`` rather than in full.
    """
    error = exc.errors()[0]
    raw_loc = list(error["loc"])
    loc, model, field = _resolve(root, raw_loc)
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        keys = ", ".join(sorted(_keys(model))) if model is not None else "none"
        where = _dotted([prefix, *loc[:-1]] if prefix else loc[:-1])
        message = (
            f"not a key of [{where}]; keys are {keys}" if where else f"not a key; keys are {keys}"
        )
    elif kind in {"union_tag_invalid", "union_tag_not_found"}:
        tag = str(error.get("ctx", {}).get("discriminator", "kind")).strip("'")
        loc.append(tag)
        tags = _tags(root, raw_loc)
        if kind == "union_tag_invalid":
            value = error.get("ctx", {}).get("tag", value)
            message = f"one of {', '.join(tags)}"
        else:
            value = None
            message = f"every entry needs a `{tag}`: one of {', '.join(tags)}"
    elif kind == "missing":
        value = None
        message = f"required: {_expected(field)}"
    elif kind in {"too_short", "too_long"}:
        message = _length(field, error)
    elif kind in TYPE_WORDS:
        # A number's type error says the range too: `rounds = true: an integer in [1, 1000]`.
        numeric = kind in {"int_type", "float_type"} and field is not None
        message = _range(field, error) if numeric else TYPE_WORDS[kind]
        if isinstance(value, str):
            message += ", not a string: write it without quotes"
    elif kind == "finite_number" or kind in _BOUNDS:
        message = _range(field, error)
        if kind == "finite_number":
            message += " (inf and nan make no sense here)"
    elif kind == "literal_error":
        message = f"one of {', '.join(_literals(field, error))}"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    if field is not None and _is_float(field.annotation) and _plain_int(value):
        value = float(value)  # the value as the program reads it (1 -> 1.0)
    if elide_tables and isinstance(value, dict):
        value = Elided()
    key = _dotted([prefix, *loc] if prefix else loc) or "(table)"
    return ConfigError(f"{source}: {key}" if source else key, value, message)


def _resolve(
    root: type[BaseModel], loc: Sequence[str | int]
) -> tuple[list[str | int], type[BaseModel] | None, FieldInfo | None]:
    """Walk ``loc`` from ``root``: the key as written (discriminator tags dropped), the model
    holding its last part, and that part's field (None where ``loc`` leaves the schema)."""
    cleaned: list[str | int] = []
    candidates: list[Any] = [root]
    model: type[BaseModel] | None = None
    field: FieldInfo | None = None
    for part in loc:
        types_here = list(_flatten(candidates))
        models = [t for t in types_here if isinstance(t, type) and issubclass(t, BaseModel)]
        if isinstance(part, int):
            cleaned.append(part)
            candidates = [
                arg
                for t in types_here
                if typing.get_origin(t) in (list, tuple)
                for arg in typing.get_args(t)
                if arg is not Ellipsis
            ]
            # An array item: its own constraints, if the array holds one kind of value.
            model = None
            field = FieldInfo.from_annotation(candidates[0]) if len(candidates) == 1 else None
            continue
        owners = [m for m in models if part in _keys(m)]
        if not owners:
            tagged = [m for m in models if part in _tag_values(m)]
            if tagged:  # a discriminated union names the chosen model: not part of the key
                candidates = tagged
                continue
            cleaned.append(part)
            model, field = (models[0] if models else None), None
            candidates = []
            continue
        cleaned.append(part)
        model = owners[0]
        field = _keys(model)[part]
        candidates = [field.annotation]
    return cleaned, model, field


def _keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by the key a file spells (the alias, where one is set)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _flatten(annotations: Sequence[Any]) -> Iterator[Any]:
    """The concrete types behind ``Annotated``, ``Optional`` and unions."""
    for annotation in annotations:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            yield from _flatten([typing.get_args(annotation)[0]])
        elif origin is typing.Union or isinstance(annotation, types.UnionType):
            yield from _flatten(typing.get_args(annotation))
        else:
            yield annotation


def _tag_values(model: type[BaseModel]) -> set[Any]:
    """The values of the model's Literal fields (a discriminated union's tags)."""
    values: set[Any] = set()
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is Literal and field.is_required():
            values.update(typing.get_args(field.annotation))
    return values


def _tags(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Every tag of the discriminated union at ``loc`` (an array item), in the union's order."""
    head = list(loc)
    while head and isinstance(head[-1], int):
        head.pop()
    _, _, field = _resolve(root, head)
    tags: list[str] = []
    for model in _models_in(field.annotation if field is not None else None):
        tags += [str(tag) for tag in _ordered_tags(model) if str(tag) not in tags]
    return tags


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models an annotation holds, also as items of arrays."""
    for candidate in _flatten([annotation]):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            yield candidate
        elif typing.get_origin(candidate) in (list, tuple):
            for arg in typing.get_args(candidate):
                yield from _models_in(arg)


def _ordered_tags(model: type[BaseModel]) -> list[Any]:
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is Literal and field.is_required():
            return list(typing.get_args(field.annotation))
    return []


def _literals(field: FieldInfo | None, error: ErrorDetails) -> list[str]:
    if field is not None:
        for annotation in _flatten([field.annotation]):
            if typing.get_origin(annotation) is Literal:
                return [str(value) for value in typing.get_args(annotation)]
    return [str(error.get("ctx", {}).get("expected", "?"))]


def _expected(field: FieldInfo | None) -> str:
    if field is None:
        return "a value"
    concrete = [t for t in _flatten([field.annotation]) if t is not type(None)]
    if len(concrete) == 1 and concrete[0] is int:
        return TYPE_WORDS["int_type"]
    if len(concrete) == 1 and concrete[0] is float:
        return TYPE_WORDS["float_type"]
    if len(concrete) == 1 and concrete[0] is bool:
        return TYPE_WORDS["bool_type"]
    if len(concrete) == 1 and concrete[0] is str:
        return TYPE_WORDS["string_type"]
    if len(concrete) == 1 and isinstance(concrete[0], type) and issubclass(concrete[0], BaseModel):
        return TYPE_WORDS["model_type"]
    return "a value"


def _metadata(field: FieldInfo | None) -> list[Any]:
    """The constraints of a field, also those inside an ``Annotated`` within a union
    (``Fraction | None``), where pydantic does not lift them to the field."""
    if field is None:
        return []
    found: list[Any] = []
    stack: list[Any] = [*field.metadata, field.annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, FieldInfo):
            stack.extend(item.metadata)
        elif typing.get_origin(item) is Annotated:
            stack.extend(typing.get_args(item)[1:])
        elif typing.get_origin(item) is typing.Union or isinstance(item, types.UnionType):
            stack.extend(typing.get_args(item))
        elif not isinstance(item, type) and typing.get_origin(item) is None:
            found.append(item)
    return found


def _length(field: FieldInfo | None, error: ErrorDetails) -> str:
    """The allowed length of an array: from the field's bounds if known, else from pydantic's."""
    ctx = error.get("ctx", {})
    low, high = ctx.get("min_length"), ctx.get("max_length")
    for item in _metadata(field):
        low = getattr(item, "min_length", low)
        high = getattr(item, "max_length", high)
    if low is not None and low == high:
        return f"an array of {low} items"
    if low is not None and high is not None:
        return f"an array of {low} to {high} items"
    return (
        f"an array of at least {low} items"
        if low is not None
        else f"an array of at most {high} items"
    )


def _range(field: FieldInfo | None, error: ErrorDetails) -> str:
    """The allowed range of a bounded number: from the field's bounds if known, else from
    the one bound pydantic names."""
    bounds: dict[str, Any] = {}
    unit = ""
    for item in _metadata(field):
        if isinstance(item, Unit):
            unit = item.name
        for name in ("gt", "ge", "lt", "le"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(item, name)
    if not bounds:
        bounds = {k: v for k, v in error.get("ctx", {}).items() if k in {"gt", "ge", "lt", "le"}}
    low = bounds.get("gt", bounds.get("ge"))
    high = bounds.get("lt", bounds.get("le"))
    integral = field is not None and _is_int(field.annotation)
    if integral or (field is None and isinstance(error.get("input"), int)):
        low_int = None if low is None else int(low) + (1 if "gt" in bounds else 0)
        high_int = None if high is None else int(high) - (1 if "lt" in bounds else 0)
        return int_range(low_int, high_int)
    return number_range(low, high, open_min="gt" in bounds, open_max="lt" in bounds, unit=unit)


def _is_float(annotation: Any) -> bool:
    return any(t is float for t in _flatten([annotation]))


def _is_int(annotation: Any) -> bool:
    concrete = [t for t in _flatten([annotation]) if t is not type(None)]
    return bool(concrete) and all(t is int for t in concrete)


def _plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
