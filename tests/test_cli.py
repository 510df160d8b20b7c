"""The ``p2pfl`` command line: keygen, inspect, and one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from p2pfl.checkpoint import save_checkpoint
from p2pfl.cli import main
from p2pfl.codec import encode_vector
from p2pfl.identity import Identity
from p2pfl.protocol.config import MAX_ROUNDS
from p2pfl.wire import MessageKind, PayloadSpec, encode_frame, seal

SIGNER = Identity.from_seed(bytes([42]) * 32)


def model_frame(tmp_path: Path, *, tamper: bool = False) -> Path:
    vector = torch.tensor([-2.0, 0.5, 1.0, 4.5])
    spec, payload = encode_vector(vector, samples=17)
    envelope = seal(SIGNER, MessageKind.MODEL_UPDATE, seq=9, round=3, payload=payload, spec=spec)
    frame = bytearray(encode_frame(envelope))
    if tamper:
        frame[-1] ^= 0x01
    path = tmp_path / "update.frame"
    path.write_bytes(bytes(frame))
    return path


def test_keygen_writes_private_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "node1.key"
    assert main(["keygen", "--out", str(key)]) == 0
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", printed)
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "node1.pub").read_text().strip() == printed
    assert Identity.load(key).node_id.hex() == printed


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node1.key"
    assert main(["keygen", "--out", str(key)]) == 0
    before = key.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(key)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: ") and "refusing to overwrite" in err
    assert err.count("\n") == 1
    assert key.read_bytes() == before
    # An orphan public key blocks too, so a key and its .pub never disagree.
    other = tmp_path / "node2.key"
    (tmp_path / "node2.pub").write_text("x")
    assert main(["keygen", "--out", str(other)]) == 2
    assert not other.exists()


def test_inspect_model_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_frame(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "kind:    10 (MODEL_UPDATE)" in out
    assert f"sender:  {SIGNER.node_id.short()}" in out
    assert "seq:     9" in out
    assert "round:   3" in out
    assert "dtype 'float32' shape [4] samples 17" in out
    assert "min -2 max 4.5 mean 1" in out
    assert "matches payload" in out
    assert "signature: valid" in out


def test_inspect_tampered_frame_reports_bad_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(model_frame(tmp_path, tamper=True))]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT match payload" in out
    assert "signature: INVALID (BadSignature" in out


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**64 - 1], [0, 2**62, 2**62], [2**40, 0]])
def test_inspect_frame_with_a_refused_shape_says_so_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: list[int]
) -> None:
    spec = PayloadSpec("dense", "float32", tuple(shape), 1)
    envelope = seal(SIGNER, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"", spec=spec)
    path = tmp_path / "zero.frame"
    path.write_bytes(encode_frame(envelope))
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    refused = [line for line in captured.out.splitlines() if "refused" in line]
    assert len(refused) == 1 and "FrameTooLarge" in refused[0], captured.out


def test_inspect_handshake_frame_shows_the_nonce(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hello.frame"
    nonce = bytes(range(32))
    path.write_bytes(encode_frame(seal(SIGNER, MessageKind.HELLO, seq=1, round=0, payload=nonce)))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(HELLO)" in out and f"nonce:   {nonce.hex()}" in out


def test_inspect_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, round=5, vector=torch.tensor([1.0, 3.0]), node=SIGNER.node_id.hex())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "round:   5" in out and "shape:   [2]" in out and "(verified)" in out
    assert f"node:    {SIGNER.node_id.hex()}" in out
    assert "min 1 max 3 mean 2" in out


@pytest.mark.parametrize("content", [b"", b"garbage that is no frame", b"\x00\x00\x00\x05abcde"])
def test_inspect_garbage_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "junk"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: ") and err.count("\n") == 1


def test_missing_key_file_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nlisten = "127.0.0.1:0"\nkey_file = "absent.key"\n[data]\ndataset = "digits"\n'
    )
    assert main(["node", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: key file ") and err.count("\n") == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keygen"])
    assert info.value.code == 2
    assert "p2pfl: error:" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl.cli", "keygen", "--out", str(tmp_path / "k.key")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.pub").read_text().strip() == result.stdout.strip()


def test_status_from_a_config_without_status_listen_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "node.key"
    Identity.generate().save(key)
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nlisten = "127.0.0.1:0"\nkey_file = "node.key"\n[data]\ndataset = "digits"\n'
    )
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: node.status_listen = None:")
    assert err.count("\n") == 1


def test_status_of_a_running_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`p2pfl status --config` against a node process started with JSON logs."""
    import json
    import socket
    import time

    key = tmp_path / "node.key"
    Identity.generate().save(key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        status_port = probe.getsockname()[1]
    config = tmp_path / "node.toml"
    config.write_text(
        f"""[node]
listen = "127.0.0.1:0"
key_file = "node.key"
status_listen = "127.0.0.1:{status_port}"
[data]
dataset = "digits"
[protocol]
rounds = 1000000
local_steps = 1
"""
    )
    log = tmp_path / "node.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pfl.cli",
                "node",
                "--config",
                str(config),
                "--log-format",
                "json",
            ],
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 120
        code = 2
        while time.monotonic() < deadline and proc.poll() is None:
            capsys.readouterr()
            code = main(["status", "--config", str(config), "--timeout", "2"])
            if code == 0:
                break
            time.sleep(0.2)  # polling a starting process: there is nothing to wait on
        assert code == 0, log.read_text()
        out = capsys.readouterr().out
        assert out.startswith("node ")
        assert re.search(r"^  round +\d+$", out, re.M)
        assert re.search(r"^  peers_configured +0$", out, re.M)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    events = {record["event"] for record in records}
    assert {"status_listening", "stopped"} <= events, events
    assert all({"time", "level", "event", "fields"} <= set(record) for record in records)


# -- p2pfl node: every startup failure is one line, exit 2 (issue 12, defect 3) -------------


@pytest.fixture
def node_command() -> Iterator[Callable[[Path], tuple[int, str]]]:
    """Run ``p2pfl node --config FILE`` in this process; returns (exit code, stderr).

    Restores what the command changes for the whole process (logging, torch threads, the
    collector's frozen generation).
    """
    root = logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()

    def run(config: Path) -> tuple[int, str]:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = main(["node", "--config", str(config)])
        return code, stderr.getvalue()

    try:
        yield run
    finally:
        gc.unfreeze()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)


def node_toml(tmp_path: Path, node: str = "", rest: str = "") -> Path:
    """A one-node config (fresh key) with extra ``[node]`` lines and extra sections."""
    key = tmp_path / "node.key"
    if not key.exists():
        Identity.generate().save(key)
    lines = {"listen": '"127.0.0.1:0"', "key_file": '"node.key"'}
    for line in node.splitlines():
        name, _, value = line.partition("=")
        if name.strip():
            lines[name.strip()] = value.strip()
    body = "\n".join(f"{name} = {value}" for name, value in lines.items())
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\n{body}\n[data]\ndataset = "digits"\n[protocol]\nrounds = 1\nlocal_steps = 1\n'
        + rest
    )
    return config


def one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("p2pfl: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_node_listen_address_in_use(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]], busy_port: int
) -> None:
    code, err = node_command(node_toml(tmp_path, f'listen = "127.0.0.1:{busy_port}"'))
    one_line(code, err, f"node.listen = '127.0.0.1:{busy_port}'", "in use", "pick a free port")


def test_node_listen_host_that_does_not_resolve(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    code, err = node_command(node_toml(tmp_path, 'listen = "no-such-host.invalid:7101"'))
    one_line(code, err, "node.listen = 'no-such-host.invalid:7101'", "cannot listen")


def test_node_listen_host_of_another_machine(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of this machine.
    code, err = node_command(node_toml(tmp_path, 'listen = "192.0.2.1:7101"'))
    one_line(code, err, "node.listen = '192.0.2.1:7101'", "a host of this machine")


def test_node_status_listen_in_use(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]], busy_port: int
) -> None:
    code, err = node_command(node_toml(tmp_path, f'status_listen = "127.0.0.1:{busy_port}"'))
    one_line(code, err, f"node.status_listen = '127.0.0.1:{busy_port}'", "in use")


def test_node_key_file_naming_a_directory(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    (tmp_path / "keys").mkdir()
    code, err = node_command(node_toml(tmp_path, 'key_file = "keys"'))
    one_line(code, err, "node.key_file", "not a directory")


def test_node_config_that_is_not_utf8(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    config = tmp_path / "node.toml"
    config.write_bytes(b'[node]\nlisten = "127.0.0.1:0" # caf\xe9\n')
    code, err = node_command(config)
    one_line(code, err, "config = ", "UTF-8")


@pytest.mark.parametrize("depth", [900, 5000])
def test_node_config_nested_thousands_deep(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]], depth: int
) -> None:
    config = node_toml(tmp_path, rest=f"[merge.params]\nx = {'[' * depth}{']' * depth}\n")
    code, err = node_command(config)
    one_line(code, err)
    assert len(err) < 1000  # the value is not printed thousands of brackets long


def test_node_unwritable_checkpoint_dir_fails_before_the_first_round(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    # A path below a regular file cannot be created, even by root (who ignores modes).
    (tmp_path / "plain.txt").write_text("not a directory")
    config = node_toml(tmp_path, 'checkpoint_dir = "plain.txt/state"')
    code, err = node_command(config)
    one_line(code, err, "node.checkpoint_dir", "can create and write")


def test_node_rounds_beyond_the_bound(
    tmp_path: Path, node_command: Callable[[Path], tuple[int, str]]
) -> None:
    config = node_toml(tmp_path)
    config.write_text(config.read_text().replace("rounds = 1\n", f"rounds = {2**70}\n"))
    code, err = node_command(config)
    one_line(code, err, f"protocol.rounds = {2**70}", f"[1, {MAX_ROUNDS}]")


def test_inspect_shows_a_compressed_models_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pfl.codec import CodecSettings, make_codec

    encoded = make_codec(CodecSettings(name="int8")).encode(torch.tensor([-2.0, 0.5, 1.0, 4.5]))
    envelope = seal(
        SIGNER, MessageKind.MODEL_UPDATE, seq=9, round=3, payload=encoded.payload, spec=encoded.spec
    )
    path = tmp_path / "int8.frame"
    path.write_bytes(encode_frame(envelope))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "codec 'int8' dtype 'uint8' shape [4]" in out
    assert "values:  4 elements, min -2 max 4.5" in out
