"""Per-message cost of the dsgd core and the wire decoding, as a ratio to another tree.

Workload: 7 dsgd cores on a complete graph (degree 6, as the standard workload's 6-regular
graph), MLP 64-32-10 sized vectors (2,410 floats), sample-weighted mean, signatures on. Every
round, each core gets ``TrainingFinished`` (a vector drawn before timing starts), seals and
sends its model; each envelope is framed, decoded and verified once and handed to its 6
receivers as ``MessageReceived``, the way the simulator delivers it. So one node-round here is
what a node of the standard workload does per round, minus training and evaluation: one
``TrainingFinished``, one seal, one frame decode, 6 deliveries, one merge.

    PYTHONPATH=. .venv/bin/python bench/core_messages.py [--rounds 400]
        [--baseline TREE [--repeat N]]

It prints the main-thread CPU seconds of the whole loop and those of its two parts: the cores'
``handle`` calls and the frame encoding and decoding (signing and verifying included), and the
Python and builtin calls per node-round of a short run (deterministic, so load-proof). With
``--baseline TREE`` it runs itself in turns in fresh processes against ``TREE`` and this tree
(see ``bench/sim_throughput.py``) and prints the ratios of the medians (above 1: this tree is
faster).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import sim_throughput
import torch

from p2pfl.identity import Identity
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import CoreConfig, make_core
from p2pfl.protocol.actions import Send
from p2pfl.protocol.events import MessageReceived, NeighboursConnected, Started, TrainingFinished
from p2pfl.wire import decode_frame, encode_frame

NODES = 7
SIZE = 64 * 32 + 32 + 32 * 10 + 10


def run(rounds: int) -> tuple[float, float, float, int]:
    """(loop, handle, frames) main-thread CPU seconds and the node-rounds done."""
    identities = [Identity.from_seed(bytes([index + 1]) * 32) for index in range(NODES)]
    ids = [identity.node_id for identity in identities]
    config = CoreConfig(mode="dsgd", rounds=rounds, round_timeout=1e9)
    generator = torch.Generator().manual_seed(1)
    cores = [
        make_core(
            config,
            identity=identity,
            neighbours=[peer for peer in ids if peer != identity.node_id],
            vector=torch.randn(SIZE, generator=generator),
            samples=64,
            merge=make_merge_rule("weighted"),
            rng=np.random.default_rng(index),
        )
        for index, identity in enumerate(identities)
    ]
    trained = torch.randn(rounds, NODES, SIZE, generator=generator)
    index = {peer: at for at, peer in enumerate(ids)}
    now = 0.0
    for core in cores:
        core.handle(NeighboursConnected(), now=now)
        core.handle(Started(), now=now)
    handle_cpu = frame_cpu = 0.0
    clock = time.thread_time
    started = clock()
    for round_ in range(rounds):
        now += 1.0
        outbox: list[tuple[int, list[Send]]] = []
        for node, core in enumerate(cores):
            before = clock()
            actions = core.handle(
                TrainingFinished(vector=trained[round_, node], loss=0.5, steps=2), now=now
            )
            handle_cpu += clock() - before
            outbox.append((node, [action for action in actions if isinstance(action, Send)]))
        for node, sends in outbox:
            before = clock()
            verified = decode_frame(encode_frame(sends[0].envelope))
            frame_cpu += clock() - before
            sender = ids[node]
            before = clock()
            for send in sends:
                cores[index[send.peer]].handle(
                    MessageReceived(peer=sender, envelope=verified), now=now
                )
            handle_cpu += clock() - before
    loop_cpu = clock() - started
    assert all(core.round == rounds for core in cores), "every round closed"
    return loop_cpu, handle_cpu, frame_cpu, rounds * NODES


def calls_per_node_round(rounds: int) -> float:
    """Python and builtin calls per node-round of a run of ``rounds`` (setup included, so a
    short run overstates it a little): a cost that machine load does not blur."""
    # The tree under test is on PYTHONPATH (see the module docstring), its tests too.
    from tests.protocol.test_peers import calls_during

    done: list[int] = []
    count = calls_during(lambda: done.append(run(rounds)[3]))
    return count / done[0]


_FIGURES = {
    "calls": re.compile(r"^calls per node-round: ([0-9.]+)"),
    "loop": re.compile(r"^loop main-thread CPU: ([0-9.]+) s"),
    "handle": re.compile(r"^core handle CPU: ([0-9.]+) s"),
    "frames": re.compile(r"^frame encode\+decode CPU: ([0-9.]+) s"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.baseline is not None:
        seconds = sim_throughput._unit
        # compare() prints every figure in seconds; the call count has no unit.
        sim_throughput._unit = lambda figure: "" if figure == "calls" else seconds(figure)
        sim_throughput.compare(
            args.baseline, args.repeat, script=__file__, figures_of=_FIGURES, extra=()
        )
        return
    torch.set_num_threads(1)
    loop_cpu, handle_cpu, frame_cpu, node_rounds = run(args.rounds)
    print(f"{node_rounds} node-rounds, {NODES} cores of degree {NODES - 1}, {SIZE} floats")
    print(
        f"loop main-thread CPU: {loop_cpu:.3f} s ({1e6 * loop_cpu / node_rounds:.0f} µs/node-round)"
    )
    print(
        f"core handle CPU: {handle_cpu:.3f} s ({1e6 * handle_cpu / node_rounds:.0f} µs/node-round)"
    )
    print(f"calls per node-round: {calls_per_node_round(20):.0f}")
    print(
        f"frame encode+decode CPU: {frame_cpu:.3f} s ({1e6 * frame_cpu / node_rounds:.0f} µs/node-round)"
    )


if __name__ == "__main__":
    main()
