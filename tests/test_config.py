"""Node configs: the loopback example loads, and every mistake names its dotted key in one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from p2pfl.cli import main
from p2pfl.config import load_config
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity
from p2pfl.protocol.config import MAX_ROUNDS, CoreConfig
from p2pfl.wire import MAX_ROUND

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "loopback"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The loopback example with fresh keys, in a temporary directory."""
    work = tmp_path / "loopback"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("*.key", "*.pub", "state"))
    for index in (1, 2, 3):
        Identity.generate().save(work / f"node{index}.key")
        (work / f"node{index}.pub").write_text(
            Identity.load(work / f"node{index}.key").node_id.hex() + "\n"
        )
    return work


def test_loopback_example_loads_with_paths_relative_to_the_file(example: Path) -> None:
    config = load_config(example / "node2.toml")
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 7102)
    assert config.key_file == example / "node2.key"
    assert config.checkpoint_dir == example / "state" / "node2"
    assert config.startup_timeout == 30.0
    assert [p.address for p in config.peers] == ["127.0.0.1:7101", "127.0.0.1:7103"]
    assert config.peers[0].node_id == Identity.load(example / "node1.key").node_id
    assert config.data.dataset == "digits"
    assert config.data.partition == "dirichlet"
    assert config.data.partition_params == {"alpha": 0.5}
    assert (config.data.num_nodes, config.data.node_index) == (3, 1)
    assert config.learner.hidden == [32]
    assert config.protocol.mode == "dsgd"
    assert config.protocol.rounds == 20
    assert config.merge.rule == "weighted"
    config.build_merge()


def test_inline_public_key_and_defaults(example: Path) -> None:
    key = Identity.load(example / "node1.key").node_id.hex()
    path = example / "minimal.toml"
    path.write_text(
        f"""
[node]
listen = "[::1]:0"
key_file = "keys/me.key"
[[peers]]
address = "10.0.0.1:7000"
public_key = "{key}"
[data]
dataset = "gaussian_mixture"
[data.params]
n_samples = 100
dim = 4
num_classes = 2
"""
    )
    config = load_config(path)
    assert (config.listen_host, config.listen_port) == ("::1", 0)
    assert config.key_file == example / "keys" / "me.key"
    assert config.checkpoint_dir is None
    assert config.peers[0].node_id.hex() == key
    assert config.protocol.mode == "dsgd"
    learner = config.build_learner()
    assert learner.num_samples > 0


# (description, regex on node1.toml, replacement, expected message start)
BAD_CASES = [
    (
        "misspelt mode",
        r'mode = "dsgd"',
        'mode = "gosip"',
        "protocol.mode = 'gosip': one of dsgd, fedavg, gossip",
    ),
    (
        "fedavg server not a key",
        r'mode = "dsgd"',
        'mode = "fedavg"\nserver = "abc"',
        "protocol.server = 'abc': a 64-character hex",
    ),
    ("zero rounds", r"rounds = 20", "rounds = 0", "protocol.rounds = 0:"),
    ("rounds as text", r"rounds = 20", 'rounds = "ten"', "protocol.rounds = 'ten':"),
    (
        "unknown protocol key",
        r"round_timeout = 10.0",
        "round_timeout = 10.0\nfanuot = 2",
        "protocol.fanuot = 2:",
    ),
    (
        "listen without port",
        r'listen = "127.0.0.1:7101"',
        'listen = "localhost"',
        "node.listen = 'localhost':",
    ),
    (
        "port out of range",
        r'listen = "127.0.0.1:7101"',
        'listen = "127.0.0.1:70000"',
        "node.listen =",
    ),
    ("missing listen", r'listen = "127.0.0.1:7101"\n', "", "node.listen = None:"),
    (
        "negative startup timeout",
        r"startup_timeout = 30.0",
        "startup_timeout = -1",
        "node.startup_timeout = -1.0:",
    ),
    (
        "unknown node key",
        r'key_file = "node1.key"',
        'key_file = "node1.key"\nkeyfile = "x"',
        "node.keyfile = 'x':",
    ),
    ("unknown section", r"\[merge\]", "[bogus]\nx = 1\n[merge]", "bogus = {'x': 1}:"),
    (
        "bad inline key",
        r'public_key_file = "node2.pub"',
        'public_key = "abc"',
        "peers[0].public_key = 'abc':",
    ),
    (
        "missing key file",
        r'public_key_file = "node3.pub"',
        'public_key_file = "nope.pub"',
        "peers[1].public_key_file =",
    ),
    (
        "both keys",
        r'public_key_file = "node2.pub"',
        'public_key_file = "node2.pub"\npublic_key = "00"',
        "peers[0].public_key = '00':",
    ),
    (
        "unknown dataset",
        r'dataset = "digits"',
        'dataset = "mnist"',
        "data.dataset = 'mnist': one of digits, gaussian_mixture",
    ),
    (
        "unknown partition",
        r'partition = "dirichlet"',
        'partition = "pathological"',
        "data.partition = 'pathological':",
    ),
    (
        "unknown partition param",
        r"alpha = 0.5",
        "beta = 0.5",
        "data.partition_params.beta = 0.5: partition 'dirichlet' takes alpha, min_size, "
        "max_attempts",
    ),
    ("node index out of range", r"node_index = 0", "node_index = 3", "data.node_index = 3:"),
    ("zero hidden units", r"hidden = \[32\]", "hidden = [0]", "learner.hidden = [0]:"),
    ("lr as text", r"lr = 0.1", 'lr = "fast"', "learner.lr = 'fast':"),
    ("hidden as text", r"hidden = \[32\]", 'hidden = ["32"]', "learner.hidden[0] = '32':"),
    ("unknown model", r"hidden = \[32\]", 'model = "resnet"', "learner.model = 'resnet': one of"),
    ("unknown optimizer", r"lr = 0.1", 'optimizer = "rmsprop"', "learner.optimizer = 'rmsprop':"),
    ("adam with momentum", r"lr = 0.1", 'optimizer = "adam"\nmomentum = 0.9', "learner.momentum"),
    ("one beta", r"lr = 0.1", "betas = [0.9]", "learner.betas = [0.9]:"),
    (
        "unknown learner key",
        r"lr = 0.1",
        "lr = 0.1\nlearning_rate = 1",
        "learner.learning_rate = 1:",
    ),
    ("unknown merge rule", r'rule = "weighted"', 'rule = "averge"', "merge.rule = 'averge':"),
    ("not toml", r"\[learner\]", "[learner", "config = "),
    (
        "status on a public address",
        r"startup_timeout = 30.0",
        'startup_timeout = 30.0\nstatus_listen = "0.0.0.0:9101"',
        "node.status_listen = '0.0.0.0:9101': a loopback address",
    ),
    (
        "status without a port",
        r"startup_timeout = 30.0",
        'startup_timeout = 30.0\nstatus_listen = "127.0.0.1"',
        "node.status_listen = '127.0.0.1':",
    ),
    (
        "fewer max_peers than peers",
        r"startup_timeout = 30.0",
        "startup_timeout = 30.0\nmax_peers = 1",
        "node.max_peers = 1: an integer >= the number of [[peers]] (2)",
    ),
    (
        "accept_unknown_peers as text",
        r"startup_timeout = 30.0",
        'startup_timeout = 30.0\naccept_unknown_peers = "yes"',
        "node.accept_unknown_peers = 'yes': a boolean",
    ),
    (
        "zero message rate",
        r"startup_timeout = 30.0",
        "startup_timeout = 30.0\npeer_message_rate = 0",
        "node.peer_message_rate = 0.0:",
    ),
    (
        "zero idle timeout",
        r"startup_timeout = 30.0",
        "startup_timeout = 30.0\nidle_timeout = 0",
        "node.idle_timeout = 0.0:",
    ),
    (
        "zero handshakes",
        r"startup_timeout = 30.0",
        "startup_timeout = 30.0\nmax_handshakes = 0",
        "node.max_handshakes = 0: an integer >= 1",
    ),
]


def test_limits_status_and_peer_exchange_keys(example: Path) -> None:
    path = example / "node1.toml"
    path.write_text(
        path.read_text().replace(
            "startup_timeout = 30.0",
            """startup_timeout = 30.0
status_listen = "127.0.0.1:9101"
max_peers = 8
max_handshakes = 4
max_frame_bytes = 1048576
peer_message_rate = 5
peer_message_burst = 10
idle_timeout = 20
strikes_to_ban = 2
ban_interval = 60
ip_failures_to_ban = 0
ip_failure_window = 30
max_bans = 64
peer_exchange = false
peer_exchange_interval = 10
peer_exchange_max_per_message = 4
max_known_peers = 16
accept_unknown_peers = true""",
        )
    )
    config = load_config(path)
    assert config.status_listen == "127.0.0.1:9101"
    limits = config.limits
    assert (limits.max_peers, limits.max_handshakes, limits.max_frame_bytes) == (8, 4, 1 << 20)
    assert (limits.peer_message_rate, limits.peer_message_burst) == (5.0, 10)
    assert (limits.idle_timeout, limits.strikes_to_ban, limits.ban_interval) == (20.0, 2, 60.0)
    assert (limits.ip_failures_to_ban, limits.ip_failure_window, limits.max_bans) == (0, 30.0, 64)
    exchange = config.peer_exchange
    assert not exchange.enabled and exchange.accept_unknown_peers
    assert (exchange.interval, exchange.max_per_message, exchange.max_known_peers) == (10.0, 4, 16)


def test_limits_defaults(example: Path) -> None:
    config = load_config(example / "node1.toml")
    assert config.status_listen is None
    assert config.limits.max_peers == 32 and config.limits.strikes_to_ban == 3
    assert config.peer_exchange.enabled and not config.peer_exchange.accept_unknown_peers


def test_status_may_listen_remotely_when_allowed(example: Path) -> None:
    path = example / "node1.toml"
    path.write_text(
        path.read_text().replace(
            "startup_timeout = 30.0",
            'startup_timeout = 30.0\nstatus_listen = "0.0.0.0:9101"\nstatus_allow_remote = true',
        )
    )
    assert load_config(path).status_listen == "0.0.0.0:9101"


@pytest.mark.parametrize(
    ("pattern", "replacement", "expected"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_config_names_the_key_in_one_line(
    example: Path, capsys: pytest.CaptureFixture[str], pattern: str, replacement: str, expected: str
) -> None:
    path = example / "node1.toml"
    text, count = re.subn(pattern, replacement, path.read_text(), count=1)
    assert count == 1, pattern
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message

    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"p2pfl: error: {message}\n"


def test_value_out_of_range_found_when_building_the_learner_names_the_key(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = example / "node1.toml"
    path.write_text(path.read_text().replace("alpha = 0.5", "alpha = -1.0"))
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"^data\.partition_params\.alpha = -1\.0: "):
        config.build_learner()
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: data.partition_params.alpha = -1.0: ")
    assert err.count("\n") == 1


def test_absurd_model_is_refused_in_one_line_before_allocating(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = example / "node1.toml"
    path.write_text(path.read_text().replace("hidden = [32]", "hidden = [1000000000]"))
    with pytest.raises(ConfigError, match=r"^learner\.model = 'mlp': a model of at most"):
        load_config(path).build_learner()
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: learner.model = 'mlp'") and err.count("\n") == 1


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--config", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.startswith("p2pfl: error: config = ")


def test_peer_with_the_nodes_own_key_is_refused(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = example / "node1.toml"
    path.write_text(path.read_text().replace('"node2.pub"', '"node1.pub"'))
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: peers[0].public_key = ")
    assert err.count("\n") == 1


def test_bootstrap_list_and_membership_protocol_keys(example: Path) -> None:
    keys = [Identity.load(example / f"node{i}.key").node_id.hex() for i in (1, 2, 3)]
    path = example / "modest.toml"
    text = f"""
[node]
listen = "127.0.0.1:0"
key_file = "node1.key"
[[bootstrap]]
address = "127.0.0.1:7102"
public_key = "{keys[1]}"
[[bootstrap]]
address = "127.0.0.1:7103"
public_key_file = "node3.pub"
[data]
dataset = "digits"
[protocol]
mode = "gossip"
peer_sampling = "membership"
history_gossip = true
history_lambda = 1
"""
    path.write_text(text)
    config = load_config(path)
    assert [p.address for p in config.bootstrap] == ["127.0.0.1:7102", "127.0.0.1:7103"]
    assert [p.node_id.hex() for p in config.bootstrap] == keys[1:]
    assert config.peers == ()
    assert config.protocol.peer_sampling == "membership"
    assert config.protocol.history_gossip is True
    assert config.protocol.history_lambda == 1.0
    assert config.protocol.admits_strangers

    duplicate = text.replace('public_key_file = "node3.pub"', f'public_key = "{keys[1]}"')
    path.write_text(duplicate)
    with pytest.raises(ConfigError, match=r"^bootstrap\[1\]\.public_key = "):
        load_config(path)
    path.write_text(text.replace('"membership"', '"everyone"'))
    with pytest.raises(ConfigError, match=r"^protocol\.peer_sampling = 'everyone': one of"):
        load_config(path)
    path.write_text(text.replace("[[bootstrap]]", "[bootstrap]", 1))
    with pytest.raises(ConfigError, match="bootstrap"):
        load_config(path)


def test_fedavg_node_whose_server_is_not_a_peer_exits_2_in_one_line(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = example / "node1.toml"
    stranger = Identity.generate().node_id.hex()
    text = path.read_text().replace('mode = "dsgd"', f'mode = "fedavg"\nserver = "{stranger}"')
    path.write_text(text)
    assert load_config(path).protocol.server == stranger  # well formed: the node decides
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"p2pfl: error: protocol.server = '{stranger}': the key of this node")
    assert err.count("\n") == 1


def test_model_larger_than_max_frame_bytes_is_refused_at_startup(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = example / "node1.toml"
    text = path.read_text().replace("[node]\n", "[node]\nmax_frame_bytes = 8192\n", 1)
    path.write_text(text)
    config = load_config(path)
    # digits: 64 features, 10 classes; MLP 64-32-10 = 2,410 float32 parameters > 8 KiB.
    with pytest.raises(ConfigError, match=r"^node\.max_frame_bytes = 8192: a model of 2410 "):
        config.check_frame_size()
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: node.max_frame_bytes = 8192: ")
    assert err.count("\n") == 1
    assert load_config(example / "node2.toml").check_frame_size() > 2410 * 4


def test_rounds_are_bounded_for_nodes_and_scenarios_alike() -> None:
    """The bound lives in CoreConfig, which node configs and scenarios both build."""
    assert CoreConfig(rounds=MAX_ROUNDS).rounds == MAX_ROUNDS
    with pytest.raises(ConfigError, match=r"^protocol\.rounds = 1180591620717411303424: "):
        CoreConfig(rounds=2**70)
    assert MAX_ROUNDS + CoreConfig().max_rounds_ahead < MAX_ROUND
