"""Fused depthwise separable convolution on the CPU.

One task is a block of up to ``tile`` consecutive output pixels (flattened over batch, rows and
columns) times a block of output channels. Its depthwise result (tile x C_in*M) is computed
into a small buffer sized to stay in L2 (``depthwise_row``) and consumed at once by the
pointwise GEMM micro-kernel (``gemm_tile``); the full intermediate tensor is never allocated.
Biases and activations are applied inside the kernel. Output-channel blocks exist only to give
every thread work when there are few pixels (N=1, late layers); otherwise each task covers all
output channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ._jit import Kernel, kernel
from ._simd import VEC_BYTES, address
from .depthwise import depthwise_tile, vector_head
from .layout import bias_vector
from .pointwise import (
    aligned_rows,
    gemm_panel_width,
    gemm_scratch,
    gemm_split,
    gemm_task,
    gemm_tile,
    kernel_panels,
    no_packed,
    packs_once,
    zero_tail,
)

# the most of the next task's input a task asks for into L2 while its GEMM runs: a quarter of
# L2. The tile split counts on that input being about as large as the tile; at stride 2 on
# small images it is several times larger (layer 9, N=8: 800 KB of input rows for a 196 KB
# tile), and asking for all of it evicted the tile and the weights: capped, N=8 layer 9
# 0.94-0.96x the time, the others unchanged (benchmarks/design_measurements.md)
PREFETCH_MAX_BYTES = _config.L2_BYTES // 4


def separable_nhwc(
    x, dwk, dw_bias, pw, nopack, bias, out, geo, mid_act, act, split
):  # pragma: no cover - compiled
    """out = act(bias + mid_act(depthwise(x, dwk) + dw_bias) @ pw), block by block.

    x: (N,H,W,C); dwk: (KH,KW,C*M) the depthwise weights; pw: (C*M, C_out) C-contiguous (each
    task packs its panels, see ``pointwise_nhwc``); nopack: ``no_packed``; bias padded to a
    multiple of the panel width; out: (N,OH,OW,C_out);
    geo: the spec's geometry tuple (_spec.GEOMETRY_FIELDS); split: (tile, cblock, kc), see
    ``gemm_split``, and the number of workers: the task list in that many contiguous runs, one
    per parallel iteration, so that a task knows whether the next one is its own (the only
    input worth prefetching).
    """
    tile, cblock, kc, workers = split
    oh = out.shape[1]
    ow = out.shape[2]
    P = out.shape[0] * oh * ow
    CO = out.shape[3]
    out2 = out.reshape(P, CO)  # the output as a matrix of pixels
    CM = dwk.shape[2]
    H = x.shape[1]
    kh, _, sh, _, dil_h, _, pt, _, _ = geo
    nb = (P + tile - 1) // tile
    nc = (CO + cblock - 1) // cblock
    # the tile at x's offset from a vector boundary where the 3x3 depthwise aligns its loads of
    # x (``vector_head``): its stores to the tile then line up too; else on a boundary
    phase = 0
    if geo[0] == 3 and geo[1] == 3 and geo[8] == 1 and vector_head(address(x), CM, x.itemsize):
        phase = address(x) % VEC_BYTES
    tasks = nb * nc
    for w in prange(workers):
        for t in range(w * tasks // workers, (w + 1) * tasks // workers):
            cb, p0, p1, c0, c1 = gemm_task(t, nc, tile, cblock, P, CO)
            buf = aligned_rows(tile, CM, out, phase)
            pk, at, part = gemm_scratch(kc, tile, out)
            depthwise_tile(x, dwk, p0, p1, oh, ow, geo, dw_bias, mid_act, buf)
            zero_tail(buf, p1 - p0)
            # the input rows of this worker's next task, to prefetch while the GEMM runs; none
            # where the next task is another worker's (N=1, late layers: one task each) or
            # reuses this pixel block
            pf = address(x)
            pf_len = 0
            if cb == nc - 1 and p1 < P and t + 1 < (w + 1) * tasks // workers:
                q1 = min(P, p1 + tile) - 1
                r0 = p1 // ow
                r1 = q1 // ow
                lo = (r0 // oh) * H + max(0, (r0 % oh) * sh - pt)
                hi = (r1 // oh) * H + min(H - 1, (r1 % oh) * sh - pt + (kh - 1) * dil_h)
                pf += lo * x.strides[1]
                pf_len = min(PREFETCH_MAX_BYTES, max(0, hi + 1 - lo) * x.strides[1])
            gemm_tile(buf, False, p1 - p0, pw, nopack, bias, out2[p0:p1], c0, c1, act, False,
                      pk, at, part, pf, pf_len, False)  # fmt: skip


def separable_args(spec: ConvSpec, dtype: np.dtype, parallel: bool) -> Callable[..., tuple]:
    """``build(x, weights, biases, out)``: the arguments of separable_nhwc for a call of this
    signature (x and out NHWC, C-contiguous; see ``kernel``)."""
    sz = dtype.itemsize
    split = gemm_split(spec, spec.c_mid, spec.kh * spec.kw, sz, parallel)
    workers = _config.thread_count() if parallel else 1  # (the count gemm_split split for)
    tasks = -(-spec.pixels // split[0]) * -(-spec.c_out // split[1])
    split = (*split, max(1, min(workers, tasks)))
    nr = gemm_panel_width(sz)
    nopack = no_packed(dtype)
    c_mid, c_out, geo = spec.c_mid, spec.c_out, spec.geometry
    mid_act, act = int(spec.mid_activation), int(spec.activation)
    once = packs_once(spec.pixels, split[0], c_mid * c_out * sz, parallel)
    # (no bias: worked out here, not per call)
    zeros_mid, zeros = bias_vector(None, c_mid, dtype), bias_vector(None, c_out, dtype, nr)

    def build(x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> tuple:
        dwk, pw = weights
        w, panels = kernel_panels(pw, nopack, once, parallel, "separable_pw")
        db, b = biases
        db = zeros_mid if db is None else bias_vector(db, c_mid, dtype)
        b = zeros if b is None else bias_vector(b, c_out, dtype, nr)
        return (x, dwk, db, w, panels, b, out, geo, mid_act, act, split)

    return build


SEPARABLE: Kernel = kernel(separable_nhwc, separable_args)
