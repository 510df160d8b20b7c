"""Calling a dataset or partition builder with a config's parameters (numbers are checked by
:mod:`p2pfl.checks`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from p2pfl.errors import ConfigError


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
            ``fixed`` ones), or a required parameter is missing; whatever ``fn`` raises
            passes through.
    """
    fixed = dict(fixed or {})
    signature = inspect.signature(fn)
    accepted = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "no parameters"
        raise ConfigError(
            f"{kind}_params.{unknown[0]}", params[unknown[0]], f"{kind} {name!r} takes {allowed}"
        )
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.name not in params and p.name not in fixed
    ]
    if missing:
        raise ConfigError(
            f"{kind}_params.{missing[0]}", None, f"{kind} {name!r} requires {', '.join(missing)}"
        )
    return fn(**fixed, **params)
