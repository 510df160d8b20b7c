"""The public in-memory network driver, as the README and its docstring show it."""

from __future__ import annotations

import pytest
import torch

from p2pfl.merge import MergeContext
from p2pfl.numerics import finite_rows
from p2pfl.protocol import CoreConfig
from p2pfl.testing import FakeNetwork


class FiniteMean:
    """The README's user rule; remembers the instances built."""

    name = "finite_mean"
    built: list[FiniteMean] = []

    def __init__(self) -> None:
        FiniteMean.built.append(self)
        self.calls = 0

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        self.calls += 1
        rows = torch.cat([own[None], received[finite_rows(received)]])
        return rows.to(torch.float64).mean(dim=0).to(own.dtype)


def test_readme_example_runs_a_user_rule_on_a_ring_with_a_crashed_node() -> None:
    FiniteMean.built.clear()
    config = CoreConfig(mode="gossip", rounds=10, period=1.0)
    ring = [(i, (i + 1) % 6) for i in range(6)]
    vectors = [torch.full((4,), float(i)) for i in range(6)]
    net = FakeNetwork(6, ring, config, vectors=vectors, merge=FiniteMean, silent={5})
    net.start()
    net.run(until=60.0)
    assert len(FiniteMean.built) == 5, "one rule per live node, none for the silent one"
    assert all(rule.calls > 0 for rule in FiniteMean.built), "every node merged with it"
    for node in net.nodes.values():
        assert node.core.finished and not node.misbehaved
    # the five live nodes' models moved towards each other from 0..4
    finals = torch.stack([node.core.vector for node in net.nodes.values()])
    assert float(finals.max() - finals.min()) < 4.0


def test_docstring_example_dsgd_triangle_agrees() -> None:
    config = CoreConfig(mode="dsgd", rounds=3, local_steps=1)
    vectors = [torch.full((4,), float(i)) for i in range(3)]
    net = FakeNetwork(3, [(0, 1), (1, 2), (0, 2)], config, vectors=vectors, merge="mean")
    net.start()
    net.run()
    assert all(node.core.finished for node in net.nodes.values())
    finals = [node.core.vector for node in net.nodes.values()]
    assert all(torch.equal(v, finals[0]) for v in finals), "a full mesh of means agrees"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vectors": [torch.zeros(2)] * 2}, "vectors has 2 entries, not n=3"),
        ({"vectors": [torch.zeros(2)] * 3, "samples": [1]}, "samples has 1 entries"),
        ({"vectors": [torch.zeros(2)] * 3, "edges": [(0, 3)]}, "edge (0, 3) is outside 0..2"),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    edges = kwargs.pop("edges", [(0, 1)])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FakeNetwork(3, edges, CoreConfig(), **kwargs)  # type: ignore[arg-type]
