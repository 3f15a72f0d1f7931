"""The machine's FMA peak, measured: a register-resident loop of vector fused multiply-adds on
every thread (``numba-dsconv bench`` reports it beside the SGEMM and copy ceilings).

Each thread keeps ``FMA_CHAINS`` independent accumulators of the kernels' own vector width
(``_simd.VEC_BYTES``) in registers and runs ``iters`` rounds of one FMA per accumulator: no
memory traffic, enough independent chains to cover the FMA latency on every x86 core we know
(2 FMA units x 4-5 cycles). It is the rate the GEMM micro-kernel could reach at best, as compiled
by the same LLVM for the same vector width.
"""

from __future__ import annotations

import time

import numpy as np
from numba import prange

from ._jit import kernel
from ._simd import VEC_BYTES, address, vadd, vfma, vloadp, vstorep

# independent accumulators per thread (the GEMM block has 12)
FMA_CHAINS = 12


def fma_loop(seed, out, iters):  # pragma: no cover - compiled
    """out[t] = the FMA_CHAINS accumulators of task t summed lane-wise, after ``iters`` rounds
    of acc = acc * m + a on each (m slightly below 1: the values stay finite)."""
    dt = seed.dtype
    p = address(seed)
    m = vloadp(p, dt)
    a = vloadp(p + VEC_BYTES, dt)
    for t in prange(out.shape[0]):
        s0 = vloadp(p + 2 * VEC_BYTES, dt)
        s1 = s0
        s2 = s0
        s3 = s0
        s4 = s0
        s5 = s0
        s6 = s0
        s7 = s0
        s8 = s0
        s9 = s0
        s10 = s0
        s11 = s0
        for _ in range(iters):
            s0 = vfma(m, s0, a)
            s1 = vfma(m, s1, a)
            s2 = vfma(m, s2, a)
            s3 = vfma(m, s3, a)
            s4 = vfma(m, s4, a)
            s5 = vfma(m, s5, a)
            s6 = vfma(m, s6, a)
            s7 = vfma(m, s7, a)
            s8 = vfma(m, s8, a)
            s9 = vfma(m, s9, a)
            s10 = vfma(m, s10, a)
            s11 = vfma(m, s11, a)
        # the chains summed and stored: every one is live to the end
        s0 = vadd(vadd(vadd(s0, s1), vadd(s2, s3)), vadd(vadd(s4, s5), vadd(s6, s7)))
        s0 = vadd(s0, vadd(vadd(s8, s9), vadd(s10, s11)))
        vstorep(address(out) + t * out.strides[0], s0)


FMA = kernel(fma_loop, None).parallel


def fma_peak_gflops(
    threads: int, dtype: type = np.float32, seconds: float = 0.05, repeat: int = 5
) -> tuple[float, list[float]]:
    """(best GFLOP/s, every sample's seconds) of ``threads`` tasks of the FMA loop on Numba's
    pool (one per thread), each sized to run about ``seconds``; 2 FLOPs per lane per FMA."""
    lanes = VEC_BYTES // np.dtype(dtype).itemsize
    seed = np.empty((3, lanes), dtype)
    seed[0], seed[1], seed[2] = 0.999, 1e-3, 1.0
    out = np.empty((threads, lanes), dtype)
    FMA(seed, out, 1)  # compile (or load from the cache)
    iters = 1 << 16
    while True:  # grow the loop until one run takes ``seconds``
        t0 = time.perf_counter()
        FMA(seed, out, iters)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or iters >= 1 << 34:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        FMA(seed, out, iters)
        samples.append(time.perf_counter() - t0)
    if not np.isfinite(out).all():  # pragma: no cover - the loop is contractive
        raise RuntimeError("the FMA loop diverged")
    flops = 2.0 * threads * iters * FMA_CHAINS * lanes
    return flops / min(samples) / 1e9, samples
