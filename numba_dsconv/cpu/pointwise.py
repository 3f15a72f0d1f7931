"""Pointwise (1x1) convolution: a GEMM over pixels, NHWC, parallel over pixel blocks."""

from __future__ import annotations

from numba import prange

from ._jit import gemm_rows, parallel_and_serial


def pointwise_nhwc(x2, p, bias, out2, block, act):  # pragma: no cover - compiled
    """out2[r, :] = act(bias + x2[r, :] @ p) for every pixel r.

    x2: (pixels, C_in) C-contiguous; p: (C_in, C_out); out2: (pixels, C_out).
    """
    rows = x2.shape[0]
    nblocks = (rows + block - 1) // block
    for b in prange(nblocks):
        r0 = b * block
        r1 = min(rows, r0 + block)
        gemm_rows(x2[r0:r1], p, bias, out2[r0:r1], r1 - r0, act)


pointwise_nhwc_parallel, pointwise_nhwc_serial = parallel_and_serial(pointwise_nhwc)
