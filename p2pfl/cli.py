"""The ``p2pfl`` command: ``keygen``, ``node`` and ``inspect``.

Exit codes: 0 success; 1 ``inspect`` found a frame whose signature does not verify;
2 a usage, configuration, key or file error (one line ``p2pfl: error: <message>`` on stderr).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.errors import ConfigError, IdentityError, P2PFLError, WireError
from p2pfl.identity import Identity, NodeId

EXIT_OK = 0
EXIT_UNVERIFIED = 1
EXIT_ERROR = 2
MAX_INSPECT_BYTES = 256 * 1024 * 1024


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
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads for training (default 1: small models, several nodes per host)",
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
            return _node(args.config, args.log_level, args.torch_threads)
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


def _node(config_file: Path, log_level: str, torch_threads: int) -> int:
    import torch
    import trio

    from p2pfl.config import load_config
    from p2pfl.runtime.node import Node, run_until_signalled

    config = load_config(config_file)
    logging.basicConfig(
        level=getattr(logging, log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if torch_threads < 1:
        raise ConfigError("--torch-threads", torch_threads, "an integer >= 1")
    torch.set_num_threads(torch_threads)
    try:
        node = Node(config)
    except (WireError, ImportError) as exc:  # a corrupt checkpoint, a missing optional dependency
        return _error(str(exc))
    # Everything loaded so far (torch, the dataset) lives until exit: keep it out of the
    # collector's way, which also spares seconds of collection at interpreter shutdown.
    gc.freeze()
    try:
        trio.run(run_until_signalled, node)
    except OSError as exc:
        return _error(f"node.listen = {config.listen!r}: cannot listen ({exc.strerror or exc})")
    return EXIT_OK


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
    from p2pfl.codec import decode_vector
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
    except WireError as exc:
        print(f"  signature: INVALID ({type(exc).__name__}: {exc})")
        return EXIT_UNVERIFIED
    print(f"  signature: valid (signed by {envelope.sender.short()})")
    if envelope.kind in (MessageKind.HELLO, MessageKind.HELLO_PROOF):
        print(f"  nonce:   {bytes(envelope.payload).hex()}")
    elif isinstance(envelope.spec, PayloadSpec) and envelope.spec.codec == "dense":
        try:
            vector = decode_vector(envelope.spec, envelope.payload)
        except WireError as exc:
            print(f"  values:  undecodable ({exc})")
        else:
            if vector.numel():
                print(
                    f"  values:  {vector.numel()} elements, min {float(vector.min()):.6g} "
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
        raise ConfigError("file", str(path), f"a frame with a msgpack header ({exc})") from None
    if not isinstance(header, dict):
        raise ConfigError("file", str(path), "a frame whose header is a msgpack map")
    return header, data[8 + header_len :]


if __name__ == "__main__":
    sys.exit(main())
