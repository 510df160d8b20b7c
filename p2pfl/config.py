"""A node's configuration: one TOML file, checked key by key.

Schema (every relative path is relative to the directory of the config file)::

    [node]
    listen = "127.0.0.1:7101"        # required; host:port to accept peers on ("[::1]:7101" for IPv6)
    key_file = "node1.key"           # required; private key made by `p2pfl keygen --out node1.key`
    checkpoint_dir = "state/node1"   # optional; where the model is checkpointed after every round
    startup_timeout = 30.0           # seconds to wait for all peers before the first round
    send_queue = 16                  # frames queued per peer before the oldest is dropped
    handshake_timeout = 10.0         # seconds a peer has to complete the handshake
    status_listen = "127.0.0.1:9101" # optional; Prometheus text on GET /metrics (`p2pfl status`)
    status_allow_remote = false      # status_listen may name a non-loopback address only if true

    # limits (see README, "Operate a node"); the defaults suit a handful of peers
    max_peers = 32                   # authenticated connections; >= the number of [[peers]]
    max_handshakes = 16              # unauthenticated connections at once; more are closed at once
    max_frame_bytes = 67108864       # largest frame read from a peer (64 MiB)
    peer_message_rate = 20.0         # frames per second per peer (token bucket) ...
    peer_message_burst = 40          # ... with this burst, on top of what the protocol sends
                                     # per round and per period; each frame over it is a strike
    idle_timeout = 60.0              # no frame for this long drops a peer (keep-alives at 1/3)
    strikes_to_ban = 3               # strikes within 10 minutes that ban a peer's key
    ban_interval = 300.0             # seconds a ban lasts (bans are kept in memory only)
    ip_failures_to_ban = 10          # failed handshakes from one IP within ip_failure_window
    ip_failure_window = 60.0         #   that ban the IP; 0 never bans an IP
    max_bans = 1024                  # bans remembered per kind (key, IP); soonest-ending evicted

    # peer exchange (see p2pfl/runtime/peerx.py)
    peer_exchange = true             # advertise connected peers to neighbours, learn theirs
    peer_exchange_interval = 30.0    # seconds between advertisements
    peer_exchange_max_per_message = 32
    max_known_peers = 256            # learned peers remembered (oldest forgotten)
    accept_unknown_peers = false     # connect to learned peers and accept peers not in [[peers]]

    [[peers]]                        # one table per neighbour
    address = "127.0.0.1:7102"       # required
    public_key_file = "node2.pub"    # the neighbour's key, as `p2pfl keygen` writes it,
    # public_key = "<64 hex>"        #   or inline; exactly one of the two

    [[bootstrap]]                    # optional; other nodes this one may reach, same keys as
    address = "127.0.0.1:7103"       #   [[peers]]; modes that talk beyond their neighbours
    public_key = "<64 hex>"          #   (modest, gossip with peer_sampling = "membership")
                                     #   start their view with them and dial them on demand

    [data]
    dataset = "digits"               # a name in p2pfl.learn.DATASETS: digits | gaussian_mixture |
                                     #   mnist1d | synthetic_leaf | npz | torchvision | hf
    partition = "dirichlet"          # a name in p2pfl.learn.PARTITIONS: iid | dirichlet | shards |
                                     #   quantity_skew | natural (datasets with owners)
    num_nodes = 3                    # nodes sharing the training set
    node_index = 0                   # this node's share, in [0, num_nodes)
    seed = 1                         # the run seed; the same on every node
    test_fraction = 0.2              # share held out as the common test set
    [data.params]                    # keyword arguments of the dataset builder (gaussian_mixture:
                                     #   n_samples, dim, num_classes, separation; npz: path;
                                     #   torchvision: name, root; see README "Datasets");
                                     #   path and root are relative to this file
    [data.partition_params]          # keyword arguments of the partition (dirichlet: alpha, ...)
    alpha = 0.5

    [learner]                        # the keys of a scenario's [learner] (p2pfl.learn.settings)
    model = "mlp"                    # mlp | cnn1d | lenet5 | cifar_cnn | "python:package.module:factory"
    hidden = [32]                    # mlp only: hidden layer sizes ([] is a linear model)
    # model_params = { channels = [32, 32, 32] }   # the model factory's keyword arguments
    optimizer = "sgd"                # sgd | adam | adamw
    lr = 0.1
    momentum = 0.0                   # sgd; nesterov = true for Nesterov momentum
    weight_decay = 0.0
    # betas = [0.9, 0.999], eps = 1e-8 (adam, adamw)
    lr_schedule = "constant"         # constant | step (lr_step_size, lr_gamma) | cosine (lr_min)
    optimizer_state = "keep"         # keep | reset (dropped when a merge changed the model)
    batch_size = 32

    [protocol]                       # the fields of p2pfl.protocol.CoreConfig
    mode = "dsgd"                    # dsgd | gossip | modest | fedavg (or a plug-in's)
    # server = "<64 hex>"            # fedavg: the server's key, the same on every node; a
                                     #   client lists the server in [[peers]], the server
                                     #   lists its clients
    rounds = 20                      # 1 .. 10**9 (protocol.config.MAX_ROUNDS)
    local_steps = 20
    round_timeout = 10.0
    # period, period_jitter, fanout, wire_dtype, max_rounds_ahead, replay_window,
    # peer_sampling ("neighbours" | "membership"), history_gossip, history_lambda,
    # history_capacity, and modest's sample_size, aggregators, success_fraction, min_models,
    # ping_timeout, aggregation_timeout, ack_timeout, inactivity_threshold, view_entries, ...
    # codec = "dense"                # dense | int8 | topk | fedzip (p2pfl.codec.CODECS), with
                                     #   codec_fraction, codec_count, codec_clusters,
                                     #   codec_chunk, error_feedback, keyframe_every

    [merge]
    rule = "weighted"                # a name in p2pfl.merge.MERGE_RULES
    [merge.params]                   # keyword arguments of the rule

Every mistake (unknown key, wrong type, bad value, missing file) raises
:class:`~p2pfl.errors.ConfigError` whose one-line message names the dotted key, e.g.
``protocol.mode = 'gosip': one of dsgd, fedavg, gossip, modest``.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.learn.settings import LearnerSettings
from p2pfl.protocol.config import CoreConfig

LearnerConfig = LearnerSettings
"""The ``[learner]`` table: the same schema as a scenario's (:mod:`p2pfl.learn.settings`)."""

if TYPE_CHECKING:
    from p2pfl.learn import TorchLearner
    from p2pfl.merge import MergeRule

_MISSING: Any = object()
_TABLES = ("node", "peers", "bootstrap", "data", "learner", "protocol", "merge")


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A configured neighbour: where to reach it and the key it must prove."""

    host: str
    port: int
    node_id: NodeId

    @property
    def address(self) -> str:
        return _format_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class DataConfig:
    """The ``[data]`` table: dataset, partition and this node's share."""

    dataset: str = "digits"
    params: Mapping[str, Any] = field(default_factory=dict)
    partition: str = "iid"
    partition_params: Mapping[str, Any] = field(default_factory=dict)
    num_nodes: int = 1
    node_index: int = 0
    seed: int = 0
    test_fraction: float = 0.2


@dataclass(frozen=True, slots=True)
class MergeConfig:
    """The ``[merge]`` table: a merge rule by name and its parameters."""

    rule: str = "weighted"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds that keep a node alive under hostile traffic (keys of ``[node]``)."""

    max_peers: int = 32
    max_handshakes: int = 16
    max_frame_bytes: int = 64 * 1024 * 1024
    peer_message_rate: float = 20.0
    peer_message_burst: int = 40
    idle_timeout: float = 60.0
    strikes_to_ban: int = 3
    ban_interval: float = 300.0
    ip_failures_to_ban: int = 10
    ip_failure_window: float = 60.0
    max_bans: int = 1024


@dataclass(frozen=True, slots=True)
class PeerExchangeConfig:
    """Peer exchange settings (keys of ``[node]``)."""

    enabled: bool = True
    interval: float = 30.0
    max_per_message: int = 32
    max_known_peers: int = 256
    accept_unknown_peers: bool = False


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one ``p2pfl node`` needs; see the module docstring for the file format."""

    listen_host: str
    listen_port: int
    key_file: Path
    checkpoint_dir: Path | None = None
    startup_timeout: float = 30.0
    send_queue: int = 16
    handshake_timeout: float = 10.0
    status_host: str | None = None
    status_port: int = 0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    peer_exchange: PeerExchangeConfig = field(default_factory=PeerExchangeConfig)
    peers: tuple[PeerConfig, ...] = ()
    bootstrap: tuple[PeerConfig, ...] = ()
    """Nodes beyond the neighbours: known to membership-based modes, dialled on demand."""
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    protocol: CoreConfig = field(default_factory=CoreConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    source: Path | None = None

    @property
    def listen(self) -> str:
        return _format_address(self.listen_host, self.listen_port)

    @property
    def status_listen(self) -> str | None:
        """``host:port`` of the status endpoint, or ``None`` when it is off."""
        if self.status_host is None:
            return None
        return _format_address(self.status_host, self.status_port)

    def build_learner(self) -> TorchLearner:
        """This node's learner (dataset, partition, model) as the config describes it.

        Raises:
            ConfigError: a value is out of range; the key is named as in the config file.
            ImportError: the dataset needs an optional dependency that is missing.
        """
        from p2pfl.learn import build_node_learner

        data, learner = self.data, self.learner
        try:
            return build_node_learner(
                data.dataset,
                data.params,
                data.partition,
                data.partition_params,
                data.num_nodes,
                data.node_index,
                learner.model,
                None,
                learner.batch_size,
                data.seed,
                data.test_fraction,
                model_params=learner.model_parameters(),
                optimizer=learner.optimizer_settings(self.protocol.rounds),
            )
        except ConfigError as exc:
            raise ConfigError(_learner_key(exc.key, data), exc.value, exc.allowed) from exc

    def check_frame_size(self) -> int:
        """Refuse a model whose frames would exceed ``node.max_frame_bytes``, before the
        dataset and model are built (peers would drop every model this node sends).

        Returns:
            The bytes of one model frame.

        Raises:
            ConfigError: the frame is larger than ``node.max_frame_bytes``; the message
                names both sizes and the keys to change.
        """
        from p2pfl.sizes import dataset_shape, model_frame_bytes, parameter_count

        try:
            _, sample_shape, classes = dataset_shape(self.data.dataset, self.data.params)
        except ConfigError as exc:
            raise ConfigError(_learner_key(exc.key, self.data), exc.value, exc.allowed) from exc
        learner = self.learner
        try:
            params = parameter_count(
                learner.model, learner.model_parameters(), sample_shape, classes
            )
        except ConfigError as exc:
            raise ConfigError(f"learner.{exc.key}", exc.value, exc.allowed) from None
        protocol = self.protocol
        frame = model_frame_bytes(
            params,
            wire_dtype=protocol.wire_dtype,
            view_entries=protocol.view_entries if protocol.admits_strangers else 0,
        )
        limit = self.limits.max_frame_bytes
        if frame > limit:
            raise ConfigError(
                "node.max_frame_bytes",
                limit,
                f"a model of {params} parameters needs frames of {frame} bytes; raise "
                f"node.max_frame_bytes to at least {frame}, or shrink learner.hidden "
                f"or use protocol.wire_dtype = 'float16'",
            )
        return frame

    def build_merge(self) -> MergeRule:
        """The configured merge rule.

        Raises:
            ConfigError: unknown rule or parameters it does not take.
        """
        from p2pfl.merge import make_merge_rule

        return make_merge_rule(self.merge.rule, key="merge.rule", **dict(self.merge.params))


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read and check a node's TOML config.

    Raises:
        ConfigError: the file is missing or not TOML, or any key is unknown, of the wrong
            type or out of range (the message names the dotted key).
    """
    source = Path(path)
    try:
        with source.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", str(source), "an existing TOML file") from None
    except OSError as exc:
        raise ConfigError("config", str(source), f"a readable file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(source), f"valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "config", str(source), f"a UTF-8 text file (byte {exc.start} is not UTF-8)"
        ) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(
            "config", str(source), "TOML nested a few levels deep, not thousands"
        ) from None
    return config_from_dict(document, base_dir=source.parent, source=source)


def config_from_dict(
    document: Mapping[str, Any], *, base_dir: Path, source: Path | None = None
) -> NodeConfig:
    """Check a parsed config document; relative paths are taken from ``base_dir``.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    for key in document:
        if key not in _TABLES:
            _fail(key, document[key], f"not a section; sections are {', '.join(_TABLES)}")
    node = _Table(document, "node", required=True)
    listen_host, listen_port = _parse_address("node.listen", node.get("listen", str))
    key_file = base_dir / node.get("key_file", str)
    if key_file.is_dir():
        _fail(
            "node.key_file",
            str(key_file),
            "a private key file (made by `p2pfl keygen --out FILE`), not a directory",
        )
    checkpoint_raw = node.get("checkpoint_dir", str, None)
    checkpoint_dir = None if checkpoint_raw is None else base_dir / checkpoint_raw
    startup_timeout = node.seconds("startup_timeout", 30.0)
    send_queue = node.integer("send_queue", 16, minimum=1)
    handshake_timeout = node.seconds("handshake_timeout", 10.0)
    status_raw = node.get("status_listen", str, None)
    status_remote = node.get("status_allow_remote", bool, False)
    status_host: str | None = None
    status_port = 0
    if status_raw is not None:
        status_host, status_port = _parse_address("node.status_listen", status_raw)
        if not status_remote and not _is_loopback(status_host):
            _fail(
                "node.status_listen",
                status_raw,
                "a loopback address such as '127.0.0.1:9101' "
                "(or set node.status_allow_remote = true)",
            )
    limits = _parse_limits(node)
    exchange = PeerExchangeConfig(
        enabled=node.get("peer_exchange", bool, True),
        interval=node.seconds("peer_exchange_interval", 30.0),
        max_per_message=node.integer("peer_exchange_max_per_message", 32, minimum=1),
        max_known_peers=node.integer("max_known_peers", 256, minimum=0),
        accept_unknown_peers=node.get("accept_unknown_peers", bool, False),
    )
    node.finish()

    peers = _parse_peers(document.get("peers", []), base_dir)
    bootstrap = _parse_peers(document.get("bootstrap", []), base_dir, section="bootstrap")
    if limits.max_peers < len(peers):
        _fail(
            "node.max_peers",
            limits.max_peers,
            f"an integer >= the number of [[peers]] ({len(peers)})",
        )
    data = _parse_data(_Table(document, "data", required=True), base_dir)
    learner = _parse_learner(_Table(document, "learner"))
    protocol = _parse_protocol(_Table(document, "protocol"))
    merge_table = _Table(document, "merge")
    merge = MergeConfig(
        rule=merge_table.get("rule", str, "weighted"),
        params=merge_table.table("params"),
    )
    merge_table.finish()
    config = NodeConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        key_file=key_file,
        checkpoint_dir=checkpoint_dir,
        startup_timeout=startup_timeout,
        send_queue=send_queue,
        handshake_timeout=handshake_timeout,
        status_host=status_host,
        status_port=status_port,
        limits=limits,
        peer_exchange=exchange,
        peers=peers,
        bootstrap=bootstrap,
        data=data,
        learner=learner,
        protocol=protocol,
        merge=merge,
        source=source,
    )
    config.build_merge()
    return config


def _parse_limits(node: _Table) -> LimitsConfig:
    rate = node.number("peer_message_rate", 20.0)
    if rate <= 0:
        _fail(node.key("peer_message_rate"), rate, "a number of frames per second > 0")
    return LimitsConfig(
        max_peers=node.integer("max_peers", 32, minimum=1),
        max_handshakes=node.integer("max_handshakes", 16, minimum=1),
        max_frame_bytes=node.integer("max_frame_bytes", 64 * 1024 * 1024, minimum=4096),
        peer_message_rate=rate,
        peer_message_burst=node.integer("peer_message_burst", 40, minimum=1),
        idle_timeout=node.seconds("idle_timeout", 60.0),
        strikes_to_ban=node.integer("strikes_to_ban", 3, minimum=1),
        ban_interval=node.seconds("ban_interval", 300.0),
        ip_failures_to_ban=node.integer("ip_failures_to_ban", 10, minimum=0),
        ip_failure_window=node.seconds("ip_failure_window", 60.0),
        max_bans=node.integer("max_bans", 1024, minimum=1),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Table:
    """One TOML table being read: typed getters that name ``prefix.key`` in errors."""

    def __init__(self, document: Mapping[str, Any], name: str, *, required: bool = False) -> None:
        raw = document.get(name, _MISSING)
        if raw is _MISSING:
            if required:
                _fail(name, None, f"a [{name}] section (required)")
            raw = {}
        if not isinstance(raw, dict):
            _fail(name, raw, f"a [{name}] table")
        self.name = name
        self.raw: dict[str, Any] = raw
        self.used: list[str] = []

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        self.used.append(key)
        value = self.raw.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                _fail(self.key(key), None, f"a {_type_name(kind)} (required)")
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            _fail(self.key(key), value, f"a {_type_name(kind)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 0) -> int:
        value: int = self.get(key, int, default)
        if value < minimum:
            _fail(self.key(key), value, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        self.used.append(key)
        value = self.raw.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                _fail(self.key(key), None, "a number (required)")
            return float(default)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            _fail(self.key(key), value, "a finite number")
        return float(value)

    def seconds(self, key: str, default: float) -> float:
        value = self.number(key, default)
        if value <= 0:
            _fail(self.key(key), value, "a number of seconds > 0")
        return value

    def table(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = self.get(key, dict, {})
        return dict(value)

    def finish(self, allowed: tuple[str, ...] | None = None) -> None:
        names = tuple(self.used) if allowed is None else allowed
        for key, value in self.raw.items():
            if key not in names:
                _fail(
                    self.key(key), value, f"not a key of [{self.name}]; keys are {', '.join(names)}"
                )


def _parse_peers(raw: object, base_dir: Path, *, section: str = "peers") -> tuple[PeerConfig, ...]:
    if not isinstance(raw, list):
        _fail(section, raw, f"an array of [[{section}]] tables")
    peers: list[PeerConfig] = []
    for index, entry in enumerate(raw):
        name = f"{section}[{index}]"
        table = _Table({name: entry}, name)
        host, port = _parse_address(table.key("address"), table.get("address", str))
        key_hex = table.get("public_key", str, None)
        key_file = table.get("public_key_file", str, None)
        table.finish()
        if (key_hex is None) == (key_file is None):
            _fail(
                table.key("public_key"),
                key_hex,
                "exactly one of public_key (64 hex characters) or public_key_file",
            )
        if key_file is not None:
            path = base_dir / key_file
            try:
                key_hex = path.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                _fail(
                    table.key("public_key_file"),
                    str(path),
                    "a readable file holding a hex public key (made by `p2pfl keygen`)",
                )
            node_id = NodeId.from_hex(key_hex, key=table.key("public_key_file"))
        else:
            node_id = NodeId.from_hex(key_hex, key=table.key("public_key"))
        if any(p.node_id == node_id for p in peers):
            _fail(table.key("public_key"), node_id.hex(), f"a key no other [[{section}]] entry has")
        peers.append(PeerConfig(host=host, port=port, node_id=node_id))
    return tuple(peers)


def _parse_data(table: _Table, base_dir: Path) -> DataConfig:
    from p2pfl.learn.datasets import DATASETS, PATH_PARAMS
    from p2pfl.learn.partition import FIXED_ARGUMENTS, PARTITIONS

    dataset = table.get("dataset", str)
    if dataset not in DATASETS:
        _fail(table.key("dataset"), dataset, f"one of {', '.join(sorted(DATASETS))}")
    partition = table.get("partition", str, "iid")
    if partition not in PARTITIONS:
        _fail(table.key("partition"), partition, f"one of {', '.join(sorted(PARTITIONS))}")
    params = table.table("params")
    partition_params = table.table("partition_params")
    _check_params("data.params", params, DATASETS[dataset], fixed=())
    for key in PATH_PARAMS & set(params):
        if not isinstance(params[key], str):
            _fail(f"data.params.{key}", params[key], "a path (string)")
        params[key] = str(base_dir / Path(params[key]).expanduser())
    _check_params(
        "data.partition_params",
        partition_params,
        PARTITIONS[partition],
        fixed=FIXED_ARGUMENTS,
    )
    num_nodes = table.integer("num_nodes", 1, minimum=1)
    node_index = table.integer("node_index", 0, minimum=0)
    if node_index >= num_nodes:
        _fail(
            table.key("node_index"), node_index, f"an integer in [0, {num_nodes}) (data.num_nodes)"
        )
    seed = table.integer("seed", 0, minimum=0)
    test_fraction = table.number("test_fraction", 0.2)
    if not 0 < test_fraction < 1:
        _fail(table.key("test_fraction"), test_fraction, "a number strictly between 0 and 1")
    table.finish()
    return DataConfig(
        dataset=dataset,
        params=params,
        partition=partition,
        partition_params=partition_params,
        num_nodes=num_nodes,
        node_index=node_index,
        seed=seed,
        test_fraction=test_fraction,
    )


def _check_params(prefix: str, params: Mapping[str, Any], fn: Any, fixed: tuple[str, ...]) -> None:
    signature = inspect.signature(fn)
    accepted = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed
    ]
    for key, value in params.items():
        if key not in accepted:
            allowed = ", ".join(accepted) if accepted else "none"
            _fail(f"{prefix}.{key}", value, f"not a parameter; parameters are {allowed}")


def _parse_learner(table: _Table) -> LearnerSettings:
    from p2pfl.learn.settings import parse_learner_settings

    return parse_learner_settings(table.raw, prefix=table.name)


def _parse_protocol(table: _Table) -> CoreConfig:
    import p2pfl.protocol  # noqa: F401  (registers the protocol modes)

    fields = {f.name: f.default for f in dataclasses.fields(CoreConfig)}
    table.finish(tuple(fields))
    values: dict[str, Any] = {}
    for key, value in table.raw.items():
        default = fields[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    config = CoreConfig(**values)
    try:
        config.validate()
    except ConfigError as exc:
        key = exc.key if exc.key.startswith("protocol.") else f"protocol.{exc.key}"
        raise ConfigError(key, exc.value, exc.allowed) from None
    return config


_LEARNER_KEYS = {
    "dataset": "data.dataset",
    "partition": "data.partition",
    "num_nodes": "data.num_nodes",
    "n": "data.num_nodes",
    "node_index": "data.node_index",
    "seed": "data.seed",
    "test_fraction": "data.test_fraction",
    "layer_sizes": "learner.hidden",
    "rounds": "protocol.rounds",
}


def _learner_key(key: str, data: DataConfig) -> str:
    """Name a key reported by ``p2pfl.learn`` as it is spelled in the config file."""
    if key.startswith("data."):  # already spelled as in the file
        return key
    head, _, rest = key.partition(".")
    if head in LearnerSettings.model_fields:
        return f"learner.{key}"
    if head == "dataset_params" and rest:
        return f"data.params.{rest}"
    if head == "partition_params" and rest:
        return f"data.partition_params.{rest}"
    if key in data.partition_params:
        return f"data.partition_params.{key}"
    if key in data.params:
        return f"data.params.{key}"
    return _LEARNER_KEYS.get(key, f"data.{key}")


def _parse_address(key: str, text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        _fail(key, text, "host:port with a port in 0..65535 (e.g. '127.0.0.1:7101')")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _type_name(kind: type) -> str:
    return {
        str: "string",
        int: "integer",
        float: "number",
        list: "list",
        dict: "table",
        bool: "boolean (true or false)",
    }.get(kind, kind.__name__)


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(key, value, allowed)
