"""Compressed updates in the sans-IO core: error feedback, delta chains, lost links, settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.codec import CodecSettings, decode_vector
from p2pfl.config import load_config
from p2pfl.errors import ConfigError, RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    CoreConfig,
    DeadlineReached,
    MessageReceived,
    NeighboursConnected,
    PeerMisbehaved,
    Send,
    Started,
    TrainingFinished,
    make_core,
)
from p2pfl.protocol.compression import BASE, KEYFRAME, Chains, Compressor, MissingBase
from p2pfl.protocol.messages import Sealer
from p2pfl.protocol.peers import PeerSet
from p2pfl.wire import Envelope

ALICE = Identity.from_seed(b"\x21" * 32)
BOB = Identity.from_seed(b"\x22" * 32)
SIZE = 300


def _models(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """A model drifting by small random steps, as training moves it."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.randn(SIZE, generator=generator)
    out = []
    for _ in range(steps):
        model = model + 0.05 * torch.randn(SIZE, generator=generator)
        out.append(model.clone())
    return out


def _sealer(codec: str, **options: object) -> Sealer:
    settings = CodecSettings(name=codec, fraction=0.05)
    compressor = Compressor(settings, bounds=(200, 100), **options)  # type: ignore[arg-type]
    return Sealer(ALICE, wire_dtype="float32", samples=3, seq_start=0, compressor=compressor)


class _Receiver:
    """BOB receiving ALICE's models through the same parsing path as a core."""

    def __init__(self) -> None:
        self.peers = PeerSet(BOB.node_id, [ALICE.node_id], window_size=64)
        self.peers.connect(ALICE.node_id)
        self.chains = Chains()

    def take(self, envelope: Envelope) -> torch.Tensor:
        from p2pfl.protocol.messages import parse_model_update

        event = MessageReceived(ALICE.node_id, envelope)
        return parse_model_update(event, self.peers, torch.Size([SIZE]), self.chains).vector


# ---------------------------------------------------------------------- error feedback


def test_int8_error_feedback_keeps_the_sum_of_what_was_sent_on_track() -> None:
    models = _models(40)
    drift = {}
    for feedback in (True, False):
        sealer = _sealer("int8", error_feedback=feedback)
        sent = [decode_vector(e.spec, e.payload) for e in (sealer.seal(m, 0) for m in models)]
        drift[feedback] = (sum(sent) - sum(models)).abs().max().item()
    # With feedback the accumulated error is one step's; without, it grows with the rounds.
    step = (models[-1].max() - models[-1].min()).item() / 255
    assert drift[True] <= step
    assert drift[False] > 3 * drift[True]


@pytest.mark.parametrize("codec", ["topk", "fedzip"])
def test_receivers_rebuild_the_senders_public_copy_bit_for_bit(codec: str) -> None:
    sealer = _sealer(codec, keyframe_every=5)
    receiver = _Receiver()
    compressor = sealer.compressor
    assert compressor is not None
    kinds = []
    for model in _models(12):
        envelope = sealer.seal(model, 0)
        kinds.append(KEYFRAME if KEYFRAME in envelope.meta else envelope.spec.codec)
        rebuilt = receiver.take(envelope)
        assert torch.equal(rebuilt, compressor._reference)
    assert kinds == [KEYFRAME] + [codec] * 5 + [KEYFRAME] + [codec] * 5


def test_delta_error_feedback_tracks_the_model_and_its_absence_drifts() -> None:
    models = _models(30, seed=4)
    error = {}
    for feedback in (True, False):
        sealer = _sealer("topk", error_feedback=feedback, keyframe_every=0)
        receiver = _Receiver()
        for model in models:
            rebuilt = receiver.take(sealer.seal(model, 0))
        error[feedback] = (rebuilt - models[-1]).norm().item()
    # 5% of the entries per message: with feedback what is left out goes out later.
    assert error[True] < 0.5 * error[False], error


def test_a_lost_link_is_dropped_without_blame_until_the_next_keyframe() -> None:
    sealer = _sealer("topk", keyframe_every=3)
    envelopes = [sealer.seal(model, 0) for model in _models(8)]
    complete, lossy = _Receiver(), _Receiver()
    for index, envelope in enumerate(envelopes):
        expected = complete.take(envelope)
        if index == 2:
            continue  # lost on the way to `lossy`
        if index == 3:
            with pytest.raises(MissingBase):
                lossy.take(envelope)
            continue
        # Before the loss and from the next keyframe (index 4) on, both see the same model.
        assert (KEYFRAME in envelope.meta) == (index in (0, 4))
        assert torch.equal(lossy.take(envelope), expected)


def test_a_delta_naming_no_held_base_or_a_bad_one() -> None:
    sealer = _sealer("topk")
    envelopes = [sealer.seal(model, 0) for model in _models(2)]
    receiver = _Receiver()
    with pytest.raises(MissingBase):
        receiver.take(envelopes[1])  # never saw the keyframe
    assert BASE in envelopes[1].meta
    # A sparse payload sent as a whole model is refused: it is not one.
    bare = dataclasses.replace(envelopes[1], seq=7, meta={"deg": 0})
    with pytest.raises(RemoteProtocolError, match="names no base"):
        _Receiver().take(bare)
    named = dataclasses.replace(envelopes[1], seq=8, meta={"deg": 0, BASE: "zero"})
    with pytest.raises(RemoteProtocolError, match="not a sequence number"):
        _Receiver().take(named)


def test_a_non_finite_model_does_not_poison_later_payloads() -> None:
    sealer = _sealer("int8")
    bad = torch.zeros(SIZE)
    bad[3] = float("nan")
    sealer.seal(bad, 0)
    good = sealer.seal(torch.ones(SIZE), 0)
    assert torch.equal(decode_vector(good.spec, good.payload), torch.ones(SIZE))


# --------------------------------------------------------------------------- in a core


def _core(identity: Identity, neighbour: Identity, config: CoreConfig):  # type: ignore[no-untyped-def]
    return make_core(
        config,
        identity=identity,
        neighbours=[neighbour.node_id],
        vector=torch.zeros(SIZE),
        samples=1,
        merge=make_merge_rule("weighted"),
        rng=np.random.default_rng(0),
    )


def test_two_dsgd_cores_exchange_topk_deltas_and_skip_a_lost_one() -> None:
    config = CoreConfig(
        mode="dsgd", rounds=6, local_steps=1, round_timeout=10.0, codec="topk", keyframe_every=2
    )
    a, b = _core(ALICE, BOB, config), _core(BOB, ALICE, config)
    for core in (a, b):
        core.handle(NeighboursConnected(), now=0.0)
        core.handle(Started(), now=0.0)
    keyframes = []
    for round_, model in enumerate(_models(6)):
        now = 100.0 * round_
        out_a = a.handle(TrainingFinished(model, 0.0, 1), now=now)
        out_b = b.handle(TrainingFinished(-model, 0.0, 1), now=now)
        [to_b] = [x.envelope for x in out_a if isinstance(x, Send)]
        [to_a] = [x.envelope for x in out_b if isinstance(x, Send)]
        keyframes.append(KEYFRAME in to_b.meta)
        actions = a.handle(MessageReceived(BOB.node_id, to_a), now=now)
        if round_ in (1, 2):
            # Round 1's model to b is lost: b closes on its deadline; round 2's delta builds
            # on the lost one and is dropped silently (no blame), and b times out again.
            if round_ == 2:
                actions += b.handle(MessageReceived(ALICE.node_id, to_b), now=now)
            actions += b.handle(DeadlineReached(), now=now + 50.0)
        else:
            actions += b.handle(MessageReceived(ALICE.node_id, to_b), now=now)
        assert not any(isinstance(x, PeerMisbehaved) for x in actions)
        assert a.round == b.round == round_ + 1
    assert keyframes == [True, False, False, True, False, False]


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"codec": "zip"}, "protocol.codec"),
        ({"codec": "topk", "mode": "gossip"}, "protocol.codec"),
        ({"codec": "int8", "mode": "modest"}, "protocol.codec"),
        ({"codec_fraction": 0.0}, "protocol.codec_fraction"),
        ({"codec_fraction": 1.5}, "protocol.codec_fraction"),
        ({"codec_count": -1}, "protocol.codec_count"),
        ({"codec_clusters": 17}, "protocol.codec_clusters"),
        ({"codec_chunk": 0}, "protocol.codec_chunk"),
        ({"error_feedback": "yes"}, "protocol.error_feedback"),
        ({"keyframe_every": -1}, "protocol.keyframe_every"),
    ],
)
def test_codec_settings_are_checked_by_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        CoreConfig(**changes)
    assert info.value.key == key


def test_int8_is_allowed_in_every_mode_that_seals_models() -> None:
    for mode in ("dsgd", "gossip", "fedavg"):
        CoreConfig(mode=mode, codec="int8")


NODE_TOML = """
[node]
listen = "127.0.0.1:0"
key_file = "me.key"
[[peers]]
address = "10.0.0.1:7000"
public_key = "{key}"
[data]
dataset = "digits"
[protocol]
{protocol}
"""


def test_a_node_config_takes_the_same_codec_keys(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        NODE_TOML.format(
            key=BOB.node_id.hex(),
            protocol='codec = "fedzip"\ncodec_fraction = 0.05\nerror_feedback = false',
        )
    )
    protocol = load_config(path).protocol
    assert (protocol.codec, protocol.codec_fraction, protocol.error_feedback) == (
        "fedzip",
        0.05,
        False,
    )
    path.write_text(NODE_TOML.format(key=BOB.node_id.hex(), protocol='codec = "gzip"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "protocol.codec"
    assert "dense, fedzip, int8, topk" in str(info.value)
