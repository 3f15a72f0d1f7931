"""The measuring engine behind ``numba-dsconv bench`` and the asv suites (benchmarks/).

Method (docs/PERFORMANCE.md): the machine's own ceilings are measured in the same run (SGEMM
rate, copy bandwidth); each layer of the MobileNet suite (:mod:`numba_dsconv.suite`) is timed
after a warm-up that keeps JIT compilation out of every timed region, interleaved with the
PyTorch anchors (A B C A B C ...), and summarised by the median of several samples. Every
timed result is checked against the float64 NumPy formulation (``_numpy_ref``).

Roofline: ``floor = max(FLOPs / SGEMM rate, bytes / copy bandwidth)`` with 2 FLOPs per
multiply-add and bytes = every input (x, weights) read once + the output written once, in the
result dtype. The intermediate of a fused separable layer is not counted. ``% of roofline =
floor / measured time``. The benchmarked calls carry no bias and no activation.

Nothing here prints: progress goes through a callback, results come back as dataclasses
(:class:`BenchResult`), and :func:`write_json` / :func:`plot_roofline` write them out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _config, _numpy_ref, api
from ._spec import ConvSpec, make_spec
from .cost import cost
from .suite import LAYERS, Layer
from .suite import layer as suite_layer

__all__ = [
    "ANCHORS",
    "OURS",
    "RTOL_FLOAT32",
    "DEVICES",
    "OPS",
    "BenchResult",
    "Case",
    "Ceilings",
    "LayerResult",
    "SideResult",
    "Work",
    "gpu_available",
    "machine_info",
    "measure_ceilings",
    "parse_layers",
    "plot_roofline",
    "roofline_floor",
    "run_bench",
    "thread_limits",
    "time_interleaved",
    "work",
    "write_json",
]

OPS: tuple[str, ...] = ("separable", "depthwise", "pointwise", "conv2d")
DEVICES: tuple[str, ...] = ("cpu", "cuda")

# A float32 result whose largest error, relative to the largest |value| of the float64
# reference, exceeds this is flagged as a mismatch.
RTOL_FLOAT32 = 1e-4

# GPU inputs are rotated through enough copies to cover this many bytes, so that a call does
# not find its input in L2 left there by the previous call (H200: 60 MB of L2).
GPU_ROTATE_BYTES = 128 * 1024 * 1024

# Anchor names and their labels, per device.
ANCHORS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("torch_channels_last", "torch CL"), ("torch_nchw", "torch NCHW")),
    "cuda": (("torch_fp32", "torch fp32"), ("torch_default", "torch default")),
}
OURS = "numba_dsconv"

Progress = Callable[[str, str, int, int], None]
"""``progress(phase, label, done, total)``; phase is "ceilings", "compile" or "measure"."""


def _no_progress(phase: str, label: str, done: int, total: int) -> None:
    return None


# --------------------------------------------------------------------------------------------
# work: FLOPs and bytes of one call, and the roofline


@dataclass(frozen=True)
class Work:
    """FLOPs and compulsory bytes of one call of ``op`` on a suite layer (float32)."""

    op: str
    batch: int
    flops: int
    nbytes: int
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.nbytes


def work(lay: Layer, op: str, batch: int, itemsize: int = 4) -> Work:
    """FLOPs (2 per multiply-add, from :func:`numba_dsconv.cost`) and bytes of one call.

    separable: x -> (N, H_out, W_out, C_out), the depthwise + pointwise MACs, the intermediate
    not counted; depthwise: x -> (N, H_out, W_out, C_in); pointwise: the pointwise stage of the
    layer, (N, H_out, W_out, C_in) -> (N, H_out, W_out, C_out); conv2d: the standard K x K
    convolution of the layer.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    c = cost(
        (batch, lay.hw, lay.hw, lay.c_in),
        lay.kernel,
        lay.c_out,
        stride=lay.stride,
        padding=lay.padding,
    )
    n, ho, wo, _ = c.output_shape
    x_shape = (batch, lay.hw, lay.hw, lay.c_in)
    mid_shape = (n, ho, wo, lay.c_in)
    out_shape = (n, ho, wo, lay.c_out)
    taps = lay.kernel * lay.kernel
    if op == "separable":
        macs = c.depthwise_macs + c.pointwise_macs
        elems = (x_shape, (taps * lay.c_in,), (lay.c_in * lay.c_out,), out_shape)
    elif op == "depthwise":
        macs = c.depthwise_macs
        elems = (x_shape, (taps * lay.c_in,), mid_shape)
        out_shape = mid_shape
    elif op == "pointwise":
        macs = c.pointwise_macs
        elems = (mid_shape, (lay.c_in * lay.c_out,), out_shape)
        x_shape = mid_shape
    else:
        macs = c.standard_macs
        elems = (x_shape, (taps * lay.c_in * lay.c_out,), out_shape)
    nbytes = itemsize * sum(math.prod(s) for s in elems)
    return Work(op, batch, 2 * macs, nbytes, x_shape, out_shape)


def roofline_floor(flops: float, nbytes: float, sgemm_gflops: float, copy_gbs: float) -> float:
    """Seconds a call cannot beat: max(FLOPs / SGEMM rate, bytes / copy bandwidth).

    A ceiling that is unknown (NaN) or not positive drops out of the max.
    """
    terms = [0.0]
    if math.isfinite(sgemm_gflops) and sgemm_gflops > 0:
        terms.append(flops / (sgemm_gflops * 1e9))
    if math.isfinite(copy_gbs) and copy_gbs > 0:
        terms.append(nbytes / (copy_gbs * 1e9))
    return max(terms)


# --------------------------------------------------------------------------------------------
# the machine: ceilings, thread counts, versions


@dataclass(frozen=True)
class Ceilings:
    """The machine's measured ceilings (best of several samples)."""

    device: str
    sgemm_gflops: float
    copy_gbs: float
    sgemm_n: int
    copy_bytes: int
    sgemm_samples_s: tuple[float, ...]
    copy_samples_s: tuple[float, ...]
    sgemm_source: str
    copy_source: str

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the two ceilings meet."""
        return self.sgemm_gflops / self.copy_gbs


def _best_of(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> list[float]:
    fn()  # warm-up: page faults, BLAS thread start, cuBLAS handle
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def measure_ceilings(
    device: str = "cpu",
    *,
    repeat: int = 5,
    sgemm_n: int | None = None,
    copy_bytes: int | None = None,
    progress: Progress | None = None,
) -> Ceilings:
    """Measure the SGEMM rate and copy bandwidth of ``device`` (best of ``repeat``).

    CPU: ``numpy.matmul`` of float32 n x n matrices (default n = 2048) with the BLAS limited to
    Numba's thread count (by the caller, see :func:`run_bench`); ``numpy.copyto`` of a
    float32 array (default 256 MiB), counting bytes read + written. CUDA: ``torch.matmul`` in
    strict fp32 (TF32 off; NaN when torch is missing) and a device-to-device copy of 1 GiB.
    """
    progress = progress or _no_progress
    if device == "cuda":
        return _measure_ceilings_cuda(repeat, sgemm_n or 8192, copy_bytes or (1 << 30), progress)
    n = sgemm_n or 2048
    nbytes = copy_bytes or (256 << 20)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    progress("ceilings", "SGEMM (numpy)", 0, 2)
    sg = _best_of(lambda: np.matmul(a, b, out=c), repeat, lambda: None)
    progress("ceilings", "copy bandwidth", 1, 2)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    cp = _best_of(lambda: np.copyto(dst, src), repeat, lambda: None)
    progress("ceilings", "done", 2, 2)
    return Ceilings(
        device="cpu",
        sgemm_gflops=2 * n**3 / min(sg) / 1e9,
        copy_gbs=2 * (nbytes // 4) * 4 / min(cp) / 1e9,
        sgemm_n=n,
        copy_bytes=(nbytes // 4) * 4,
        sgemm_samples_s=tuple(sg),
        copy_samples_s=tuple(cp),
        sgemm_source=f"numpy.matmul float32 {n}^3 ({_blas_name()})",
        copy_source="numpy.copyto float32 (one thread), read + write",
    )


def _measure_ceilings_cuda(repeat: int, n: int, nbytes: int, progress: Progress) -> Ceilings:
    from numba import cuda

    progress("ceilings", "copy bandwidth (device to device)", 0, 2)
    count = nbytes // 4
    src = cuda.to_device(np.ones(count, np.float32))
    dst = cuda.device_array(count, np.float32)
    cp = _best_of(lambda: dst.copy_to_device(src), repeat, cuda.synchronize)
    progress("ceilings", "SGEMM (torch fp32)", 1, 2)
    torch = _torch()
    sg: list[float] = []
    source = "no CUDA torch: no SGEMM ceiling, the floor uses bandwidth only"
    rate = float("nan")
    if torch is not None and torch.cuda.is_available():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            a = torch.randn(n, n, device="cuda")
            b = torch.randn(n, n, device="cuda")
            sg = _best_of(lambda: torch.matmul(a, b), repeat, torch.cuda.synchronize)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rate = 2 * n**3 / min(sg) / 1e9
        source = f"torch.matmul fp32 (TF32 off) {n}^3"
    progress("ceilings", "done", 2, 2)
    return Ceilings(
        device="cuda",
        sgemm_gflops=rate,
        copy_gbs=2 * count * 4 / min(cp) / 1e9,
        sgemm_n=n,
        copy_bytes=count * 4,
        sgemm_samples_s=tuple(sg),
        copy_samples_s=tuple(cp),
        sgemm_source=source,
        copy_source="numba.cuda device-to-device copy, read + write",
    )


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS threads not controlled: threadpoolctl not installed"
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            api_name, version = info.get("internal_api"), info.get("version")
            return f"{api_name} {version}, {info.get('num_threads')} threads"
    return "BLAS unknown"


@contextlib.contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """Run NumPy's BLAS and torch with ``n`` threads (Numba's count) inside the block."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        except ImportError:
            pass  # BLAS keeps its own count (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS)
        torch = _torch()
        if torch is not None:
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old)
        yield


def gpu_available() -> bool:
    """True when the CUDA backend can run (a GPU, or the Numba CUDA simulator)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no CUDA target, a broken driver: no GPU
        return False


def _threading_layer() -> str:
    from .cpu.backend import threading_layer

    return threading_layer()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Date, CPU, core and thread counts, threading layer, versions, GPUs, tunables."""
    import llvmlite
    import numba

    from . import __version__

    torch = _torch()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "numba_threads": numba.get_num_threads(),
        "threading_layer": _threading_layer(),
        "blas": _blas_name(),
        "platform": platform.platform(),
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "numba": numba.__version__,
            "llvmlite": llvmlite.__version__,
            "torch": None if torch is None else torch.__version__,
            "numba_dsconv": __version__,
        },
        "commit": _git_commit(),
        "config": {
            "fastmath": sorted(_config.FASTMATH),
            "serial_max_macs": _config.SERIAL_MAX_MACS,
            "cpu_tile_bytes": _config.CPU_TILE_BYTES,
            "cpu_tile_max_pixels": _config.CPU_TILE_MAX_PIXELS,
            "cpu_gemm_kc": _config.CPU_GEMM_KC,
        },
        "gpus": [],
    }
    if device == "cuda":
        from . import cuda

        info["gpus"] = cuda.describe_devices()
        if torch is not None and torch.cuda.is_available():
            info["gpus_torch"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
    return info


# --------------------------------------------------------------------------------------------
# one case: the arrays and the calls for a layer x op x batch x device


def _reference_conv2d(x: np.ndarray, w: np.ndarray, spec: ConvSpec) -> np.ndarray:
    y = np.zeros(spec.out_nhwc)
    w64 = np.asarray(w, np.float64)
    for i, j, tap in _numpy_ref._taps(x, spec):
        y += tap @ w64[i, j]
    return y


class Case:
    """One layer x op x batch x device: its arrays, the numba_dsconv call and the anchors.

    Raises NotImplementedError for ``device="cuda"`` when no GPU is usable (asv reads that as
    "skip").
    """

    def __init__(self, lay: Layer, op: str, batch: int, device: str = "cpu") -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1; got {batch!r}")
        if device == "cuda" and not gpu_available():
            raise NotImplementedError("device='cuda': no usable CUDA GPU on this machine")
        self.layer, self.op, self.batch, self.device = lay, op, batch, device
        self.work = work(lay, op, batch)
        x, dw, pw = lay.arrays(batch)
        rng = np.random.default_rng(1000 + lay.number)
        if op == "pointwise":
            # The pointwise stage of the layer: its input is the depthwise output's shape.
            x = rng.standard_normal(self.work.x_shape, dtype=np.float32)
        self.host: dict[str, np.ndarray] = {"x": x}
        if op in ("separable", "depthwise"):
            self.host["dw"] = dw
        if op in ("separable", "pointwise"):
            self.host["pw"] = pw
        if op == "conv2d":
            shape = (lay.kernel, lay.kernel, lay.c_in, lay.c_out)
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 / math.sqrt(lay.kernel * lay.kernel * lay.c_in))
            self.host["w"] = w
        self._rotation = 1
        if device == "cuda":
            self._rotation = max(1, min(4096, math.ceil(GPU_ROTATE_BYTES / x.nbytes)))

    # -- numba_dsconv --------------------------------------------------------------------

    def _call_args(self) -> tuple[list[Any], dict[str, Any], Callable[[], None]]:
        h = self.host
        if self.device == "cuda":
            from numba import cuda

            xs = [cuda.to_device(h["x"]) for _ in range(self._rotation)]
            ws = {k: cuda.to_device(v) for k, v in h.items() if k != "x"}
            return xs, ws, cuda.synchronize
        return [h["x"]], {k: v for k, v in h.items() if k != "x"}, _no_sync

    def numba_fn(self) -> tuple[Callable[[], Any], Callable[[], None]]:
        """(call, sync): one numba_dsconv call on the next input, and the wait for it."""
        xs, ws, sync = self._call_args()
        lay, dev = self.layer, self.device
        geo = {"stride": lay.stride, "padding": lay.padding, "device": dev}
        if self.op == "separable":
            dw, pw = ws["dw"], ws["pw"]

            def one(x: Any) -> Any:
                return api.separable(x, dw, pw, **geo)
        elif self.op == "depthwise":
            dw = ws["dw"]

            def one(x: Any) -> Any:
                return api.depthwise(x, dw, **geo)
        elif self.op == "pointwise":
            pw = ws["pw"]

            def one(x: Any) -> Any:
                return api.pointwise(x, pw, device=dev)
        else:
            w = ws["w"]

            def one(x: Any) -> Any:
                return api.conv2d(x, w, **geo)

        return _rotating(one, xs), sync

    # -- the anchors -----------------------------------------------------------------------

    def torch_fns(self) -> dict[str, tuple[Callable[[], Any], Callable[[], None]]]:
        """The PyTorch anchors by name ({} without torch, or without a CUDA torch on GPU)."""
        torch = _torch()
        if torch is None or (self.device == "cuda" and not torch.cuda.is_available()):
            return {}
        import torch.nn.functional as F

        lay, h = self.layer, self.host
        dev = "cuda" if self.device == "cuda" else "cpu"
        x_nchw = torch.from_numpy(h["x"]).permute(0, 3, 1, 2)
        weights = {}
        if "dw" in h:
            weights["dw"] = torch.from_numpy(h["dw"]).permute(2, 0, 1).unsqueeze(1)
        if "pw" in h:
            weights["pw"] = torch.from_numpy(h["pw"]).t()[:, :, None, None]
        if "w" in h:
            weights["w"] = torch.from_numpy(h["w"]).permute(3, 2, 0, 1)
        s, p, groups = lay.stride, lay.padding, lay.c_in

        def build(fmt: Any) -> tuple[list[Any], dict[str, Any]]:
            xs = [
                x_nchw.to(dev).contiguous(memory_format=fmt).clone(memory_format=fmt)
                for _ in range(self._rotation)
            ]
            ws = {k: v.to(dev).contiguous(memory_format=fmt) for k, v in weights.items()}
            return xs, ws

        def op_fn(ws: dict[str, Any]) -> Callable[[Any], Any]:
            if self.op == "separable":
                return lambda x: F.conv2d(
                    F.conv2d(x, ws["dw"], stride=s, padding=p, groups=groups), ws["pw"]
                )
            if self.op == "depthwise":
                return lambda x: F.conv2d(x, ws["dw"], stride=s, padding=p, groups=groups)
            if self.op == "pointwise":
                return lambda x: F.conv2d(x, ws["pw"])
            return lambda x: F.conv2d(x, ws["w"], stride=s, padding=p)

        def guarded(fn: Callable[[Any], Any], before: Callable[[], None]) -> Callable[[Any], Any]:
            def call(x: Any) -> Any:
                before()
                with torch.inference_mode():
                    return fn(x)

            return call

        out: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {}
        if self.device == "cpu":
            for name, fmt in (
                ("torch_channels_last", torch.channels_last),
                ("torch_nchw", torch.contiguous_format),
            ):
                xs, ws = build(fmt)
                out[name] = (_rotating(guarded(op_fn(ws), _no_sync), xs), _no_sync)
        else:
            cudnn_default = torch.backends.cudnn.allow_tf32
            matmul_default = torch.backends.cuda.matmul.allow_tf32

            def strict() -> None:
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False

            def default() -> None:
                torch.backends.cudnn.allow_tf32 = cudnn_default
                torch.backends.cuda.matmul.allow_tf32 = matmul_default

            xs, ws = build(torch.channels_last)
            fn = op_fn(ws)
            sync = torch.cuda.synchronize
            out["torch_fp32"] = (_rotating(guarded(fn, strict), xs), sync)
            out["torch_default"] = (_rotating(guarded(fn, default), xs), sync)
        return out

    # -- correctness -----------------------------------------------------------------------

    def reference(self) -> np.ndarray:
        """The float64 NumPy result (NHWC)."""
        lay, h = self.layer, self.host
        x = h["x"]
        if self.op == "pointwise":
            return _numpy_ref.pointwise(x, h["pw"], None)
        c_out = lay.c_out if self.op in ("separable", "conv2d") else lay.c_in
        spec = make_spec(
            self.op,
            x_shape=x.shape,
            layout="NHWC",
            kernel=(lay.kernel, lay.kernel),
            c_in_kernel=lay.c_in,
            multiplier=1,
            c_out=c_out,
            stride=lay.stride,
            padding=lay.padding,
        )
        if self.op == "conv2d":
            return _reference_conv2d(x, h["w"], spec)
        mid = _numpy_ref.depthwise(x, h["dw"], None, spec)
        return mid if self.op == "depthwise" else _numpy_ref.pointwise(mid, h["pw"], None)

    @staticmethod
    def relative_error(result: Any, ref: np.ndarray) -> float:
        """max |result - ref| / max |ref| (result: NHWC array, device array or NCHW tensor)."""
        got = _to_host_nhwc(result)
        if got.shape != ref.shape:
            return float("inf")
        scale = float(np.max(np.abs(ref))) if ref.size else 1.0
        err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        return err / max(scale, 1e-30)


def _no_sync() -> None:
    return None


def _rotating(one: Callable[[Any], Any], inputs: list[Any]) -> Callable[[], Any]:
    if len(inputs) == 1:
        x0 = inputs[0]
        return lambda: one(x0)
    state = {"i": 0}

    def call() -> Any:
        i = state["i"]
        state["i"] = (i + 1) % len(inputs)
        return one(inputs[i])

    return call


def _to_host_nhwc(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    if hasattr(a, "copy_to_host"):
        a = a.copy_to_host()
    return np.asarray(a, np.float64)


# --------------------------------------------------------------------------------------------
# timing


def _sample(fn: Callable[[], Any], number: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) / number


def time_interleaved(
    fns: dict[str, tuple[Callable[[], Any], Callable[[], None]]],
    repeat: int,
    *,
    min_sample_s: float = 0.02,
    on_round: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call seconds of each function, sampled A B C A B C ... ``repeat`` times.

    Each sample averages ``number`` back-to-back calls (chosen per function so a sample lasts
    about ``min_sample_s``, at least one call). The functions must be warm already.
    Returns (samples by name, number by name).
    """
    numbers = {}
    for name, (fn, sync) in fns.items():
        t = _sample(fn, 1, sync)
        numbers[name] = max(1, min(10_000, int(min_sample_s / max(t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat):
        for name, (fn, sync) in fns.items():
            samples[name].append(_sample(fn, numbers[name], sync))
        if on_round is not None:
            on_round(r + 1)
    return samples, numbers


def default_repeat(call_s: float) -> int:
    """Samples per side when --repeat is not given: more for short calls."""
    if call_s < 0.01:
        return 15
    if call_s < 0.1:
        return 11
    return 7


# --------------------------------------------------------------------------------------------
# results


@dataclass
class SideResult:
    """One implementation on one layer: numba_dsconv or an anchor."""

    name: str
    median_s: float
    samples_s: list[float]
    number: int
    gflops: float
    gbs: float
    pct_roofline: float
    error_rel: float
    ok: bool


@dataclass
class LayerResult:
    layer: int
    name: str
    hw: int
    c_in: int
    c_out: int
    stride: int
    op: str
    batch: int
    device: str
    flops: int
    nbytes: int
    intensity: float
    floor_s: float
    ours: SideResult
    anchors: dict[str, SideResult]
    # time(anchor) / time(numba_dsconv): above 1, numba_dsconv is faster.
    speedup: dict[str, float]
    ok: bool


@dataclass
class BenchResult:
    machine: dict[str, Any]
    ceilings: Ceilings
    settings: dict[str, Any]
    anchors: list[str]
    anchor_note: str | None
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every numba_dsconv result agreed with the float64 reference."""
        return all(row.ok for row in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ceilings"]["ridge_flop_per_byte"] = self.ceilings.ridge
        d["ok"] = self.ok
        return d


def _side(name: str, samples: list[float], number: int, w: Work, floor: float, err: float):
    med = statistics.median(samples)
    return SideResult(
        name=name,
        median_s=med,
        samples_s=list(samples),
        number=number,
        gflops=w.flops / med / 1e9,
        gbs=w.nbytes / med / 1e9,
        pct_roofline=100.0 * floor / med,
        error_rel=err,
        ok=err <= RTOL_FLOAT32,
    )


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
                if "-" in part:
                    lo, hi = (int(v) for v in part.split("-", 1))
                    numbers.extend(range(lo, hi + 1))
                else:
                    numbers.append(int(part))
            except ValueError:
                raise ValueError(f"layers must look like '1,3,7' or '1-11'; got {spec!r}") from None
        spec = numbers
    out = [item if isinstance(item, Layer) else suite_layer(int(item)) for item in spec]
    if not out:
        raise ValueError("layers selects no layer")
    return out


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
    progress : ``progress(phase, label, done, total)``, see :data:`Progress`
    """
    import numba

    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch!r}")
    if repeat is not None and repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat!r}")
    if device == "cuda" and not gpu_available():
        raise NotImplementedError("device='cuda': no usable CUDA GPU on this machine")
    progress = progress or _no_progress
    lays = parse_layers(layers)
    threads = numba.get_num_threads()
    torch = _torch()
    if not anchors:
        note = "anchors not requested"
    elif torch is None:
        note = "torch not installed"
    elif device == "cuda" and not torch.cuda.is_available():
        note = "torch has no CUDA device"
    else:
        note = None
    anchor_names = [] if note else [name for name, _ in ANCHORS[device]]

    with thread_limits(threads):
        if ceilings is None:
            ceilings = measure_ceilings(device, progress=progress)
        machine = machine_info(device)
        cases = []
        for i, lay in enumerate(lays):
            progress("compile", f"layer {lay.number}: JIT compile and warm-up", i, len(lays))
            case = Case(lay, op, batch, device)
            fns = {OURS: case.numba_fn()}
            if anchor_names:
                fns.update(case.torch_fns())
            ref = case.reference()
            errors, call_s = {}, 0.0
            for name, (fn, sync) in fns.items():
                result = fn()  # the first call compiles (or loads from the disk cache)
                sync()
                errors[name] = case.relative_error(result, ref)
                del result
                for _ in range(2):
                    call_s = max(call_s, _sample(fn, 1, sync))
            del ref
            cases.append((case, fns, errors, call_s))
        progress("compile", "done", len(lays), len(lays))

        rounds = [repeat or default_repeat(c[3]) for c in cases]
        total, done = sum(rounds), 0
        rows = []
        for (case, fns, errors, _), r in zip(cases, rounds, strict=True):
            label = f"layer {case.layer.number}: {case.layer.name}"
            progress("measure", label, done, total)
            samples, numbers = time_interleaved(
                fns,
                r,
                min_sample_s=min_sample_s,
                on_round=lambda k, d=done, lab=label: progress("measure", lab, d + k, total),
            )
            done += r
            w = case.work
            floor = roofline_floor(w.flops, w.nbytes, ceilings.sgemm_gflops, ceilings.copy_gbs)
            sides = {
                name: _side(name, samples[name], numbers[name], w, floor, errors[name])
                for name in fns
            }
            ours = sides.pop(OURS)
            lay = case.layer
            rows.append(
                LayerResult(
                    layer=lay.number,
                    name=lay.name,
                    hw=lay.hw,
                    c_in=lay.c_in,
                    c_out=lay.c_out,
                    stride=lay.stride,
                    op=op,
                    batch=batch,
                    device=device,
                    flops=w.flops,
                    nbytes=w.nbytes,
                    intensity=w.intensity,
                    floor_s=floor,
                    ours=ours,
                    anchors=sides,
                    speedup={k: v.median_s / ours.median_s for k, v in sides.items()},
                    ok=ours.ok,
                )
            )
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
    return BenchResult(
        machine=machine,
        ceilings=ceilings,
        settings=settings,
        anchors=anchor_names,
        anchor_note=note,
        layers=rows,
    )


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Every number of ``result`` as JSON (non-finite floats written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(result.to_dict()), indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# the roofline chart

_ANCHOR_STYLE = {
    "torch_channels_last": ("tab:orange", "s"),
    "torch_nchw": ("tab:green", "^"),
    "torch_fp32": ("tab:orange", "s"),
    "torch_default": ("tab:green", "^"),
}


def plot_roofline(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """A log-log roofline chart (x: FLOP/byte, y: GFLOP/s) with every measured layer on it.

    Needs matplotlib (``pip install 'numba-dsconv[bench]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the roofline plot needs matplotlib: pip install 'numba-dsconv[bench]'"
        ) from exc
    ceil = result.ceilings
    rows = result.layers
    ai = [r.intensity for r in rows]
    ridge = ceil.ridge if math.isfinite(ceil.ridge) else max(ai, default=1.0)
    x_lo = min([*ai, ridge] or [1.0]) / 4
    x_hi = max([*ai, ridge] or [1.0]) * 4
    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.geomspace(x_lo, x_hi, 200)
    peak = ceil.sgemm_gflops if math.isfinite(ceil.sgemm_gflops) else np.inf
    ax.plot(xs, np.minimum(peak, ceil.copy_gbs * xs), color="black", lw=2, label="roofline")
    if math.isfinite(peak):
        ax.axhline(peak, color="gray", ls=":", lw=1)
    ax.plot(xs, ceil.copy_gbs * xs, color="gray", ls=":", lw=1)
    ax.annotate(
        f"copy {ceil.copy_gbs:.1f} GB/s",
        (xs[20], ceil.copy_gbs * xs[20]),
        textcoords="offset points",
        xytext=(-10, 10),
        ha="right",
        fontsize=8,
        color="dimgray",
    )
    if math.isfinite(peak):
        ax.annotate(
            f"SGEMM {peak:.0f} GFLOP/s",
            (x_hi, peak),
            textcoords="offset points",
            xytext=(-4, 4),
            ha="right",
            fontsize=8,
            color="dimgray",
        )
    labels = dict(ANCHORS[rows[0].device]) if rows else {}
    for name in result.anchors:
        color, marker = _ANCHOR_STYLE.get(name, ("tab:red", "v"))
        pts = [(r.intensity, r.anchors[name].gflops) for r in rows if name in r.anchors]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True),
                color=color,
                marker=marker,
                s=28,
                alpha=0.8,
                label=labels.get(name, name),
                zorder=3,
            )
    ax.scatter(
        ai, [r.ours.gflops for r in rows], color="tab:blue", s=40, zorder=4, label="numba_dsconv"
    )
    for i, r in enumerate(sorted(rows, key=lambda r: (r.intensity, r.ours.gflops))):
        ax.annotate(
            str(r.layer),
            (r.intensity, r.ours.gflops),
            textcoords="offset points",
            xytext=(5, -9 if i % 2 else 3),  # alternate, so neighbours' labels do not overlap
            fontsize=8,
            color="tab:blue",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ys = [r.ours.gflops for r in rows] + [a.gflops for r in rows for a in r.anchors.values()]
    top = peak if math.isfinite(peak) else max(ys, default=1.0)
    ax.set_ylim(min([*ys, ceil.copy_gbs * x_lo]) / 2, max([*ys, top]) * 2)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    s = result.settings
    m = result.machine
    ax.set_title(
        f"{s['op']} N={s['batch']} on {s['device']}: {m['cpu']}, {s['threads']} threads"
        if s["device"] == "cpu"
        else f"{s['op']} N={s['batch']} on {', '.join(m.get('gpus') or ['cuda'])}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
