"""The ``p2pfl`` command: ``keygen``, ``node``, ``status`` and ``inspect``.

Exit codes: 0 success; 1 ``inspect`` found a frame whose signature does not verify;
2 a usage, configuration, key or file error, or ``status`` cannot reach the node (one line
``p2pfl: error: <message>`` on stderr).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import math
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.errors import BadSignature, ConfigError, IdentityError, P2PFLError, WireError
from p2pfl.identity import Identity, NodeId

EXIT_OK = 0
EXIT_UNVERIFIED = 1
EXIT_ERROR = 2
MAX_INSPECT_BYTES = 256 * 1024 * 1024
STATUS_TIMEOUT = 5.0
MAX_STATUS_BYTES = 1024 * 1024


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors end with one ``p2pfl: error:`` line and exit code 2."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"p2pfl: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pfl", description="Decentralised peer-to-peer gossip learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    keygen = commands.add_parser(
        "keygen", help="create a node key (FILE) and its public key (FILE.pub)"
    )
    keygen.add_argument(
        "--out", required=True, type=Path, help="private key file to create (mode 0600)"
    )

    node = commands.add_parser("node", help="run a node from a TOML config")
    node.add_argument("--config", required=True, type=Path, help="the node's TOML config file")
    node.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text (default) or json: one object per line with time, level, event, fields",
    )
    node.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads for training (default 1: small models, several nodes per host)",
    )

    status = commands.add_parser(
        "status", help="print a running node's status (from its node.status_listen endpoint)"
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the node's TOML config (uses status_listen)")
    where.add_argument("--address", help="host:port of the status endpoint")
    status.add_argument("--raw", action="store_true", help="print the Prometheus text as is")
    status.add_argument(
        "--timeout", type=float, default=STATUS_TIMEOUT, help="seconds to wait for the node"
    )

    inspect = commands.add_parser("inspect", help="decode a frame file or a checkpoint")
    inspect.add_argument("file", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``p2pfl`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "keygen":
            return _keygen(args.out)
        if args.command == "node":
            return _node(args.config, args.log_level, args.torch_threads, args.log_format)
        if args.command == "status":
            return _status(args.config, args.address, args.raw, args.timeout)
        if args.command == "inspect":
            return _inspect(args.file)
    except (ConfigError, IdentityError) as exc:
        return _error(str(exc))
    raise AssertionError(f"unhandled command {args.command!r}")


def _error(message: str) -> int:
    print(f"p2pfl: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_ERROR


# -- keygen ---------------------------------------------------------------------------------


def public_key_path(key_file: Path) -> Path:
    """Where ``keygen`` puts the public key of ``key_file``: ``node1.key`` -> ``node1.pub``."""
    return (
        key_file.with_suffix(".pub")
        if key_file.suffix != ".pub"
        else key_file.with_name(key_file.name + ".pub")
    )


def _keygen(out: Path) -> int:
    pub = public_key_path(out)
    for path in (out, pub):
        if path.exists():
            raise IdentityError(f"{path} exists; refusing to overwrite a key (delete it first)")
    identity = Identity.generate()
    identity.save(out)
    pub.write_text(identity.node_id.hex() + "\n", encoding="ascii")
    print(identity.node_id.hex())
    return EXIT_OK


# -- node -----------------------------------------------------------------------------------


def _node(config_file: Path, log_level: str, torch_threads: int, log_format: str = "text") -> int:
    import torch
    import trio

    from p2pfl.config import load_config
    from p2pfl.runtime.logs import configure_logging
    from p2pfl.runtime.node import Node, run_until_signalled

    config = load_config(config_file)
    config.check_frame_size()
    configure_logging(log_level, log_format)
    if torch_threads < 1:
        raise ConfigError("--torch-threads", torch_threads, "an integer >= 1")
    torch.set_num_threads(torch_threads)
    try:
        node = Node(config)
    except (WireError, ImportError) as exc:  # a corrupt checkpoint, a missing optional dependency
        return _error(str(exc))
    except OSError as exc:  # the key or checkpoint file cannot be read
        return _error(f"{exc.filename or 'a file'}: {exc.strerror or exc}")
    # Everything loaded so far (torch, the dataset) lives until exit: keep it out of the
    # collector's way, which also spares seconds of collection at interpreter shutdown.
    gc.freeze()
    try:
        trio.run(run_until_signalled, node)
    except BaseExceptionGroup as group:
        # trio's nurseries wrap a startup failure (an address that cannot be listened on)
        # in exception groups; a group of nothing but ConfigErrors is one line.
        errors, rest = group.split(ConfigError)
        if errors is None or rest is not None:
            raise
        return _error(str(_first_leaf(errors)))
    return EXIT_OK


def _first_leaf(group: BaseExceptionGroup[ConfigError]) -> BaseException:
    """The first exception inside ``group`` that is not itself a group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


# -- status ---------------------------------------------------------------------------------


def _status(config_file: Path | None, address: str | None, raw: bool, timeout: float) -> int:
    from p2pfl.config import load_config
    from p2pfl.runtime.peerx import parse_address

    if config_file is not None:
        config = load_config(config_file)
        if config.status_listen is None:
            raise ConfigError("node.status_listen", None, "set, to query the node's status")
        target = config.status_listen
    else:
        assert address is not None
        target = address
    parsed = parse_address(target)
    if parsed is None:
        raise ConfigError("--address", target, "host:port, e.g. 127.0.0.1:9101")
    host, port = parsed
    try:
        text = _fetch_metrics(host, port, timeout)
    except OSError as exc:
        return _error(f"cannot reach the node's status at {target}: {exc.strerror or exc}")
    except ValueError as exc:
        return _error(f"bad answer from {target}: {exc}")
    if raw:
        sys.stdout.write(text)
    else:
        print(format_status(text), end="")
    return EXIT_OK


def _fetch_metrics(host: str, port: int, timeout: float) -> str:
    """GET /metrics over HTTP/1.0.

    Raises:
        OSError: the node cannot be reached or does not answer in time.
        ValueError: the answer is not a 200 response with a text body.
    """
    import socket

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("ascii"))
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_STATUS_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not sep or status_line.split(" ")[1:2] != ["200"]:
        raise ValueError(status_line or "empty response")
    return body.decode("utf-8", errors="replace")


def format_status(text: str) -> str:
    """The metrics of one node as aligned ``name  value`` lines, grouped and readable."""
    from p2pfl.runtime.status import parse_metrics

    lines: list[str] = []
    node = ""
    for name, labels, value in parse_metrics(text):
        node = labels.get("node", node)
        short = name.removeprefix("p2pfl_")
        extra = [f"{k}={v}" for k, v in labels.items() if k != "node"]
        if extra and value == 0:
            continue  # all-zero labelled series (rejection reasons, bans) are noise
        label = f"{short}{{{','.join(extra)}}}" if extra else short
        whole = math.isfinite(value) and value == int(value)
        shown = str(int(value)) if whole else f"{value:.4f}"
        lines.append(f"  {label:<40} {shown}")
    return f"node {node or '?'}\n" + "\n".join(lines) + "\n"


# -- inspect --------------------------------------------------------------------------------


def _inspect(path: Path) -> int:
    from p2pfl import checkpoint

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            start = handle.read(len(checkpoint.MAGIC))
    except OSError as exc:
        return _error(f"{path}: {exc.strerror or exc}")
    if start == checkpoint.MAGIC:
        return _inspect_checkpoint(path)
    if size > MAX_INSPECT_BYTES:
        return _error(f"{path}: {size} bytes is larger than any frame p2pfl reads")
    return _inspect_frame(path, path.read_bytes())


def _inspect_checkpoint(path: Path) -> int:
    from p2pfl.checkpoint import load_checkpoint

    try:
        loaded = load_checkpoint(path)
    except P2PFLError as exc:
        return _error(str(exc))
    header, vector = loaded.header, loaded.vector
    print(f"checkpoint {path}")
    print(f"  format:  {header.format}")
    print(f"  node:    {header.node}")
    print(f"  round:   {header.round}")
    print(f"  dtype:   {header.dtype}")
    print(f"  shape:   {list(header.shape)}")
    print(f"  sha256:  {header.sha256.hex()} (verified)")
    for key in sorted(header.info):
        print(f"  info.{key}: {header.info[key]!r}")
    if vector.numel():
        print(
            f"  values:  min {float(vector.min()):.6g} max {float(vector.max()):.6g} "
            f"mean {float(vector.mean()):.6g}"
        )
    return EXIT_OK


def _inspect_frame(path: Path, data: bytes) -> int:
    from p2pfl.codec import CODECS, decode_vector
    from p2pfl.wire import MessageKind, PayloadSpec, decode_frame

    header, payload = _peek_frame(path, data)
    print(f"frame {path} ({len(data)} bytes)")
    kind = header.get("k")
    try:
        kind_name = MessageKind(int(kind)).name if isinstance(kind, int) else "unknown"
    except ValueError:
        kind_name = "unknown"
    sender = header.get("s")
    sender_text = (
        f"{NodeId(sender).short()} ({sender.hex()})"
        if isinstance(sender, bytes) and len(sender) == 32
        else repr(sender)
    )
    print(f"  version: {header.get('v')!r}")
    print(f"  kind:    {kind!r} ({kind_name})")
    print(f"  sender:  {sender_text}")
    print(f"  seq:     {header.get('q')!r}")
    print(f"  round:   {header.get('r')!r}")
    spec = header.get("p")
    if isinstance(spec, dict):
        print(
            f"  payload: codec {spec.get('c')!r} dtype {spec.get('d')!r} shape {spec.get('s')!r} "
            f"samples {spec.get('n')!r}, {len(payload)} bytes"
        )
    else:
        print(f"  payload: {len(payload)} bytes")
    digest = header.get("h")
    if isinstance(digest, bytes):
        matches = hashlib.sha256(payload).digest() == digest
        print(
            f"  sha256:  {digest.hex()} ({'matches payload' if matches else 'DOES NOT match payload'})"
        )
    meta = header.get("m")
    if meta:
        print(f"  meta:    {meta!r}")
    try:
        envelope = decode_frame(data)
    except BadSignature as exc:
        print(f"  signature: INVALID ({type(exc).__name__}: {exc})")
        return EXIT_UNVERIFIED
    except WireError as exc:
        # Checks run cheapest first: a frame refused for its shape or header never reached
        # the signature check.
        print(f"  refused: {type(exc).__name__}: {exc} (signature not checked)")
        return EXIT_UNVERIFIED
    print(f"  signature: valid (signed by {envelope.sender.short()})")
    if envelope.kind in (MessageKind.HELLO, MessageKind.HELLO_PROOF):
        print(f"  nonce:   {bytes(envelope.payload).hex()}")
    elif isinstance(envelope.spec, PayloadSpec) and envelope.spec.codec in CODECS:
        # A delta (topk, fedzip) decodes to the change it carries, not to a model.
        label = "delta:  " if "b" in envelope.meta else "values: "
        try:
            vector = decode_vector(envelope.spec, envelope.payload)
        except WireError as exc:
            print(f"  {label} undecodable ({exc})")
        else:
            if vector.numel():
                print(
                    f"  {label} {vector.numel()} elements, min {float(vector.min()):.6g} "
                    f"max {float(vector.max()):.6g} mean {float(vector.mean()):.6g}"
                )
    return EXIT_OK


def _peek_frame(path: Path, data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header map and payload of a frame, *unverified*, for display only.

    Raises:
        ConfigError: the file is not a frame at all.
    """
    prefix = struct.Struct(">I")
    if len(data) < 8:
        raise ConfigError("file", str(path), "a frame (p2pfl wire format) or a checkpoint")
    (total,) = prefix.unpack_from(data, 0)
    (header_len,) = prefix.unpack_from(data, 4)
    if total + 4 != len(data) or 8 + header_len > len(data):
        raise ConfigError(
            "file",
            str(path),
            f"one whole frame (its prefix declares {total + 4} bytes, file has {len(data)})",
        )
    try:
        header = msgpack.unpackb(
            data[8 : 8 + header_len], raw=False, strict_map_key=False, max_ext_len=0
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        reason = str(exc) or type(exc).__name__  # msgpack's depth error has no message
        raise ConfigError("file", str(path), f"a frame with a msgpack header ({reason})") from None
    if not isinstance(header, dict):
        raise ConfigError("file", str(path), "a frame whose header is a msgpack map")
    return header, data[8 + header_len :]


def entry() -> None:
    """Console-script entry: run :func:`main`, flush, and leave without interpreter teardown.

    A node's trio worker threads have run torch code; at interpreter shutdown torch's native
    thread pools can be destroyed under them and abort the process ("terminate called without
    an active exception", exit -6), which we saw after clean SIGTERM shutdowns on a loaded
    machine. Everything a node must keep is already on disk (checkpoints are fsynced), so
    after flushing the logs and standard streams the process exits directly.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
