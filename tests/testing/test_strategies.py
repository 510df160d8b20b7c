"""The public strategies produce valid objects: vectors, update sets, contexts, frames, graphs."""

from __future__ import annotations

import networkx as nx
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.merge import MergeContext
from p2pfl.params import ParamLayout
from p2pfl.testing import (
    IDENTITY_POOL_SIZE,
    TopologySample,
    UpdateSet,
    envelopes,
    held_out_probe,
    merge_contexts,
    param_layouts,
    parameter_vectors,
    pool_identity,
    topologies,
    update_sets,
)
from p2pfl.wire import Envelope, decode_frame, encode_frame


@given(parameter_vectors(size=st.integers(1, 16)))
def test_parameter_vectors_are_flat_finite_float32(vector: torch.Tensor) -> None:
    assert vector.dtype == torch.float32 and vector.ndim == 1 and 1 <= vector.numel() <= 16
    assert bool(torch.isfinite(vector).all())


@given(parameter_vectors(size=3, elements=st.floats(0.0, 1.0, width=32)))
def test_parameter_vectors_take_elements(vector: torch.Tensor) -> None:
    assert vector.shape == (3,) and bool(((vector >= 0) & (vector <= 1)).all())


@given(update_sets(k=st.integers(0, 8), size=st.integers(1, 6), byzantine=st.integers(0, 8)))
def test_update_sets_are_consistent(updates: UpdateSet) -> None:
    own, received, weights, byzantine = updates  # unpacks like a tuple
    k, size = received.shape
    assert own.shape == (size,) and weights.shape == (k,)
    assert own.dtype == received.dtype == weights.dtype == torch.float32
    assert byzantine <= set(range(k))
    assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    honest = updates.honest()
    assert honest.shape == (1 + k - len(byzantine), size)
    assert bool(torch.isfinite(honest).all())
    # honest inputs lie within max_spread (10) of a centre inside [-100, 100]^P
    assert float(honest.max(0).values.sub(honest.min(0).values).max()) <= 20.0 + 1e-3
    assert float(honest.abs().max()) <= 110.0 + 1e-3


@given(update_sets(k=6, size=4, byzantine=6, non_finite=False))
def test_update_sets_without_non_finite_rows(updates: UpdateSet) -> None:
    assert updates.byzantine == frozenset(range(6))
    assert bool(torch.isfinite(updates.received).all())


@given(st.data())
def test_merge_contexts_fit_k(data: st.DataObject) -> None:
    k = data.draw(st.integers(0, IDENTITY_POOL_SIZE))
    layout = data.draw(param_layouts())
    ctx = data.draw(merge_contexts(k, layout=layout))
    assert isinstance(ctx, MergeContext)
    assert len(ctx.senders) == len(set(ctx.senders)) == k
    assert len(ctx.rounds) == len(ctx.peer_degrees) == k
    assert all(r >= 0 for r in ctx.rounds) and ctx.total_rounds > ctx.own_round
    assert ctx.degree == 0 or ctx.degree >= k
    assert ctx.state == {} and ctx.layout == layout and ctx.probe is not None
    recall = ctx.probe(torch.zeros(layout.size))
    classes = layout.slots[0].shape[0]
    assert recall.shape == (classes,) and bool(((recall >= 0) & (recall <= 1)).all())


@given(param_layouts())
def test_param_layouts_are_a_weight_matrix_and_a_bias(layout: ParamLayout) -> None:
    weight, bias = layout.slots
    assert weight.ndim == 2 and bias.shape == (weight.shape[0],)
    assert layout.size == weight.numel + bias.numel


def test_held_out_probe_reads_the_head() -> None:
    layout = ParamLayout.from_shapes([("weight", (2, 3)), ("bias", (2,))])
    probe = held_out_probe(layout)
    always_class_0 = torch.tensor([0, 0, 0, 0, 0, 0, 1.0, -1.0])
    torch.testing.assert_close(probe(always_class_0), torch.tensor([1.0, 0.0]))
    poisoned = torch.full((8,), float("nan"))
    assert bool(torch.isfinite(probe(poisoned)).all())


def test_pool_identities_are_fixed_and_distinct() -> None:
    ids = {pool_identity(i).node_id for i in range(IDENTITY_POOL_SIZE)}
    assert len(ids) == IDENTITY_POOL_SIZE
    assert pool_identity(3) is pool_identity(3)


@given(envelopes())
def test_envelopes_decode_and_verify(envelope: Envelope) -> None:
    decoded = decode_frame(encode_frame(envelope))
    assert decoded.kind is envelope.kind and decoded.sender == envelope.sender
    assert (decoded.seq, decoded.round) == (envelope.seq, envelope.round)
    assert decoded.spec == envelope.spec and dict(decoded.meta) == dict(envelope.meta)
    assert bytes(decoded.payload) == bytes(envelope.payload)
    assert envelope.sender in {pool_identity(i).node_id for i in range(IDENTITY_POOL_SIZE)}


@given(topologies())
def test_topologies_have_n_nodes(sample: TopologySample) -> None:
    assert isinstance(sample.graph, nx.Graph)
    assert sorted(sample.graph.nodes) == list(range(sample.n))
    assert 1 <= sample.n <= 16
    assert not any(u == v for u, v in sample.graph.edges)


@given(topologies(kinds=["ring", "erdos_renyi", "barabasi_albert"], connected=True))
def test_connected_topologies(sample: TopologySample) -> None:
    assert nx.is_connected(sample.graph)
