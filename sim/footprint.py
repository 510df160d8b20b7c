"""What a scenario will need in memory, estimated before anything is allocated.

:func:`estimate` reads only the scenario (sizes, not data): the node count from the topology's
parameters, the model's parameter count from a model built on the meta device (no storage),
the dataset's shape from its parameters. :func:`check_fits` compares the estimate with the
memory the machine has available (``MemAvailable`` in ``/proc/meminfo``) and refuses a
scenario that does not fit with one line naming both and the keys to change.

The parts and their constants (bytes, measured on the standard workload, 2,000 and 8,000
nodes of a random 6-regular graph, torch 2.13 CPU):

* models: nodes x parameters x 4 bytes x copies. A node holds its model, the envelope it
  last sent (payload and decoded tensor), its pending metrics row, the training's input and
  output: :data:`MODEL_COPIES`; plus the received models its buffer holds, as the mode
  declares (``ModeTraits.buffered``; dsgd: received models are decoded once and shared by
  their receivers, so two per node whatever the degree; gossip: about two per push it
  receives, ``2 * fanout``, plus ``GOSSIP_IN_FLIGHT`` for pushes on their way; modest: ``sample_size``; one per neighbour for a mode that
  declares nothing) and :func:`optimizer_copies` per node for optimizer state (plain SGD:
  none), plus :func:`codec_copies` for a compressed codec's state.
* data: examples x (features x 4 + 8 label bytes) x :data:`DATA_COPIES` (the dataset, its
  training split and the nodes' shares are separate tensors).
* per node: :data:`NODE_BYTES` (key, core, peer set, sampler, rng, counters);
* graph: :data:`EDGE_BYTES` per edge (networkx adjacency, neighbour lists, peer tables);
  nothing for an implicit complete graph;
* training: one batched step of every node: nodes x batch x (input + output widths) x 4 x 3
  (inputs, activations, gradients; convolutions' feature maps are under-counted), plus one
  gradient per node.
* evaluation: a completed round's models stacked into one ``[n, P]`` tensor, which a worker
  thread evaluates while the loop goes on (the next round's models accumulate meanwhile), plus
  one chunk's activations: :data:`EVAL_CHUNK_EXAMPLES` x (input width +
  :data:`EVAL_CLASS_COPIES` x classes) x 4 (hidden widths are not counted).

The estimate is deliberately simple. Checked against peak RSS (which also holds the ~0.3 GB
of the interpreter and torch, already allocated when the check runs): the standard workload
at 8,000 nodes was estimated at 1.7 GB and peaked at 1.7 GB while every receiver kept its
own copy of each received model; with shared received models, 10,000 nodes peaked at 1.47 GB
(estimated 1.7 GB, 2.0 GB with one buffered copy per neighbour); the dense-graph bench (1,437
nodes, complete graph, gossip) was estimated at 0.25 GB and peaked at 0.67 GB, the 400-node
variant at 0.07 GB and 0.41 GB: with the 0.25 GB that the interpreter and the imported
packages hold before the run, gossip held about 76 KB (four models of 4,810 parameters) per
node more than counted, its pushes in flight: :data:`GOSSIP_IN_FLIGHT` (the estimates are
now 0.35 GB and 0.10 GB). When the engine keeps fewer copies of a model, change
:data:`MODEL_COPIES` and the buffered counts here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from p2pfl.codec import CODECS
from p2pfl.errors import ConfigError
from p2pfl.protocol import CoreConfig, mode_traits
from p2pfl.sizes import dataset_shape, parameter_count
from sim.scenario import Scenario

MODEL_COPIES = 5
DATA_COPIES = 3
NODE_BYTES = 24_000
EDGE_BYTES = 450
FLOAT_BYTES = 4
EVAL_CHUNK_EXAMPLES = 2**15
"""(Model, example) pairs in one evaluation chunk: :data:`p2pfl.learn.batched.EVAL_BUDGET`,
repeated here because this module must not import torch (a test keeps the two equal)."""
EVAL_CLASS_COPIES = 4
"""Class-wide tensors of an evaluation chunk: the logits, their class-first copy, the log
probabilities and the comparisons of the accuracy."""
MEMINFO = Path("/proc/meminfo")
IMPLICIT_KINDS = frozenset({"complete"})
"""Topologies the simulator keeps implicit when no adversary extends them."""

KEYS_TO_CHANGE = (
    "topology.n (or rows/cols), learner.hidden or learner.model_params, learner.batch_size, "
    "data.params"
)


def optimizer_copies(optimizer: str, momentum: float) -> int:
    """Model-sized tensors of optimiser state per node: Adam's two moments, SGD's momentum."""
    if optimizer in ("adam", "adamw"):
        return 2
    return 1 if momentum else 0


def codec_copies(codec: str, error_feedback: bool) -> int:
    """Model-sized tensors per node that a payload codec adds (p2pfl.protocol.compression).

    One envelope is sealed per model for all recipients, so a sender's state is per node,
    not per edge: ``int8`` with error feedback keeps one residual; a delta codec (``topk``,
    ``fedzip``) keeps one reference (the receivers' copy, or the previous model without error
    feedback), and receivers hold each sender's public copy, shared by all of them in the
    simulator (one reconstruction per envelope) but one round older than the buffered model:
    one more per node.
    """
    cls = CODECS.get(codec)
    if cls is None or not cls.lossy:
        return 0
    if cls.delta:
        return 2
    return 1 if error_feedback else 0


@dataclass(frozen=True, slots=True)
class Footprint:
    """Estimated bytes by part; :attr:`total` is their sum."""

    nodes: int
    params: int
    models: int
    data: int
    per_node: int
    graph: int
    training: int
    evaluation: int = 0

    @property
    def total(self) -> int:
        return (
            self.models + self.data + self.per_node + self.graph + self.training + self.evaluation
        )

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {_size(value)}"
            for name, value in (
                ("models", self.models),
                ("data", self.data),
                ("per-node state", self.per_node),
                ("graph", self.graph),
                ("training batch", self.training),
                ("evaluation", self.evaluation),
            )
            if value
        )
        return (
            f"about {_size(self.total)} for {self.nodes} nodes x {self.params} parameters ({parts})"
        )


def _size(count: int) -> str:
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KB"


def node_count(scenario: Scenario) -> int | None:
    """Nodes of the topology (and Sybil clones), from its parameters; None if unknown (a
    topology file)."""
    params = scenario.topology_params()
    if "n" in params:
        base = params["n"]
    elif "rows" in params and "cols" in params:
        base = params["rows"] * params["cols"]
    else:
        return None
    if not isinstance(base, int):
        return None
    return base + sum(spec.sybils or 0 for spec in scenario.adversaries)


def mean_degree(scenario: Scenario, nodes: int) -> float:
    """The topology's mean degree, from its kind and parameters (6 when unknown)."""
    params = scenario.topology_params()
    kind = scenario.topology.kind

    def number(key: str, default: float) -> float:
        value = params.get(key, default)
        return float(value) if isinstance(value, int | float) else default

    degree = {
        "ring": 2.0,
        "line": 2.0,
        "star": 2.0,
        "complete": nodes - 1.0,
        "grid": 4.0,
        "torus": 4.0,
        "erdos_renyi": number("p", 0.0) * (nodes - 1),
        "random_regular": number("d", 6.0),
        "watts_strogatz": number("k", 6.0),
        "barabasi_albert": 2.0 * number("m", 3.0),
        "random_geometric": math.pi * number("radius", 0.0) ** 2 * (nodes - 1),
        "exponential": 2.0 * math.log2(max(nodes, 2)),
        "two_cliques": nodes / 2.0,
    }.get(kind, 6.0)
    return max(0.0, min(degree, nodes - 1.0))


def estimate(scenario: Scenario) -> Footprint | None:
    """The scenario's memory footprint, or None when its size is unknown before building it.

    Raises:
        ConfigError: the dataset is unknown or its parameters are invalid.
    """
    nodes = node_count(scenario)
    if nodes is None:
        return None
    examples, sample_shape, classes = dataset_shape(scenario.data.dataset, scenario.data.params)
    features = math.prod(sample_shape)
    learner = scenario.learner
    try:
        params = parameter_count(learner.model, learner.model_parameters(), sample_shape, classes)
    except ConfigError as exc:
        raise ConfigError(f"learner.{exc.key}", exc.value, exc.allowed) from None
    degree = mean_degree(scenario, nodes)
    protocol = scenario.protocol
    declared = mode_traits(protocol.mode).buffered
    buffered = degree
    if declared is not None:
        config = CoreConfig.from_settings(
            protocol, rounds=scenario.rounds, local_steps=learner.local_steps
        )
        buffered = declared(config, degree)
    copies = MODEL_COPIES + optimizer_copies(learner.optimizer, learner.momentum) + buffered
    copies += codec_copies(protocol.codec, protocol.error_feedback)
    implicit = scenario.topology.kind in IMPLICIT_KINDS and not scenario.adversaries
    edges = 0 if implicit else nodes * degree / 2
    batch = min(scenario.learner.batch_size, max(1, examples // max(nodes, 1)))
    return Footprint(
        nodes=nodes,
        params=params,
        models=int(nodes * params * FLOAT_BYTES * copies),
        data=examples * (features * FLOAT_BYTES + 8) * DATA_COPIES,
        per_node=nodes * NODE_BYTES,
        graph=int(edges * EDGE_BYTES),
        training=nodes * batch * (features + classes) * FLOAT_BYTES * 3
        + nodes * params * FLOAT_BYTES,
        evaluation=nodes * params * FLOAT_BYTES
        + EVAL_CHUNK_EXAMPLES * (features + EVAL_CLASS_COPIES * classes) * FLOAT_BYTES,
    )


def available_bytes() -> int | None:
    """Memory the machine can give without swapping (``MemAvailable``), None if unknown."""
    try:
        text = MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_fits(scenario: Scenario, available: int | None = None) -> Footprint | None:
    """Refuse a scenario whose estimated footprint exceeds the available memory.

    Args:
        scenario: the scenario about to run.
        available: bytes available; by default read from the machine.

    Returns:
        The estimate (None when the size is unknown before building).

    Raises:
        ConfigError: the estimate exceeds the available memory; the one-line message names
            the estimate, the available memory, the keys to change and ``--force``.
    """
    footprint = estimate(scenario)
    if available is None:
        available = available_bytes()
    if footprint is None or available is None or footprint.total <= available:
        return footprint
    raise ConfigError(
        "topology.n",
        footprint.nodes,
        f"needs {footprint.describe()}, but {_size(available)} is available; "
        f"lower {KEYS_TO_CHANGE}, or pass --force to run anyway",
    )
