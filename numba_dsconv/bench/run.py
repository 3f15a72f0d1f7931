"""A benchmark run: ceilings, then each layer compiled, checked against float64 and timed
interleaved with its anchors (``run_bench``); and the GPU script's extra measurements (the
separable kernel under other _config settings, the N=1 call broken down)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numba

from .cases import ANCHORS, DEVICES, OURS, RTOL_FLOAT32, TIMED_ALONE, Case, check_case
from .machine import (
    Ceilings,
    Progress,
    machine_info,
    measure_ceilings,
    no_progress,
    serial_blas,
    thread_limits,
    torch_module,
)
from .report import BenchResult, LayerResult, side
from .suite import LAYERS, Layer
from .suite import layer as suite_layer
from .timing import Timed, call_latency, default_repeat, sample, time_interleaved
from .work import roofline_floor


def parse_layers(spec: str | Sequence[int | Layer] | None) -> list[Layer]:
    """'1,3,7' or '1-4,7' or a sequence of numbers / Layer objects -> suite layers."""
    if spec is None:
        return list(LAYERS)
    if isinstance(spec, str):
        numbers: list[int | Layer] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part),) * 2
            except ValueError:
                raise ValueError(f"layers must look like '1,3,7' or '1-11'; got {spec!r}") from None
            if hi < lo or hi - lo >= len(LAYERS):  # checked before the range is expanded
                raise ValueError(
                    f"layers: {part!r} is not a range of suite layers (1-{len(LAYERS)})"
                )
            numbers.extend(range(lo, hi + 1))  # each number checked by suite_layer below
        spec = numbers
    out = [item if isinstance(item, Layer) else suite_layer(int(item)) for item in spec]
    if not out:
        raise ValueError("layers selects no layer")
    return out


def _anchor_names(device: str, anchors: bool) -> tuple[list[str], str | None]:
    """(anchor names to time, or [] with the reason)."""
    torch = torch_module()
    if not anchors:
        note = "anchors not requested"
    elif torch is None:
        note = "torch not installed"
    elif device == "cuda" and not torch.cuda.is_available():
        note = "torch has no CUDA device"
    else:
        note = None
    return ([] if note else [name for name, _ in ANCHORS[device]]), note


@dataclass
class _Prepared:
    case: Case
    fns: dict[str, Timed]
    errors: dict[str, float]
    call_s: float


def _prepare(lay: Layer, op: str, batch: int, device: str, with_anchors: bool) -> _Prepared:
    """Build a case, compile (or load) and warm up every side, check each against float64."""
    case = Case(lay, op, batch, device)
    fns = {OURS: case.numba_fn()}
    if with_anchors:
        fns.update(case.torch_fns())
    with serial_blas():
        ref = case.reference()
    errors, call_s = {}, 0.0
    for name, (fn, sync) in fns.items():
        result = fn()  # the first call compiles (or loads from the disk cache)
        sync()
        errors[name] = case.relative_error(result, ref)
        del result
        for _ in range(2):
            call_s = max(call_s, sample(fn, 1, sync))
    return _Prepared(case, fns, errors, call_s)


def _row(p: _Prepared, samples: dict, numbers: dict, ceilings: Ceilings) -> LayerResult:
    w, lay = p.case.work, p.case.layer
    floor = roofline_floor(w.flops, w.nbytes, ceilings.compute_gflops, ceilings.copy_gbs)
    fma = ceilings.fma_gflops
    sides = {n: side(n, samples[n], numbers[n], w, floor, p.errors[n], fma) for n in p.fns}
    ours = sides.pop(OURS)
    return LayerResult(
        layer=lay.number,
        name=lay.name,
        hw=lay.hw,
        c_in=lay.c_in,
        c_out=lay.c_out,
        stride=lay.stride,
        op=p.case.op,
        batch=p.case.batch,
        device=p.case.device,
        flops=w.flops,
        nbytes=w.nbytes,
        intensity=w.intensity,
        floor_s=floor,
        ours=ours,
        anchors=sides,
        speedup={k: v.median_s / ours.median_s for k, v in sides.items()},
        ok=ours.ok,
    )


def run_bench(
    device: str = "cpu",
    batch: int = 1,
    layers: str | Sequence[int | Layer] | None = None,
    op: str = "separable",
    repeat: int | None = None,
    *,
    anchors: bool = True,
    ceilings: Ceilings | None = None,
    min_sample_s: float = 0.02,
    progress: Progress | None = None,
) -> BenchResult:
    """Measure the ceilings, then time ``op`` on each layer against the PyTorch anchors.

    Parameters
    ----------
    device : "cpu" or "cuda" (raises NotImplementedError when no GPU is usable)
    batch : N
    layers : suite layer numbers ("1,3,7", "1-11", [1, 3]) or Layer objects; default all
    op : "separable" | "depthwise" | "pointwise" | "conv2d"
    repeat : interleaved samples per side; default 7-15 depending on the call's duration
    anchors : time PyTorch too (when installed)
    ceilings : reuse ceilings measured earlier instead of measuring them again
    min_sample_s : each sample averages enough back-to-back calls to last about this long
    progress : ``progress(phase, label, done, total)``, see :data:`machine.Progress`

    Examples
    --------
    >>> from numba_dsconv.bench import run_bench
    >>> result = run_bench("cpu", batch=1, layers="9", repeat=3)  # doctest: +SKIP
    >>> result.ok, result.layers[0].speedup  # doctest: +SKIP
    (True, {'torch_channels_last': 1.8, 'torch_nchw': 2.8})
    """
    check_case(op, batch, device)
    if repeat is not None and repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat!r}")
    progress = progress or no_progress
    lays = parse_layers(layers)
    threads = numba.get_num_threads()
    anchor_names, note = _anchor_names(device, anchors)
    with thread_limits(threads):
        if ceilings is None:
            ceilings = measure_ceilings(device, progress=progress)
        machine = machine_info(device)
        prepared = []
        for i, lay in enumerate(lays):
            progress("compile", f"layer {lay.number}: JIT compile and warm-up", i, len(lays))
            prepared.append(_prepare(lay, op, batch, device, bool(anchor_names)))
        progress("compile", "done", len(lays), len(lays))
        rounds = [repeat or default_repeat(p.call_s) for p in prepared]
        # the interleaved group, then each anchor timed alone (cases.TIMED_ALONE), in order
        groups = [
            [{k: v for k, v in p.fns.items() if k not in TIMED_ALONE}]
            + [{k: v} for k, v in p.fns.items() if k in TIMED_ALONE]
            for p in prepared
        ]
        total, done = sum(r * len(g) for r, g in zip(rounds, groups, strict=True)), 0
        rows = []
        for p, r, layer_groups in zip(prepared, rounds, groups, strict=True):
            label = f"layer {p.case.layer.number}: {p.case.layer.name}"
            progress("measure", label, done, total)
            samples, numbers = {}, {}
            for fns in layer_groups:

                def on_round(k: int, d: int = done, lab: str = label) -> None:
                    progress("measure", lab, d + k, total)

                s, n = time_interleaved(fns, r, min_sample_s=min_sample_s, on_round=on_round)
                samples.update(s)
                numbers.update(n)
                done += r
            rows.append(_row(p, samples, numbers, ceilings))
        progress("measure", "done", total, total)
    settings = {
        "device": device,
        "batch": batch,
        "op": op,
        "layers": [lay.number for lay in lays],
        "repeat": repeat,
        "min_sample_s": min_sample_s,
        "threads": threads,
        "dtype": "float32",
        "rtol": RTOL_FLOAT32,
        "bias": False,
        "activation": None,
    }
    return BenchResult(machine, ceilings, settings, anchor_names, note, rows)


def time_variants(
    case: Case, variants: Sequence[tuple[str, dict[str, Any]]], repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds per call, relative error against float64) of the case's numba_dsconv
    call as shipped and under each variant's _config settings, timed interleaved. A variant
    whose error exceeds RTOL_FLOAT32 is still timed; the caller judges the errors."""
    ref = case.reference()
    fns = {"shipped": case.numba_fn()}
    fns.update((label, case.numba_fn(knobs=knobs)) for label, knobs in variants)
    errors = {}
    for label, (fn, sync) in fns.items():
        errors[label] = case.relative_error(fn(), ref)
        sync()
    samples, _ = time_interleaved(fns, repeat)
    return {k: statistics.median(v) for k, v in samples.items()}, errors


def call_breakdown(case: Case, reps: int = 300) -> dict[str, float]:
    """Median wall seconds of one call at the case's batch (meant for N=1 on a GPU): until it
    returns, until its work is done, with out=, and the bare kernel launch it ends in."""
    fn, sync = case.numba_fn()
    fn_out, _ = case.numba_fn(out=True)
    launch, _ = case.bare_launch() if case.device == "cuda" else (None, None)
    out = {
        "call": call_latency(fn, sync, reps, wait=False),
        "call+sync": call_latency(fn, sync, reps, wait=True),
        "call out=": call_latency(fn_out, sync, reps, wait=False),
    }
    if launch is not None:
        out["bare launch"] = call_latency(launch, sync, reps, wait=False)
        out["bare launch+sync"] = call_latency(launch, sync, reps, wait=True)
    return out


@dataclass
class PythonShare:
    """One layer's public call (CPU), timed call by call with the time inside its kernel's
    dispatcher: medians in seconds of the calls' wall time (``call_s``), of their kernel time
    (``kernel_s``) and of each call's difference (``python_s``): the library's own work per
    call (the fast path's lookup or the validation, the plan, the result's allocation, the
    call into the kernel), as it runs between kernels: from cold caches."""

    layer: Layer
    call_s: float
    kernel_s: float
    python_s: float

    def cells(self) -> list[str]:
        """#, layer, call, kernel, python (microseconds): a table row."""
        return [str(self.layer.number), self.layer.name, f"{self.call_s * 1e6:.1f}",
                f"{self.kernel_s * 1e6:.1f}", f"{self.python_s * 1e6:.1f}"]  # fmt: skip


@contextlib.contextmanager
def _timed_kernels() -> Iterator[list[float]]:
    """The CPU kernel table's dispatchers wrapped to note the seconds each call spends inside
    them, in the list yielded (the fast path's remembered calls dropped before and after: a
    prepared launch holds the dispatcher it was prepared with)."""
    from .. import api
    from ..cpu import backend

    spent: list[float] = []

    def timed(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent.append(time.perf_counter() - t0)

        return run

    table = dict(backend.KERNELS)
    api._FAST.clear()
    try:
        for op, k in table.items():
            backend.KERNELS[op] = k._replace(parallel=timed(k.parallel), serial=timed(k.serial))
        yield spent
    finally:
        backend.KERNELS.update(table)
        api._FAST.clear()


def python_share(
    layers: Sequence[Layer], op: str = "separable", batch: int = 1, repeat: int = 15
) -> list[PythonShare]:
    """Per layer, ``20 * repeat`` public calls (the GEMM weights packed beforehand, so that no
    call packs), each timed whole and inside its kernel's dispatcher (``_timed_kernels``):
    ``PythonShare``. Each call's difference is its own (the same call, the same caches): the
    difference of two medians of ~100 us calls moved by tens of microseconds with the host's
    noise. The wrapper's own frame (~0.3 us) counts as the library's."""
    rows = []
    with _timed_kernels() as spent:
        for lay in layers:
            call, _ = Case(lay, op, batch, "cpu").numba_fn(packed=True)
            call()  # compiled, planned and remembered outside the timing
            calls, kernels, python = [], [], []
            for _ in range(20 * repeat):
                spent.clear()
                t0 = time.perf_counter()
                call()
                t = time.perf_counter() - t0
                calls.append(t)
                kernels.append(sum(spent))
                python.append(t - sum(spent))
            med = statistics.median
            rows.append(PythonShare(lay, med(calls), med(kernels), med(python)))
    return rows


__all__ = [
    "DEVICES",
    "PythonShare",
    "call_breakdown",
    "parse_layers",
    "python_share",
    "run_bench",
    "time_variants",
]
