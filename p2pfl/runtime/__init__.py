"""The trio driver: TCP framing and the nonce handshake, peer connections, the node loop.

Only this package (and the CLI) does network I/O; the protocol core it drives does none.
"""

from p2pfl.runtime.node import Node, run_until_signalled
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.transport import FrameStream, Handshake, handshake

__all__ = [
    "Backoff",
    "FrameStream",
    "Handshake",
    "Node",
    "PeerConnection",
    "handshake",
    "run_until_signalled",
]
