"""Standard (dense) convolution on the CPU, NHWC, parallel over (batch x output rows)."""

from __future__ import annotations

from typing import Any

from numba import prange

from .._spec import ConvSpec
from ._jit import NO_ACTIVATION, Kernel, activated, kernel
from .layout import bias_vector


def conv2d_nhwc(x, w, bias, out, geo, act):  # pragma: no cover - compiled
    """out[n,i,j,k] = act(bias[k] + sum_{m,q,c} x[n, i*sh+m*dh-pt, j*sw+q*dw-pl, c] w[m,q,c,k]).

    Each valid tap is a (1 x C_in) @ (C_in x C_out) product accumulated into the output row,
    which stays in L1; the output-channel loop is innermost and contiguous.
    """
    _, _, sh, sw, dil_h, dil_w, pt, pl, _ = geo
    _, H, W, C = x.shape
    KH, KW, _, CO = w.shape
    N, OH, OW, _ = out.shape
    for t in prange(N * OH):
        n = t // OH
        i = t - n * OH
        for j in range(OW):
            o = out[n, i, j]
            for k in range(CO):
                o[k] = bias[k]
            for m in range(KH):
                ih = i * sh - pt + m * dil_h
                row_inside = ih >= 0 and ih < H
                for q in range(KW):
                    iw = j * sw - pl + q * dil_w
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
            if act != NO_ACTIVATION:
                for k in range(CO):
                    o[k] = activated(o[k], act)


def conv2d_args(spec: ConvSpec, x, weights, biases, out, parallel: bool) -> tuple[Any, ...]:
    """The arguments of conv2d_nhwc for one call (x and out NHWC, C-contiguous)."""
    b = bias_vector(biases[0], spec.c_out, out.dtype)
    return (x, weights[0], b, out, spec.geometry, int(spec.activation))


CONV2D: Kernel = kernel(conv2d_nhwc, conv2d_args)
