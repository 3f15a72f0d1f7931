"""Standard (dense) convolution on the CPU, NHWC: an implicit GEMM through the pointwise
kernel's micro-kernel.

The convolution is the GEMM out[p, k] = sum_r A[p, r] W[r, k] over the pixels p, where a row of
A is the receptive field of output pixel p, tap by tap ((m, q) then the input channel c, the
order of w's rows as (K_h*K_w*C_in, C_out)), zeros on the padding. A is never built whole: a
task (a block of output pixels x a block of output channels, as in ``pointwise_nhwc``) gathers
its pixels' rows one slab of taps at a time into a buffer sized for L2 (``im2col_slab``) and runs
``gemm_tile`` on it, the sums accumulating in the output from slab to slab (bias on the first,
activation on the last). Where each thread runs several pixel blocks against the same weights
(``packs_once``), the weights are packed into the micro-kernel's panels once per call, not
once per task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ..packing import kernel_operands
from ._jit import NO_ACTIVATION, Kernel, helper, kernel
from ._simd import address
from .layout import bias_vector
from .pointwise import (
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


@helper
def im2col_slab(x, p0, p1, oh, ow, geo, kw, t0, t1, buf):  # pragma: no cover - compiled
    """buf[p - p0, (t - t0) * C + c] = x[n, i*sh + m*dh - pt, j*sw + q*dw - pl, c] for the output
    pixels p0 <= p < p1 (p = (n*oh + i)*ow + j) and the taps t0 <= t < t1 (t = m*kw + q); 0
    where the tap falls on the padding (0 * weight then reaches the sum: NaN and Inf weights
    propagate, as the formula says).

    A kernel row's taps inside the image that lie side by side in x (undilated) are one run
    of contiguous values, copied at once: per tap, the index arithmetic and checks cost more
    than the copy of C_in = 32 values (layer 1, N=8: 0.92x the time of the conv2d)."""
    _, _, sh, sw, dil_h, dil_w, pt, pl, _ = geo
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    xf = x.reshape(-1)  # C-contiguous (NHWC)
    for p in range(p0, p1):
        r = p - p0
        n = p // (oh * ow)
        rem = p - n * oh * ow
        i = rem // ow
        j = rem - i * ow
        row = buf[r]
        t = t0
        while t < t1:
            m = t // kw
            q = t - m * kw
            qe = min(kw, q + t1 - t)  # this kernel row's taps in the slab: q..qe-1
            ih = i * sh - pt + m * dil_h
            iw = j * sw - pl + q * dil_w
            o = (t - t0) * C
            if dil_w == 1 and ih >= 0 and ih < H and iw >= 0 and iw + qe - q <= W:
                L = (qe - q) * C
                src = ((n * H + ih) * W + iw) * C
                dst, run = row[o : o + L], xf[src : src + L]
                for c in range(L):
                    dst[c] = run[c]
            else:
                for u in range(qe - q):
                    iwu = iw + u * dil_w
                    dst = row[o + u * C : o + (u + 1) * C]
                    if ih >= 0 and ih < H and iwu >= 0 and iwu < W:
                        src = ((n * H + ih) * W + iwu) * C
                        run = xf[src : src + C]
                        for c in range(C):
                            dst[c] = run[c]
                    else:
                        for c in range(C):
                            dst[c] = 0
            t += qe - q


def conv2d_nhwc(x, w2, packed, bias, out, geo, act, split, slab):  # pragma: no cover - compiled
    """out = act(bias + im2col(x) @ w2), task by task, ``slab`` taps at a time.

    x: (N,H,W,C); w2: (K_h*K_w*C, C_out) C-contiguous (w's rows); packed: w2's panels
    (``packed_weights``, or the caller's ``numba_dsconv.pack``: w2 then a stand-in, unread;
    each slab reads its rows of them), or ``no_packed`` (each task packs its own); bias padded
    to a multiple of the panel width; out: (N,OH,OW,C_out); geo: the spec's geometry tuple;
    split: (tile, cblock, kc), see ``gemm_split``.
    """
    tile, cblock, kc = split
    kh, kw = geo[0], geo[1]
    taps = kh * kw
    oh = out.shape[1]
    ow = out.shape[2]
    P = out.shape[0] * oh * ow
    CO = out.shape[3]
    C = x.shape[3]
    out2 = out.reshape(P, CO)
    nb = (P + tile - 1) // tile
    nc = (CO + cblock - 1) // cblock
    for t in prange(nb * nc):
        cb, p0, p1, c0, c1 = gemm_task(t, nc, tile, cblock, P, CO)
        buf = np.empty((tile, slab * C), dtype=out.dtype)
        pk, at, part = gemm_scratch(kc, tile, out)
        dst = out2[p0:p1]
        zero_tail(buf, p1 - p0)  # the short row group's rows past p1 (no slab writes them)
        for t0 in range(0, taps, slab):
            t1 = min(taps, t0 + slab)
            im2col_slab(x, p0, p1, oh, ow, geo, kw, t0, t1, buf)
            a = act if t1 == taps else NO_ACTIVATION
            gemm_tile(buf, False, p1 - p0, w2[t0 * C : t1 * C], packed[:, t0 * C : t1 * C],
                      bias, dst, c0, c1, a, t0 > 0, pk, at, part, address(x), 0, False)  # fmt: skip


def conv2d_args(spec: ConvSpec, dtype: np.dtype, parallel: bool) -> Callable[..., tuple]:
    """``build(x, weights, biases, out)``: the arguments of conv2d_nhwc for a call of this
    signature (x and out NHWC, C-contiguous; see ``kernel``): the taps per slab such that a
    full tile's slab of A fits the GEMM tile budget (all of them where it does), and the task
    split for that slab."""
    sz = dtype.itemsize
    c_in, c_out, taps = spec.c_in, spec.c_out, spec.kh * spec.kw
    row_bytes = c_in * sz * _config.CPU_TILE_MAX_PIXELS
    slab = max(1, min(taps, _config.CPU_TILE_BYTES // max(1, row_bytes)))
    split = gemm_split(spec, slab * c_in, 1, sz, parallel, prefetched=False)
    nr = gemm_panel_width(sz)
    nopack = no_packed(dtype)
    geo, act = spec.geometry, int(spec.activation)
    once = packs_once(spec.pixels, split[0], taps * c_in * c_out * sz, parallel)

    def build(x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> tuple:
        w2, packed = kernel_operands(weights[0], nopack)  # the caller's panels (numba_dsconv.pack)
        if packed.shape[0] == 0:
            w2 = np.ascontiguousarray(w2).reshape(taps * c_in, c_out)
            _, packed = kernel_panels(w2, nopack, once, parallel, "conv2d_w")
        b = bias_vector(biases[0], c_out, dtype, nr)
        return (x, w2, packed, b, out, geo, act, split, slab)

    return build


CONV2D: Kernel = kernel(conv2d_nhwc, conv2d_args)
