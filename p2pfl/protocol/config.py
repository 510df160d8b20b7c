"""The settings of a protocol core: one schema for a scenario's ``[protocol]`` table and a
node config's.

:class:`ProtocolSettings` holds the keys both share, each declared once with its type, its
default and its allowed range; ``sim.scenario.ProtocolSpec`` is it (plus any simulator-only
key), and :class:`CoreConfig`, what a core is built from and what a node's ``[protocol]``
table is read into, adds the keys a scenario spells elsewhere (``rounds``, ``local_steps``)
or the simulator fills in (``server``, ``replay_window``).

To add a protocol key, add one annotated field to :class:`ProtocolSettings` (with a
``Field(...)`` bound, or a validator when a registry decides) and document it in
:class:`CoreConfig`'s attributes: scenarios, node configs and cores all take it from there.

``round_timeout`` defaults to 30 s everywhere: long enough for a real device's slowest
neighbour to train and send (a timeout too short silently drops its models, a cost no log
shows), where a too-long wait only delays a round after a silent failure. Shipped scenarios
that want a faster virtual round set ``round_timeout = 5.0``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from p2pfl.codec import CODECS, DENSE, MAX_CLUSTERS, WIRE_DTYPES, CodecSettings
from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.protocol.compression import DELTA_MODES
from p2pfl.protocol.core import MODE_TRAITS, PROTOCOL_MODES
from p2pfl.protocol.membership import MAX_RECORDS_PER_MESSAGE
from p2pfl.protocol.timed import MERGE_TRIGGERS
from p2pfl.schema import Seconds, Strict, config_error, registered

PEER_SAMPLING = ("neighbours", "membership")
"""The values of ``protocol.peer_sampling``."""

MAX_ROUNDS = 10**9
"""The most rounds a run may ask for (nodes and scenarios alike): far beyond any real run,
and far below the wire's round field (``wire.MAX_ROUND``) however far ahead peers run."""

MAX_GOSSIP_STEPS = 1000
"""The most dsgd gossip steps per round (``rounds * gossip_steps`` stays far below the wire's
round field)."""
MAX_SPSA_SAMPLES = 255
"""The most one-byte projections an ``spsa`` step message carries (its payload bound)."""

CONFIG_PREFIX = "protocol"
"""Config keys in errors are named ``protocol.<field>``, as in a scenario file."""


class ProtocolSettings(Strict):
    """The ``[protocol]`` keys scenarios and node configs share (see :class:`CoreConfig`)."""

    mode: Annotated[str, registered(lambda: PROTOCOL_MODES)] = "dsgd"
    round_timeout: Seconds = 30.0
    period: Seconds = 1.0
    period_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    fanout: int = Field(default=1, ge=1)
    wire_dtype: Annotated[str, registered(lambda: WIRE_DTYPES)] = "float32"
    max_rounds_ahead: int = Field(default=4, ge=0)
    # modest (p2pfl.protocol.modest; defaults as in the MoDeST reference)
    sample_size: int = Field(default=10, ge=1)
    sample_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    aggregators: int = Field(default=1, ge=1)
    success_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    min_models: int = Field(default=3, ge=1)
    ping_timeout: Seconds = 5.0
    aggregation_timeout: Seconds = 300.0
    ack_timeout: Seconds = 320.0
    inactivity_threshold: int = Field(default=50, ge=1)
    view_entries: int = Field(default=16, ge=1, le=MAX_RECORDS_PER_MESSAGE)
    view_capacity: int = Field(default=4096, ge=1)
    announce_join: bool = True
    peer_sampling: Literal["neighbours", "membership"] = "neighbours"
    # SybilWall history gossip (p2pfl.protocol.histories): unset = on for sybilwall rules
    history_gossip: bool | None = None
    history_lambda: float = Field(default=0.8, gt=0.0)
    history_capacity: int = Field(default=32, ge=1)
    # DFedSAM-MGS: exchanges and merges per dsgd round (p2pfl.protocol.dsgd); 1 = plain dsgd
    gossip_steps: int = Field(default=1, ge=1, le=MAX_GOSSIP_STEPS)
    # gossip: merge when models arrive ("count") or every merge_interval s ("time", FedFix-style)
    merge_trigger: Annotated[str, registered(lambda: MERGE_TRIGGERS)] = "count"
    merge_interval: Seconds = 1.0
    # compressed updates (p2pfl.codec, p2pfl.protocol.compression): the codec, its parameters
    codec: Annotated[str, registered(lambda: CODECS)] = DENSE
    codec_fraction: float = Field(default=0.01, gt=0.0, le=1.0)
    codec_count: int = Field(default=0, ge=0)
    codec_clusters: int = Field(default=3, ge=1, le=MAX_CLUSTERS)
    codec_chunk: int = Field(default=4096, ge=1)
    error_feedback: bool = True
    keyframe_every: int = Field(default=20, ge=0)

    @field_validator("codec")
    @classmethod
    def _codec_fits_mode(cls, codec: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode")
        found = CODECS.get(codec)
        if found is None:
            return codec  # refused by registered()
        if codec != DENSE and mode == "modest":
            raise ValueError("'dense' with mode 'modest' (it seals its own messages)")
        if found.delta and mode not in DELTA_MODES:
            allowed = ", ".join(name for name, c in sorted(CODECS.items()) if not c.delta)
            raise ValueError(
                f"one of {allowed} with mode {mode!r} (a delta codec needs a mode that sends "
                f"every model to every neighbour: {', '.join(DELTA_MODES)})"
            )
        return codec

    @field_validator("gossip_steps")
    @classmethod
    def _steps_for_dsgd(cls, steps: int, info: ValidationInfo) -> int:
        mode = info.data.get("mode")
        if steps != 1 and mode != "dsgd":
            raise ValueError(f"1 unless mode is dsgd (mode is {mode!r})")
        return steps

    @field_validator("merge_trigger")
    @classmethod
    def _time_trigger_for_gossip(cls, trigger: str, info: ValidationInfo) -> str:
        if trigger == "time":
            mode = info.data.get("mode")
            if mode != "gossip":
                raise ValueError(f"'count' unless mode is gossip (mode is {mode!r})")
            # Data shares are over a fixed neighbour set; a membership view has no such set.
            if info.data.get("peer_sampling") != "neighbours":
                raise ValueError("'count' with peer_sampling 'membership'")
        return trigger

    # spsa (p2pfl.protocol.spsa): one-byte projected gradients over shared randomness
    spsa_samples: int = Field(default=4, ge=1, le=MAX_SPSA_SAMPLES)
    spsa_eps: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    spsa_lr: float = Field(default=0.05, gt=0.0, allow_inf_nan=False)
    spsa_clip: float = Field(default=4.0, gt=0.0, allow_inf_nan=False)
    spsa_salt: int = Field(default=0, ge=0, lt=2**64)

    @field_validator("history_gossip")
    @classmethod
    def _mode_gossips_histories(cls, wanted: bool | None, info: ValidationInfo) -> bool | None:
        # A mode declares whether it can gossip histories (BaseCore.HISTORY_GOSSIP).
        mode = info.data.get("mode")
        if wanted and not getattr(PROTOCOL_MODES.get(str(mode)), "HISTORY_GOSSIP", True):
            raise ValueError(f"false or absent with mode {mode!r}")
        return wanted


class CoreConfig(ProtocolSettings):
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
        merge_trigger: gossip: ``"count"`` (merge whenever models arrived, the default) or
            ``"time"`` (train back to back, push each trained model, merge every
            ``merge_interval`` seconds with FedFix-style unbiased weights:
            :mod:`p2pfl.protocol.timed`).
        merge_interval: gossip with ``merge_trigger = "time"``: seconds between merges.
        gossip_steps: dsgd: exchanges and merges per round after the one training (Q of
            DFedSAM-MGS); 1 is plain dsgd. Every node of a run must use the same value.
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
        spsa_samples: spsa: perturbations (one byte each) a node measures per step, on one
            minibatch each (at most ``MAX_SPSA_SAMPLES``).
        spsa_eps: spsa: the perturbation size ``ε`` of the two-point estimate.
        spsa_lr: spsa: the step size of ``θ ← θ − lr · mean(ĝ z)``.
        spsa_clip: spsa: the quantiser's range: a projection is clipped to ``±spsa_clip`` and
            sent as one of 255 levels.
        spsa_salt: spsa: the run's shared randomness; every node of a run must use the same
            salt, or none can regenerate another's perturbations.
    """

    rounds: int = Field(default=10, ge=1, le=MAX_ROUNDS)
    local_steps: int = Field(default=10, ge=1)
    replay_window: int = Field(default=1024, ge=1)
    server: str = ""

    def __init__(self, **settings: Any) -> None:
        """Check every field: a config object exists only valid (and is frozen).

        Raises:
            ConfigError: naming the first wrong key (e.g. ``protocol.fanout``), its value and
                what is allowed.
        """
        try:
            super().__init__(**settings)
        except ValidationError as exc:
            raise config_error(exc, type(self), prefix=CONFIG_PREFIX) from None

    @classmethod
    def from_settings(cls, settings: ProtocolSettings, **fields: Any) -> CoreConfig:
        """The config of ``settings`` (a scenario's table: only the shared keys are read) with
        ``fields`` (``rounds``, ``local_steps``, ...) added.

        Raises:
            ConfigError: a field is invalid.
        """
        shared = {name: getattr(settings, name) for name in ProtocolSettings.model_fields}
        return cls(**{**shared, **fields})

    def replace(self, **changes: Any) -> CoreConfig:
        """A copy with ``changes``, checked as a new config.

        Raises:
            ConfigError: a changed field is invalid.
        """
        return type(self)(**{**self.model_dump(), **changes})

    @field_validator("server")
    @classmethod
    def _server_key(cls, server: str) -> str:
        if server:
            try:
                NodeId.from_hex(server, key=f"{CONFIG_PREFIX}.server")
            except ConfigError as exc:
                raise ValueError(exc.allowed) from None
        return server

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
