"""Adversaries: the attack formulas, placement, Sybil wiring, re-sealed envelopes, attack
success, and small simulated runs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch

from p2pfl.codec import decode_vector, encode_vector
from p2pfl.errors import ConfigError
from p2pfl.wire import MessageKind, decode_frame, encode_frame, seal
from sim.adversaries import (
    Adversary,
    AdversaryPlan,
    AttackSuccess,
    alie,
    alie_z,
    dissensus,
    flip_labels,
    gaussian,
    ipm,
    metropolis_weight,
    plan_adversaries,
    poison,
    sign_flip,
    success_rate,
    trigger_mask,
)
from sim.population import build_population, initial_vectors, simulated_identity
from sim.run import run_scenario
from sim.scenario import AdversarySpec, BackdoorAttack, LabelFlipAttack, parse_scenario

SmallDocument = Callable[..., dict[str, Any]]


def _specs(*entries: dict[str, Any]) -> list[AdversarySpec]:
    return parse_scenario({"adversaries": list(entries)}).adversaries


# --- formulas -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "z"),
    [
        (10, 1, -0.140),
        (10, 2, 0.000),
        (20, 4, 0.157),
        (26, 5, 0.180),
        (50, 10, 0.253),
        (100, 20, 0.286),
    ],
)
def test_alie_z_matches_the_reference_table(n: int, m: int, z: float) -> None:
    assert alie_z(n, m) == pytest.approx(z, abs=1e-3)


def test_alie_z_is_clipped_outside_the_open_interval_and_rejects_nonsense() -> None:
    assert alie_z(3, 2) == pytest.approx(2.326, abs=1e-3)  # cdf 1 clipped to 0.99
    assert alie_z(2, 2) == 0.0
    with pytest.raises(ValueError):
        alie_z(4, 5)


def test_sign_flip_gaussian_ipm_and_alie_formulas() -> None:
    own = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(sign_flip(own), -own)
    assert torch.equal(sign_flip(own, 2.0), -2 * own)
    generator = torch.Generator().manual_seed(3)
    noise = gaussian(torch.zeros(20000), 200.0, "replace", generator)
    assert float(noise.std()) == pytest.approx(200.0, rel=0.03)
    shifted = gaussian(own, 1e-6, "add", torch.Generator().manual_seed(3))
    assert torch.allclose(shifted, own, atol=1e-4)
    rows = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 3.0]])
    assert torch.allclose(ipm(rows, 0.1), torch.tensor([-0.3, -0.1]))
    mean, std = rows.mean(dim=0), rows.std(dim=0)  # unbiased std, as the reference
    assert torch.allclose(alie(rows, 1.5), mean - 1.5 * std)
    assert torch.equal(alie(rows[:1], 5.0), rows[0])  # one honest model: no spread


def test_dissensus_pushes_against_the_honest_pull_with_metropolis_weights() -> None:
    assert metropolis_weight(2, 4) == pytest.approx(0.2)
    target = torch.tensor([0.0, 1.0])
    honest = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    weights = torch.tensor([0.25, 0.5])
    pull = 0.25 * torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.0, 2.0])
    expected = target - 1.5 * pull / 0.2
    assert torch.allclose(dissensus(target, honest, weights, 0.2, 1.5), expected)
    # with that Byzantine weight, the target's next mix lands back on itself plus (1-eps)*pull
    mixed = target + pull + 0.2 * (expected - target)
    assert torch.allclose(mixed, target + (1 - 1.5) * pull)


# --- data poisoning and attack success -----------------------------------------------------


def test_label_flip_targeted_all_and_augmented() -> None:
    y = torch.tensor([0, 1, 2, 0, 9])
    targeted = flip_labels(y, mode="targeted", source=0, target=1, classes=10)
    assert targeted.tolist() == [1, 1, 2, 1, 9]
    assert flip_labels(y, mode="all", source=0, target=1, classes=10).tolist() == [9, 8, 7, 9, 0]
    (spec,) = _specs({"attack": "label_flip", "count": 1})
    x = torch.arange(10.0).reshape(5, 2)
    full = (torch.ones(3, 2), torch.tensor([0, 0, 5]))
    px, py = poison(spec, (x, y), full, 10)
    assert py.tolist() == [1, 1, 2, 1, 9, 1, 1]  # own flipped + the 2 zeros of the full set
    assert px.shape == (7, 2)


def test_backdoor_patch_is_rows_0_1_cols_0_2_of_an_8x8_image() -> None:
    (spec,) = _specs({"attack": "backdoor", "count": 1})
    assert isinstance(spec, BackdoorAttack)
    assert trigger_mask(spec, (64,)).nonzero().flatten().tolist() == [0, 1, 2, 8, 9, 10]
    x, y = torch.zeros(2, 64), torch.tensor([3, 4])
    px, py = poison(spec, (x, y), (x, y), 10)
    assert py.tolist() == [3, 4, 1, 1]
    assert px[2:, [0, 1, 2, 8, 9, 10]].eq(1).all() and px[2:].sum() == 12 and px[:2].sum() == 0
    with pytest.raises(ConfigError, match="image_shape"):
        trigger_mask(spec, (10,))


def test_backdoor_patches_every_channel_of_image_shaped_examples() -> None:
    # Examples that are images already ([N, channels, height, width], as a CNN's data is):
    # the patch is rows 0-1, cols 0-2 of the last two dimensions, in every channel.
    (spec,) = _specs({"attack": "backdoor", "count": 1})
    x, y = torch.zeros(2, 3, 5, 7), torch.tensor([3, 4])
    px, py = poison(spec, (x, y), (x, y), 10)
    assert py.tolist() == [3, 4, 1, 1]
    assert px[2:, :, :2, :3].eq(1).all() and px[2:].sum() == 2 * 3 * 6 and px[:2].sum() == 0
    # A 1-D signal with one channel ([N, 1, length]) is a 1 x length image.
    (row,) = _specs({"attack": "backdoor", "count": 1, "rows": [0, 1], "cols": [2, 5]})
    signal = poison(row, (torch.zeros(1, 1, 40), torch.tensor([0])), (x, y), 10)[0]
    assert signal[1, 0].nonzero().flatten().tolist() == [2, 3, 4]
    with pytest.raises(ConfigError, match=r"patch inside 1x40"):
        trigger_mask(spec, (1, 40))
    with pytest.raises(ConfigError, match=r"\[5, 7\], the last two dimensions"):
        trigger_mask(BackdoorAttack.model_validate({**spec.model_dump(), "image_shape": [7, 5]}),
                     (3, 5, 7))  # fmt: skip


def test_attack_success_rate_on_a_constructed_example() -> None:
    predictions = torch.tensor([[1, 1, 0, 2], [0, 0, 0, 0]])
    assert success_rate(predictions, 1).tolist() == [0.5, 0.0]
    assert math.isnan(float(success_rate(torch.zeros(1, 0, dtype=torch.long), 1)[0]))
    # label flip 0 -> 1: only the class-0 test samples count; a "model" predicting 1 for
    # features > 0.5 and 0 otherwise fools two of the three class-0 samples
    x = torch.tensor([[0.9], [0.8], [0.1], [0.9], [0.2]])
    y = torch.tensor([0, 0, 0, 1, 2])

    def logits(vectors: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        one = (inputs[:, 0] > 0.5).float()
        scores = torch.stack([1 - one, one, torch.zeros_like(one)], dim=-1)
        return scores.unsqueeze(0).expand(vectors.shape[0], -1, -1)

    (flip,) = _specs({"attack": "label_flip", "count": 1})
    assert isinstance(flip, LabelFlipAttack)
    rate = AttackSuccess(flip, (x, y), logits)(torch.zeros(2, 5))
    assert rate.tolist() == pytest.approx([2 / 3, 2 / 3])
    # backdoor to 1 on 1x1 "images": the trigger sets the feature to 1 -> predicted 1 for all
    # 4 non-target samples
    (door,) = _specs({"attack": "backdoor", "count": 1, "image_shape": [1, 1], "rows": [0, 1],
                      "cols": [0, 1]})  # fmt: skip
    assert isinstance(door, BackdoorAttack)
    assert AttackSuccess(door, (x, y), logits)(torch.zeros(1, 5)).tolist() == [1.0]


# --- placement and Sybils -------------------------------------------------------------------


def test_placement_by_degree_picks_the_top_degree_nodes() -> None:
    graph = nx.barabasi_albert_graph(40, 2, seed=3)
    specs = _specs({"attack": "sign_flip", "fraction": 0.1, "choose": "degree"})
    plan = plan_adversaries(specs, graph, [False] * 40, seed=1)
    chosen = [node for node in range(40) if plan.byzantine[node]]
    top = sorted(sorted(graph.nodes, key=lambda node: (-graph.degree(node), node))[:4])
    assert chosen == top


def test_placement_by_fraction_count_list_and_among() -> None:
    graph = nx.cycle_graph(20)
    relay = [node % 2 == 0 for node in range(20)]
    specs = _specs(
        {"attack": "ipm", "nodes": [3, 5]},
        {"attack": "alie", "fraction": 0.2, "among": "relays"},
        {"attack": "none", "count": 4},
    )
    plan = plan_adversaries(specs, graph, relay, seed=7)
    assert plan.nodes_of(0) == [3, 5]
    picked = plan.nodes_of(1)
    assert len(picked) == 4 and all(relay[node] for node in picked)
    assert sum(plan.byzantine) == 6  # "none" places nobody
    again = plan_adversaries(specs, nx.cycle_graph(20), relay, seed=7)
    assert again.entry_of == plan.entry_of
    with pytest.raises(ConfigError, match=r"adversaries\[0\]\.nodes"):
        plan_adversaries(_specs({"attack": "ipm", "nodes": [25]}), graph, relay, seed=1)


def test_sybil_entry_adds_s_wired_identities() -> None:
    graph = nx.cycle_graph(10)
    specs = _specs({"attack": "label_flip", "sybils": 5, "sybil_edges": 3})
    plan = plan_adversaries(specs, graph, [False] * 10, seed=1)
    assert graph.number_of_nodes() == 15 and plan.size == 15 and plan.base_size == 10
    assert plan.groups == ((10, 11, 12, 13, 14),)
    assert plan.byzantine == [False] * 10 + [True] * 5
    for clone in plan.clones:
        peers = list(graph.neighbors(clone))
        assert len(peers) == 3 and all(peer < 10 for peer in peers)
    degree_plan = _specs(
        {"attack": "sign_flip", "sybils": 2, "sybil_edges": 1, "sybil_choose": "degree"}
    )
    star = nx.star_graph(6)
    plan_adversaries(degree_plan, star, [False] * 7, seed=1)
    assert sorted(star.neighbors(7)) == [0] and sorted(star.neighbors(8)) == [0]


def test_sybil_population_holds_data_keys_and_counts(small_document: SmallDocument) -> None:
    scenario = parse_scenario(
        small_document(adversaries=[{"attack": "label_flip", "sybils": 3, "sybil_edges": 2}])
    )
    population = build_population(scenario)
    assert population.size == 11 and population.honest == [True] * 8 + [False] * 3
    assert len({identity.node_id for identity in population.identities}) == 11
    assert all(population.samplers[clone] is not None for clone in (8, 9, 10))
    assert all(len(population.neighbours[clone]) == 2 for clone in (8, 9, 10))


# --- the engine hook: re-sealed envelopes ---------------------------------------------------


@dataclass(frozen=True)
class _Holder:
    vector: torch.Tensor


def _hook(
    plan: AdversaryPlan, neighbours: list[list[int]], models: list[torch.Tensor]
) -> Adversary:
    size = plan.size
    return Adversary(
        plan,
        cores=[_Holder(model) for model in models],
        identities=[simulated_identity(9, node) for node in range(size)],
        neighbours=neighbours,
        initial=[torch.full((3,), -7.0) for _ in range(size)],
        seed=9,
    )


def _sealed(node: int, vector: torch.Tensor, *, seq: int = 4, round_: int = 2) -> Any:
    spec, payload = encode_vector(vector, samples=12)
    return seal(
        simulated_identity(9, node),
        MessageKind.MODEL_UPDATE,
        seq=seq,
        round=round_,
        payload=bytes(payload),
        spec=spec,
        meta={"deg": 2},
    )


def _model(envelope: Any) -> torch.Tensor:
    return decode_vector(envelope.spec, envelope.payload)


# A star: node 0 (target) with neighbours 1, 2 (honest) and 3 (Byzantine).
STAR = [[1, 2, 3], [0], [0], [0]]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"attack": "sign_flip"}, lambda own, rows: -own),
        ({"attack": "ipm", "epsilon": 0.5}, lambda own, rows: -0.5 * rows.mean(dim=0)),
        ({"attack": "alie", "z": 2.0}, lambda own, rows: rows.mean(0) - 2.0 * rows.std(0)),
        (
            {"attack": "alie"},
            lambda own, rows: rows.mean(0) - alie_z(4, 1) * rows.std(0),
        ),
        ({"attack": "free_rider"}, lambda own, rows: torch.full((3,), -7.0)),
    ],
)
def test_forged_envelope_carries_the_attack_and_a_valid_signature(
    entry: dict[str, Any], expected: Any
) -> None:
    graph = nx.star_graph(3)
    plan = plan_adversaries(_specs({**entry, "nodes": [3]}), graph, [False] * 4, seed=1)
    models = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]),
              torch.tensor([4.0, 1.0, 2.0]), torch.tensor([9.0, 9.0, 9.0])]  # fmt: skip
    hook = _hook(plan, STAR, models)
    own = torch.tensor([0.5, -1.0, 2.0])
    original = _sealed(3, own)
    forged = hook.forge(3, 0, original)
    assert forged is not original
    verified = decode_frame(encode_frame(forged))  # signature checks out
    assert verified.sender == simulated_identity(9, 3).node_id
    assert (verified.kind, verified.seq, verified.round, dict(verified.meta)) == (
        MessageKind.MODEL_UPDATE,
        4,
        2,
        {"deg": 2},
    )
    assert verified.spec.samples == 12
    rows = torch.stack(models[:3])  # the target and its honest neighbours
    assert torch.allclose(_model(verified), expected(own, rows), atol=1e-6)
    assert hook.forge(3, 0, original) is forged  # a re-send: same envelope


def test_dissensus_is_computed_per_target_through_the_hook() -> None:
    graph = nx.star_graph(3)
    plan = plan_adversaries(_specs({"attack": "dissensus", "nodes": [3]}), graph, [False] * 4,
                            seed=1)  # fmt: skip
    models = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]),
              torch.tensor([4.0, 1.0, 2.0]), torch.tensor([9.0, 9.0, 9.0])]  # fmt: skip
    hook = _hook(plan, STAR, models)
    forged = hook.forge(3, 0, _sealed(3, models[3]))
    w = metropolis_weight(3, 1)  # every edge of the star: 1/(1+3)
    pull = w * (models[1] - models[0]) + w * (models[2] - models[0])
    assert torch.allclose(_model(forged), models[0] - 1.5 * pull / w)


def test_data_attackers_send_honestly_and_sybil_clones_send_the_leaders_model() -> None:
    graph = nx.cycle_graph(4)
    specs = _specs({"attack": "label_flip", "nodes": [1]}, {"attack": "backdoor", "sybils": 2})
    plan = plan_adversaries(specs, graph, [False] * 4, seed=1)
    neighbours = [sorted(graph.neighbors(node)) for node in range(plan.size)]
    hook = _hook(plan, neighbours, [torch.zeros(3)] * plan.size)
    honest_data_attacker = _sealed(1, torch.ones(3))
    assert hook.forge(1, 0, honest_data_attacker) is honest_data_attacker
    leader, clone = plan.groups[0]
    leader_envelope = _sealed(leader, torch.tensor([5.0, 6.0, 7.0]))
    assert hook.forge(leader, neighbours[leader][0], leader_envelope) is leader_envelope
    clone_envelope = _sealed(clone, torch.tensor([0.0, 0.0, 1.0]), seq=8)
    forged = hook.forge(clone, neighbours[clone][0], clone_envelope)
    verified = decode_frame(encode_frame(forged))
    assert verified.sender == simulated_identity(9, clone).node_id and verified.seq == 8
    assert torch.equal(_model(verified), torch.tensor([5.0, 6.0, 7.0]))


# --- scenarios and runs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"attack": "sign_flp", "count": 1}, "adversaries[0].attack"),
        ({"count": 1}, "adversaries[0].attack"),
        ({"attack": "gaussian", "count": 1, "sigmaa": 1}, "adversaries[0].sigmaa"),
        ({"attack": "gaussian", "count": 1, "sigma": -1}, "adversaries[0].sigma"),
        ({"attack": "ipm", "fraction": 1.5}, "adversaries[0].fraction"),
        ({"attack": "alie", "z": "big", "count": 1}, "adversaries[0].z"),
        ({"attack": "sign_flip", "count": 1, "sybils": 3}, "adversaries[0]"),
        ({"attack": "label_flip", "count": 1, "source": 1}, "adversaries[0]"),
    ],
)
def test_scenario_errors_are_one_line_and_name_the_key(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario({"adversaries": [entry]})
    message = str(caught.value)
    assert "\n" not in message and f"scenario: {key} " in message


def test_independent_init_gives_every_node_its_own_model(small_document: SmallDocument) -> None:
    scenario = parse_scenario(small_document(learner={"hidden": [8], "init": "independent"}))
    vectors = initial_vectors(scenario, build_population(scenario))
    assert not torch.equal(vectors[0], vectors[1])
    shared = parse_scenario(small_document())
    same = initial_vectors(shared, build_population(shared))
    assert torch.equal(same[0], same[1])


def _accuracy(document: dict[str, Any], directory: Path) -> float:
    result = run_scenario(parse_scenario(document), directory, plots=False)
    value = result.summary["mean_test_accuracy"]
    assert isinstance(value, float)
    return value


def test_sign_flip_quarter_degrades_mean_but_not_median(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    base = {
        "rounds": 6,
        "topology": {"kind": "complete", "n": 8},
        "adversaries": [{"attack": "sign_flip", "nodes": [2, 5]}],
    }
    mean = _accuracy(small_document(**base, merge={"rule": "mean"}), tmp_path / "mean")
    median = _accuracy(small_document(**base, merge={"rule": "median"}), tmp_path / "median")
    clean = _accuracy(
        small_document(**{**base, "adversaries": []}, merge={"rule": "median"}), tmp_path / "ok"
    )
    assert median >= 0.9 * clean
    assert mean < median - 0.2


def test_targeted_run_reports_attack_success_per_node_and_in_summary(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    document = small_document(
        adversaries=[{"attack": "label_flip", "source": 0, "target": 1, "sybils": 2}]
    )
    result = run_scenario(parse_scenario(document), tmp_path / "run", plots=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["byzantine_nodes"] == 2 and summary["honest_nodes"] == 8
    assert 0.0 <= summary["attack_success_rate"] <= 1.0
    assert result.summary["attacks"] == ["label_flip"]
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert header.split(",")[-1] == "attack_success"
    assert all(0.0 <= float(row.split(",")[-1]) <= 1.0 for row in rows)
    assert any(row.split(",")[2] == "0" for row in rows)  # clones are marked Byzantine
    # the summary's rate is the mean over honest nodes of their last round's rate
    last = {row.split(",")[1]: row.split(",") for row in rows}
    honest_rates = [float(cells[-1]) for cells in last.values() if cells[2] == "1"]
    assert len(honest_rates) == 8
    assert summary["attack_success_rate"] == pytest.approx(sum(honest_rates) / 8)
    clean = run_scenario(parse_scenario(small_document()), tmp_path / "clean", plots=False)
    assert clean.summary["attack_success_rate"] is None
    text = (tmp_path / "clean" / "metrics.csv").read_text().splitlines()
    assert text[1].split(",")[-1] == "nan"


def test_gaussian_sybil_clones_send_one_identical_draw() -> None:
    graph = nx.cycle_graph(4)
    plan = plan_adversaries(_specs({"attack": "gaussian", "sigma": 1.0, "sybils": 3}), graph,
                            [False] * 4, seed=1)  # fmt: skip
    neighbours = [sorted(graph.neighbors(node)) for node in range(plan.size)]
    hook = _hook(plan, neighbours, [torch.zeros(3)] * plan.size)
    leader, *clones = plan.groups[0]
    sent = [hook.forge(leader, neighbours[leader][0], _sealed(leader, torch.ones(3)))]
    sent += [hook.forge(c, neighbours[c][0], _sealed(c, torch.zeros(3))) for c in clones]
    models = [_model(envelope) for envelope in sent]
    assert all(torch.equal(models[0], other) for other in models[1:])
    assert not torch.equal(models[0], torch.ones(3))
