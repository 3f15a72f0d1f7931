"""Pointwise (1x1) convolution: a GEMM over pixels, NHWC, parallel over (pixel block x
output-channel block) tasks."""

from __future__ import annotations

from numba import prange

from ._jit import gemm_scratch, gemm_tile, parallel_and_serial
from ._simd import address


def pointwise_nhwc(x2, w, bias, out2, block, cblock, kc, act):  # pragma: no cover - compiled
    """out2[r, c] = act(bias[c] + x2[r, :] @ w[:, c]) for every pixel r.

    x2: (pixels, C_in) C-contiguous; w: (C_in, C_out) as given; bias padded to a multiple of
    the micro-kernel's panel width; out2: (pixels, C_out). ``cblock`` is a multiple of the
    panel width, ``kc`` the reduction block (see ``gemm_tile``).
    """
    rows = x2.shape[0]
    CO = w.shape[1]
    nb = (rows + block - 1) // block
    nc = (CO + cblock - 1) // cblock
    for t in prange(nb * nc):
        cb = t % nc
        b = t // nc
        r0 = b * block
        r1 = min(rows, r0 + block)
        c0 = cb * cblock
        pk, at, part = gemm_scratch(kc, block, out2)
        # the rows of this thread's next task (prange hands out contiguous chunks), to prefetch
        # while the GEMM runs; none if the next task reuses these rows
        n0 = min(rows, r1)
        n1 = min(rows, n0 + block) if cb == nc - 1 else n0
        pf = address(x2) + n0 * x2.strides[0]
        pf_len = (n1 - n0) * x2.strides[0]
        c1 = min(CO, c0 + cblock)
        gemm_tile(x2[r0:r1], r1 - r0, w, bias, out2[r0:r1], c0, c1, act, pk, at, part, pf, pf_len)


pointwise_nhwc_parallel, pointwise_nhwc_serial = parallel_and_serial(pointwise_nhwc)
