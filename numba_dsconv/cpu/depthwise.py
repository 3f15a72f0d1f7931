"""Depthwise convolution, NHWC, parallel over (batch x output rows)."""

from __future__ import annotations

from numba import prange

from ._jit import depthwise_row, parallel_and_serial


def depthwise_nhwc(
    x, d, bias, out, kh, kw, sh, sw, dh, dw, pt, pl, multiplier, act
):  # pragma: no cover - compiled
    """out[n,i,j,c*M+q] = act(bias + sum_{m,q'} x[n, i*sh+m*dh-pt, j*sw+q'*dw-pl, c] d[m,q',cM+q]).

    x: (N,H,W,C) C-contiguous; d: (KH,KW,C*M); bias: (C*M,); out: (N,OH,OW,C*M);
    kh, kw: d's kernel size (3x3 takes an unrolled interior path).
    """
    N = out.shape[0]
    OH = out.shape[1]
    OW = out.shape[2]
    for t in prange(N * OH):
        n = t // OH
        i = t - n * OH
        orow = out[n, i]
        depthwise_row(
            x, d, n, i, 0, OW, kh, kw, sh, sw, dh, dw, pt, pl, multiplier, bias, act, orow
        )


depthwise_nhwc_parallel, depthwise_nhwc_serial = parallel_and_serial(depthwise_nhwc)
