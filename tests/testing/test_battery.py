"""The merge-rule battery: every registered rule keeps its promises; broken rules are caught."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from hypothesis import Phase, settings

import p2pfl.merge
from p2pfl.errors import ConfigError
from p2pfl.merge import MERGE_RULES, MergeContext
from p2pfl.numerics import finite_rows
from p2pfl.testing import (
    PROMISES,
    UNIVERSAL,
    MergeRuleViolation,
    Promise,
    check_merge_rule,
    describe_promises,
    promises_for,
)


def _import_rule_modules() -> list[str]:
    """Import every module of :mod:`p2pfl.merge`, so that every rule registers; return failures."""
    failures = []
    for module in pkgutil.iter_modules(p2pfl.merge.__path__, "p2pfl.merge."):
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # a rule module that does not import is a finding
            failures.append(f"{module.name}: {type(exc).__name__}: {exc}")
    return failures


IMPORT_FAILURES = _import_rule_modules()
RULES = sorted(MERGE_RULES)


def budget(fast: int) -> int:
    """``fast`` examples per property in the quick tiers; the profile's when it asks for more."""
    profile = settings().max_examples
    return profile if profile > 200 else fast


def test_every_merge_module_imports() -> None:
    assert not IMPORT_FAILURES, "\n".join(IMPORT_FAILURES)


# Rules that document a minimum number of finite inputs (own included) and raise below it.
# Empty on purpose: a node with one neighbour still merges, so every rule is checked from n = 1.
PRECONDITIONS: dict[str, int] = {}


@pytest.mark.parametrize("name", RULES)
def test_registered_rule_keeps_its_promises(name: str) -> None:
    check_merge_rule(name, max_examples=budget(10), min_inputs=PRECONDITIONS.get(name, 1))


# ------------------------------------------------------------------ deliberately broken


def _finite(own: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """The own vector and the finite received rows, stacked."""
    return torch.cat([own[None], received[finite_rows(received)]])


class FirstFinite:
    """Returns the first finite received row: depends on the order of its inputs."""

    name = "first_finite"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        rows = received[finite_rows(received)]
        return (rows[0] if rows.shape[0] else own).clone()


class NaiveMean:
    """Plain torch.mean over everything: a NaN row poisons the output."""

    name = "naive_mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return torch.cat([own[None], received]).mean(dim=0)


class ZeroingMean:
    """Zeroes non-finite entries of ``received`` in place before averaging."""

    name = "zeroing_mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        received[~torch.isfinite(received)] = 0.0
        return torch.cat([own[None], received]).to(torch.float64).mean(dim=0).to(own.dtype)


class Float64Mean:
    """A correct mean of the finite inputs, returned in float64."""

    name = "float64_mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return _finite(own, received).to(torch.float64).mean(dim=0)


class FiniteMean:
    """A correct mean of the finite inputs (it promises no robustness)."""

    name = "finite_mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return _finite(own, received).to(torch.float64).mean(dim=0).to(own.dtype)


class CoordinateMax:
    """The coordinate-wise maximum of the finite inputs: escapes the honest range."""

    name = "coordinate_max"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return _finite(own, received).max(dim=0).values


class NanAsZeroMean:
    """Averages with non-finite entries read as zeros: finite, but the bad row still counts."""

    name = "nan_as_zero_mean"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        rows = torch.nan_to_num(torch.cat([own[None], received]), 0.0, 0.0, 0.0)
        return rows.to(torch.float64).mean(dim=0).to(own.dtype)


class Drifting:
    """Moves towards zero even when every input agrees."""

    name = "drifting"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return 0.9 * _finite(own, received).to(torch.float64).mean(dim=0).to(own.dtype)


# Detection without shrinking, derandomized so that the same examples run every time.
NO_SHRINKING = settings(phases=[Phase.explicit, Phase.generate], database=None, derandomize=True)


@pytest.mark.parametrize(
    ("rule", "promises", "violated"),
    [
        (FirstFinite(), {Promise.ORDER_INVARIANCE}, Promise.ORDER_INVARIANCE),
        (NaiveMean(), set(), Promise.NAN_NEVER_PROPAGATED),
        (ZeroingMean(), set(), Promise.NO_MUTATION),
        (Float64Mean(), set(), Promise.SHAPE_DTYPE),
        (CoordinateMax(), {Promise.HONEST_RANGE}, Promise.HONEST_RANGE),
        (FiniteMean(), {Promise.BOUNDED}, Promise.BOUNDED),
        (NanAsZeroMean(), {Promise.NAN_EXCLUSION}, Promise.NAN_EXCLUSION),
        (Drifting(), {Promise.IDENTITY}, Promise.IDENTITY),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_broken_rule_is_caught(rule: object, promises: set[Promise], violated: Promise) -> None:
    with pytest.raises(MergeRuleViolation, match=violated.value) as caught:
        check_merge_rule(
            rule,  # type: ignore[arg-type]
            promises=promises,
            max_examples=budget(40),
            hypothesis_settings=NO_SHRINKING,
        )
    assert caught.value.promise is violated
    assert caught.value.rule == rule.name  # type: ignore[attr-defined]
    assert "minimal counterexample" in str(caught.value)


def test_correct_user_rule_passes_what_it_promises() -> None:
    check_merge_rule(
        FiniteMean(),
        promises={Promise.ORDER_INVARIANCE, Promise.IDENTITY, Promise.NAN_EXCLUSION},
        max_examples=budget(20),
    )


class NeedsThree:
    """A correct mean that refuses fewer than three finite inputs, as documented."""

    name = "needs_three"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        rows = _finite(own, received)
        if rows.shape[0] < 3:
            raise ValueError(f"needs_three needs 3 finite inputs, got {rows.shape[0]}")
        return rows.to(torch.float64).mean(dim=0).to(own.dtype)


def test_min_inputs_states_a_precondition() -> None:
    promised = {Promise.ORDER_INVARIANCE, Promise.IDENTITY, Promise.NAN_EXCLUSION}
    check_merge_rule(NeedsThree(), promises=promised, min_inputs=3, max_examples=budget(10))
    with pytest.raises(MergeRuleViolation, match="raised ValueError: needs_three needs 3"):
        check_merge_rule(NeedsThree(), max_examples=budget(50), hypothesis_settings=NO_SHRINKING)


def test_counterexample_is_shrunk_and_readable() -> None:
    with pytest.raises(MergeRuleViolation) as caught:
        check_merge_rule(NaiveMean(), max_examples=budget(60))
    message = str(caught.value)
    assert "nan_never_propagated" in message
    assert "received[0]" in message and "<- Byzantine" in message
    assert "received[1]" not in message  # shrunk to a single received row


# ------------------------------------------------------------------------ the promise table


def test_promises_table() -> None:
    for name, promised in PROMISES.items():
        assert promised >= UNIVERSAL, name
        if Promise.HONEST_RANGE in promised:
            assert Promise.BOUNDED in promised, name  # inside the honest box is bounded
    assert promises_for("mean") == PROMISES["mean"]
    assert Promise.HONEST_RANGE not in promises_for("mean")
    assert promises_for("a_rule_nobody_registered") == UNIVERSAL
    assert promises_for(FiniteMean()) == UNIVERSAL
    table = describe_promises()
    for name in RULES:
        assert f"| `{name}` |" in table
    assert table.splitlines()[0].startswith("| rule | shape_dtype |")


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        check_merge_rule("no_such_rule")
    with pytest.raises(ValueError):
        check_merge_rule("mean", f=-1)
    with pytest.raises(ValueError):
        check_merge_rule("mean", min_inputs=0)
