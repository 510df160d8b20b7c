"""Membership views and committee derivation: convergence, sizes, churn, forgery."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import Identity, NodeId
from p2pfl.protocol.committee import Selection, first_available, ordering, sample_key
from p2pfl.protocol.membership import (
    Advert,
    Membership,
    Record,
    Status,
    parse_records,
    sign_advert,
)
from p2pfl.testing.network import identity_of

POPULATION = 16
IDENTITIES = [identity_of(i) for i in range(POPULATION)]
IDS = [identity.node_id for identity in IDENTITIES]
THRESHOLD = 5

# One advertisement per (peer, counter, status), signed once: signing is the slow part.
_ADVERTS: dict[tuple[int, int, Status], Advert] = {}


def advert(peer: int, counter: int, status: Status) -> Advert:
    key = (peer, counter, status)
    if key not in _ADVERTS:
        _ADVERTS[key] = sign_advert(IDENTITIES[peer], counter, status)
    return _ADVERTS[key]


records = st.builds(
    lambda peer, counter, leave, active: Record(
        advert(peer, counter, Status.LEAVE if leave else Status.JOIN), active
    ),
    st.integers(1, POPULATION - 1),
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 30),
)


def view(bootstrap: range = range(1, POPULATION // 2)) -> Membership:
    return Membership(
        IDENTITIES[0],
        [IDS[i] for i in bootstrap],
        inactivity_threshold=THRESHOLD,
    )


def truth(copies: list[Record]) -> dict[NodeId, tuple[tuple[int, int], int]]:
    """The merge rule by brute force: max advertisement rank and max round, per peer."""
    known: dict[NodeId, tuple[tuple[int, int], int]] = {
        IDS[i]: ((0, 0), 0) for i in range(1, POPULATION // 2)
    }
    for record in copies:
        peer = record.advert.peer
        rank, active = known.get(peer, ((-1, 0), 0))
        known[peer] = (max(rank, record.advert.rank), max(active, record.active))
    return known


@settings(max_examples=60)
@given(st.lists(records, max_size=30), st.randoms(use_true_random=False), st.integers(0, 40))
def test_same_records_in_any_order_give_the_same_view_and_samples(
    copies: list[Record], shuffle: object, index: int
) -> None:
    a, b = view(), view()
    shuffled = list(copies)
    shuffle.shuffle(shuffled)  # type: ignore[attr-defined]
    half = len(copies) // 2
    a.merge(copies[:half])
    a.apply_pending()
    a.merge(copies[half:])
    a.apply_pending()
    for record in shuffled:
        b.merge([record])
    b.apply_pending()
    expected = truth(copies)
    for peer, (rank, active) in expected.items():
        held = a.advert(peer)
        assert held is not None and held.rank == rank and a.last_active(peer) == active
    for r in range(index, index + 5):
        assert a.candidates(r) == b.candidates(r)
        order = ordering(a.candidates(r), r)
        assert order == ordering(b.candidates(r), r)
        up = {peer for peer in order if sample_key(peer, 999)[0] % 3}
        for size in (1, 3, 10):
            assert first_available(order, size, up) == first_available(
                ordering(b.candidates(r), r), size, up
            )


@settings(max_examples=80)
@given(
    st.lists(records, max_size=30),
    st.integers(0, 40),
    st.integers(1, 12),
    st.sets(st.integers(0, POPULATION - 1)),
)
def test_the_sample_has_min_s_available_members_and_only_active_ones(
    copies: list[Record], index: int, size: int, up_indices: set[int]
) -> None:
    membership = view()
    for start in range(0, len(copies), 4):
        membership.merge(copies[start : start + 4])
        if start % 8 == 0:
            membership.apply_pending()
    membership.apply_pending()
    expected = truth(copies)
    active = {IDS[0]} | {
        peer
        for peer, (rank, last) in expected.items()
        if rank[1] == Status.JOIN and last >= index - THRESHOLD
    }
    candidates = membership.candidates(index)
    assert set(candidates) == active
    up = {IDS[i] for i in up_indices} | {IDS[0]}
    order = ordering(candidates, index)
    selection = Selection(order, size, index=index, own=IDS[0])
    now = 0.0
    while not selection.done:
        pings = selection.pump(now, 1.0)
        for peer in pings:
            if peer in up:
                selection.pong(peer)
        now += 1.0
        selection.expire(now)
    chosen = selection.found()
    assert len(chosen) == min(size, len(set(candidates) & up))
    assert set(chosen) <= active & up
    assert chosen == first_available(order, size, up)


def test_churn_leave_applies_at_once_join_waits_for_the_next_send() -> None:
    membership = view(range(1, 4))
    membership.merge([Record(advert(2, 1, Status.LEAVE), 3)])
    assert IDS[2] not in membership.candidates(3)
    newcomer = Record(advert(9, 0, Status.JOIN), 3)
    rejoin = Record(advert(2, 2, Status.JOIN), 3)
    membership.merge([newcomer, rejoin])
    assert IDS[9] not in membership.candidates(3) and IDS[2] not in membership.candidates(3)
    assert membership.pending == {IDS[9], IDS[2]}
    membership.apply_pending()
    assert {IDS[9], IDS[2]} <= set(membership.candidates(3))
    # inactivity: not seen for more than THRESHOLD rounds
    assert IDS[1] not in membership.candidates(THRESHOLD + 1)
    membership.observe(IDS[1], 10)
    assert IDS[1] in membership.candidates(10 + THRESHOLD)
    # suspicion (a refusing aggregator) lasts until the peer is seen in a later round
    membership.suspect(IDS[1], 10)
    assert IDS[1] not in membership.candidates(10)
    membership.observe(IDS[1], 11)
    assert IDS[1] in membership.candidates(11)


def test_a_relay_cannot_forge_or_alter_an_announcement() -> None:
    membership = view(range(1, 4))
    relay = IDENTITIES[5]
    forged_leave = Advert(IDS[1], 7, Status.LEAVE, relay.sign(b"whatever"))
    with pytest.raises(RemoteProtocolError, match="forged"):
        membership.merge([Record(advert(3, 1, Status.LEAVE), 1), Record(forged_leave, 1)])
    assert membership.advert(IDS[3]) == Advert(IDS[3], 0, Status.JOIN)  # nothing applied
    genuine = advert(1, 7, Status.JOIN)
    altered = Advert(IDS[1], 7, Status.LEAVE, genuine.signature)
    with pytest.raises(RemoteProtocolError):
        membership.merge([Record(altered, 1)])
    membership.merge([Record(advert(1, 7, Status.LEAVE), 1)])
    assert membership.advert(IDS[1]) == advert(1, 7, Status.LEAVE)


def test_piggyback_is_bounded_signed_and_round_trips() -> None:
    membership = Membership(IDENTITIES[0], IDS[1:], inactivity_threshold=THRESHOLD)
    membership.merge([Record(advert(i, 1, Status.JOIN), i) for i in range(1, POPULATION)])
    rng = np.random.default_rng(0)
    for limit in (1, 4, 8, 100):
        sent = membership.piggyback(limit, rng)
        assert 1 <= len(sent) <= limit and sent[0].advert.peer == IDS[0]
        assert len({record.advert.peer for record in sent}) == len(sent)
        parsed = parse_records([record.to_wire() for record in sent], max_round=100)
        assert parsed == sent
    assert len(membership.piggyback(100, rng)) == POPULATION


@pytest.mark.parametrize(
    "raw",
    [
        "x",
        [[b"k", 1, 1, 0, b"s"]],
        [[bytes(32), -1, 0, 0, bytes(64)]],
        [[bytes(32), 0, 0, 2, bytes(64)]],
        [[bytes(32), 0, 0, True, bytes(64)]],
        [[bytes(32), 0, 0, 0]],
        [[bytes(32), 0, 0, 0, bytes(64)]] * 257,
    ],
)
def test_malformed_views_are_refused(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_records(raw, max_round=10)


def test_capacity_bounds_the_view() -> None:
    membership = Membership(IDENTITIES[0], [], capacity=4, inactivity_threshold=THRESHOLD)
    membership.merge([Record(advert(i, 0, Status.JOIN), i) for i in range(1, 10)])
    membership.apply_pending()
    assert len(membership) == 4 and IDS[0] in membership
    assert set(membership.peers()) == {IDS[7], IDS[8], IDS[9]}  # the most recently active


def test_own_identity_signs_its_records() -> None:
    me = Identity.from_seed(b"\x07" * 32)
    membership = Membership(me, [], counter=5)
    record = membership.announce(Status.LEAVE)
    assert record.advert.counter == 6 and record.advert.status is Status.LEAVE
    record.advert.verify()
