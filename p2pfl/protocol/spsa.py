"""``spsa``: shared-randomness SPSA with one-byte updates ("Just One Byte", Zelikman et al.).

Theory of operation
-------------------
Every honest node holds the same model ``θ_t`` at step ``t`` (``core.round == t``, the
steps completed; ``core.vector == θ_t``). Step ``t`` runs::

    TRAINING ──TrainingFinished──► COLLECTING ──all in / timeout──► apply ──► TRAINING (t+1)
                                                                      └────► DONE (t+1 == rounds)

1. ``StartTraining(θ_t, S, t, probe=SpsaProbe(seeds, ε))``: the driver's learner measures the
   two-point projected gradient along each of the ``S = spsa_samples`` perturbations seeded by
   ``(spsa_salt, t, own key, k)`` (:mod:`p2pfl.learn.spsa`).
2. On ``TrainingFinished`` each projection is quantised to one byte and the bytes are sealed
   once as an ``SPSA_STEP`` message for step ``t``, carrying the first 16 bytes of
   SHA-256(``θ_t``) in ``meta["md"]``, and sent to every connected neighbour. The frame is a
   signed header plus ``S`` bytes: its size does not depend on the model.
3. The step closes once every connected neighbour's bytes of step ``t`` are in (a neighbour
   that connects while the core collects is sent this step's bytes and waited for), or at
   ``round_timeout``.
4. Apply: every contribution of step ``t`` (the own and those received), in the order of the
   senders' keys and then samples, regenerating each sender's perturbations from the seeds:
   ``θ_{t+1} = θ_t − spsa_lr · mean(ĝ z)`` (:func:`p2pfl.learn.spsa.apply_update`). The same
   set of bytes gives the same bits on every node. Then ``Emit("round", ...)`` with the new
   model's digest and the number of neighbours whose step-``t`` digest differed from the own
   (``digest_mismatches``: honest nodes in sync report 0; when it is not 0 an
   ``Emit("digest_mismatch", ...)`` says so on its own, which the simulator writes to its
   events and a node logs) and the bytes of the step (``step_frame_bytes``, the size of the
   own step frame, and ``step_bytes_sent``, that times the peers connected at the close),
   ``SaveCheckpoint(t + 1, θ_{t+1})`` and the next probe, or ``Stop``.

Steps ahead are buffered (at most ``max_rounds_ahead + 1`` steps, the latest kept); bytes of
steps already closed are ignored; a second, different message for the same step from one
neighbour is ``PeerMisbehaved``.

Joining, leaving, falling behind
--------------------------------
A node that leaves simply stops sending: its neighbours stop waiting for it when the
connection drops (or at the timeout), so a leave *between* steps changes no honest node's set
of contributions. A node that joins late, restarts, or missed a step catches up with one
dense model transfer instead of a replay: when a neighbour's message for a step after ``t``
arrives and this node holds none of that neighbour's bytes for ``t`` (links are FIFO, so an
in-sync neighbour's step-``t`` bytes always come first), or when most neighbours' digests of
``θ_t`` differ from the own (this node diverged, e.g. after a lost message), it sends that
neighbour an ``SPSA_SYNC`` request and the neighbour answers with its current model as one
float32 ``MODEL_UPDATE`` of its current step (once per step per asker). The asker adopts it
if its digest agrees with most of the digests other neighbours advertised for that step (when
it heard any), jumps to that step and probes it; its neighbours, which wait for every
connected peer, take its bytes of that step like anyone's. A request unanswered after
``round_timeout`` may be sent again, to whichever neighbour next shows this node is behind.

The core needs every contribution to reach every node: run it on a complete graph. On a
sparser graph the models drift apart and ``digest_mismatches`` shows it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from p2pfl.checkpoint import vector_digest
from p2pfl.codec import encode_vector
from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.identity import NodeId
from p2pfl.learn.spsa import apply_update, dequantise, perturbation_seed, quantise
from p2pfl.protocol.actions import (
    Action,
    Emit,
    PeerMisbehaved,
    Send,
    SpsaProbe,
    StartTraining,
    Stop,
)
from p2pfl.protocol.base import BaseCore
from p2pfl.protocol.config import MAX_SPSA_SAMPLES, CoreConfig
from p2pfl.protocol.core import ModeTraits, register_protocol_mode
from p2pfl.protocol.events import Event, MessageReceived, TrainingFinished
from p2pfl.protocol.messages import ModelUpdate, check_sender, parse_model_update
from p2pfl.protocol.phases import SPSA_TRANSITIONS, Phase
from p2pfl.wire import Envelope, MessageKind, PayloadSpec, encode_header

MODEL_DIGEST_BYTES = 16
"""The prefix of SHA-256(model) a step message carries."""

SPSA_CODEC = "spsa"
"""The payload codec of ``SPSA_STEP``: ``S`` int8 levels (dtype ``int8``, shape ``[S]``)."""


@dataclass(frozen=True, slots=True)
class StepBytes:
    """One node's contribution to a step: its quantised projections and the digest of the
    model it measured them at."""

    levels: tuple[int, ...]
    model: bytes


def model_digest(vector: torch.Tensor) -> bytes:
    """The first :data:`MODEL_DIGEST_BYTES` of SHA-256 of the model's float32 bytes."""
    return bytes.fromhex(vector_digest(vector))[:MODEL_DIGEST_BYTES]


def parse_step(envelope: Envelope) -> StepBytes:
    """The contribution an ``SPSA_STEP`` envelope carries.

    Raises:
        RemoteProtocolError: the payload description, size, a level (-128 is never sent) or
            the model digest is malformed.
    """
    spec = envelope.spec
    if spec.codec != SPSA_CODEC or spec.dtype != "int8" or len(spec.shape) != 1:
        raise RemoteProtocolError(f"step payload {spec.codec}/{spec.dtype} {list(spec.shape)}")
    count = spec.shape[0]
    if not 0 <= count <= MAX_SPSA_SAMPLES or envelope.payload_bytes != count:
        raise RemoteProtocolError(
            f"step payload of {envelope.payload_bytes} bytes declared as {count} levels "
            f"(at most {MAX_SPSA_SAMPLES})"
        )
    levels = tuple(int(level) for level in np.frombuffer(envelope.payload, dtype=np.int8))
    if -128 in levels:
        raise RemoteProtocolError("step level -128 is outside [-127, 127]")
    model = envelope.meta.get("md")
    if not isinstance(model, bytes) or len(model) != MODEL_DIGEST_BYTES:
        raise RemoteProtocolError(f"step model digest is not {MODEL_DIGEST_BYTES} bytes")
    return StepBytes(levels, model)


def frame_size(envelope: Envelope) -> int:
    """Bytes the envelope takes on the wire (both length prefixes, header, payload)."""
    return 8 + len(encode_header(envelope)) + envelope.payload_bytes


def _traffic(config: CoreConfig, model_frames: int) -> tuple[float, float]:
    # Per step: the step bytes, and at most one sync request or one synced model; a peer
    # that gives up on this node runs a step at most every round_timeout seconds.
    return 2.0, 2.0 / config.round_timeout


@register_protocol_mode("spsa", traits=ModeTraits(traffic=_traffic))
class SpsaCore(BaseCore):
    """Shared-randomness SPSA: one byte per perturbation, bit-identical models everywhere."""

    TRANSITIONS = SPSA_TRANSITIONS
    HISTORY_GOSSIP = False

    def _init_mode(self) -> None:
        self._digest = model_digest(self.vector)
        self._steps: dict[int, dict[NodeId, StepBytes]] = {}
        self._own: StepBytes | None = None
        self._envelope: Envelope | None = None
        self._probing: int | None = None
        self._projections: tuple[float, ...] = ()
        self._loss = math.nan
        self._collect_until: float | None = None
        self._sync: tuple[NodeId, float] | None = None
        self._answered: dict[NodeId, int] = {}
        self._diverged = False
        self.mismatches = 0
        """Neighbours' step digests that differed from the own, over the whole run."""
        self.syncs = 0
        """Models adopted from a neighbour (joins, catch-ups, repairs)."""

    @property
    def digest(self) -> bytes:
        """The digest prefix of ``vector`` (what this node advertises for its step)."""
        return self._digest

    def handle(self, event: Event, *, now: float) -> list[Action]:
        """As :meth:`BaseCore.handle`; a ``TrainingFinished`` carries the projections."""
        if isinstance(event, TrainingFinished):
            self._projections = tuple(float(value) for value in event.projections)
        return super().handle(event, now=now)

    # -- hooks --------------------------------------------------------------------------

    def _on_started(self) -> list[Action]:
        actions = self._probe()
        for step in sorted(self._steps, reverse=True):
            for peer in self._steps[step]:
                actions += self._check_behind(peer, step)
        return actions

    def _on_connected(self, peer: NodeId) -> list[Action]:
        if self._machine.phase is Phase.COLLECTING and self._envelope is not None:
            return [Send(peer, self._envelope)]
        return []

    def _on_disconnected(self, peer: NodeId) -> list[Action]:
        return self._close_if_complete()

    def _on_message(self, event: MessageReceived) -> list[Action]:
        kind = event.envelope.kind
        try:
            if kind is MessageKind.MODEL_UPDATE:
                return self._on_update(parse_model_update(event, self._peers, self.vector.shape))
            check_sender(event, self._peers)
            if kind is MessageKind.SPSA_STEP:
                return self._on_step(event.peer, event.envelope.round, parse_step(event.envelope))
            if kind is MessageKind.SPSA_SYNC:
                return self._on_sync_request(event.peer, event.envelope.round)
            raise RemoteProtocolError(f"unexpected message kind {kind.name}")
        except RemoteProtocolError as exc:
            return [PeerMisbehaved(event.peer, str(exc))]

    def _on_update(self, update: ModelUpdate) -> list[Action]:
        """A model sent in answer to a sync request."""
        asked = self._sync
        if asked is None or asked[0] != update.sender:
            return []  # a late answer to a request given up on: harmless, ignored
        self._sync = None
        if update.round < self.round or (update.round == self.round and not self._diverged):
            return []
        digest = model_digest(update.vector)
        heard = [
            contribution.model
            for peer, contribution in self._steps.get(update.round, {}).items()
            if peer != update.sender
        ]
        if heard and 2 * heard.count(digest) <= len(heard):
            return [
                Emit(
                    "spsa_sync_rejected",
                    {"round": update.round, "peer": update.sender.short(), "heard": len(heard)},
                )
            ]
        return self._adopt(update)

    def _on_trained(self, trained: torch.Tensor, loss: float, steps: int) -> list[Action]:
        projections, self._projections = self._projections, ()
        if self.round >= self.config.rounds:  # a sync reached the last step meanwhile
            self._machine.goto(Phase.DONE)
            return [Stop(f"completed {self.round} steps (synced)")]
        if self._probing != self.round:  # a sync moved this node on meanwhile
            return self._probe()
        if len(projections) > MAX_SPSA_SAMPLES:
            raise LocalProtocolError(f"{len(projections)} projections, at most {MAX_SPSA_SAMPLES}")
        clip = self.config.spsa_clip
        levels = tuple(quantise(value, clip) for value in projections)
        self._own = StepBytes(levels, self._digest)
        self._loss = loss
        envelope = self._sealer.seal_payload(
            MessageKind.SPSA_STEP,
            self.round,
            payload=np.array(levels, dtype=np.int8).tobytes(),
            spec=PayloadSpec(SPSA_CODEC, "int8", (len(levels),), self.samples),
            meta={"md": self._digest},
        )
        self._envelope = envelope
        self._collect_until = self._now + self.config.round_timeout
        self._machine.goto(Phase.COLLECTING)
        sends: list[Action] = [Send(peer, envelope) for peer in self._peers.connected()]
        return sends + self._close_if_complete()

    def _on_deadline(self) -> list[Action]:
        if self._sync is not None and self._now >= self._sync[1]:
            self._sync = None
        if (
            self._machine.phase is Phase.COLLECTING
            and self._collect_until is not None
            and self._now >= self._collect_until
        ):
            return self._close_step(timed_out=True)
        return []

    def _deadline(self) -> float | None:
        times = []
        if self._machine.phase is Phase.COLLECTING and self._collect_until is not None:
            times.append(self._collect_until)
        if self._sync is not None:
            times.append(self._sync[1])
        return min(times, default=None)

    # -- messages -----------------------------------------------------------------------

    def _on_step(self, peer: NodeId, step: int, contribution: StepBytes) -> list[Action]:
        if step < self.round:
            return []  # a step already closed here
        held = self._steps.setdefault(step, {})
        before = held.get(peer)
        if before is not None:
            if before == contribution:
                return []
            return [PeerMisbehaved(peer, f"two different step messages for step {step}")]
        held[peer] = contribution
        self._trim()
        actions: list[Action] = []
        if self._machine.phase is not Phase.IDLE:
            actions += self._check_behind(peer, step)
        if step == self.round:
            actions += self._close_if_complete()
        return actions

    def _on_sync_request(self, peer: NodeId, step: int) -> list[Action]:
        if step > self.round or self._answered.get(peer) == self.round:
            return []
        self._answered[peer] = self.round
        # float32 whatever the wire dtype: the asker must end with these very bits.
        spec, payload = encode_vector(self.vector, dtype="float32", samples=self.samples)
        envelope = self._sealer.seal_payload(
            MessageKind.MODEL_UPDATE,
            self.round,
            payload=payload,
            spec=spec,
            meta={"deg": len(self._peers.neighbours)},
        )
        return [Send(peer, envelope)]

    def _check_behind(self, peer: NodeId, step: int) -> list[Action]:
        """Ask ``peer`` for its model if its message of ``step`` shows this node fell behind."""
        if step <= self.round or peer in self._steps.get(self.round, {}):
            return []
        return self._ask_sync(peer)

    def _ask_sync(self, peer: NodeId) -> list[Action]:
        if self._sync is not None or not self._peers.is_connected(peer):
            return []
        self._sync = (peer, self._now + self.config.round_timeout)
        request = self._sealer.seal_payload(MessageKind.SPSA_SYNC, self.round)
        return [Send(peer, request)]

    def _trim(self) -> None:
        """Keep the current step and the latest ``max_rounds_ahead`` steps ahead of it."""
        ahead = sorted(step for step in self._steps if step > self.round)
        for step in ahead[: max(0, len(ahead) - self.config.max_rounds_ahead)]:
            del self._steps[step]

    # -- the step -----------------------------------------------------------------------

    def _probe(self) -> list[Action]:
        self._machine.goto(Phase.TRAINING)
        self._probing = self.round
        self._own = None
        self._envelope = None
        seeds = tuple(
            perturbation_seed(self.config.spsa_salt, self.round, self.node_id, sample)
            for sample in range(self.config.spsa_samples)
        )
        probe = SpsaProbe(seeds, self.config.spsa_eps)
        return [StartTraining(self.vector, len(seeds), self.round, probe=probe)]

    def _close_if_complete(self) -> list[Action]:
        if self._machine.phase is not Phase.COLLECTING:
            return []
        held = self._steps.get(self.round, {})
        if any(peer not in held for peer in self._peers.connected()):
            return []
        return self._close_step(timed_out=False)

    def _close_step(self, *, timed_out: bool) -> list[Action]:
        own = self._own
        envelope = self._envelope
        assert own is not None and envelope is not None, "COLLECTING always has own bytes"
        step = self.round
        received = self._steps.pop(step, {})
        everyone = {**received, self.node_id: own}
        clip, salt = self.config.spsa_clip, self.config.spsa_salt
        contributions = [
            (perturbation_seed(salt, step, sender, sample), dequantise(level, clip))
            for sender in sorted(everyone)
            for sample, level in enumerate(everyone[sender].levels)
        ]
        advertised = Counter(contribution.model for contribution in received.values())
        mismatches = len(received) - advertised[self._digest]
        self.mismatches += mismatches
        majority = advertised.most_common(1)[0][0] if advertised else self._digest
        self._diverged = advertised[majority] > advertised[self._digest]
        self.vector = apply_update(self.vector, contributions, self.config.spsa_lr)
        self._digest = model_digest(self.vector)
        self.round = step + 1
        self._own = None
        self._envelope = None
        sent = len(self._peers.connected())
        size = frame_size(envelope)
        record = Emit(
            "round",
            {
                "round": step,
                "loss": self._loss,
                "steps": len(own.levels),
                "received": len(received),
                "expected": len(set(self._peers.connected()) | set(received)),
                "neighbours": len(self._peers.neighbours),
                "contributions": len(contributions),
                "timed_out": int(timed_out),
                "digest": self._digest.hex(),
                "digest_mismatches": mismatches,
                "step_frame_bytes": size,
                "step_bytes_sent": sent * size,
                "merged_at": self._now,
            },
        )
        actions: list[Action] = [record, self._checkpoint(self.round, self.vector)]
        if mismatches:
            actions.insert(
                0,
                Emit(
                    "digest_mismatch",
                    {
                        "round": step,
                        "peers": mismatches,
                        "of": len(received),
                        "own": own.model.hex(),
                        "majority": majority.hex(),
                    },
                ),
            )
        if self.round >= self.config.rounds:
            self._machine.goto(Phase.DONE)
            return [*actions, Stop(f"completed {self.round} steps")]
        actions += self._probe()
        if self._diverged:
            repair = next(peer for peer in sorted(received) if received[peer].model == majority)
            actions += self._ask_sync(repair)
        return actions

    def _adopt(self, update: ModelUpdate) -> list[Action]:
        """Take a neighbour's model of its step ``update.round`` as the own."""
        advanced = update.round > self.round
        self.vector = update.vector.detach().to(torch.float32).clone()
        self._digest = model_digest(self.vector)
        self.round = update.round
        self._diverged = False
        self.syncs += 1
        for step in [step for step in self._steps if step < self.round]:
            del self._steps[step]
        actions: list[Action] = [
            Emit("spsa_synced", {"round": self.round, "peer": update.sender.short()})
        ]
        if advanced:
            actions.append(self._checkpoint(self.round, self.vector))
        phase = self._machine.phase
        if self.round >= self.config.rounds:
            if phase is Phase.TRAINING:
                return actions  # DONE once the outstanding probe is answered
            self._machine.goto(Phase.DONE)
            return [*actions, Stop(f"completed {self.round} steps (synced)")]
        if phase is Phase.COLLECTING and advanced:
            return actions + self._probe()
        return actions
