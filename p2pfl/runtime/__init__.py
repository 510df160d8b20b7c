"""The trio driver: TCP framing and the nonce handshake, peer connections, the node loop,
and what keeps a node alive under hostile traffic: limits and bans (``limits``), peer exchange
(``peerx``), the status endpoint (``status``) and structured logs (``logs``).

Only this package (and the CLI) does network I/O; the protocol core it drives does none.
"""

from p2pfl.runtime.limits import BanList, FailureCounter, TokenBucket
from p2pfl.runtime.node import Node, run_until_signalled
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.peerx import PeerAd, PeerBook
from p2pfl.runtime.status import Metrics
from p2pfl.runtime.transport import FrameStream, Handshake, handshake

__all__ = [
    "Backoff",
    "BanList",
    "FailureCounter",
    "FrameStream",
    "Handshake",
    "Metrics",
    "Node",
    "PeerAd",
    "PeerBook",
    "PeerConnection",
    "TokenBucket",
    "handshake",
    "run_until_signalled",
]
