"""Token buckets, bans, failure counters and the idle watchdog, in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pfl.identity import Identity, NodeId
from p2pfl.protocol import CoreConfig, ModeTraits, register_protocol_mode
from p2pfl.protocol.core import MODE_TRAITS, PROTOCOL_MODES
from p2pfl.protocol.dsgd import DsgdCore
from p2pfl.runtime.limits import BanList, FailureCounter, TokenBucket, peer_allowance
from p2pfl.runtime.peer import PeerConnection
from p2pfl.runtime.transport import FrameStream
from p2pfl.wire import Envelope, MessageKind, seal

A = Identity.from_seed(bytes([1]) * 32)
B = Identity.from_seed(bytes([2]) * 32)


# -- token bucket ---------------------------------------------------------------------------


def test_token_bucket_admits_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(0.4)  # 0.8 tokens refilled: not enough
    assert bucket.take(0.5)  # 1.0 token
    assert not bucket.take(0.5)
    # A long pause refills to the burst, never beyond it.
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]


def test_token_bucket_refused_take_costs_nothing_and_time_never_runs_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    for _ in range(100):
        assert not bucket.take(10.5)
    assert bucket.take(11.0)
    assert not bucket.take(5.0)  # an earlier `now` refills nothing


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.5), (float("inf"), 1.0)])
def test_token_bucket_rejects_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)


def test_credit_adds_tokens_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=4, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    bucket.credit(2)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    bucket.credit(100)
    assert bucket.tokens == 4


def dsgd_allowance() -> tuple[TokenBucket, float]:
    """The bucket of a dsgd neighbour with the default limits, and its per-round credit."""
    allowance = peer_allowance(
        CoreConfig(mode="dsgd"),
        base_rate=20.0,
        base_burst=40,
        histories=False,
        idle_timeout=60.0,
        exchange_interval=30.0,
    )
    return allowance.bucket(0.0), allowance.per_round


@pytest.mark.parametrize("rounds_per_second", [0.1, 10.0, 1e3, 1e6])
def test_an_honest_dsgd_neighbour_is_never_refused_at_any_round_pace(
    rounds_per_second: float,
) -> None:
    """A neighbour sends its model of round r+1 as soon as it has ours of round r, so it is
    at most one round ahead; it is never refused, however short a round is."""
    bucket, per_round = dsgd_allowance()
    for round_ in range(5000):
        now = round_ / rounds_per_second
        assert bucket.take(now), round_  # the neighbour's model of the next round arrives
        bucket.credit(per_round)  # ... and then this node closes its round


def test_a_peer_sending_more_than_the_protocol_allows_is_refused() -> None:
    bucket, per_round = dsgd_allowance()
    refused = 0
    for round_ in range(1000):
        now = round_ / 1e3
        refused += sum(not bucket.take(now) for _ in range(4))  # four models per round
        bucket.credit(per_round)
    assert refused > 1000


def test_the_allowance_follows_the_protocol_settings() -> None:
    def make(protocol: CoreConfig, *, histories: bool = False) -> tuple[float, float, float]:
        a = peer_allowance(
            protocol,
            base_rate=20.0,
            base_burst=40,
            histories=histories,
            idle_timeout=None,
            exchange_interval=None,
        )
        return a.per_round, a.per_second, a.burst

    dsgd = CoreConfig(mode="dsgd", round_timeout=10.0, max_rounds_ahead=4)
    assert make(dsgd) == (2.0, pytest.approx(20.2), 40 + 2.0 * 6)
    assert make(dsgd, histories=True)[0] == 6.0  # model and two history records, twice
    # gossip: a push per (shortest) period reaches a neighbour at most once.
    _, fast, _ = make(CoreConfig(mode="gossip", period=0.01, period_jitter=0.5))
    assert fast == pytest.approx(20.0 + 2 * 1 / 0.005)
    # fedavg: a model each way per round, sent again after a reconnection.
    fedavg = CoreConfig(mode="fedavg", round_timeout=4.0, max_rounds_ahead=0)
    assert make(fedavg) == (4.0, pytest.approx(21.0), 40 + 4.0 * 2)


def test_a_plugin_mode_gets_the_traffic_it_declares_or_only_the_base_limits() -> None:
    def traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
        return 3.0 * model_frames, 0.5

    for name, traits, expected in [
        ("plugin-silent", ModeTraits(), (0.0, 20.0)),
        ("plugin-declared", ModeTraits(traffic=traffic), (6.0, 21.0)),
    ]:
        register_protocol_mode(name, traits=traits)(DsgdCore)
        try:
            allowance = peer_allowance(
                CoreConfig(mode=name),
                base_rate=20.0,
                base_burst=40,
                histories=False,
                idle_timeout=None,
                exchange_interval=None,
            )
        finally:
            del PROTOCOL_MODES[name], MODE_TRAITS[name]
        assert (allowance.per_round, allowance.per_second) == expected


# -- bans -----------------------------------------------------------------------------------


def test_ban_expires() -> None:
    bans = BanList[str](capacity=8)
    bans.ban("10.0.0.1", until=60.0, now=0.0)
    assert bans.is_banned("10.0.0.1", 59.9)
    assert bans.banned_until("10.0.0.1", 30.0) == 60.0
    assert not bans.is_banned("10.0.0.1", 60.0)
    assert len(bans) == 0  # dropped when seen expired
    assert not bans.is_banned("10.0.0.2", 0.0)


def test_ban_keeps_the_longer_ban_and_expire_drops_old_ones() -> None:
    bans = BanList[str](capacity=8)
    bans.ban("x", until=100.0, now=0.0)
    bans.ban("x", until=50.0, now=1.0)
    assert bans.banned_until("x", 60.0) == 100.0
    bans.ban("y", until=10.0, now=1.0)
    assert bans.active(now=20.0) == 1


def test_ban_list_is_bounded_and_evicts_the_soonest_ending() -> None:
    bans = BanList[int](capacity=3)
    for key in range(10_000):
        bans.ban(key, until=1000.0 + key, now=0.0)
        assert len(bans) <= 3
    assert sorted(bans) == [9997, 9998, 9999]
    assert bans.evicted == 10_000 - 3
    assert len(bans._heap) <= 2 * 3 + 16 + 1


def test_ban_list_heap_stays_bounded_when_one_key_is_banned_again_and_again() -> None:
    bans = BanList[str](capacity=4)
    for step in range(10_000):
        bans.ban("same", until=10.0 + step, now=float(step))
    assert len(bans) == 1
    assert len(bans._heap) <= 2 * 4 + 16 + 1


async def test_ban_expiry_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    bans = BanList[NodeId](capacity=4)
    start = trio.current_time()
    bans.ban(A.node_id, until=start + 300.0, now=start)
    await trio.sleep(299.0)
    assert bans.is_banned(A.node_id, trio.current_time())
    await trio.sleep(1.0)
    assert not bans.is_banned(A.node_id, trio.current_time())


# -- failure counters -----------------------------------------------------------------------


def test_failure_counter_counts_within_the_window() -> None:
    failures = FailureCounter[str](capacity=16, window=60.0)
    assert [failures.record("ip", float(t)) for t in range(3)] == [1, 2, 3]
    assert failures.count("ip", 59.0) == 3
    assert failures.count("ip", 60.0) == 0
    assert failures.record("ip", 60.0) == 1  # a new window


def test_failure_counter_memory_does_not_grow_with_distinct_keys() -> None:
    failures = FailureCounter[str](capacity=100, window=60.0)
    for i in range(100_000):
        failures.record(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1.0)
    assert len(failures) == 100
    # The most recent keys are the ones kept.
    assert failures.count("10.1.134.159", 1.0) == 1


# -- the idle watchdog ----------------------------------------------------------------------


def keepalive() -> Envelope:
    return seal(B, MessageKind.KEEPALIVE, seq=1, round=0, payload=b"")


async def never(peer: NodeId, message: object) -> None:
    raise AssertionError(f"unexpected callback for {peer}: {message}")


async def test_silent_peer_is_dropped_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    local, _remote = trio.testing.memory_stream_pair()
    connection = PeerConnection(A.node_id, FrameStream(local), idle_timeout=30.0)
    start = trio.current_time()
    await connection.run(never, never)
    assert connection.timed_out
    assert trio.current_time() - start == pytest.approx(30.0)


async def test_keepalives_keep_both_sides_of_an_idle_link_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    received: list[MessageKind] = []

    async def on_message(peer: NodeId, envelope: Envelope) -> None:
        received.append(envelope.kind)

    a = PeerConnection(B.node_id, FrameStream(left), idle_timeout=30.0, keepalive=keepalive)
    b = PeerConnection(A.node_id, FrameStream(right), idle_timeout=30.0, keepalive=keepalive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, on_message, never)
        nursery.start_soon(b.run, on_message, never)
        await trio.sleep(600.0)  # virtual: twenty idle timeouts
        assert not a.closed.is_set() and not b.closed.is_set()
        nursery.cancel_scope.cancel()
    assert not a.timed_out and not b.timed_out
    assert a.keepalives_sent >= 600 / 10 - 1
    assert set(received) == {MessageKind.KEEPALIVE}


async def test_a_peer_trickling_one_frame_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    local, remote = trio.testing.memory_stream_pair()
    connection = PeerConnection(A.node_id, FrameStream(local), idle_timeout=30.0)

    async def trickle() -> None:
        frame = b"\x00\x00\x10\x00" + b"\x00" * 4096
        for byte in frame:
            await remote.send_all(bytes([byte]))
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await connection.run(never, never)
        nursery.cancel_scope.cancel()
    assert connection.timed_out
