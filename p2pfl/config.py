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
    optimizer = "sgd"                # sgd | adam | adamw | sam (rho = 0.05: SAM ascent radius)
    lr = 0.1
    momentum = 0.0                   # sgd; nesterov = true for Nesterov momentum
    weight_decay = 0.0
    # betas = [0.9, 0.999], eps = 1e-8 (adam, adamw)
    lr_schedule = "constant"         # constant | step (lr_step_size, lr_gamma) | cosine (lr_min)
    optimizer_state = "keep"         # keep | reset (dropped when a merge changed the model)
    batch_size = 32

    [protocol]                       # the keys of p2pfl.protocol.CoreConfig: a scenario's
                                     #   [protocol] keys plus rounds, local_steps,
                                     #   replay_window and server
    mode = "dsgd"                    # dsgd | gossip | modest | fedavg | spsa (or a plug-in's)
    # server = "<64 hex>"            # fedavg: the server's key, the same on every node; a
                                     #   client lists the server in [[peers]], the server
                                     #   lists its clients
    rounds = 20                      # 1 .. 10**9 (protocol.config.MAX_ROUNDS)
    local_steps = 20
    round_timeout = 10.0             # default 30.0
    # period, period_jitter, fanout, wire_dtype, max_rounds_ahead, replay_window,
    # peer_sampling ("neighbours" | "membership"), history_gossip, history_lambda,
    # history_capacity, and modest's sample_size, aggregators, success_fraction, min_models,
    # ping_timeout, aggregation_timeout, ack_timeout, inactivity_threshold, view_entries,
    # view_capacity, announce_join, and spsa's spsa_samples, spsa_eps, spsa_lr, spsa_clip,
    # spsa_salt (all: p2pfl.protocol.ProtocolSettings)
    # gossip_steps = 1               # dsgd: exchanges and merges per round (DFedSAM-MGS's Q)
    # merge_trigger = "count"        # gossip: "time" merges every merge_interval s (FedFix-style)
    # codec = "dense"                # dense | int8 | topk | fedzip (p2pfl.codec.CODECS), with
                                     #   codec_fraction, codec_count, codec_clusters,
                                     #   codec_chunk, error_feedback, keyframe_every

    [merge]
    rule = "weighted"                # a name in p2pfl.merge.MERGE_RULES
    [merge.params]                   # keyword arguments of the rule

Every table is a strict pydantic model (:class:`p2pfl.schema.Strict`), the same rules a
scenario follows; ``[learner]`` and ``[protocol]`` are the scenario's own schemas
(:class:`~p2pfl.learn.LearnerSettings`, :class:`~p2pfl.protocol.CoreConfig`). Every mistake
(unknown key, wrong type, bad value, missing file) raises :class:`~p2pfl.errors.ConfigError`
whose one-line message names the dotted key, e.g.
``protocol.mode = 'gosip': one of dsgd, fedavg, gossip, modest, spsa``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

from pydantic import ConfigDict, Field, ValidationError, field_validator

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.learn.settings import LearnerSettings
from p2pfl.protocol.config import CoreConfig
from p2pfl.schema import Seconds, Strict, Unit, config_error, registered

LearnerConfig = LearnerSettings
"""The ``[learner]`` table: the same schema as a scenario's (:mod:`p2pfl.learn.settings`)."""

if TYPE_CHECKING:
    from p2pfl.learn import TorchLearner
    from p2pfl.merge import MergeRule

_TABLES = ("node", "peers", "bootstrap", "data", "learner", "protocol", "merge")
_Part = TypeVar("_Part", bound=Strict)
FramesPerSecond = Annotated[float, Field(gt=0.0), Unit("frames per second")]


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A configured neighbour: where to reach it and the key it must prove."""

    host: str
    port: int
    node_id: NodeId

    @property
    def address(self) -> str:
        return _format_address(self.host, self.port)


def _datasets() -> Collection[str]:
    from p2pfl.learn.datasets import DATASETS

    return DATASETS


def _partitions() -> Collection[str]:
    from p2pfl.learn.partition import PARTITIONS

    return PARTITIONS


Dataset = Annotated[str, registered(_datasets)]


class DataConfig(Strict):
    """The ``[data]`` table: dataset, partition and this node's share."""

    dataset: Dataset = "digits"
    params: dict[str, Any] = Field(default_factory=dict)
    partition: Annotated[str, registered(_partitions)] = "iid"
    partition_params: dict[str, Any] = Field(default_factory=dict)
    num_nodes: int = Field(default=1, ge=1)
    node_index: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)


class MergeConfig(Strict):
    """The ``[merge]`` table: a merge rule by name and its parameters."""

    rule: str = "weighted"
    params: dict[str, Any] = Field(default_factory=dict)


class LimitsConfig(Strict):
    """Bounds that keep a node alive under hostile traffic (keys of ``[node]``)."""

    max_peers: int = Field(default=32, ge=1)
    max_handshakes: int = Field(default=16, ge=1)
    max_frame_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    peer_message_rate: FramesPerSecond = 20.0
    peer_message_burst: int = Field(default=40, ge=1)
    idle_timeout: Seconds = 60.0
    strikes_to_ban: int = Field(default=3, ge=1)
    ban_interval: Seconds = 300.0
    ip_failures_to_ban: int = Field(default=10, ge=0)
    ip_failure_window: Seconds = 60.0
    max_bans: int = Field(default=1024, ge=1)


class PeerExchangeConfig(Strict):
    """Peer exchange settings (keys of ``[node]``, named there as the aliases say)."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    enabled: bool = Field(default=True, alias="peer_exchange")
    interval: Seconds = Field(default=30.0, alias="peer_exchange_interval")
    max_per_message: int = Field(default=32, ge=1, alias="peer_exchange_max_per_message")
    max_known_peers: int = Field(default=256, ge=0)
    accept_unknown_peers: bool = False


class NodeTable(LimitsConfig, PeerExchangeConfig):
    """The ``[node]`` table: where the node listens, its key, its timeouts, and the keys of
    :class:`LimitsConfig` and :class:`PeerExchangeConfig`."""

    listen: str
    key_file: str
    checkpoint_dir: str | None = None
    startup_timeout: Seconds = 30.0
    send_queue: int = Field(default=16, ge=1)
    handshake_timeout: Seconds = 10.0
    status_listen: str | None = None
    status_allow_remote: bool = False

    @field_validator("listen", "status_listen")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is not None:
            _split_address(address)
        return address


class PeerTable(Strict):
    """One ``[[peers]]`` or ``[[bootstrap]]`` entry; the key is checked when it is read."""

    address: str
    public_key: str | None = None
    public_key_file: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        _split_address(address)
        return address


class DataTable(DataConfig):
    """The ``[data]`` table as a file spells it: the dataset must be named."""

    dataset: Dataset


class NodeFile(Strict):
    """A whole node config file; ``[protocol]`` is read into :class:`CoreConfig` apart."""

    node: NodeTable
    peers: list[PeerTable] = Field(default_factory=list)
    bootstrap: list[PeerTable] = Field(default_factory=list)
    data: DataTable
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    protocol: dict[str, Any] = Field(default_factory=dict)
    merge: MergeConfig = Field(default_factory=MergeConfig)


_NODE_DEFAULTS = NodeTable.model_fields


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one ``p2pfl node`` needs; see the module docstring for the file format."""

    listen_host: str
    listen_port: int
    key_file: Path
    checkpoint_dir: Path | None = None
    startup_timeout: float = _NODE_DEFAULTS["startup_timeout"].default
    send_queue: int = _NODE_DEFAULTS["send_queue"].default
    handshake_timeout: float = _NODE_DEFAULTS["handshake_timeout"].default
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
    try:
        parsed = NodeFile.model_validate(dict(document))
    except ValidationError as exc:
        raise config_error(exc, NodeFile, elide_tables=False) from None
    import p2pfl.protocol  # noqa: F401  (registers the protocol modes)

    protocol = CoreConfig(**parsed.protocol)
    node = parsed.node
    listen_host, listen_port = _split_address(node.listen)
    key_file = base_dir / node.key_file
    if key_file.is_dir():
        _fail(
            "node.key_file",
            str(key_file),
            "a private key file (made by `p2pfl keygen --out FILE`), not a directory",
        )
    status_host: str | None = None
    status_port = 0
    if node.status_listen is not None:
        status_host, status_port = _split_address(node.status_listen)
        if not node.status_allow_remote and not _is_loopback(status_host):
            _fail(
                "node.status_listen",
                node.status_listen,
                "a loopback address such as '127.0.0.1:9101' "
                "(or set node.status_allow_remote = true)",
            )
    peers = _read_peers(parsed.peers, base_dir, "peers")
    bootstrap = _read_peers(parsed.bootstrap, base_dir, "bootstrap")
    if node.max_peers < len(peers):
        _fail(
            "node.max_peers",
            node.max_peers,
            f"an integer >= the number of [[peers]] ({len(peers)})",
        )
    config = NodeConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        key_file=key_file,
        checkpoint_dir=None if node.checkpoint_dir is None else base_dir / node.checkpoint_dir,
        startup_timeout=node.startup_timeout,
        send_queue=node.send_queue,
        handshake_timeout=node.handshake_timeout,
        status_host=status_host,
        status_port=status_port,
        limits=_part(LimitsConfig, node),
        peer_exchange=_part(PeerExchangeConfig, node),
        peers=peers,
        bootstrap=bootstrap,
        data=_read_data(parsed.data, base_dir),
        learner=parsed.learner,
        protocol=protocol,
        merge=parsed.merge,
        source=source,
    )
    config.build_merge()
    return config


def _part(model: type[_Part], table: NodeTable) -> _Part:
    """The settings of ``model`` among the keys of the ``[node]`` table."""
    return model.model_validate({name: getattr(table, name) for name in model.model_fields})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_peers(tables: list[PeerTable], base_dir: Path, section: str) -> tuple[PeerConfig, ...]:
    peers: list[PeerConfig] = []
    for index, table in enumerate(tables):
        name = f"{section}[{index}]"
        host, port = _split_address(table.address)
        key_hex, key_file = table.public_key, table.public_key_file
        if (key_hex is None) == (key_file is None):
            _fail(
                f"{name}.public_key",
                key_hex,
                "exactly one of public_key (64 hex characters) or public_key_file",
            )
        if key_file is not None:
            path = base_dir / key_file
            try:
                key_hex = path.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                _fail(
                    f"{name}.public_key_file",
                    str(path),
                    "a readable file holding a hex public key (made by `p2pfl keygen`)",
                )
            node_id = NodeId.from_hex(key_hex, key=f"{name}.public_key_file")
        else:
            assert key_hex is not None  # exactly one of the two is set
            node_id = NodeId.from_hex(key_hex, key=f"{name}.public_key")
        if any(p.node_id == node_id for p in peers):
            _fail(f"{name}.public_key", node_id.hex(), f"a key no other [[{section}]] entry has")
        peers.append(PeerConfig(host=host, port=port, node_id=node_id))
    return tuple(peers)


def _read_data(table: DataTable, base_dir: Path) -> DataConfig:
    from p2pfl.learn._config import check_params
    from p2pfl.learn.datasets import DATASETS, PATH_PARAMS
    from p2pfl.learn.partition import FIXED_ARGUMENTS, PARTITIONS

    params = dict(table.params)
    check_params("data.params", f"dataset {table.dataset!r}", DATASETS[table.dataset], params)
    for key in PATH_PARAMS & set(params):
        if not isinstance(params[key], str):
            _fail(f"data.params.{key}", params[key], "a path (string)")
        params[key] = str(base_dir / Path(params[key]).expanduser())
    check_params(
        "data.partition_params",
        f"partition {table.partition!r}",
        PARTITIONS[table.partition],
        table.partition_params,
        fixed=FIXED_ARGUMENTS,
    )
    if table.node_index >= table.num_nodes:
        _fail(
            "data.node_index",
            table.node_index,
            f"an integer in [0, {table.num_nodes}) (data.num_nodes)",
        )
    return DataConfig.model_validate({**table.model_dump(), "params": params})


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


def _split_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:7101`` for IPv6) as its host and port.

    Raises:
        ValueError: not of that form, or the port is outside 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("host:port with a port in 0..65535 (e.g. '127.0.0.1:7101')")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(key, value, allowed)
