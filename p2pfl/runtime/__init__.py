"""The trio driver: TCP framing and the nonce handshake (``transport``), peer connections
(``peer``, ``connections``), the node (``node``) and its pump (``pump``), what keeps a node
alive under hostile traffic: defences (``defences``) on limits and bans (``limits``), peer
exchange (``peerx``), checkpoints and evaluation (``reporting``), the status endpoint
(``status``), structured logs (``logs``) and the injected link policy (``policy``).

Only this package (and the CLI) does network I/O; the protocol core it drives does none.
"""

from p2pfl.runtime.limits import BanList, FailureCounter, TokenBucket
from p2pfl.runtime.node import Node, run_until_signalled
from p2pfl.runtime.peer import Backoff, PeerConnection
from p2pfl.runtime.peerx import PeerAd, PeerBook
from p2pfl.runtime.policy import LinkPolicy, OpenLinks
from p2pfl.runtime.status import Metrics
from p2pfl.runtime.transport import FrameStream, Handshake, handshake

__all__ = [
    "Backoff",
    "BanList",
    "FailureCounter",
    "FrameStream",
    "Handshake",
    "LinkPolicy",
    "Metrics",
    "Node",
    "OpenLinks",
    "PeerAd",
    "PeerBook",
    "PeerConnection",
    "TokenBucket",
    "handshake",
    "run_until_signalled",
]
