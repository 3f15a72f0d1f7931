"""Timing: interleaved samples (A B C A B C ...) after warm-up, medians, per-call latency.

Every function timed here must be warm (compiled) already. ``sync`` waits for the device
(``cuda.synchronize`` on a GPU, a no-op on the CPU) so that an asynchronous launch is never
timed as if it had finished.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

Timed = tuple[Callable[[], Any], Callable[[], None]]
"""(call, sync)."""


def no_sync() -> None:
    return None


def sample(fn: Callable[[], Any], number: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``number`` back-to-back calls (a launch overlaps the previous
    call's work on a GPU: this is the throughput)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) / number


def time_interleaved(
    fns: dict[str, Timed],
    repeat: int,
    *,
    min_sample_s: float = 0.02,
    on_round: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call seconds of each function, sampled A B C A B C ... ``repeat`` times.

    Each sample averages ``number`` back-to-back calls (chosen per function so a sample lasts
    about ``min_sample_s``, at least one call). Returns (samples by name, number by name).
    """
    numbers = {}
    for name, (fn, sync) in fns.items():
        t = sample(fn, 1, sync)
        numbers[name] = max(1, min(10_000, int(min_sample_s / max(t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat):
        for name, (fn, sync) in fns.items():
            samples[name].append(sample(fn, numbers[name], sync))
        if on_round is not None:
            on_round(r + 1)
    return samples, numbers


def alternating_processes(
    module: str,
    names: list[str],
    args: list[str],
    threads: int,
    rounds: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{name: the JSON object each of its ``rounds`` workers printed}: round after round, one
    process per name in turn (``python -m module NAME *args``, on ``threads`` Numba and OpenMP
    threads), so that the sides alternate and no two thread pools share a process (a pool
    that has just finished spins for a while and takes the cores from the next call: in one
    process the training step of torch and ours, alternating, each met the other's pool)."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    total = rounds * len(names)
    for k in range(rounds):
        for i, name in enumerate(names):
            if progress is not None:
                progress(k * len(names) + i, total)
            cmd = [sys.executable, "-m", module, name, *args]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = done.stdout.strip().splitlines()
            try:
                if done.returncode != 0 or not lines:
                    raise ValueError
                out[name].append(json.loads(lines[-1]))
            except ValueError:  # no JSON line either (json's error is a ValueError)
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"the {name} worker failed: {' '.join(tail)}") from None
    if progress is not None:
        progress(total, total)
    return out


def default_repeat(call_s: float) -> int:
    """Samples per side when no repeat is given: more for short calls."""
    if call_s < 0.01:
        return 15
    if call_s < 0.1:
        return 11
    return 7


def call_latency(fn: Callable[[], Any], sync: Callable[[], None], reps: int, wait: bool) -> float:
    """Median wall seconds of one call, alone (the device idle before it): until the call
    returns (``wait`` False: an asynchronous launch is not waited for), or until its work has
    finished (``wait`` True)."""
    for _ in range(min(20, reps)):
        fn()
    sync()
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if wait:
            sync()
        walls.append(time.perf_counter() - t0)
        if not wait:
            sync()
    return statistics.median(walls)


def rotating(one: Callable[[Any], Any], inputs: list[Any]) -> Callable[[], Any]:
    """A call of ``one`` on the next of ``inputs`` each time (so a GPU call does not find its
    input in the L2 cache the previous call left it in)."""
    if len(inputs) == 1:
        x0 = inputs[0]
        return lambda: one(x0)
    state = {"i": 0}

    def call() -> Any:
        i = state["i"]
        state["i"] = (i + 1) % len(inputs)
        return one(inputs[i])

    return call
