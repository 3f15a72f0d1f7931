"""Standard (dense) convolution, NHWC, parallel over (batch x output rows)."""

from __future__ import annotations

from numba import prange

from ._jit import activated, parallel_and_serial


def conv2d_nhwc(x, w, bias, out, sh, sw, dh, dw, pt, pl, act):  # pragma: no cover - compiled
    """out[n,i,j,k] = act(bias[k] + sum_{m,q,c} x[n, i*sh+m*dh-pt, j*sw+q*dw-pl, c] w[m,q,c,k]).

    Each valid tap is a (1 x C_in) @ (C_in x C_out) product accumulated into the output row,
    which stays in L1; the output-channel loop is innermost and contiguous.
    """
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    KH = w.shape[0]
    KW = w.shape[1]
    CO = w.shape[3]
    N = out.shape[0]
    OH = out.shape[1]
    OW = out.shape[2]
    for t in prange(N * OH):
        n = t // OH
        i = t - n * OH
        for j in range(OW):
            o = out[n, i, j]
            for k in range(CO):
                o[k] = bias[k]
            for m in range(KH):
                ih = i * sh - pt + m * dh
                row_inside = ih >= 0 and ih < H
                for q in range(KW):
                    iw = j * sw - pl + q * dw
                    if row_inside and iw >= 0 and iw < W:
                        xr = x[n, ih, iw]
                        for c in range(C):
                            a = xr[c]
                            wr = w[m, q, c]
                            for k in range(CO):
                                o[k] += a * wr[k]
                    else:  # a tap on the zero padding: 0 * weight (NaN/Inf weights propagate)
                        for c in range(C):
                            wr = w[m, q, c]
                            for k in range(CO):
                                o[k] += 0 * wr[k]
            if act != 0:
                for k in range(CO):
                    o[k] = activated(o[k], act)


conv2d_nhwc_parallel, conv2d_nhwc_serial = parallel_and_serial(conv2d_nhwc)
