"""Shared pieces of the CPU kernels: the jit decorator pair, the depthwise pixel, the pointwise
GEMM micro-kernel and the fused epilogue helpers."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from numba import njit, prange

from .. import _config


def parallel_and_serial(fn: Callable[..., Any]) -> tuple[Any, Any]:
    """Compile one kernel body twice: ``parallel=True`` and a serial build for tiny inputs.

    The serial build is a clone with its own ``__qualname__`` so the two never share an entry
    in Numba's on-disk cache (whose index key does not include the ``parallel`` flag).
    """
    opts = dict(fastmath=set(_config.FASTMATH), cache=_config.CACHE, nogil=True)
    par = njit(parallel=True, **opts)(fn)
    clone = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    clone.__qualname__ = fn.__qualname__ + "_serial"
    clone.__module__ = fn.__module__
    ser = njit(parallel=False, **opts)(clone)
    return par, ser


# Shared device functions. Not IR-inlined (inline="always" made the parallel separable kernel
# take ~10 s to compile, cold): LLVM still inlines them, at no measured cost at run time.
helper = njit(fastmath=set(_config.FASTMATH), cache=_config.CACHE, nogil=True)


@helper
def activate_row(row, code):  # pragma: no cover - compiled
    """In-place None (0) / relu (1) / relu6 (2). NaN stays NaN: only v < 0 and v > 6 change."""
    if code == 1:
        for k in range(row.shape[0]):
            if row[k] < 0:
                row[k] = 0
    elif code == 2:
        for k in range(row.shape[0]):
            v = row[k]
            if v < 0:
                row[k] = 0
            elif v > 6:
                row[k] = 6


@helper
def store_activated(row, k, v, code):  # pragma: no cover - compiled
    """row[k] = act(v) for act None (0) / relu (1) / relu6 (2); NaN stays NaN."""
    if code != 0 and v < 0:
        row[k] = 0
    elif code == 2 and v > 6:
        row[k] = 6
    else:
        row[k] = v


@helper
def depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, o):  # pragma: no cover
    """o[c*M+q] = bias + the taps of output pixel (i, j) of image n, any geometry.

    The general path (border pixels, depth multiplier > 1): a tap on the zero padding
    contributes 0 * weight, so NaN/Inf weights propagate as the formula says.
    """
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    CM = d.shape[2]
    for c in range(CM):
        o[c] = bias[c]
    for m in range(d.shape[0]):
        ih = i * sh - pt + m * dh
        row_inside = ih >= 0 and ih < H
        for q in range(d.shape[1]):
            iw = j * sw - pl + q * dw
            dq = d[m, q]
            if row_inside and iw >= 0 and iw < W:
                if multiplier == 1:
                    for c in range(C):
                        o[c] += x[n, ih, iw, c] * dq[c]
                else:
                    for c in range(C):
                        xv = x[n, ih, iw, c]
                        base = c * multiplier
                        for mq in range(multiplier):
                            o[base + mq] += xv * dq[base + mq]
            else:
                for c in range(CM):
                    o[c] += 0 * dq[c]


@helper
def depthwise_row(
    x, d, n, i, j0, j1, KH, KW, sh, sw, dh, dw, pt, pl, multiplier, bias, dst
):  # pragma: no cover - compiled
    """dst[j - j0, :] = bias + depthwise taps of output pixels (i, j0..j1-1) of image n.

    A 3x3 kernel (every MobileNet layer) with multiplier 1 has an interior path written with
    constant trip counts, so the 9 taps unroll inside the channel loop: one accumulator per
    channel vector, 9 fused multiply-adds, one store, no bounds checks. Border pixels, other
    kernel sizes and depth multipliers > 1 take ``depthwise_pixel``.
    """
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    ih0 = i * sh - pt
    fast = multiplier == 1 and KH == 3 and KW == 3 and ih0 >= 0 and ih0 + 2 * dh < H
    for jj in range(j1 - j0):
        j = j0 + jj
        iw0 = j * sw - pl
        o = dst[jj]
        if fast and iw0 >= 0 and iw0 + 2 * dw < W:
            for c in range(C):
                acc = bias[c]
                for m in range(3):
                    for q in range(3):
                        acc += x[n, ih0 + m * dh, iw0 + q * dw, c] * d[m, q, c]
                o[c] = acc
        else:
            depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, o)


@helper
def gemm_tile(a, rows, bt, bias, dst, c_lo, c_hi, act):  # pragma: no cover - compiled
    """dst[r, c] = act(bias[c] + a[r, :] . bt[c, :]) for r < rows, c_lo <= c < c_hi.

    a: (>=rows, K) with K contiguous (the depthwise tile or the input pixels); bt: (C_out, K),
    the pointwise weights packed transposed once per call so that both operands of every dot
    product are contiguous. A 4 x 4 block of output pixels x output channels is held in 16
    scalar accumulators across the whole K loop; LLVM vectorises that loop (reassociation is
    allowed) into 16 vector accumulators fed by 8 contiguous loads per step. The 4 weight rows
    of a block stay in L1 while the loop walks down the pixel rows (the tile is in L2).
    """
    K = bt.shape[1]
    c = c_lo
    while c + 4 <= c_hi:
        b0 = bt[c]
        b1 = bt[c + 1]
        b2 = bt[c + 2]
        b3 = bt[c + 3]
        r = 0
        while r + 4 <= rows:
            a0 = a[r]
            a1 = a[r + 1]
            a2 = a[r + 2]
            a3 = a[r + 3]
            s00 = bias[c]
            s01 = bias[c + 1]
            s02 = bias[c + 2]
            s03 = bias[c + 3]
            s10 = bias[c]
            s11 = bias[c + 1]
            s12 = bias[c + 2]
            s13 = bias[c + 3]
            s20 = bias[c]
            s21 = bias[c + 1]
            s22 = bias[c + 2]
            s23 = bias[c + 3]
            s30 = bias[c]
            s31 = bias[c + 1]
            s32 = bias[c + 2]
            s33 = bias[c + 3]
            for k in range(K):
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
                y0 = b0[k]
                y1 = b1[k]
                y2 = b2[k]
                y3 = b3[k]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            d0 = dst[r]
            d1 = dst[r + 1]
            d2 = dst[r + 2]
            d3 = dst[r + 3]
            store_activated(d0, c, s00, act)
            store_activated(d0, c + 1, s01, act)
            store_activated(d0, c + 2, s02, act)
            store_activated(d0, c + 3, s03, act)
            store_activated(d1, c, s10, act)
            store_activated(d1, c + 1, s11, act)
            store_activated(d1, c + 2, s12, act)
            store_activated(d1, c + 3, s13, act)
            store_activated(d2, c, s20, act)
            store_activated(d2, c + 1, s21, act)
            store_activated(d2, c + 2, s22, act)
            store_activated(d2, c + 3, s23, act)
            store_activated(d3, c, s30, act)
            store_activated(d3, c + 1, s31, act)
            store_activated(d3, c + 2, s32, act)
            store_activated(d3, c + 3, s33, act)
            r += 4
        # leftover pixel rows of this channel quad
        while r < rows:
            ar = a[r]
            s0 = bias[c]
            s1 = bias[c + 1]
            s2 = bias[c + 2]
            s3 = bias[c + 3]
            for k in range(K):
                xv = ar[k]
                s0 += xv * b0[k]
                s1 += xv * b1[k]
                s2 += xv * b2[k]
                s3 += xv * b3[k]
            dr = dst[r]
            store_activated(dr, c, s0, act)
            store_activated(dr, c + 1, s1, act)
            store_activated(dr, c + 2, s2, act)
            store_activated(dr, c + 3, s3, act)
            r += 1
        c += 4
    # leftover output channels
    while c < c_hi:
        bc = bt[c]
        for r in range(rows):
            ar = a[r]
            s = bias[c]
            for k in range(K):
                s += ar[k] * bc[k]
            store_activated(dst[r], c, s, act)
        c += 1


def transpose_batched(src, dst):  # pragma: no cover - compiled
    """dst[n, j, i] = src[n, i, j] (casting to dst's dtype), in 32 x 32 blocks.

    Used to pack the pointwise weights (K, C_out) -> (C_out, K) and to convert NCHW <-> NHWC
    ((C, H*W) <-> (H*W, C) per image): a plain strided copy (numpy's ``.T`` copy) thrashes the
    cache and the TLB and took longer than the convolution itself.
    """
    N = src.shape[0]
    R = src.shape[1]
    C = src.shape[2]
    nrb = (R + 31) // 32
    ncb = (C + 31) // 32
    for t in prange(N * nrb * ncb):
        n = t // (nrb * ncb)
        b = t - n * (nrb * ncb)
        r0 = (b // ncb) * 32
        c0 = (b % ncb) * 32
        s = src[n]
        d = dst[n]
        for c in range(c0, min(C, c0 + 32)):
            row = d[c]
            for r in range(r0, min(R, r0 + 32)):
                row[r] = s[r, c]


transpose_batched_parallel, transpose_batched_serial = parallel_and_serial(transpose_batched)
