"""Fused depthwise separable convolution on the CPU.

One task is a block of up to ``tile`` consecutive output pixels (flattened over batch, rows and
columns) times a block of output channels. Its depthwise result (tile x C_in*M) is computed
into a small buffer sized to stay in L2 and consumed at once by the pointwise GEMM micro-kernel
(``gemm_tile``); the full intermediate tensor is never allocated. Biases and activations are
applied inside the kernel. Output-channel blocks exist only to give every thread work when
there are few pixels (N=1, late layers); otherwise each task covers all output channels.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import depthwise_row, gemm_scratch, gemm_tile, parallel_and_serial
from ._simd import address


def separable_nhwc(
    x,
    d,
    dw_bias,
    w,
    bias,
    out2,
    oh,
    ow,
    kh,
    kw,
    sh,
    sw,
    dh,
    dw,
    pt,
    pl,
    multiplier,
    mid_act,
    act,
    tile,
    cblock,
    kc,
):  # pragma: no cover - compiled
    """out2 = act(bias + mid_act(depthwise(x, d) + dw_bias) @ w), block by block.

    x: (N,H,W,C); d: (KH,KW,C*M); w: (C*M, C_out) the pointwise weights as given, bias padded
    to a multiple of the panel width; out2: (N*OH*OW, C_out), the output viewed as a matrix of
    pixels. ``tile`` is a multiple of GEMM_MR, ``cblock`` of the panel width.
    """
    P = out2.shape[0]
    CO = w.shape[1]
    CM = d.shape[2]
    H = x.shape[1]
    nb = (P + tile - 1) // tile
    nc = (CO + cblock - 1) // cblock
    for t in prange(nb * nc):
        cb = t % nc
        b = t // nc
        p0 = b * tile
        p1 = min(P, p0 + tile)
        buf = np.empty((tile, CM), dtype=out2.dtype)
        pk, at, part = gemm_scratch(kc, tile, out2)
        p = p0
        while p < p1:  # the block as segments of output rows
            j = p % ow
            r = p // ow
            i = r % oh
            n = r // oh
            seg = min(p1 - p, ow - j)
            rows = buf[p - p0 : p - p0 + seg]
            depthwise_row(
                x, d, n, i, j, j + seg, kh, kw, sh, sw, dh, dw, pt, pl, multiplier, dw_bias,
                mid_act, rows,
            )  # fmt: skip
            p += seg
        # the input rows of this thread's next task (prange hands out contiguous chunks), to
        # prefetch while the GEMM runs; none if the next task reuses this pixel block
        pf = address(x)
        pf_len = 0
        if cb == nc - 1 and p1 < P:
            q1 = min(P, p1 + tile) - 1
            r0 = p1 // ow
            r1 = q1 // ow
            lo = (r0 // oh) * H + max(0, (r0 % oh) * sh - pt)
            hi = (r1 // oh) * H + min(H - 1, (r1 % oh) * sh - pt + (kh - 1) * dh)
            pf += lo * x.strides[1]
            pf_len = max(0, hi + 1 - lo) * x.strides[1]
        c0 = cb * cblock
        c1 = min(CO, c0 + cblock)
        gemm_tile(buf, p1 - p0, w, bias, out2[p0:p1], c0, c1, act, pk, at, part, pf, pf_len)


separable_nhwc_parallel, separable_nhwc_serial = parallel_and_serial(separable_nhwc)
