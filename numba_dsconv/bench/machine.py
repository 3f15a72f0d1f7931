"""The machine: its measured ceilings (one method per device), thread counts, versions, and the
global settings a measurement touches (BLAS and torch threads, torch's TF32 flags), always
restored.

Ceilings are the best of several samples: CPU, ``numpy.matmul`` of float32 n x n matrices
(n = 2048) with the BLAS at Numba's thread count, ``numpy.copyto`` of 256 MiB of float32
(bytes read + written), and the FMA peak: a register-resident loop of vector FMAs on each of
Numba's threads (``numba_dsconv.cpu.peak``; what the GEMM micro-kernel could reach at best);
CUDA, ``torch.matmul`` in strict fp32 (TF32 off; NaN without a CUDA
torch) of 8192 x 8192 and a device-to-device copy of 1 GiB.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _config

Progress = Callable[[str, str, int, int], None]
"""``progress(phase, label, done, total)``; phase is "ceilings", "compile" or "measure"."""


def no_progress(phase: str, label: str, done: int, total: int) -> None:
    return None


def torch_module() -> Any:
    """torch, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def gpu_available() -> bool:
    """True when the CUDA backend can run (a GPU, or the Numba CUDA simulator)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no CUDA target, a broken driver: no GPU
        return False


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
    # the compute peak a register-resident vector FMA loop reaches (CPU; NaN where unmeasured)
    fma_gflops: float = float("nan")
    fma_source: str = "not measured"
    # the rate of the kernels' own GEMM micro-kernel on data in L1 (CPU; NaN where unmeasured):
    # what the GEMM-bound layers could reach at best with this register block
    block_gflops: float = float("nan")
    block_source: str = "not measured"

    @property
    def compute_gflops(self) -> float:
        """The roofline's compute ceiling: the FMA peak where it was measured (the machine's
        limit: every tuned GEMM here ran above numpy's SGEMM), else the SGEMM rate."""
        if math.isfinite(self.fma_gflops) and self.fma_gflops > 0:
            return self.fma_gflops
        return self.sgemm_gflops

    @property
    def compute_name(self) -> str:
        """``compute_gflops``'s ceiling: "FMA peak" or "SGEMM"."""
        return "FMA peak" if self.compute_gflops == self.fma_gflops else "SGEMM"

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline's two ceilings meet."""
        return self.compute_gflops / self.copy_gbs


def best_of(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of ``repeat`` calls of fn, each timed alone after one warm-up call."""
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
    """Measure the SGEMM rate and copy bandwidth of ``device`` (best of ``repeat``); the
    defaults are in the module docstring. Call it inside :func:`thread_limits` on the CPU."""
    measure = _cuda_ceilings if device == "cuda" else _cpu_ceilings
    return measure(repeat, sgemm_n, copy_bytes, progress or no_progress)


def _cpu_ceilings(repeat: int, n: int | None, nbytes: int | None, progress: Progress) -> Ceilings:
    n = n or 2048
    count = (nbytes or (256 << 20)) // 4
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    progress("ceilings", "SGEMM (numpy)", 0, 4)
    sg = best_of(lambda: np.matmul(a, b, out=c), repeat, lambda: None)
    progress("ceilings", "copy bandwidth", 1, 4)
    src = np.ones(count, np.float32)
    dst = np.empty_like(src)
    cp = best_of(lambda: np.copyto(dst, src), repeat, lambda: None)
    progress("ceilings", "FMA peak", 2, 4)
    import numba

    from ..cpu.peak import FMA_CHAINS, VEC_BYTES, block_peak_gflops, block_shape, fma_peak_gflops

    threads = numba.get_num_threads()
    fma, _ = fma_peak_gflops(threads, repeat=repeat)
    progress("ceilings", "GEMM block", 3, 4)
    block, _ = block_peak_gflops(threads, repeat=repeat)
    block_rows, block_vectors, block_depth = block_shape()
    progress("ceilings", "done", 4, 4)
    return Ceilings(
        device="cpu",
        sgemm_gflops=2 * n**3 / min(sg) / 1e9,
        copy_gbs=2 * count * 4 / min(cp) / 1e9,
        sgemm_n=n,
        copy_bytes=count * 4,
        sgemm_samples_s=tuple(sg),
        copy_samples_s=tuple(cp),
        sgemm_source=f"numpy.matmul float32 {n}^3 ({blas_name()})",
        copy_source="numpy.copyto float32 (one thread), read + write",
        fma_gflops=fma,
        fma_source=f"{FMA_CHAINS} chains of {VEC_BYTES * 8}-bit float32 FMAs x {threads} threads",
        block_gflops=block,
        block_source=f"{block_rows} rows x {block_vectors} {VEC_BYTES * 8}-bit vectors, "
        f"{block_depth} reductions, in L1, x {threads} threads",
    )


def _cuda_ceilings(repeat: int, n: int | None, nbytes: int | None, progress: Progress) -> Ceilings:
    from numba import cuda

    n = n or 8192
    count = (nbytes or (1 << 30)) // 4
    progress("ceilings", "copy bandwidth (device to device)", 0, 2)
    src = cuda.to_device(np.ones(count, np.float32))
    dst = cuda.device_array(count, np.float32)
    cp = best_of(lambda: dst.copy_to_device(src), repeat, cuda.synchronize)
    progress("ceilings", "SGEMM (torch fp32)", 1, 2)
    torch = torch_module()
    sg: list[float] = []
    source = "no CUDA torch: no SGEMM ceiling, the floor uses bandwidth only"
    rate = float("nan")
    if torch is not None and torch.cuda.is_available():
        with tf32(False):
            a = torch.randn(n, n, device="cuda")
            b = torch.randn(n, n, device="cuda")
            sg = best_of(lambda: torch.matmul(a, b), repeat, torch.cuda.synchronize)
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


@contextlib.contextmanager
def tf32(enabled: bool | None) -> Iterator[None]:
    """torch's TF32 flags (cuDNN convolutions and CUDA matmuls) set to ``enabled`` inside the
    block (None: torch's defaults as they were on entry) and restored on exit."""
    torch = torch_module()
    if torch is None:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if enabled is not None:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """Run NumPy's BLAS and torch with ``n`` threads (Numba's count) inside the block."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        except ImportError:
            pass  # BLAS keeps its own count (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS)
        torch = torch_module()
        if torch is not None:
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old)
        yield


@contextlib.contextmanager
def serial_blas() -> Iterator[None]:
    """NumPy's BLAS on one thread inside the block (where threadpoolctl is installed): its
    worker threads spin for a while after each parallel call and take the cores from whatever
    runs next, so the float64 references run without them before anything is timed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS threads not controlled: threadpoolctl not installed"
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            api_name, version = info.get("internal_api"), info.get("version")
            return f"{api_name} {version}, {info.get('num_threads')} threads"
    return "BLAS unknown"


def _cpu_model() -> str:
    """The model name, with the family and model numbers where the name alone is vague (a
    virtual machine's "AMD EPYC": family 25 is Zen 3/4, 26 Zen 5), the vector width the
    kernels were built for and the per-core L1d and L2 they block for."""
    from .. import _config
    from ..cpu._simd import VEC_BYTES

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return (f"{name}, {VEC_BYTES * 8}-bit vectors, L1d {_config.L1D_BYTES // 1024} KiB / L2 "
            f"{_config.L2_BYTES // 1024} KiB per core")  # fmt: skip


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

    from .. import __version__
    from ..cpu.backend import threading_layer

    torch = torch_module()
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
        "threading_layer": threading_layer(),
        "blas": blas_name(),
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
            "l1d_bytes": _config.L1D_BYTES,
            "l2_bytes": _config.L2_BYTES,
            "tuned": dict(_config.TUNING),  # {} where `numba-dsconv tune` has not run
        },
        "gpus": [],
    }
    if device == "cuda":
        from .. import cuda

        info["gpus"] = cuda.describe_devices()
        info["config"].update(
            cuda_gemm_tile=list(_config.CUDA_GEMM_TILE),
            cuda_halo=_config.CUDA_HALO,
            cuda_gemm_registers=_config.CUDA_GEMM_REGISTERS,
        )
        if torch is not None and torch.cuda.is_available():
            info["gpus_torch"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
    return info
