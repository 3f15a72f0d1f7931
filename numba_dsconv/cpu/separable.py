"""Fused depthwise separable convolution on the CPU.

One task is a tile of up to ``tile`` output pixels of one output row. Its depthwise result
(tile x C_in*M) is computed into a small buffer that stays in L1/L2 and consumed at once by the
pointwise GEMM; the full intermediate tensor is never allocated. Biases and activations are
applied inside the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import activate_row, depthwise_pixel, gemm_rows, parallel_and_serial


def separable_nhwc(
    x, d, dw_bias, p, bias, out, sh, sw, dh, dw, pt, pl, multiplier, mid_act, act, tile
):  # pragma: no cover - compiled
    """out = act(bias + mid_act(depthwise(x, d) + dw_bias) @ p), tile by tile.

    x: (N,H,W,C); d: (KH,KW,C*M); p: (C*M, C_out); out: (N,OH,OW,C_out).
    """
    N = out.shape[0]
    OH = out.shape[1]
    OW = out.shape[2]
    CM = d.shape[2]
    nj = (OW + tile - 1) // tile
    for t in prange(N * OH * nj):
        jb = t % nj
        r = t // nj
        i = r % OH
        n = r // OH
        j0 = jb * tile
        j1 = min(OW, j0 + tile)
        buf = np.empty((tile, CM), dtype=out.dtype)
        for j in range(j0, j1):
            row = buf[j - j0]
            depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, dw_bias, row)
            activate_row(row, mid_act)
        gemm_rows(buf, p, bias, out[n, i, j0:j1], j1 - j0, act)


separable_nhwc_parallel, separable_nhwc_serial = parallel_and_serial(separable_nhwc)
