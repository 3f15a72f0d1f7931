"""The machine's FMA peak and the GEMM micro-kernel's own ceiling, measured on every thread
(``numba-dsconv bench`` reports both beside the SGEMM and copy ceilings).

Each thread keeps ``FMA_CHAINS`` independent accumulators of the kernels' own vector width
(``_simd.VEC_BYTES``) in registers and runs ``iters`` rounds of one FMA per accumulator: no
memory traffic, enough independent chains to cover the FMA latency on every x86 core we know
(2 FMA units x 4-5 cycles). It is the rate the GEMM micro-kernel could reach at best, as compiled
by the same LLVM for the same vector width.

``block_loop`` runs the register block most of the kernels' GEMMs run (with AVX-512
``pointwise.gemm_block_wide``, else ``pointwise.gemm_block``) itself, again and again on an A
block and a panel that stay in L1: no cache misses, no packing, no task split. Its rate is the
most the GEMM-bound layers can reach with that block; the gap from it to the FMA peak is the
block's own (its loads and loop), the gap below it the kernels' feeding. (The GEMMs that stay
on the 8 x 2 block with AVX-512, ``pointwise.wide_columns``, have a ceiling a few % lower.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from ._jit import NO_ACTIVATION, kernel
from ._simd import VEC_BYTES, address, vadd, vfma, vloadp, vstorep
from .layout import aligned_empty
from .pointwise import GEMM_MR, WIDE, WIDE_MR, gemm_block, gemm_block_wide

# the rows of the block ``block_loop`` runs
BLOCK_ROWS = WIDE_MR if WIDE else GEMM_MR

# independent accumulators per thread (the GEMM blocks have 12 to 24)
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


def _rate(run: Callable[[int], None], flops_per_iter: float, seconds: float, repeat: int):
    """(best GFLOP/s, every sample's seconds) of ``run(iters)``, with ``iters`` grown until a
    run takes about ``seconds``."""
    run(1)  # compile (or load from the cache)
    iters = 1 << 10
    while True:  # grow the loop until one run takes ``seconds``
        t0 = time.perf_counter()
        run(iters)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or iters >= 1 << 34:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(iters)
        samples.append(time.perf_counter() - t0)
    return flops_per_iter * iters / min(samples) / 1e9, samples


def fma_peak_gflops(
    threads: int, dtype: type = np.float32, seconds: float = 0.05, repeat: int = 5
) -> tuple[float, list[float]]:
    """(best GFLOP/s, every sample's seconds) of ``threads`` tasks of the FMA loop on Numba's
    pool (one per thread), each sized to run about ``seconds``; 2 FLOPs per lane per FMA."""
    lanes = VEC_BYTES // np.dtype(dtype).itemsize
    seed = np.empty((3, lanes), dtype)
    seed[0], seed[1], seed[2] = 0.999, 1e-3, 1.0
    out = np.empty((threads, lanes), dtype)
    rate = _rate(lambda iters: FMA(seed, out, iters), 2.0 * threads * FMA_CHAINS * lanes,
                 seconds, repeat)  # fmt: skip
    if not np.isfinite(out).all():  # pragma: no cover - the loop is contractive
        raise RuntimeError("the FMA loop diverged")
    return rate


def block_loop(a, panel, out, rounds):  # pragma: no cover - compiled
    """out[t] = a @ panel for every task t, computed ``rounds`` times over by the GEMM
    micro-kernel most GEMMs run (``BLOCK_ROWS`` rows of a, both in L1, the sums started from
    zero and stored in every round, as the kernels do per block): with AVX-512 the wide block
    (``pointwise.gemm_block_wide``: panel holds two panels side by side, (depth, 2 NR)),
    else ``pointwise.gemm_block`` (panel (depth, NR)); ``block_shape`` gives the depth."""
    dt = out.dtype
    sz = out.itemsize
    mr, kc = a.shape
    nr = panel.shape[1]
    zero = np.zeros(nr, dt)
    for t in prange(out.shape[0]):
        part = np.empty((mr, nr), dt)
        po = address(out) + t * out.strides[0]
        for _ in range(rounds):
            if WIDE:
                gemm_block_wide(address(a), a.strides[0], sz, address(panel),
                                address(panel) + VEC_BYTES * 2, panel.strides[0], kc, True,
                                address(zero), po, out.strides[1], mr, True, NO_ACTIVATION, dt,
                                sz)  # fmt: skip
            else:
                gemm_block(address(a), a.strides[0], sz, address(panel), panel.strides[0], kc,
                           True, address(zero), address(part), part.strides[0], True, po,
                           out.strides[1], mr, mr, nr, NO_ACTIVATION, dt, sz)  # fmt: skip


BLOCK = kernel(block_loop, None).parallel


def block_peak_gflops(
    threads: int, dtype: type = np.float32, seconds: float = 0.05, repeat: int = 5
) -> tuple[float, list[float]]:
    """(best GFLOP/s, every sample's seconds) of ``threads`` tasks of ``block_loop`` (the GEMM
    micro-kernel on data in L1: the most the kernels' GEMMs can reach on this machine, as the
    FMA loop is the most any code can), one per thread, each sized to run about ``seconds``."""
    rng = np.random.default_rng(0)
    a, panel = block_operands(rng, np.dtype(dtype))
    out = aligned_empty((threads, a.shape[0], panel.shape[1]), np.dtype(dtype))
    flops = 2.0 * threads * a.shape[0] * panel.shape[1] * a.shape[1]
    return _rate(lambda rounds: BLOCK(a, panel, out, rounds), flops, seconds, repeat)


def block_shape() -> tuple[int, int, int]:
    """(rows, vectors, depth) of the block ``block_loop`` runs: BLOCK_ROWS rows x 2 or 4
    vectors, over a reduction whose panel of weights (128 bytes per reduction channel) fills
    two thirds of L1 (halved for the wide block's pairs): the block on data in L1."""
    depth = max(64, _config.L1D_BYTES * 2 // 3 // 128 // 16 * 16)
    if WIDE:
        return BLOCK_ROWS, 4, depth // 2
    return BLOCK_ROWS, 2, depth


def block_operands(rng: np.random.Generator, dtype: np.dtype, depth: int = 0):
    """(a, panel) for ``block_loop`` (``block_shape``; ``depth`` instead where given), 64-byte
    aligned, uniform in [-1, 1]."""
    rows, vectors, default_depth = block_shape()
    width = vectors * VEC_BYTES // dtype.itemsize
    depth = depth or default_depth
    a = aligned_empty((rows, depth), dtype)
    a[:] = rng.uniform(-1, 1, a.shape)
    panel = aligned_empty((depth, width), dtype)
    panel[:] = rng.uniform(-1, 1, panel.shape)
    return a, panel
