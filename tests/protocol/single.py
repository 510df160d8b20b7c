"""One core and the neighbours around it, for tests that play the neighbours by hand."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfl.codec import encode_vector
from p2pfl.identity import Identity, NodeId
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import Action, Core, CoreConfig, MessageReceived, PeerConnected, make_core
from p2pfl.testing.network import identity_of
from p2pfl.wire import Envelope, MessageKind, PayloadSpec, seal

SIZE = 4
ME = 0
NEIGHBOURS = (1, 2, 3)
STRANGER = 9


def sealed(
    sender: Identity,
    *,
    seq: int,
    round: int,
    vector: torch.Tensor | None = None,
    samples: int = 1,
    kind: MessageKind = MessageKind.MODEL_UPDATE,
) -> Envelope:
    """A real signed model update from ``sender`` (default model: all entries = round)."""
    if vector is None:
        vector = torch.full((SIZE,), float(round))
    spec, payload = encode_vector(vector, samples=samples)
    return seal(sender, kind, seq=seq, round=round, payload=bytes(payload), spec=spec)


def sealed_raw(
    sender: Identity, *, seq: int, round: int, spec: PayloadSpec, payload: bytes
) -> Envelope:
    return seal(sender, MessageKind.MODEL_UPDATE, seq=seq, round=round, payload=payload, spec=spec)


@dataclass
class Single:
    core: Core
    me: Identity
    peers: dict[int, Identity]

    def id(self, index: int) -> NodeId:
        return self.peers[index].node_id

    def receive(
        self, index: int, envelope: Envelope, *, now: float = 0.0, via: int | None = None
    ) -> list[Action]:
        peer = self.peers[index if via is None else via].node_id
        return self.core.handle(MessageReceived(peer, envelope), now=now)


def make_single(
    mode: str,
    *,
    connect: bool = True,
    samples: int = 1,
    merge: str = "mean",
    **overrides: object,
) -> Single:
    config = CoreConfig(mode=mode, **overrides)  # type: ignore[arg-type]
    me = identity_of(ME)
    peers = {i: identity_of(i) for i in (*NEIGHBOURS, STRANGER)}
    core = make_core(
        config,
        identity=me,
        neighbours=[peers[i].node_id for i in NEIGHBOURS],
        vector=torch.zeros(SIZE),
        samples=samples,
        merge=make_merge_rule(merge),
        rng=np.random.default_rng(1),
    )
    single = Single(core, me, peers)
    if connect:
        for i in NEIGHBOURS:
            assert core.handle(PeerConnected(single.id(i)), now=0.0) == []
    return single
