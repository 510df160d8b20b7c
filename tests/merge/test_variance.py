"""Variance-corrected averaging: targets, invariants, composition and the Xavier example."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.merge import MergeContext, make_merge_rule
from p2pfl.merge.variance import corrected_spans, variance_correct
from p2pfl.params import ParamLayout

LAYOUT = ParamLayout.from_shapes(
    [("conv.weight", (6, 1, 5, 5)), ("conv.bias", (6,)), ("fc.weight", (4, 30)), ("scale", (1,))]
)
WEIGHTS = [LAYOUT.slots[0].span, LAYOUT.slots[2].span]
BIAS = LAYOUT.slots[1].span


def pvar(x: torch.Tensor) -> float:
    return float(x.double().var(unbiased=False))


def models(k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, LAYOUT.size, generator=generator) * torch.linspace(0.5, 2.0, k)[:, None]


def merge(
    rule_params: dict[str, object], own: torch.Tensor, received: torch.Tensor
) -> torch.Tensor:
    rule = make_merge_rule("variance_corrected", **rule_params)
    return rule(own, received, torch.ones(received.shape[0]), MergeContext(layout=LAYOUT))


@pytest.mark.parametrize("target", ["others", "self", "mix"])
def test_variance_hits_the_target_and_the_mean_is_kept(target: str) -> None:
    stack = models(5)
    own, received = stack[0], stack[1:]
    beta = 0.3
    out = merge({"beta": beta, "target": target}, own, received)
    averaged = beta * own.double() + (1 - beta) * received.double().mean(dim=0)
    for span in WEIGHTS:
        others = sum(pvar(row[span]) for row in received) / len(received)
        expected = {
            "others": others,
            "self": pvar(own[span]),
            "mix": beta * pvar(own[span]) + (1 - beta) * others,
        }[target]
        assert math.isclose(pvar(out[span]), expected, rel_tol=1e-5)
        assert math.isclose(float(out[span].double().mean()), float(averaged[span].mean()),
                            rel_tol=1e-5, abs_tol=1e-6)  # fmt: skip
    # biases and single-element tensors are averaged but never rescaled by default
    torch.testing.assert_close(out[BIAS], averaged[BIAS].float())
    torch.testing.assert_close(out[-1:], averaged[-1:].float())


def test_include_bias_rescales_one_dimensional_tensors() -> None:
    stack = models(4, seed=3)
    out = merge({"include_bias": True}, stack[0], stack[1:])
    expected = sum(pvar(row[BIAS]) for row in stack[1:]) / 3
    assert math.isclose(pvar(out[BIAS]), expected, rel_tol=1e-5)
    assert len(corrected_spans(LAYOUT, LAYOUT.size, include_bias=True)) == 3  # never "scale"


def test_correction_is_idempotent() -> None:
    stack = models(4, seed=1)
    spans = corrected_spans(LAYOUT, LAYOUT.size)
    targets = [0.7, 2.5]
    once = variance_correct(stack.mean(dim=0), targets, spans)
    twice = variance_correct(once, targets, spans)
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=1e-6)


def test_beta_zero_with_identical_inputs_is_the_identity() -> None:
    model = models(1, seed=2)[0]
    received = model.repeat(4, 1)
    out = merge({"beta": 0.0}, model, received)
    torch.testing.assert_close(out, model, rtol=1e-6, atol=1e-6)


def test_averaging_xavier_models_shrinks_variance_and_correction_restores_it() -> None:
    # Conv2d(1, 6, 5) with Xavier-uniform init: Var = 2 / (25 + 150) = 0.011429
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 6, 5) for _ in range(8)]
    for conv in convs:
        nn.init.xavier_uniform_(conv.weight)
        nn.init.zeros_(conv.bias)
    stack = torch.stack(
        [torch.cat([c.weight.detach().reshape(-1), c.bias.detach()]) for c in convs]
    )
    layout = ParamLayout.from_shapes([("weight", (6, 1, 5, 5)), ("bias", (6,))])
    ctx = MergeContext(layout=layout)
    weight = layout.slots[0].span
    own, received = stack[0], stack[1:]
    initial = sum(pvar(row[weight]) for row in stack) / 8
    assert initial == pytest.approx(2 / 175, rel=0.1)

    plain = make_merge_rule("mean")(own, received, torch.ones(7), ctx)
    assert pvar(plain[weight]) == pytest.approx(2 / 175 / 8, rel=0.35)  # ~0.001429

    rule = make_merge_rule("variance_corrected", base="mean")
    corrected = rule(own, received, torch.ones(7), ctx)
    others = sum(pvar(row[weight]) for row in received) / 7
    assert pvar(corrected[weight]) == pytest.approx(others, rel=1e-5)  # ~0.011429 again
    assert pvar(corrected[weight]) == pytest.approx(2 / 175, rel=0.1)
    torch.testing.assert_close(corrected[layout.slots[1].span], torch.zeros(6))


def test_composes_on_a_robust_rule() -> None:
    stack = models(6, seed=4)
    stack[5] += 100.0  # an outlier the median ignores
    own, received = stack[0], stack[1:]
    ctx = MergeContext(layout=LAYOUT)
    median = make_merge_rule("median")(own, received, torch.ones(5), ctx)
    out = make_merge_rule("variance_corrected", base="trimmed_mean", base_params={"b": 2})(
        own, received, torch.ones(5), ctx
    )
    for span in WEIGHTS:
        others = sum(pvar(row[span]) for row in received) / 5
        assert math.isclose(pvar(out[span]), others, rel_tol=1e-5)
        assert math.isclose(
            float(out[span].double().mean()), float(median[span].double().mean()), abs_tol=1e-5
        )


def test_eps_matches_the_python_port_formula() -> None:
    stack = models(3, seed=5)
    out = merge({"eps": 1e-4, "beta": 0.5}, stack[0], stack[1:])
    y = 0.5 * stack[0].double() + 0.25 * (stack[1].double() + stack[2].double())
    span = WEIGHTS[0]
    target = (pvar(stack[1][span]) + pvar(stack[2][span])) / 2
    factor = math.sqrt((target + 1e-4) / (pvar(y[span]) + 1e-4))
    expected = (y[span] - y[span].mean()) * factor + y[span].mean()
    torch.testing.assert_close(out[span], expected.float())


def test_without_layout_the_whole_vector_is_one_tensor() -> None:
    stack = models(4, seed=6)
    out = make_merge_rule("variance_corrected")(stack[0], stack[1:], torch.ones(3), MergeContext())
    others = sum(pvar(row) for row in stack[1:]) / 3
    assert math.isclose(pvar(out), others, rel_tol=1e-5)


def test_edge_cases() -> None:
    rule = make_merge_rule("variance_corrected")
    own = models(1)[0]
    ctx = MergeContext(layout=LAYOUT)
    nothing = rule(own, torch.empty(0, LAYOUT.size), torch.empty(0), ctx)
    torch.testing.assert_close(nothing, own)
    assert nothing.data_ptr() != own.data_ptr()
    stack = models(3, seed=7)
    with_nan = stack.clone()
    with_nan[2, 5] = math.nan
    torch.testing.assert_close(
        rule(own, with_nan, torch.ones(3), ctx), rule(own, stack[:2], torch.ones(2), ctx)
    )
    before = with_nan.clone()
    rule(own, with_nan, torch.ones(3), ctx)
    torch.testing.assert_close(with_nan, before, equal_nan=True)
    with pytest.raises(ValueError):
        rule(own[:-1], stack[:, :-1], torch.ones(3), ctx)  # layout does not match


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"beta": 1.5}, "merge.beta"),
        ({"target": "follow"}, "merge.target"),
        ({"eps": -1.0}, "merge.eps"),
        ({"include_bias": 1}, "merge.include_bias"),
        ({"base": "no-such-rule"}, "merge.base"),
        ({"base_params": {"f": 1}}, "merge.base_params"),
        ({"base": "trimmed_mean", "base_params": {"f": -1}}, "merge.f"),
    ],
)
def test_bad_parameters_name_the_key(params: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_merge_rule("variance_corrected", **params)
    assert info.value.key == key


def test_inputs_near_the_largest_float_give_a_finite_output() -> None:
    # Found by the property battery: the target variance exceeds the merged one, and the
    # rescaled values stepped past float32's largest value into inf.
    largest = torch.finfo(torch.float32).max
    own = torch.zeros(3)
    received = torch.tensor(
        [[math.nan, 0.0, 0.0], [largest, -largest, largest], [-largest, largest, 0.5]]
    )
    out = make_merge_rule("variance_corrected")(own, received, torch.ones(3), MergeContext())
    assert bool(torch.isfinite(out).all())
    assert float(out.abs().max()) <= largest
