"""The merge-rule property battery: check any rule, ours or a user's, against its promises.

Needs Hypothesis (``pip install 'p2pfl-gossip[dev]'``, or ``pip install hypothesis``).

Theory of operation
-------------------
A merge rule is a pure function ``rule(own[P], received[k, P], weights[k], ctx) -> Tensor[P]``
(see :mod:`p2pfl.merge.base`). :func:`check_merge_rule` states each property as a Hypothesis
test over the strategies of :mod:`p2pfl.testing.strategies` and runs them one after the
other. The first property that fails is shrunk to a minimal example, which is raised as a
:class:`MergeRuleViolation` naming the property and printing the inputs.

Every property is checked with a plausible context: distinct senders, rounds, degrees, a
layout that splits P into a ``[C, F]`` weight matrix and a ``[C]`` bias, and a probe that
measures per-class recall on fixed synthetic data (for per-layer and per-class rules such as
variance correction and Bristle). Each call gets a fresh, empty ``ctx.state``, so a rule
that keeps history (FoolsGold, SybilWall) is checked as on its first round, and the two
calls a property compares see the same state. A rule given by name is rebuilt for every
call.

Which properties a rule is checked for is the set of :class:`Promise` values it makes: the
three universal ones (:data:`UNIVERSAL`) for every rule, and for the built-in rules those
listed in :data:`PROMISES`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from p2pfl.errors import InsufficientInputs
from p2pfl.merge.base import MERGE_RULES, MergeContext, MergeRule, make_merge_rule
from p2pfl.testing.strategies import (
    UpdateSet,
    merge_contexts,
    param_layouts,
    parameter_vectors,
    update_sets,
)

__all__ = [
    "PROMISES",
    "UNIVERSAL",
    "MergeRuleViolation",
    "Promise",
    "check_merge_rule",
    "describe_promises",
    "promises_for",
]


class Promise(enum.Enum):
    """A property a merge rule can promise; the value is the name used in reports."""

    SHAPE_DTYPE = "shape_dtype"
    NO_MUTATION = "no_mutation"
    NAN_NEVER_PROPAGATED = "nan_never_propagated"
    ORDER_INVARIANCE = "order_invariance"
    IDENTITY = "identity"
    NAN_EXCLUSION = "nan_exclusion"
    HONEST_RANGE = "honest_range"
    BOUNDED = "bounded"

    @property
    def description(self) -> str:
        """What the property says, in one sentence."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Promise.SHAPE_DTYPE: "the output is a tensor with the own vector's shape and dtype",
    Promise.NO_MUTATION: "own, received and weights are left bit-for-bit unchanged",
    Promise.NAN_NEVER_PROPAGATED: (
        "with a finite own vector the output is finite, whatever the received rows hold "
        "(NaN, infinities, values near float32's max)"
    ),
    Promise.ORDER_INVARIANCE: (
        "permuting the received rows together with weights, senders, rounds and peer "
        "degrees gives the same output"
    ),
    Promise.IDENTITY: "when own and every received row are equal, the output equals own",
    Promise.NAN_EXCLUSION: (
        "a received row holding NaN or an infinity changes nothing: the output equals the "
        "rule applied without that row (and its weight and context entries)"
    ),
    Promise.HONEST_RANGE: (
        "with at most f Byzantine rows among n >= 2f+3 inputs, every output coordinate lies "
        "within the range of that coordinate over the honest inputs (own included)"
    ),
    Promise.BOUNDED: (
        "with 1..f Byzantine rows among n >= 2f+3 inputs, the output stays within "
        "2n*(r+1) of the honest inputs' centroid (r: their largest distance to it), "
        "however far the Byzantine rows are"
    ),
}

#: The promises every merge rule makes: the interface contract of :mod:`p2pfl.merge.base`.
UNIVERSAL: frozenset[Promise] = frozenset(
    {Promise.SHAPE_DTYPE, Promise.NO_MUTATION, Promise.NAN_NEVER_PROPAGATED}
)

_AVERAGING = UNIVERSAL | {Promise.ORDER_INVARIANCE, Promise.IDENTITY, Promise.NAN_EXCLUSION}
_ROBUST = _AVERAGING | {Promise.BOUNDED}
_COORDINATE_ROBUST = _ROBUST | {Promise.HONEST_RANGE}

#: What each built-in rule promises, with its default parameters (robust rules tolerate
#: f = 1 Byzantine input by default). A name missing here promises only :data:`UNIVERSAL`.
#: Krum, Multi-Krum, the geometric median, centered clipping, ClippedGossip and NNA do not
#: promise HONEST_RANGE: a Byzantine point just outside the honest box, close to the honest
#: cluster, can be selected or pull the output there; they promise BOUNDED instead.
PROMISES: dict[str, frozenset[Promise]] = {
    "mean": _AVERAGING,
    "weighted": _AVERAGING,
    "age_weighted": _AVERAGING,
    "variance_corrected": _AVERAGING,
    "median": _COORDINATE_ROBUST,
    "trimmed_mean": _COORDINATE_ROBUST,
    "krum": _ROBUST,
    "multi_krum": _ROBUST,
    "geometric_median": _ROBUST,
    "centered_clipping": _ROBUST,
    "clipped_gossip": _ROBUST,
    "nna": _ROBUST,
    "balance": _AVERAGING,
    "foolsgold": _AVERAGING,
    "sybilwall": _AVERAGING,
    "sybilwall_median": _AVERAGING,
    "sybilwall_weighted_median": _AVERAGING,
    "bristle": _AVERAGING,
}

_ORDER = (
    Promise.SHAPE_DTYPE,
    Promise.NO_MUTATION,
    Promise.NAN_NEVER_PROPAGATED,
    Promise.IDENTITY,
    Promise.ORDER_INVARIANCE,
    Promise.NAN_EXCLUSION,
    Promise.HONEST_RANGE,
    Promise.BOUNDED,
)


def promises_for(rule: MergeRule | str) -> frozenset[Promise]:
    """The promises :func:`check_merge_rule` checks by default for ``rule`` (or a rule name)."""
    name = rule if isinstance(rule, str) else getattr(rule, "name", "")
    return UNIVERSAL | PROMISES.get(name, UNIVERSAL)


def describe_promises(names: Iterable[str] | None = None) -> str:
    """A Markdown table of which rule promises what.

    Args:
        names: The rules to list; by default every rule in :data:`PROMISES` or registered.
    """
    rows = sorted(set(PROMISES) | set(MERGE_RULES)) if names is None else list(names)
    header = "| rule | " + " | ".join(p.value for p in _ORDER) + " |"
    lines = [header, "|" + "---|" * (len(_ORDER) + 1)]
    for name in rows:
        held = promises_for(name)
        marks = " | ".join("✓" if p in held else "" for p in _ORDER)
        lines.append(f"| `{name}` | {marks} |")
    return "\n".join(lines)


class MergeRuleViolation(AssertionError):
    """A merge rule broke a property it promises; the message holds a minimal counterexample.

    Attributes:
        rule: The rule's name.
        promise: The property that failed.
        detail: What went wrong, in one line.
    """

    def __init__(self, rule: str, promise: Promise, detail: str, counterexample: str) -> None:
        self.rule = rule
        self.promise = promise
        self.detail = detail
        super().__init__(
            f"merge rule {rule!r} violates {promise.value} ({promise.description}): {detail}\n"
            f"minimal counterexample:\n{counterexample}"
        )


# ---------------------------------------------------------------------------- the cases


@dataclass(frozen=True, slots=True)
class _Case:
    own: torch.Tensor
    received: torch.Tensor
    weights: torch.Tensor
    ctx: MergeContext
    byzantine: frozenset[int] = frozenset()
    permutation: tuple[int, ...] = ()

    def __repr__(self) -> str:  # Hypothesis prints it in its note; the violation shows it all
        return f"<merge inputs: k={self.received.shape[0]}, P={self.own.shape[0]}>"


def _fmt(tensor: torch.Tensor) -> str:
    values = tensor.detach().reshape(-1).tolist()
    return "[" + ", ".join(f"{v:.7g}" for v in values) + "]"


def _describe(case: _Case, outputs: Mapping[str, torch.Tensor | None]) -> str:
    ctx = case.ctx
    lines = [f"  own      = {_fmt(case.own)}  ({case.own.dtype}, shape {list(case.own.shape)})"]
    if case.received.shape[0] == 0:
        lines.append(f"  received = (none)  shape {list(case.received.shape)}")
    for i in range(case.received.shape[0]):
        tag = "  <- Byzantine" if i in case.byzantine else ""
        lines.append(f"  received[{i}] = {_fmt(case.received[i])}{tag}")
    lines.append(f"  weights  = {_fmt(case.weights)}")
    layout = (
        "None"
        if ctx.layout is None
        else ", ".join(f"{s.name}{list(s.shape)}" for s in ctx.layout.slots)
    )
    lines.append(
        f"  ctx: senders={[s.short() for s in ctx.senders]} rounds={list(ctx.rounds)} "
        f"own_round={ctx.own_round} own_weight={ctx.own_weight} degree={ctx.degree} "
        f"peer_degrees={list(ctx.peer_degrees)} total_rounds={ctx.total_rounds} "
        f"layout=({layout}) probe={'yes' if ctx.probe else 'no'} state=fresh"
    )
    if case.permutation:
        lines.append(f"  permutation of the received rows = {list(case.permutation)}")
    for key, tensor in outputs.items():
        lines.append(f"  {key} = {'n/a' if tensor is None else _fmt(tensor)}")
    return "\n".join(lines)


class _Subject:
    """The rule under test: builds it, calls it, and turns its misbehaviour into violations."""

    def __init__(self, rule: MergeRule | str, params: Mapping[str, Any]) -> None:
        if isinstance(rule, str):
            self.name = rule
            self._factory: Callable[[], MergeRule] = lambda: make_merge_rule(rule, **params)
            self._factory()  # fail now, as a ConfigError, on an unknown name or parameter
        else:
            self.name = str(getattr(rule, "name", type(rule).__name__))
            self._factory = lambda: rule

    def fail(
        self,
        promise: Promise,
        case: _Case,
        detail: str,
        **outputs: torch.Tensor | None,
    ) -> MergeRuleViolation:
        return MergeRuleViolation(self.name, promise, detail, _describe(case, outputs))

    def call(
        self,
        promise: Promise,
        case: _Case,
        own: torch.Tensor | None = None,
        received: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        ctx: MergeContext | None = None,
    ) -> torch.Tensor:
        own = case.own if own is None else own
        received = case.received if received is None else received
        weights = case.weights if weights is None else weights
        fresh = replace(case.ctx if ctx is None else ctx, state={})
        try:
            output = self._factory()(own, received, weights, fresh)
        except InsufficientInputs:
            # A documented refusal (the protocol keeps the own model): not a violation, but
            # the example says nothing about the property, so Hypothesis draws another.
            reject()
        except Exception as exc:
            raise self.fail(promise, case, f"the rule raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(output, torch.Tensor):
            raise self.fail(
                Promise.SHAPE_DTYPE, case, f"the rule returned a {type(output).__name__}"
            )
        return output


def _scale(*tensors: torch.Tensor) -> float:
    finite = [t[torch.isfinite(t)].abs() for t in tensors if t.numel()]
    peaks = [float(t.max()) for t in finite if t.numel()]
    return max(peaks, default=0.0)


def _differs(got: torch.Tensor, want: torch.Tensor, scale: float, rtol: float = 1e-4) -> str:
    """Why ``got`` is not ``want`` within tolerance, or the empty string."""
    if got.shape != want.shape:
        return f"shapes differ: {list(got.shape)} vs {list(want.shape)}"
    a, b = got.detach().to(torch.float64), want.detach().to(torch.float64)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return "NaN in one output but not the other"
    a, b = a[~nan_a], b[~nan_b]
    same_inf = torch.isinf(a) & (a == b)
    gap = (a - b).abs()
    gap[same_inf] = 0.0
    allowed = rtol * (1.0 + scale) + rtol * b.abs().nan_to_num(0.0, 0.0, 0.0)
    bad = gap > allowed
    if bool(bad.any()):
        worst = int(torch.argmax(torch.where(bad, gap, torch.zeros_like(gap))))
        return f"largest gap {float(gap[worst]):.6g} at coordinate {worst}"
    return ""


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(a.detach().cpu().contiguous().numpy().tobytes() == b.numpy().tobytes())


# ------------------------------------------------------------------------- strategies


@dataclass(frozen=True, slots=True)
class _Shape:
    """How many rows a property draws.

    ``bad`` bounds the Byzantine rows; the finite inputs (own and honest rows) number at
    least ``usable``, and all inputs together at least ``total``.
    """

    bad: tuple[int, int] = (0, 0)
    usable: int = 1
    total: int = 1
    extra_honest: int = 5


@st.composite
def _cases(draw: st.DrawFn, shape: _Shape, *, non_finite: bool = True) -> _Case:
    layout = draw(param_layouts())
    bad = draw(st.integers(*shape.bad))
    low = max(0, shape.usable - 1, shape.total - 1 - bad)
    rows = bad + draw(st.integers(low, low + shape.extra_honest))
    updates: UpdateSet = draw(
        update_sets(k=rows, size=layout.size, byzantine=bad, non_finite=non_finite)
    )
    ctx = draw(merge_contexts(rows, layout=layout))
    return _Case(updates.own, updates.received, updates.weights, ctx, updates.byzantine)


@st.composite
def _equal_cases(draw: st.DrawFn, n_min: int) -> _Case:
    base = draw(_cases(_Shape(usable=n_min)))
    x = draw(parameter_vectors(size=base.own.shape[0]))
    received = x.repeat(base.received.shape[0], 1)
    return _Case(x, received, base.weights, base.ctx)


def _drop(values: tuple[Any, ...], drop: frozenset[int]) -> tuple[Any, ...]:
    return tuple(v for i, v in enumerate(values) if i not in drop)


@st.composite
def _exclusion_cases(draw: st.DrawFn, n_min: int) -> _Case:
    base = draw(_cases(_Shape(usable=n_min, extra_honest=4)))
    k, size = base.received.shape[0], base.own.shape[0]
    bad_count = draw(st.integers(1, 2))
    positions = frozenset(draw(st.permutations(range(k + bad_count)))[:bad_count])
    ctx = draw(merge_contexts(k + bad_count, layout=base.ctx.layout))
    poison = st.sampled_from((float("nan"), float("inf"), float("-inf")))
    rows, weights, honest = [], [], iter(range(k))
    for i in range(k + bad_count):
        if i in positions:
            row = draw(parameter_vectors(size=size))
            row[draw(st.integers(0, size - 1))] = draw(poison)
            if draw(st.booleans()):
                row = torch.full((size,), draw(poison))
            rows.append(row)
            weights.append(float(draw(st.integers(1, 1000))))
        else:
            j = next(honest)
            rows.append(base.received[j])
            weights.append(float(base.weights[j]))
    return _Case(
        base.own,
        torch.stack(rows),
        torch.tensor(weights, dtype=torch.float32),
        ctx,
        positions,
    )


# ------------------------------------------------------------------------- properties


def _check_shape_dtype(subject: _Subject, case: _Case, f: int) -> None:
    out = subject.call(Promise.SHAPE_DTYPE, case)
    if out.shape != case.own.shape or out.dtype != case.own.dtype:
        raise subject.fail(
            Promise.SHAPE_DTYPE,
            case,
            f"output has shape {list(out.shape)} and dtype {out.dtype}, expected "
            f"{list(case.own.shape)} and {case.own.dtype}",
            output=out,
        )


def _check_no_mutation(subject: _Subject, case: _Case, f: int) -> None:
    copies = (case.own.clone(), case.received.clone(), case.weights.clone())
    subject.call(Promise.NO_MUTATION, case)
    for name, before, after in zip(
        ("own", "received", "weights"), copies, (case.own, case.received, case.weights), strict=True
    ):
        if not _same_bits(after, before):
            shown = replace(case, own=copies[0], received=copies[1], weights=copies[2])
            raise subject.fail(
                Promise.NO_MUTATION,
                shown,
                f"{name} was modified in place (inputs shown as passed)",
                **{f"{name}_after_call": after},
            )


def _check_nan_never_propagated(subject: _Subject, case: _Case, f: int) -> None:
    out = subject.call(Promise.NAN_NEVER_PROPAGATED, case)
    if not bool(torch.isfinite(out).all()):
        raise subject.fail(
            Promise.NAN_NEVER_PROPAGATED, case, "the output is not finite", output=out
        )


def _check_identity(subject: _Subject, case: _Case, f: int) -> None:
    out = subject.call(Promise.IDENTITY, case)
    why = _differs(out, case.own, _scale(case.own), rtol=1e-4)
    if why:
        raise subject.fail(Promise.IDENTITY, case, why, output=out, expected=case.own)


def _check_order(subject: _Subject, case: _Case, f: int) -> None:
    order = list(case.permutation)
    index = torch.tensor(order, dtype=torch.long)
    ctx = case.ctx
    permuted_ctx = replace(
        ctx,
        senders=tuple(ctx.senders[i] for i in order) if ctx.senders else (),
        rounds=tuple(ctx.rounds[i] for i in order) if ctx.rounds else (),
        peer_degrees=tuple(ctx.peer_degrees[i] for i in order) if ctx.peer_degrees else (),
    )
    out = subject.call(Promise.ORDER_INVARIANCE, case)
    permuted = subject.call(
        Promise.ORDER_INVARIANCE,
        case,
        received=case.received[index],
        weights=case.weights[index],
        ctx=permuted_ctx,
    )
    why = _differs(permuted, out, _scale(case.own, case.received))
    if why:
        raise subject.fail(
            Promise.ORDER_INVARIANCE,
            case,
            f"the permuted input gives another output: {why}",
            output=out,
            output_of_permuted_input=permuted,
        )


def _check_nan_exclusion(subject: _Subject, case: _Case, f: int) -> None:
    drop = case.byzantine
    keep = torch.tensor([i not in drop for i in range(case.received.shape[0])], dtype=torch.bool)
    ctx = case.ctx
    reduced_ctx = replace(
        ctx,
        senders=_drop(ctx.senders, drop),
        rounds=_drop(ctx.rounds, drop),
        peer_degrees=_drop(ctx.peer_degrees, drop),
    )
    out = subject.call(Promise.NAN_EXCLUSION, case)
    want = subject.call(
        Promise.NAN_EXCLUSION,
        case,
        received=case.received[keep],
        weights=case.weights[keep],
        ctx=reduced_ctx,
    )
    why = _differs(out, want, _scale(case.own, case.received))
    if why:
        raise subject.fail(
            Promise.NAN_EXCLUSION,
            case,
            f"the non-finite rows (marked Byzantine) changed the output: {why}",
            output=out,
            output_without_non_finite_rows=want,
        )


def _check_honest_range(subject: _Subject, case: _Case, f: int) -> None:
    out = subject.call(Promise.HONEST_RANGE, case)
    honest = UpdateSet(case.own, case.received, case.weights, case.byzantine).honest()
    honest64 = honest.to(torch.float64)
    low, high = honest64.min(dim=0).values, honest64.max(dim=0).values
    slack = 1e-5 * (1.0 + _scale(honest))
    got = out.detach().to(torch.float64)
    outside = ~((got >= low - slack) & (got <= high + slack))
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        raise subject.fail(
            Promise.HONEST_RANGE,
            case,
            f"coordinate {i} is {float(got[i]):.7g}, outside the honest range "
            f"[{float(low[i]):.7g}, {float(high[i]):.7g}] ({len(case.byzantine)} Byzantine of "
            f"n = {honest.shape[0] + len(case.byzantine)} inputs, f = {f})",
            output=out,
            honest_low=low,
            honest_high=high,
        )


def _check_bounded(subject: _Subject, case: _Case, f: int) -> None:
    out = subject.call(Promise.BOUNDED, case)
    honest = UpdateSet(case.own, case.received, case.weights, case.byzantine).honest()
    honest64 = honest.to(torch.float64)
    centroid = honest64.mean(dim=0)
    radius = float((honest64 - centroid).norm(dim=1).max())
    n = case.received.shape[0] + 1
    bound = 2 * n * (radius + 1.0) + 1e-4 * float(centroid.norm())
    distance = float((out.detach().to(torch.float64) - centroid).norm())
    if not distance <= bound:
        raise subject.fail(
            Promise.BOUNDED,
            case,
            f"the output is {distance:.6g} from the honest centroid, beyond the bound "
            f"2n(r+1) = {bound:.6g} (n = {n}, r = {radius:.6g}, "
            f"{len(case.byzantine)} Byzantine, f = {f})",
            output=out,
            honest_centroid=centroid,
        )


@st.composite
def _permuted_cases(draw: st.DrawFn, n_min: int) -> _Case:
    base = draw(_cases(_Shape(bad=(0, 4), usable=n_min)))
    order = draw(st.permutations(range(base.received.shape[0])))
    return replace(base, permutation=tuple(order))


_Check = Callable[[_Subject, _Case, int], None]


def _plan(promise: Promise, f: int, n_min: int) -> tuple[st.SearchStrategy[_Case], _Check]:
    any_rows = _Shape(bad=(0, 4), usable=n_min)
    match promise:
        case Promise.SHAPE_DTYPE:
            return _cases(any_rows), _check_shape_dtype
        case Promise.NO_MUTATION:
            return _cases(any_rows), _check_no_mutation
        case Promise.NAN_NEVER_PROPAGATED:
            return _cases(_Shape(bad=(1, 5), usable=n_min)), _check_nan_never_propagated
        case Promise.IDENTITY:
            return _equal_cases(n_min), _check_identity
        case Promise.ORDER_INVARIANCE:
            return _permuted_cases(n_min), _check_order
        case Promise.NAN_EXCLUSION:
            return _exclusion_cases(n_min), _check_nan_exclusion
        case Promise.HONEST_RANGE:
            shape = _Shape(bad=(0, f), usable=n_min, total=2 * f + 3, extra_honest=3)
            return _cases(shape), _check_honest_range
        case Promise.BOUNDED:
            shape = _Shape(bad=(min(1, f), f), usable=n_min, total=2 * f + 3, extra_honest=3)
            return _cases(shape), _check_bounded


# ---------------------------------------------------------------------------- the battery


def check_merge_rule(
    rule: MergeRule | str,
    *,
    promises: Iterable[Promise] | None = None,
    max_examples: int | None = None,
    f: int = 1,
    min_inputs: int = 1,
    params: Mapping[str, Any] | None = None,
    hypothesis_settings: settings | None = None,
) -> None:
    """Check ``rule`` against every property it promises; return quietly if all hold.

    The universal properties (:data:`UNIVERSAL`) are always checked. Properties run in a
    fixed order (shape and dtype, no mutation, finite output, identity, order invariance,
    NaN exclusion, honest range, boundedness); the first that fails is shrunk by Hypothesis
    and raised. An exception raised by the rule on any drawn input is a violation of the
    property being checked.

    Args:
        rule: A rule object (anything with ``name`` and the merge signature), reused for
            every call, so it must keep history in ``ctx.state`` and not on itself; or the
            name of a registered rule, which is then built with ``params`` afresh for every
            call.
        promises: What the rule promises beyond :data:`UNIVERSAL`; by default its entry in
            :data:`PROMISES` (looked up by ``rule.name``), or nothing more for an unknown name.
        max_examples: Hypothesis examples per property; by default ``hypothesis_settings``'
            or the loaded profile's.
        f: The number of Byzantine inputs the rule is configured to tolerate; HONEST_RANGE and
            BOUNDED inject up to ``f`` Byzantine rows among ``n >= 2f + 3`` inputs.
        min_inputs: Only draw inputs with at least this many finite inputs (own included),
            for a rule that documents such a precondition. The default, 1, checks that the
            rule works for a node that received nothing.
        params: Parameters for a rule given by name (``make_merge_rule(rule, **params)``).
        hypothesis_settings: Settings to start from (for example ``derandomize=True`` or
            ``phases`` without shrinking); the battery always sets ``deadline=None`` and
            reports one failure.

    Raises:
        MergeRuleViolation: a promised property does not hold; the message names it and shows
            a minimal counterexample.
        ConfigError: ``rule`` is a name that is not registered, or ``params`` do not fit it.
        ValueError: ``f`` is negative or ``min_inputs`` is below 1.
    """
    if f < 0:
        raise ValueError(f"f = {f} must be >= 0")
    if min_inputs < 1:
        raise ValueError(f"min_inputs = {min_inputs} must be >= 1 (own is always an input)")
    subject = _Subject(rule, params or {})
    promised = UNIVERSAL | (promises_for(rule) if promises is None else frozenset(promises))
    parent = hypothesis_settings if hypothesis_settings is not None else settings()
    config = settings(
        parent,
        max_examples=max_examples if max_examples is not None else parent.max_examples,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[
            *parent.suppress_health_check,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )
    for promise in _ORDER:
        if promise in promised:
            _run(subject, promise, _plan(promise, f, min_inputs), f, config)


def _run(
    subject: _Subject,
    promise: Promise,
    plan: tuple[st.SearchStrategy[_Case], _Check],
    f: int,
    config: settings,
) -> None:
    cases, check = plan

    @config
    @given(case=cases)
    def run(case: _Case) -> None:
        check(subject, case, f)

    run.__name__ = run.__qualname__ = f"check_{promise.value}"
    try:
        run()
    except Flaky as exc:
        raise MergeRuleViolation(
            subject.name,
            promise,
            "the rule is not deterministic: the same input gave different results",
            str(exc),
        ) from exc
