"""Checking and calling a registry entry (dataset, partition, model factory) with a config's
parameters (numbers are checked by :mod:`p2pfl.checks`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

from p2pfl.errors import ConfigError


def check_params(
    key: str,
    what: str,
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    *,
    fixed: Collection[str] = (),
    keyword_only: bool = False,
    hint: str = "",
) -> None:
    """Refuse a key of ``params`` that ``fn`` does not take as a keyword argument.

    The one check of a builder's parameters, for a node config's ``[data]`` table and for the
    builders themselves, so every caller words the error alike.

    Args:
        key: the dotted key of the parameters' table (``"data.params"``, ``"model_params"``).
        what: the builder as the message names it (``"dataset 'digits'"``).
        fn: the builder; a ``**kwargs`` parameter makes it take any key.
        params: the config's parameters.
        fixed: parameters the caller supplies itself, which a config may not set.
        keyword_only: only keyword-only parameters are the config's (a model factory's
            positional ones are the input shape and class count).
        hint: appended to the message.

    Raises:
        ConfigError: ``key.name = value: WHAT takes a, b[HINT]`` for the first unknown name.
    """
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    kinds = (
        (inspect.Parameter.KEYWORD_ONLY,)
        if keyword_only
        else (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    accepted = [p.name for p in parameters if p.kind in kinds and p.name not in fixed]
    for name, value in params.items():
        if name not in accepted:
            allowed = ", ".join(accepted) if accepted else "no parameters"
            raise ConfigError(f"{key}.{name}", value, f"{what} takes {allowed}{hint}")


def call_with_params(
    kind: str,
    name: str,
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    fixed: Mapping[str, Any] | None = None,
) -> Any:
    """Call registry entry ``fn`` with config ``params`` (plus ``fixed`` arguments we supply).

    Raises:
        ConfigError: a key of ``params`` is not a parameter of ``fn`` (or is one of the
            ``fixed`` ones; :func:`check_params`), or a required parameter is missing;
            whatever ``fn`` raises passes through.
    """
    fixed = dict(fixed or {})
    check_params(f"{kind}_params", f"{kind} {name!r}", fn, params, fixed=fixed)
    missing = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in params
        and p.name not in fixed
    ]
    if missing:
        raise ConfigError(
            f"{kind}_params.{missing[0]}", None, f"{kind} {name!r} requires {', '.join(missing)}"
        )
    return fn(**fixed, **params)
