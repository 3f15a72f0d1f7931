"""Standard convolution on the GPU: an implicit GEMM (gemm.py) with B = w as a
(K_h * K_w * C_in, C_out) matrix and A gathered from the padded input, tap by tap."""

from __future__ import annotations

from functools import cache

import numpy as np

from ._jit import device_function


@cache
def conv2d_value(dtype: np.dtype):
    """The producer of the implicit GEMM: A[pixel (n, i, j), (tap, c)] = the zero-padded x at
    that tap of output pixel (i, j)."""
    zero = np.dtype(dtype).type(0)

    @device_function
    def value(x, dwk, dw_bias, halo_t, dw_t, n, i, j, pp, k, kk, g):
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, _ = g
        C = x.shape[3]
        tap = k // C
        c = k - tap * C
        m = tap // kw
        q = tap - m * kw
        ih = i * sh - pt + m * dil_h
        iw = j * sw - pl + q * dil_w
        v = zero
        if ih >= 0 and ih < x.shape[1] and iw >= 0 and iw < x.shape[2]:
            v = x[n, ih, iw, c]
        return v

    return value
