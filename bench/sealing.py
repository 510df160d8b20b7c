"""Sealing and checking one model update, step by step, as a ratio to another source tree.

Workload: the standard workload's message (bench/sim_throughput.py): a 2,410-parameter
float32 model (MLP 64-32-10) sealed as one ``MODEL_UPDATE`` with ``meta = {"deg": 6}``,
framed, parsed and decoded as the simulator does once per node-round, and the Ed25519
signatures of a round's frames checked by a verifier child process (:mod:`sim.verifier`).

Each step is timed in-process, the steps taking turns, best of ``--reps`` runs of
``--calls`` calls (microseconds per call): the best run is the one least disturbed by the
other processes of a shared machine, and short runs (100 calls, a few milliseconds) let some
fit between two preemptions even at a load average of 8. ``loop path`` is the sum of the steps the
simulator's loop thread runs per node-round (seal, frame, parse, submit to the verifier,
decode); ``child per frame`` is the verifier process's CPU time per record (from /proc, over
``--frames`` records of 50 signers) and ``submit`` the loop's CPU time per record handed
to it.

    .venv/bin/python bench/sealing.py [--calls 100] [--reps 50] [--frames 4000]
        [--baseline TREE [--repeat 3]]

``--baseline TREE`` runs the same measurement ``--repeat`` times in fresh processes, taking
turns between ``TREE`` (on ``PYTHONPATH``) and this tree, and prints each step's best figure
per tree and the ratio (baseline / this tree: above 1 means this tree is faster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from sim_throughput import best_per_call

from p2pfl.identity import Identity
from p2pfl.protocol import messages
from p2pfl.wire import encode_frame, parse_frame
from sim.verifier import VerifierProcess

PARAMETERS = 2410
"""MLP 64-32-10: 64*32 + 32 + 32*10 + 10."""
SIGNERS = 50


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verifier_costs(frames: int) -> tuple[float, float]:
    """The verifier child's CPU microseconds per record and the submitting thread's, over
    ``frames`` records signed by :data:`SIGNERS` identities."""
    records = []
    for index in range(SIGNERS):
        identity = Identity.from_seed(bytes([index + 1]) * 32)
        sealer = messages.Sealer(identity, wire_dtype="float32", samples=64, seq_start=0, degree=6)
        parsed, signed = parse_frame(encode_frame(sealer.seal(torch.randn(PARAMETERS), 0)))
        records.append((parsed.sender.raw, parsed.signature, signed))
    verifier = VerifierProcess()
    try:
        for key, signature, signed in records:  # warm up: the child has imported everything
            verifier.wait(verifier.submit(key, signature, signed))
        child_started, loop_started = process_cpu(verifier.pid), time.thread_time()
        for index in range(frames):
            ticket = verifier.submit(*records[index % SIGNERS])
        loop = time.thread_time() - loop_started
        verifier.wait(ticket)
        child = process_cpu(verifier.pid) - child_started
    finally:
        verifier.close()
    return child / frames * 1e6, loop / frames * 1e6


def measure(calls: int, reps: int, frames: int) -> dict[str, float]:
    torch.set_num_threads(1)
    identity = Identity.from_seed(bytes(range(32)))
    sealer = messages.Sealer(identity, wire_dtype="float32", samples=64, seq_start=0, degree=6)
    vector = torch.randn(PARAMETERS)
    envelope = sealer.seal(vector, 3)
    frame = encode_frame(envelope)
    parsed, signed = parse_frame(frame)

    def decode() -> object:
        # A fresh parse per call: the decoded model is kept on the envelope it came from.
        return messages.decode_model(parse_frame(frame)[0], torch.Size([PARAMETERS]))

    steps = {
        "seal": lambda: sealer.seal(vector, 3),
        "sign": lambda: identity.sign(signed),
        "encode_frame": lambda: encode_frame(envelope),
        "parse_frame": lambda: parse_frame(frame),
        "parse+decode": decode,
        "verify": lambda: parsed.sender.verify(parsed.signature, signed),
    }
    best = best_per_call(steps, calls=calls, repeats=reps, clock=time.perf_counter)
    figures = {step: seconds * 1e6 for step, seconds in best.items()}
    figures["decode"] = figures.pop("parse+decode") - figures["parse_frame"]
    figures["child per frame"], figures["submit"] = verifier_costs(frames)
    figures["loop path"] = (
        figures["seal"]
        + figures["encode_frame"]
        + figures["parse_frame"]
        + figures["submit"]
        + figures["decode"]
    )
    return figures


def compare(baseline: Path, repeat: int, argv: list[str]) -> None:
    """Run :func:`measure` in fresh processes, ``baseline`` and this tree in turns."""
    trees = {"baseline": baseline.resolve(), "this tree": Path(__file__).resolve().parents[1]}
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            output = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *argv],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for line in output.splitlines():
                step, _, value = line.rpartition(": ")
                if step and value.endswith(" us"):
                    figure = float(value[:-3])
                    best[name][step] = min(best[name].get(step, figure), figure)
    for step, base in best["baseline"].items():
        ours = best["this tree"][step]
        print(f"{step:>16}: baseline {base:8.1f} us, this tree {ours:8.1f} us, {base / ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.baseline is not None:
        argv = ["--calls", str(args.calls), "--reps", str(args.reps)]
        compare(args.baseline, args.repeat, [*argv, "--frames", str(args.frames)])
        return
    for step, figure in measure(args.calls, args.reps, args.frames).items():
        print(f"{step}: {figure:.1f} us")


if __name__ == "__main__":
    main()
