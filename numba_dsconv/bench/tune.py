"""`numba-dsconv tune`: the CPU GEMM blocking (_config.TUNED) timed on this machine, the best
written to _config.tuning_file() and used by every later process on the same machine.

The defaults follow the caches (_config: the A tile in half of L2, the weight panel of a
reduction block in a quarter of L2). Tuning times candidates around them on the fused
separable kernel, which runs every part of the blocking (tile, panel, reduction block): first
the tile (bytes x pixels, the reduction block at its default), then the reduction block with
the best tile. Candidates are timed interleaved in one process, round after round (the rounds
alternate the candidates, so a slow spell of a shared machine falls on all of them); a
candidate's score is the geometric mean over the workloads of its median time over the
default's. A candidate replaces the default only if it is faster by more than ``margin``
(2 %: less is noise here).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _config
from .suite import layer

Values = dict[str, int]


@dataclass
class TuneResult:
    defaults: Values
    chosen: Values
    score: float  # chosen's time / the defaults' (geometric mean over the workloads)
    workloads: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None


def defaults() -> Values:
    """The cache-derived values (what _config sets before any tuning file is read)."""
    return dict(_config.BLOCKING_DEFAULTS)


def tile_candidates(base: Values) -> list[Values]:
    out = []
    for frac in (0.5, 1.0, 1.5):
        for pixels in (128, 256, 384):
            tile = int(base["CPU_TILE_BYTES"] * frac) // 4096 * 4096
            out.append({**base, "CPU_TILE_BYTES": max(4096, tile), "CPU_TILE_MAX_PIXELS": pixels})
    return out


def kc_candidates(base: Values) -> list[Values]:
    """Reduction blocks of 256, 512 and 1024 channels and the default: the tuning layers'
    reductions are 128-1024 deep, and a block of twice that or more runs them in one (the
    gemm_split cap), so larger candidates would time the same kernels."""
    values = sorted({v for v in (256, 512, 1024, base["CPU_GEMM_KC"]) if 64 <= v <= 4096})
    return [{**base, "CPU_GEMM_KC": v} for v in values]


def _workloads(layers: list[int], batches: list[int]) -> list[tuple[str, Callable[[], Any]]]:
    import numba_dsconv as nd

    out = []
    for n in batches:
        for number in layers:
            lay = layer(number)
            x, dw, pw = lay.arrays(n)
            kw = {"stride": lay.stride, "padding": lay.padding}

            def call(x=x, dw=dw, pw=pw, kw=kw) -> Any:
                return nd.separable(x, dw, pw, **kw)

            out.append((f"layer {number} N={n}", call))
    return out


def _apply(values: Values) -> None:
    for k, v in values.items():
        setattr(_config, k, v)


def _time(fn: Callable[[], Any], budget_s: float) -> float:
    """The median of a few calls (at least 3, about ``budget_s`` in all)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(3, min(15, int(budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _compare(
    cands: list[Values],
    work: list[tuple[str, Callable[[], Any]]],
    rounds: int,
    budget_s: float,
    progress: Callable[[int, int], None],
) -> list[list[float]]:
    """times[c][w]: the best over rounds of candidate c's median on workload w."""
    times = [[math.inf] * len(work) for _ in cands]
    total, done = rounds * len(cands), 0
    for _ in range(rounds):
        for c, values in enumerate(cands):
            _apply(values)
            for w, (_, fn) in enumerate(work):
                times[c][w] = min(times[c][w], _time(fn, budget_s))
            done += 1
            progress(done, total)
    return times


def _score(row: list[float], base: list[float]) -> float:
    return float(np.exp(np.mean(np.log(np.array(row) / np.array(base)))))


def tune(
    layers: list[int] | None = None,
    batches: list[int] | None = None,
    rounds: int = 3,
    budget_s: float = 0.15,
    margin: float = 0.02,
    save: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> TuneResult:
    """Time the candidates (see the module docstring) and, with ``save``, write the best to
    _config.tuning_file(); _config's values in this process are left as they were."""
    layers = layers or [3, 5, 7]
    batches = batches or [1, 8]
    report = progress or (lambda stage, done, total: None)
    saved = {k: getattr(_config, k) for k in _config.TUNED}
    base = defaults()
    work = _workloads(layers, batches)
    trials: list[dict[str, Any]] = []
    try:
        _apply(base)
        for _, fn in work:  # compile (or load) and warm up
            fn()
        best = base
        for stage, make in (("tile", tile_candidates), ("reduction block", kc_candidates)):
            cands = make(best)
            if best not in cands:
                cands.insert(0, best)
            ref = cands.index(best)
            times = _compare(cands, work, rounds, budget_s, lambda d, t, s=stage: report(s, d, t))
            scores = [_score(row, times[ref]) for row in times]
            for values, row, sc in zip(cands, times, scores, strict=True):
                trials.append({"stage": stage, "values": values, "seconds": row, "score": sc})
            i = int(np.argmin(scores))
            if scores[i] < 1.0 - margin:
                best = cands[i]
        # the chosen values against the defaults, once more, interleaved
        final = _compare([base, best], work, rounds, budget_s, lambda d, t: report("check", d, t))
        score = _score(final[1], final[0])
        if score >= 1.0 - margin:
            best, score = base, 1.0
    finally:
        _apply(saved)
    result = TuneResult(base, best, score, [name for name, _ in work], trials)
    if save:
        result.path = write(result)
    return result


def write(result: TuneResult) -> str:
    """Write the result where _config reads it; returns the path."""
    path = _config.tuning_file()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {
        "machine": _config.machine_key(),
        "values": result.chosen,
        "defaults": result.defaults,
        "score": result.score,
        "workloads": result.workloads,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trials": result.trials,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # atomic: a process starting now reads the old file or the new one
    return path
