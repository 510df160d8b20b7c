"""Adversaries in the simulator: who attacks, what they train on, and what they send.

Theory of operation
-------------------
A scenario's ``[[adversaries]]`` entries (:class:`sim.scenario.AdversarySpec`) are turned into
an :class:`AdversaryPlan` before the population is built (:func:`plan_adversaries`):

* **Placement.** An entry marks existing nodes as Byzantine: the listed ``nodes``, or
  ``count`` / ``fraction`` of all n nodes of the topology (rounded) chosen among the
  candidates (nodes not taken by an earlier entry; with ``among = "data"``/``"relays"``
  only that role) at random or by highest centrality (``degree``, ``betweenness``,
  ``eigenvector``; ties to the lower index), as the disruption timeline selects nodes
  (:mod:`sim.disruptions`) but on the initial graph. Random choices draw from a stream
  derived from the run seed and the entry's index.
* **Sybils.** An entry with ``sybils = S`` is one attacker holding S identities: S nodes are
  appended to the graph (indices n, n+1, ...), each wired to ``sybil_edges`` existing nodes
  (among ``sybil_targets``, default all) chosen at random or by highest degree, with its own
  key and an honest protocol core. The first clone is the group's *leader*: it trains (on the
  attacker's data, see below) and merges like any node. Every clone sends the leader's latest
  model (attacked, for a model attack), so all S identities push the identical model. A
  clone holds the whole training set (the attacker knows the data distribution; poisoned for
  a data attack) and advertises the mean data holder's sample count.

What an attack does (formulas in ALGORITHMS.md §7):

* **Data attacks** (``label_flip``, ``backdoor``) poison the attacker's training set
  (:func:`poison`); its protocol stays honest and its models are what it trained.
* **Model attacks** (``sign_flip``, ``gaussian``, ``alie``, ``ipm``, ``dissensus``,
  ``free_rider``) replace what a Byzantine node *sends*. The engine is built with the
  :class:`Adversary` (its :class:`sim.engine.SendFilter`) and hands it every ``Send`` of a
  Byzantine node (:meth:`Adversary.forge`), which decodes the envelope's model, computes the
  attack's model for that receiver, and **re-seals** it with the sender's own key
  (:func:`p2pfl.wire.seal`), keeping kind, round, sequence number and meta, so the receiver
  accepts it as that sender's model of that round. A receiver gets one model per envelope
  (the same one if the core re-sends the envelope after a reconnect).
* **Omniscience.** Attacks that need honest models (ALIE, IPM, dissensus, free-rider
  ``received``) read every node's *current model*, ``cores[j].vector`` of the cores the
  :class:`Adversary` was given (the engine's): in ``dsgd``
  the node's last merged model (what its current training started from), in ``gossip`` its
  newest model. The target's *honest neighbourhood* is the target and its honest
  neighbours, as in the epfml reference (``codes/attacks.py``).
* ``alie`` sends μ − z·σ (coordinate-wise mean and unbiased std of the honest neighbourhood);
  without a given ``z``, z_max = Φ⁻¹((n−m−s)/(n−m)), s = ⌊n/2+1⌋ − m, with n the target's
  degree + 1 and m its Byzantine neighbours (:func:`alie_z`); ``ipm`` sends −ε·μ;
  ``dissensus`` sends x_t − ε·Σ_{j honest} W_tj (x_j − x_t) / Σ_{b Byzantine} W_tb with
  Metropolis–Hastings weights W_ij = 1/(1 + max(deg_i, deg_j)); these three are per target.
  ``sign_flip`` sends −scale·x, ``gaussian`` N(0, σ²I) or x + N(0, σ²I) (one draw per
  envelope, from a stream derived from the run seed and the node), ``free_rider`` the node's
  initial model, or (``replay = "received"``) its lowest-index honest neighbour's model as it
  was at the free-rider's previous send: it never contributes anything of its own.

**Attack success** (:class:`AttackSuccess`) of the first targeted entry, per node per round:
``label_flip`` (targeted): share of the test samples of class ``source`` predicted as
``target``; ``backdoor``: share of the test samples not of class ``target``, with the
trigger, predicted as ``target``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal, Protocol

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from p2pfl.codec import WIRE_DTYPES, decode_vector, encode_vector
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity
from p2pfl.learn import derive_seed
from p2pfl.protocol import model_kinds
from p2pfl.wire import Envelope, seal
from sim.scenario import (
    AdversarySpec,
    AlieAttack,
    BackdoorAttack,
    DissensusAttack,
    FreeRiderAttack,
    GaussianAttack,
    IpmAttack,
    LabelFlipAttack,
    NoAttack,
    SignFlipAttack,
)
from sim.selection import choose_nodes

STREAM_ADVERSARIES = 15
DATA_ATTACKS = ("label_flip", "backdoor")
MODEL_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "dissensus", "free_rider")
PER_TARGET_ATTACKS = ("alie", "ipm", "dissensus")
ALIE_CDF_CLIP = (0.01, 0.99)
"""z_max's CDF value is clipped into this range (|z| <= 2.33) where the formula leaves (0, 1)."""


# --- the attack formulas ----------------------------------------------------------------------


def alie_z(n: int, m: int) -> float:
    """z_max of "A little is enough" for n inputs of which m are Byzantine.

    z_max = Φ⁻¹((n − m − s)/(n − m)) with s = ⌊n/2 + 1⌋ − m supporters needed. Where the
    fraction leaves (0, 1) (m ≥ n/2, tiny n) it is clipped to :data:`ALIE_CDF_CLIP`; with no
    honest input z is 0.

    Raises:
        ValueError: n < 1 or m outside 0..n.
    """
    if n < 1 or not 0 <= m <= n:
        raise ValueError(f"need n >= 1 and 0 <= m <= n, got n={n}, m={m}")
    honest = n - m
    if honest == 0:
        return 0.0
    supporters = math.floor(n / 2 + 1) - m
    cdf = (honest - supporters) / honest
    low, high = ALIE_CDF_CLIP
    return NormalDist().inv_cdf(min(max(cdf, low), high))


def sign_flip(own: Tensor, scale: float = 1.0) -> Tensor:
    """−scale·x."""
    return own * -scale


def gaussian(
    own: Tensor, sigma: float, mode: Literal["replace", "add"], generator: torch.Generator
) -> Tensor:
    """N(0, σ²I) (``replace``) or x + N(0, σ²I) (``add``), drawn from ``generator``."""
    noise = torch.randn(own.shape, generator=generator, dtype=torch.float32) * sigma
    return noise if mode == "replace" else own + noise


def alie(neighbourhood: Tensor, z: float) -> Tensor:
    """μ − z·σ over the rows of ``neighbourhood`` [h, P] (σ: unbiased std; 0 for one row)."""
    mean = neighbourhood.mean(dim=0)
    if neighbourhood.shape[0] < 2:
        return mean
    return mean - z * neighbourhood.std(dim=0)


def ipm(neighbourhood: Tensor, epsilon: float) -> Tensor:
    """−ε·μ over the rows of ``neighbourhood`` [h, P]."""
    return neighbourhood.mean(dim=0) * -epsilon


def metropolis_weight(degree_i: int, degree_j: int) -> float:
    """W_ij = 1/(1 + max(deg_i, deg_j)) for an edge i-j."""
    return 1.0 / (1.0 + max(degree_i, degree_j))


def dissensus(
    target: Tensor,
    honest: Tensor,
    honest_weights: Tensor,
    byzantine_weight: float,
    epsilon: float,
) -> Tensor:
    """x_t − ε·Σ_j W_tj (x_j − x_t) / Σ_b W_tb over the target's honest neighbours ``honest``
    [h, P] with weights ``honest_weights`` [h]; the target itself if it has none."""
    if honest.shape[0] == 0 or byzantine_weight <= 0:
        return target.clone()
    pull = (honest_weights.unsqueeze(1) * (honest - target)).sum(dim=0)
    return target - epsilon * pull / byzantine_weight


# --- data poisoning -------------------------------------------------------------------------


def flip_labels(
    y: Tensor, *, mode: Literal["targeted", "all"], source: int, target: int, classes: int
) -> Tensor:
    """``source`` → ``target`` (targeted), or y → classes − 1 − y (all)."""
    if mode == "all":
        return (classes - 1) - y
    flipped = y.clone()
    flipped[y == source] = target
    return flipped


def trigger_mask(spec: BackdoorAttack, sample_shape: Sequence[int]) -> Tensor:
    """Where the trigger patch lies in one example of shape ``sample_shape``: a bool tensor of
    that shape, True on rows × cols of the image.

    Flat examples (``[D]``) are a height × width image (``image_shape``, else a square);
    examples with more dimensions are images already: the last two dimensions are height and
    width, and the patch covers every channel.

    Raises:
        ConfigError: a flat example and no ``image_shape`` while ``D`` is no square, the
            shape does not match the examples, or the patch leaves the image.
    """
    shape = tuple(sample_shape)
    if len(shape) == 1:
        (dim,) = shape
        if spec.image_shape is None:
            side = math.isqrt(dim)
            if side * side != dim:
                raise ConfigError(
                    "adversaries.image_shape", None, f"[height, width]: {dim} features is no square"
                )
            height, width = side, side
        else:
            height, width = spec.image_shape
            if height * width != dim:
                raise ConfigError(
                    "adversaries.image_shape", spec.image_shape, f"height * width = {dim} features"
                )
    elif len(shape) >= 2:
        height, width = shape[-2], shape[-1]
        if spec.image_shape is not None and list(spec.image_shape) != [height, width]:
            raise ConfigError(
                "adversaries.image_shape",
                spec.image_shape,
                f"[{height}, {width}], the last two dimensions of the examples {list(shape)}",
            )
    else:
        raise ConfigError("adversaries.attack", "backdoor", "examples with at least one feature")
    (row0, row1), (col0, col1) = spec.rows, spec.cols
    if row1 > height or col1 > width:
        raise ConfigError(
            "adversaries.rows/cols", [spec.rows, spec.cols], f"a patch inside {height}x{width}"
        )
    image = torch.zeros(height, width, dtype=torch.bool)
    image[row0:row1, col0:col1] = True
    return image.reshape(-1) if len(shape) == 1 else image.expand(shape).clone()


def apply_trigger(x: Tensor, mask: Tensor, value: float) -> Tensor:
    """A copy of the examples ``x`` [N, ...] with the features under ``mask`` set to ``value``."""
    triggered = x.clone()
    triggered[:, mask] = value
    return triggered


def poison(
    spec: AdversarySpec,
    data: tuple[Tensor, Tensor],
    full: tuple[Tensor, Tensor],
    classes: int,
) -> tuple[Tensor, Tensor]:
    """The training set of a data attacker: its own ``data``, poisoned as ``spec`` says.

    ``label_flip`` targeted flips ``source`` to ``target`` and, with ``augment``, adds every
    example of ``source`` from the whole training set ``full``, flipped (as the SybilWall
    reference does); ``all`` maps y → C−1−y. ``backdoor`` adds a triggered copy of every own
    example, labelled ``target`` (the own clean examples are kept, so the attacker's model
    stays accurate on clean inputs). Other attacks return ``data`` unchanged.
    """
    x, y = data
    match spec:
        case LabelFlipAttack(mode=mode, source=source, target=target, augment=augment):
            flipped = flip_labels(y, mode=mode, source=source, target=target, classes=classes)
            if mode == "targeted" and augment:
                extra = full[1] == source
                x = torch.cat([x, full[0][extra]])
                flipped = torch.cat([flipped, torch.full_like(full[1][extra], target)])
            return x, flipped
        case BackdoorAttack(target=target, value=value):
            triggered = apply_trigger(x, trigger_mask(spec, x.shape[1:]), value)
            return torch.cat([x, triggered]), torch.cat([y, torch.full_like(y, target)])
    return data


# --- attack success -----------------------------------------------------------------------


def success_rate(predictions: Tensor, target: int) -> Tensor:
    """Share of each row of ``predictions`` [B, N] equal to ``target`` (NaN when N = 0)."""
    if predictions.shape[-1] == 0:
        return torch.full(predictions.shape[:-1], float("nan"), dtype=torch.float64)
    return (predictions == target).to(torch.float64).mean(dim=-1)


def targeted_entry(specs: Sequence[AdversarySpec]) -> LabelFlipAttack | BackdoorAttack | None:
    """The first entry whose attack has a success rate (targeted label flip, backdoor)."""
    for spec in specs:
        if isinstance(spec, LabelFlipAttack) and spec.mode == "targeted":
            return spec
        if isinstance(spec, BackdoorAttack):
            return spec
    return None


class AttackSuccess:
    """Attack success rate of model vectors on the attack's test inputs.

    Args:
        spec: a targeted label flip or a backdoor.
        test: the common test set ``(x, y)``.
        logits: ``logits(vectors [B, P], x [N, ...]) -> [B, N, C]`` (e.g.
            :meth:`p2pfl.learn.batched.BatchedLearner.logits`).
    """

    def __init__(
        self,
        spec: LabelFlipAttack | BackdoorAttack,
        test: tuple[Tensor, Tensor],
        logits: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        x, y = test
        if isinstance(spec, LabelFlipAttack):
            self.inputs = x[y == spec.source]
        else:
            self.inputs = apply_trigger(
                x[y != spec.target], trigger_mask(spec, x.shape[1:]), spec.value
            )
        self.target = spec.target
        self._logits = logits

    @torch.no_grad()
    def __call__(self, vectors: Tensor) -> Tensor:
        """Per vector: the share of the attack's test inputs predicted as the target [B]."""
        if len(self.inputs) == 0:
            return torch.full((vectors.shape[0],), float("nan"), dtype=torch.float64)
        predictions = self._logits(vectors, self.inputs).argmax(dim=-1)
        return success_rate(predictions, self.target)


# --- placement ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdversaryPlan:
    """Who is Byzantine and why; ``entry_of[node]`` is the index of its ``[[adversaries]]``
    entry (None: honest). Sybil clones are nodes ``base_size ..``; ``groups`` lists each
    entry's clones, leader first."""

    specs: tuple[AdversarySpec, ...]
    base_size: int
    entry_of: tuple[int | None, ...]
    groups: tuple[tuple[int, ...], ...] = ()

    @property
    def size(self) -> int:
        return len(self.entry_of)

    @property
    def byzantine(self) -> list[bool]:
        return [entry is not None for entry in self.entry_of]

    @property
    def honest(self) -> list[bool]:
        return [entry is None for entry in self.entry_of]

    @property
    def clones(self) -> list[int]:
        return list(range(self.base_size, self.size))

    def spec_of(self, node: int) -> AdversarySpec | None:
        entry = self.entry_of[node]
        return None if entry is None else self.specs[entry]

    def nodes_of(self, entry: int) -> list[int]:
        return [node for node, index in enumerate(self.entry_of) if index == entry]


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, STREAM_ADVERSARIES, *path))


def plan_adversaries(
    specs: Sequence[AdversarySpec], graph: nx.Graph, relay: Sequence[bool], *, seed: int
) -> AdversaryPlan:
    """Place every entry's adversaries; **adds the Sybil clones to ``graph``** (in place).

    Raises:
        ConfigError: a listed node or Sybil target is not a node of the topology, a node is
            listed by two entries, or a clone wants more edges than it has targets.
    """
    base = graph.number_of_nodes()
    entry_of: list[int | None] = [None] * base
    groups: list[tuple[int, ...]] = []
    for index, spec in enumerate(specs):
        key = f"adversaries[{index}]"
        if isinstance(spec, NoAttack):
            continue
        if spec.sybils is not None:
            groups.append(_add_sybils(spec, index, graph, base, entry_of, seed))
            continue
        for node in _select(spec, index, graph, base, relay, entry_of, seed):
            if entry_of[node] is not None:
                raise ConfigError(f"{key}.nodes", node, "a node no earlier entry took")
            entry_of[node] = index
    return AdversaryPlan(tuple(specs), base, tuple(entry_of), tuple(groups))


def _select(
    spec: AdversarySpec,
    index: int,
    graph: nx.Graph,
    base: int,
    relay: Sequence[bool],
    entry_of: list[int | None],
    seed: int,
) -> list[int]:
    if spec.nodes is not None:
        if any(node >= base for node in spec.nodes):
            raise ConfigError(
                f"adversaries[{index}].nodes", spec.nodes, f"node indices in 0..{base - 1}"
            )
        return list(spec.nodes)
    candidates = [
        node
        for node in range(base)
        if entry_of[node] is None
        and (spec.among == "all" or (spec.among == "relays") == relay[node])
    ]
    wanted = spec.count if spec.count is not None else round((spec.fraction or 0.0) * base)
    chosen = choose_nodes(
        candidates,
        wanted,
        spec.choose,
        graph=graph,
        rng=_rng(seed, index),
        centrality_seed=derive_seed(seed, STREAM_ADVERSARIES, index, 1),
    )
    return sorted(chosen)


def _add_sybils(
    spec: AdversarySpec,
    index: int,
    graph: nx.Graph,
    base: int,
    entry_of: list[int | None],
    seed: int,
) -> tuple[int, ...]:
    key = f"adversaries[{index}]"
    targets = list(spec.sybil_targets) if spec.sybil_targets is not None else list(range(base))
    if any(node >= base for node in targets):
        raise ConfigError(f"{key}.sybil_targets", targets, f"node indices in 0..{base - 1}")
    if spec.sybil_edges > len(targets):
        raise ConfigError(
            f"{key}.sybil_edges", spec.sybil_edges, f"at most {len(targets)} (the targets)"
        )
    if spec.sybil_choose == "degree":
        degree = dict(graph.degree())
        ranked = sorted(targets, key=lambda node: (-degree[node], node))
    rng = _rng(seed, index, 2)
    clones = []
    assert spec.sybils is not None
    for _ in range(spec.sybils):
        clone = graph.number_of_nodes()
        if spec.sybil_choose == "degree":
            peers = ranked[: spec.sybil_edges]
        else:
            picked = rng.choice(len(targets), size=spec.sybil_edges, replace=False)
            peers = sorted(targets[int(row)] for row in picked)
        graph.add_node(clone)
        graph.add_edges_from((clone, peer) for peer in peers)
        entry_of.append(index)
        clones.append(clone)
    return tuple(clones)


# --- what Byzantine nodes send -------------------------------------------------------------


class HoldsModel(Protocol):
    """A node whose current model an omniscient attack reads (a protocol core)."""

    @property
    def vector(self) -> Tensor:
        """The model the node stands on now."""
        ...


@dataclass(slots=True)
class _Sent:
    """The last envelope a Byzantine node's core sent, and what was made of it."""

    envelope: Envelope
    shared: Envelope | None = None
    by_receiver: dict[int, Envelope] = field(default_factory=dict)


class Adversary:
    """Rewrites what Byzantine nodes send (model attacks, Sybil clones); the engine calls
    :meth:`forge` for every ``Send`` of a node with ``byzantine[node]`` true.

    Args:
        plan: who is Byzantine, and with which attack.
        cores: every node's core; omniscient attacks read their current models.
        identities: every node's key (a forged model is sealed with its sender's).
        neighbours: every node's neighbour indices.
        initial: every node's initial model (what a free rider replays).
        seed: the run seed (random attacks draw from streams derived from it).
    """

    def __init__(
        self,
        plan: AdversaryPlan,
        *,
        cores: Sequence[HoldsModel],
        identities: Sequence[Identity],
        neighbours: Sequence[Sequence[int]],
        initial: Sequence[Tensor],
        seed: int,
    ) -> None:
        self.plan = plan
        self._cores = cores
        self._byzantine = plan.byzantine
        self._identities = identities
        self._neighbours = neighbours
        self._initial = initial
        self._seed = seed
        self._leader: dict[int, int] = {}
        for group in plan.groups:
            for clone in group:
                self._leader[clone] = group[0]
        self._group_model: dict[int, Tensor] = {}
        self._group_forged: dict[int, tuple[Tensor, Tensor]] = {}
        self._sent: dict[int, _Sent] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._memory: dict[int, Tensor] = {}
        self.forged = 0
        """Envelopes re-sealed so far."""
        self._model_kinds = model_kinds()
        """The kinds whose payload is a model, as the registered modes declare them
        (``ModeTraits.model_kinds``); a model attack rewrites only these."""

    @property
    def byzantine(self) -> list[bool]:
        """Whether each node is Byzantine."""
        return self._byzantine

    def forge(self, node: int, receiver: int, envelope: Envelope) -> Envelope:
        """What Byzantine ``node`` sends to ``receiver`` instead of ``envelope``."""
        spec = self.plan.spec_of(node)
        if spec is None or envelope.kind not in self._model_kinds:
            return envelope
        leader = self._leader.get(node)
        model_attack = spec.attack in MODEL_ATTACKS
        if leader is None and not model_attack:
            return envelope  # a data attacker's protocol is honest
        sent = self._sent.get(node)
        if sent is None or sent.envelope is not envelope:
            sent = _Sent(envelope)
            self._sent[node] = sent
            if leader == node:
                self._group_model[node] = self._decode(envelope)
        if not model_attack and leader == node:
            return envelope
        per_target = spec.attack in PER_TARGET_ATTACKS
        if not per_target and sent.shared is not None:
            return sent.shared
        if per_target and receiver in sent.by_receiver:
            return sent.by_receiver[receiver]
        own = self._group_model.get(leader) if leader is not None else None
        if own is None:
            own = self._decode(envelope)
        if not model_attack:
            model = own
        elif leader is not None and not per_target:
            # one draw per group model, so every clone sends the identical model
            cached = self._group_forged.get(leader)
            if cached is None or cached[0] is not own:
                cached = (own, self._attack(spec, node, receiver, own))
                self._group_forged[leader] = cached
            model = cached[1]
        else:
            model = self._attack(spec, node, receiver, own)
        forged = self._seal(node, envelope, model)
        if per_target:
            sent.by_receiver[receiver] = forged
        else:
            sent.shared = forged
        return forged

    # -- internals -------------------------------------------------------------------------

    def _decode(self, envelope: Envelope) -> Tensor:
        return decode_vector(envelope.spec, envelope.payload).clone()

    def _seal(self, node: int, envelope: Envelope, model: Tensor) -> Envelope:
        # A forged model goes out dense, in the wire dtype if the sender used one (an int8
        # sender's forgeries are float32).
        dtype = envelope.spec.dtype if envelope.spec.dtype in WIRE_DTYPES else "float32"
        spec, payload = encode_vector(model, dtype=dtype, samples=envelope.spec.samples)
        self.forged += 1
        return seal(
            self._identities[node],
            envelope.kind,
            seq=envelope.seq,
            round=envelope.round,
            payload=bytes(payload),
            spec=spec,
            meta=envelope.meta,
        )

    def _model(self, node: int) -> Tensor:
        return self._cores[node].vector

    def _honest_neighbours(self, node: int) -> list[int]:
        return [peer for peer in self._neighbours[node] if not self.byzantine[peer]]

    def _attack(self, spec: AdversarySpec, node: int, receiver: int, own: Tensor) -> Tensor:
        match spec:
            case SignFlipAttack(scale=scale):
                return sign_flip(own, scale)
            case GaussianAttack(sigma=sigma, mode=mode):
                return gaussian(own, sigma, mode, self._generator(node))
            case AlieAttack(z=z):
                honest = self._honest_neighbours(receiver)
                models = torch.stack([self._model(receiver), *(self._model(j) for j in honest)])
                degree = len(self._neighbours[receiver])
                chosen = alie_z(degree + 1, degree - len(honest)) if z is None else z
                return alie(models, chosen)
            case IpmAttack(epsilon=epsilon):
                honest = self._honest_neighbours(receiver)
                models = torch.stack([self._model(receiver), *(self._model(j) for j in honest)])
                return ipm(models, epsilon)
            case DissensusAttack(epsilon=epsilon):
                return self._dissensus(receiver, epsilon)
            case FreeRiderAttack(replay=replay):
                if replay == "initial":
                    return self._initial[node]
                previous = self._memory.get(node, self._initial[node])
                honest = self._honest_neighbours(node)
                if honest:
                    self._memory[node] = self._model(honest[0]).clone()
                return previous
        raise AssertionError(spec.attack)

    def _dissensus(self, target: int, epsilon: float) -> Tensor:
        degree = len(self._neighbours[target])
        honest: list[int] = []
        weights: list[float] = []
        byzantine_weight = 0.0
        for peer in self._neighbours[target]:
            weight = metropolis_weight(degree, len(self._neighbours[peer]))
            if self.byzantine[peer]:
                byzantine_weight += weight
            else:
                honest.append(peer)
                weights.append(weight)
        target_model = self._model(target)
        rows = (
            torch.stack([self._model(j) for j in honest])
            if honest
            else target_model.new_empty((0, target_model.numel()))
        )
        return dissensus(
            target_model,
            rows,
            torch.tensor(weights, dtype=torch.float32),
            byzantine_weight,
            epsilon,
        )

    def _generator(self, node: int) -> torch.Generator:
        generator = self._generators.get(node)
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(derive_seed(self._seed, STREAM_ADVERSARIES, node, 3))
            self._generators[node] = generator
        return generator
