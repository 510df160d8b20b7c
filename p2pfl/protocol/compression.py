"""Compressed model updates: error feedback and delta chains, for node and simulator alike.

Theory of operation
-------------------
The codecs (:mod:`p2pfl.codec`) turn one tensor into bytes. This module decides *which*
tensor a node encodes, so that what its neighbours decode tracks its model over time. It is
part of the sans-IO core (the :class:`~p2pfl.protocol.messages.Sealer` owns a
:class:`Compressor`; :func:`~p2pfl.protocol.messages.parse_model_update` consults a
:class:`Chains`), so the trio node and the simulator run the same code.

Sender (:class:`Compressor`), one per node. A core seals each model once and sends that
one envelope to every recipient, so the state below is O(1) model-sized vectors per node,
not one per destination (per-destination residuals would cost ``degree`` models per node:
6,000 models for 1,000 nodes of degree 6).

- ``dense`` codec: the model as is; no state (the default, byte for byte as before).
- A lossy *model* codec (``int8``): with error feedback on, the node keeps the residual
  ``e`` (what earlier payloads failed to carry) and encodes ``x + e``; then
  ``e <- x + e - decoded``. The error of any one payload stays one quantisation step, and
  the sum of what was sent tracks the sum of the models (no systematic bias from rounding).
- A *delta* codec (``topk``, ``fedzip``) carries the change since the previous message, as
  in CHOCO-gossip (Koloskova et al., 2019): receivers keep the sender's *public copy*
  ``x̂`` (their reconstruction of its model), add each decoded delta to it, and merge
  ``x̂``. The chain starts with a *keyframe*, the model itself in the dense codec (header
  ``meta["kf"] = 1``); each later message names the sequence number of the message it
  builds on (``meta["b"]``), and a keyframe is sent again every ``keyframe_every`` messages
  (0: only the first) so a receiver that missed a link recovers. With error feedback the
  sender encodes ``x - x̂`` and keeps ``x̂`` exactly as receivers compute it, so what a
  payload leaves out is carried by the next one (the residual ``x - x̂`` *is* the error
  feedback); without it the sender encodes ``x - x_prev`` (the change since its previous
  model), and the receivers' copy drifts by every dropped entry until the next keyframe.
  Either way the sender keeps one model-sized vector.

Receiver (:class:`Chains`), per core: for each sender that uses a delta codec, the sequence
number and reconstruction of its last link. A delta whose base is not the held link (a lost
or late message, a restart, a neighbour that connected mid-chain) cannot be decoded; it is
dropped without blame (:class:`MissingBase`), and the chain resumes at the sender's next
keyframe. Delta codecs therefore need a mode that sends every model to every connected
neighbour (``dsgd``); ``gossip`` and ``fedavg`` pick recipients per message, and use ``int8``
(config validation enforces this). In the simulator one reconstruction tensor per envelope
is shared by all its receivers (``Envelope.memo``), so the receivers' copies cost about one
model per sender, not one per edge. A node of the trio runtime holds one model per
neighbour that sends deltas (mostly the very tensor its round buffer holds anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import torch

from p2pfl.codec import DENSE, CodecSettings, Encoded, make_codec
from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import NodeId
from p2pfl.numerics import all_finite
from p2pfl.wire import MAX_SEQ, Envelope

if TYPE_CHECKING:  # config imports this module (DELTA_MODES)
    from p2pfl.params import ParamLayout
    from p2pfl.protocol.config import CoreConfig

KEYFRAME: Final = "kf"
"""Header meta key marking the first link of a delta chain (value 1)."""
BASE: Final = "b"
"""Header meta key of a delta: the sequence number of the link it builds on."""

DELTA_MODES: Final = ("dsgd",)
"""Modes that send every model to every connected neighbour, as delta codecs need."""


class MissingBase(RemoteProtocolError):
    """A delta builds on a message this node does not hold: dropped, nobody's fault."""


class Compressor:
    """What one node encodes for its neighbours; see the module docstring."""

    __slots__ = (
        "_bounds",
        "_keyframe",
        "_links",
        "_reference",
        "_residual",
        "codec",
        "error_feedback",
        "keyframe_every",
        "base_seq",
    )

    def __init__(
        self,
        settings: CodecSettings,
        *,
        error_feedback: bool = True,
        keyframe_every: int = 0,
        bounds: Sequence[int] = (),
    ) -> None:
        self.codec = make_codec(settings)
        self._keyframe = make_codec(CodecSettings(name=DENSE, wire_dtype=settings.wire_dtype))
        self.error_feedback = error_feedback
        self.keyframe_every = keyframe_every
        self._bounds = tuple(bounds)
        self._residual: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        """Delta codecs: the receivers' copy x̂ (error feedback) or the previous model."""
        self._links = 0
        """Deltas sent since the last keyframe."""
        self.base_seq: int | None = None
        """The sequence number of the last message sealed (a delta's base), once known."""

    def encode(self, vector: torch.Tensor, samples: int) -> tuple[Encoded, dict[str, int]]:
        """The payload for ``vector`` and the header meta it needs; updates the state.

        The caller must report the sequence number it sealed the payload with
        (:meth:`sealed`) before encoding the next model.
        """
        codec = self.codec
        if codec.delta:
            return self._encode_delta(vector, samples)
        if not (codec.lossy and self.error_feedback):
            return codec.encode(vector, samples=samples, bounds=self._bounds), {}
        target = vector if self._residual is None else vector + self._residual
        encoded = codec.encode(target, samples=samples, bounds=self._bounds)
        approx = target if encoded.approx is None else encoded.approx
        residual = target - approx
        # A non-finite model must not poison every later payload through the residual.
        self._residual = residual if all_finite(residual) else None
        return encoded, {}

    def _encode_delta(self, vector: torch.Tensor, samples: int) -> tuple[Encoded, dict[str, int]]:
        reference = self._reference
        due = self.keyframe_every > 0 and self._links >= self.keyframe_every
        if reference is None or self.base_seq is None or due or not all_finite(reference):
            encoded = self._keyframe.encode(vector, samples=samples)
            self._reference = (vector if encoded.approx is None else encoded.approx).clone()
            self._links = 0
            return encoded, {KEYFRAME: 1}
        encoded = self.codec.encode(vector - reference, samples=samples, bounds=self._bounds)
        assert encoded.approx is not None, "a delta codec reports what it dropped"
        if self.error_feedback:
            self._reference = reference + encoded.approx  # exactly the receivers' copy
        else:
            self._reference = vector.clone()
        self._links += 1
        return encoded, {BASE: self.base_seq}

    def sealed(self, seq: int) -> None:
        """The payload last encoded went out under sequence number ``seq``."""
        self.base_seq = seq


class Chains:
    """The public copies of the neighbours that send deltas: sender -> (seq, model).

    A copy outlives a disconnection: after a short one the sender's next delta still builds
    on it, and after a long one its base sequence number no longer matches (``MissingBase``)
    until the next keyframe. Senders are neighbours (delta codecs run in dsgd only), so the
    table holds at most one model per neighbour.
    """

    __slots__ = ("_links",)

    def __init__(self) -> None:
        self._links: dict[NodeId, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._links)

    def base(self, envelope: Envelope) -> torch.Tensor:
        """The reconstruction a delta ``envelope`` builds on.

        Raises:
            RemoteProtocolError: ``meta["b"]`` is not a sequence number.
            MissingBase: this node does not hold that link (nobody's fault).
        """
        base = envelope.meta.get(BASE)
        if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base <= MAX_SEQ:
            raise RemoteProtocolError(f"delta payload names base {base!r}, not a sequence number")
        held = self._links.get(envelope.sender)
        if held is None or held[0] != base:
            raise MissingBase(f"delta builds on message {base}, which this node does not hold")
        return held[1]

    def record(self, envelope: Envelope, vector: torch.Tensor) -> None:
        """Remember ``vector`` (accepted from ``envelope``) if it is a link of a chain."""
        if BASE in envelope.meta or envelope.meta.get(KEYFRAME) == 1:
            self._links[envelope.sender] = (envelope.seq, vector)


def make_compressor(config: CoreConfig, layout: ParamLayout | None) -> Compressor | None:
    """The sender side ``config`` asks for; None for the ``dense`` codec (no state at all)."""
    if config.codec == DENSE:
        return None
    bounds = tuple(slot.numel for slot in layout.slots) if layout is not None else ()
    return Compressor(
        config.codec_settings(),
        error_feedback=config.error_feedback,
        keyframe_every=config.keyframe_every,
        bounds=bounds,
    )
