"""The settings of a protocol core (the ``[protocol]`` table of a scenario or node config)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import NoReturn, TypeGuard

from p2pfl.codec import CODECS, DENSE, MAX_CLUSTERS, WIRE_DTYPES, CodecSettings
from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.protocol.compression import DELTA_MODES
from p2pfl.protocol.core import MODE_TRAITS, PROTOCOL_MODES
from p2pfl.protocol.membership import MAX_RECORDS_PER_MESSAGE

PEER_SAMPLING = ("neighbours", "membership")
"""The values of ``protocol.peer_sampling``."""

MAX_ROUNDS = 10**9
"""The most rounds a run may ask for (nodes and scenarios alike): far beyond any real run,
and far below the wire's round field (``wire.MAX_ROUND``) however far ahead peers run."""

CONFIG_PREFIX = "protocol"
"""Config keys in errors are named ``protocol.<field>``, as in a scenario file."""


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CoreConfig:
    """What every protocol mode needs to know; fields a mode does not use are ignored.

    Attributes:
        mode: a key of ``PROTOCOL_MODES`` (``"dsgd"``, ``"gossip"``, ``"modest"``,
            ``"fedavg"``, or a plug-in's).
        rounds: the core stops (emits ``Stop``) after this many rounds (trainings).
        local_steps: local training steps asked for by each ``StartTraining``.
        round_timeout: dsgd: seconds to wait for neighbours' models after own training.
        period: gossip: seconds between pushes.
        period_jitter: gossip: each push interval is ``period * U(1 - j, 1 + j)``.
        fanout: gossip: neighbours a push goes to.
        wire_dtype: element dtype of models on the wire (a key of ``codec.WIRE_DTYPES``).
        max_rounds_ahead: dsgd: models up to this many rounds ahead are buffered, later dropped.
        replay_window: sequence numbers remembered per sender (``wire.ReplayWindow``).
        sample_size: modest: trainers per round (``s``); fedavg: clients per round, unless
            ``sample_fraction`` is set.
        sample_fraction: fedavg: the share ``C`` of the clients sampled per round, so
            ``max(1, round(C * K))`` of the ``K`` clients (McMahan et al.); unset: use
            ``sample_size``.
        server: fedavg: the server's public key (64 hex characters). The node holding that
            key is the server; every other node is a client and must have it as a neighbour.
            The simulator fills it in with the key of the server it adds.
        aggregators: modest: aggregators per round (``a``).
        success_fraction: modest: an aggregator merges once it holds
            ``floor(sample_size * success_fraction)`` models (``sf``).
        min_models: modest: at ``aggregation_timeout`` an aggregator merges only if it holds
            at least this many models (capped at the merge threshold), else abandons the round.
        ping_timeout: modest: seconds to wait for a pong before pinging the next candidate.
        aggregation_timeout: modest: seconds an aggregator waits after its first model.
        ack_timeout: modest: seconds a trainer waits for an aggregator's ack before failing
            over to the next aggregator, as on a negative ack.
        inactivity_threshold: membership: a peer not seen active for more rounds than this
            leaves the candidate set.
        view_entries: membership: records piggybacked per message (bounds traffic per message).
        view_capacity: membership: records a node keeps at most.
        announce_join: modest: on ``Started``, announce the own join to
            ``min(10 * sample_size, view)`` random peers.
        peer_sampling: gossip: where push targets come from: ``"neighbours"`` (the connected
            configured neighbours, the default) or ``"membership"`` (the active candidates of
            the membership view, so pushes reach peers beyond the neighbours; models then
            carry a view copy and the core accepts models from any authenticated peer).
        history_gossip: dsgd and gossip: SybilWall's probabilistic history gossip
            (:mod:`p2pfl.protocol.histories`). ``None`` (the default) turns it on exactly
            when the merge rule is a SybilWall variant; ``true`` / ``false`` force it.
        history_lambda: the decay λ of the history draw, ``∝ λ·e^{−λ(d−1)}`` (0.8).
        history_capacity: signed history records a node keeps at most (each the size of
            a model); the farthest, then the oldest, is forgotten first.
        codec: how models go on the wire (a key of ``codec.CODECS``): ``"dense"`` (the
            default: ``wire_dtype`` elements), ``"int8"`` (8-bit per tensor), ``"topk"`` or
            ``"fedzip"`` (sparse deltas; mode ``dsgd`` only). See
            :mod:`p2pfl.protocol.compression`.
        codec_fraction: topk, fedzip: share of each tensor's entries a delta keeps.
        codec_count: topk, fedzip: entries kept per tensor; 0 (the default) uses the fraction.
        codec_clusters: fedzip: k-means centroids per tensor (3, as in FEDZIP).
        codec_chunk: int8: elements per scale when the model's tensor sizes are unknown.
        error_feedback: lossy codecs: carry what a payload left out into the next one
            (``true``, the default).
        keyframe_every: topk, fedzip: a full (dense) model every this many deltas, so a
            receiver that missed one resumes; 0: only the first message is one.
    """

    mode: str = "dsgd"
    rounds: int = 10
    local_steps: int = 10
    round_timeout: float = 30.0
    period: float = 1.0
    period_jitter: float = 0.2
    fanout: int = 1
    wire_dtype: str = "float32"
    max_rounds_ahead: int = 4
    replay_window: int = 1024
    sample_size: int = 10
    sample_fraction: float | None = None
    server: str = ""
    aggregators: int = 1
    success_fraction: float = 1.0
    min_models: int = 3
    ping_timeout: float = 5.0
    aggregation_timeout: float = 300.0
    ack_timeout: float = 320.0
    inactivity_threshold: int = 50
    view_entries: int = 16
    view_capacity: int = 4096
    announce_join: bool = True
    peer_sampling: str = "neighbours"
    history_gossip: bool | None = None
    history_lambda: float = 0.8
    history_capacity: int = 32
    # -- compressed updates (p2pfl.protocol.compression) --
    codec: str = "dense"
    codec_fraction: float = 0.01
    codec_count: int = 0
    codec_clusters: int = 3
    codec_chunk: int = 4096
    error_feedback: bool = True
    keyframe_every: int = 20

    @property
    def admits_strangers(self) -> bool:
        """Whether the core takes connections and messages from peers that are not its
        configured neighbours, as its mode declares (``ModeTraits.strangers``: ``modest``,
        and ``gossip`` with membership peer sampling); drivers use it to route such peers'
        traffic to the core. False for a mode that is not registered."""
        traits = MODE_TRAITS.get(self.mode)
        if traits is None:
            return False
        strangers = traits.strangers
        return strangers(self) if callable(strangers) else strangers

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: naming the first wrong key (e.g. ``protocol.fanout``), its value and
                what is allowed.
        """
        # A config is immutable, and a simulator hands one object to every core it builds:
        # check each object once. Keyed by identity, not equality (1 == True == 1.0 would let
        # an invalid config pass as an equal valid one); the entry dies with the object.
        if _VALIDATED.get(id(self)) is self:
            return
        self._check()
        _VALIDATED[id(self)] = self

    def _check(self) -> None:
        if self.mode not in PROTOCOL_MODES:
            _fail("mode", self.mode, f"one of {', '.join(sorted(PROTOCOL_MODES))}")
        _int_at_least("rounds", self.rounds, 1)
        if self.rounds > MAX_ROUNDS:
            _fail("rounds", self.rounds, f"an integer in [1, {MAX_ROUNDS}]")
        _int_at_least("local_steps", self.local_steps, 1)
        _positive_seconds("round_timeout", self.round_timeout)
        _positive_seconds("period", self.period)
        jitter = self.period_jitter
        if not _is_real(jitter) or not 0.0 <= jitter < 1.0:
            _fail("period_jitter", jitter, "a number in [0, 1)")
        _int_at_least("fanout", self.fanout, 1)
        if self.wire_dtype not in WIRE_DTYPES:
            _fail("wire_dtype", self.wire_dtype, f"one of {', '.join(sorted(WIRE_DTYPES))}")
        _int_at_least("max_rounds_ahead", self.max_rounds_ahead, 0)
        _int_at_least("replay_window", self.replay_window, 1)
        _int_at_least("sample_size", self.sample_size, 1)
        share = self.sample_fraction
        if share is not None and (not _is_real(share) or not 0.0 < share <= 1.0):
            _fail("sample_fraction", share, "a number in (0, 1] (or absent: use sample_size)")
        if not isinstance(self.server, str):
            _fail("server", self.server, "the server's 64-hex-character public key")
        if self.server:
            NodeId.from_hex(self.server, key=f"{CONFIG_PREFIX}.server")
        _int_at_least("aggregators", self.aggregators, 1)
        fraction = self.success_fraction
        if not _is_real(fraction) or not 0.0 < fraction <= 1.0:
            _fail("success_fraction", fraction, "a number in (0, 1]")
        _int_at_least("min_models", self.min_models, 1)
        _positive_seconds("ping_timeout", self.ping_timeout)
        _positive_seconds("aggregation_timeout", self.aggregation_timeout)
        _positive_seconds("ack_timeout", self.ack_timeout)
        _int_at_least("inactivity_threshold", self.inactivity_threshold, 1)
        _int_at_least("view_entries", self.view_entries, 1)
        if self.view_entries > MAX_RECORDS_PER_MESSAGE:
            _fail("view_entries", self.view_entries, f"at most {MAX_RECORDS_PER_MESSAGE}")
        _int_at_least("view_capacity", self.view_capacity, 1)
        if not isinstance(self.announce_join, bool):
            _fail("announce_join", self.announce_join, "true or false")
        if self.peer_sampling not in PEER_SAMPLING:
            _fail("peer_sampling", self.peer_sampling, f"one of {', '.join(PEER_SAMPLING)}")
        if self.history_gossip is not None and not isinstance(self.history_gossip, bool):
            _fail("history_gossip", self.history_gossip, "true or false (or absent: automatic)")
        # A mode declares whether it can gossip histories (BaseCore.HISTORY_GOSSIP).
        if self.history_gossip is True and not getattr(
            PROTOCOL_MODES[self.mode], "HISTORY_GOSSIP", True
        ):
            _fail("history_gossip", True, f"false or absent with mode {self.mode!r}")
        lam = self.history_lambda
        if not _is_real(lam) or not math.isfinite(lam) or lam <= 0:
            _fail("history_lambda", lam, "a finite number > 0 (default 0.8)")
        _int_at_least("history_capacity", self.history_capacity, 1)
        self._check_codec()

    def _check_codec(self) -> None:
        codec = CODECS.get(self.codec) if isinstance(self.codec, str) else None
        if codec is None:
            _fail("codec", self.codec, f"one of {', '.join(sorted(CODECS))}")
        if self.codec != DENSE and self.mode == "modest":
            _fail("codec", self.codec, "'dense' with mode 'modest' (it seals its own messages)")
        if codec.delta and self.mode not in DELTA_MODES:
            allowed = ", ".join(name for name, c in sorted(CODECS.items()) if not c.delta)
            _fail(
                "codec",
                self.codec,
                f"one of {allowed} with mode {self.mode!r} (a delta "
                f"codec needs a mode that sends every model to every neighbour: "
                f"{', '.join(DELTA_MODES)})",
            )
        share = self.codec_fraction
        if not _is_real(share) or not 0.0 < share <= 1.0:
            _fail("codec_fraction", share, "a number in (0, 1]")
        _int_at_least("codec_count", self.codec_count, 0)
        _int_at_least("codec_clusters", self.codec_clusters, 1)
        if self.codec_clusters > MAX_CLUSTERS:
            _fail("codec_clusters", self.codec_clusters, f"an integer in [1, {MAX_CLUSTERS}]")
        _int_at_least("codec_chunk", self.codec_chunk, 1)
        if not isinstance(self.error_feedback, bool):
            _fail("error_feedback", self.error_feedback, "true or false")
        _int_at_least("keyframe_every", self.keyframe_every, 0)

    def codec_settings(self) -> CodecSettings:
        """The payload codec these settings describe."""
        return CodecSettings(
            name=self.codec,
            wire_dtype=self.wire_dtype,
            fraction=self.codec_fraction,
            count=self.codec_count,
            clusters=self.codec_clusters,
            chunk=self.codec_chunk,
        )


def _fail(field: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(f"{CONFIG_PREFIX}.{field}", value, allowed)


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(field: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(field, value, f"an integer >= {low}")


def _positive_seconds(field: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        _fail(field, value, "a finite number of seconds > 0")


_VALIDATED: weakref.WeakValueDictionary[int, CoreConfig] = weakref.WeakValueDictionary()
"""The config objects that passed :meth:`CoreConfig.validate`, by ``id``."""
