"""Pointwise (1x1) convolution: a GEMM over pixels, NHWC, parallel over (pixel block x
output-channel block) tasks."""

from __future__ import annotations

from numba import prange

from ._jit import gemm_tile, parallel_and_serial


def pointwise_nhwc(x2, bt, bias, out2, block, cblock, act):  # pragma: no cover - compiled
    """out2[r, c] = act(bias[c] + x2[r, :] . bt[c, :]) for every pixel r.

    x2: (pixels, C_in) C-contiguous; bt: (C_out, C_in) (weights packed transposed);
    out2: (pixels, C_out).
    """
    rows = x2.shape[0]
    CO = bt.shape[0]
    nb = (rows + block - 1) // block
    nc = (CO + cblock - 1) // cblock
    for t in prange(nb * nc):
        cb = t % nc
        b = t // nc
        r0 = b * block
        r1 = min(rows, r0 + block)
        c0 = cb * cblock
        gemm_tile(x2[r0:r1], r1 - r0, bt, bias, out2[r0:r1], c0, min(CO, c0 + cblock), act)


pointwise_nhwc_parallel, pointwise_nhwc_serial = parallel_and_serial(pointwise_nhwc)
