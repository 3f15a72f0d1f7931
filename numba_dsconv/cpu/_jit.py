"""Shared pieces of the CPU kernels: the jit decorator pair, the depthwise pixel, the pointwise
GEMM micro-kernel and the fused epilogue helpers."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from numba import njit, prange

from .. import _config
from ._simd import VEC_BYTES, vact, vfma, vget, vload, vload2, vstore2

_JIT_OPTS = dict(fastmath=set(_config.FASTMATH), cache=_config.CACHE, nogil=True)


def parallel_and_serial(fn: Callable[..., Any]) -> tuple[Any, Any]:
    """Compile one kernel body twice: ``parallel=True`` and a serial build for tiny inputs.

    The serial build is a clone with its own ``__qualname__`` so the two never share an entry
    in Numba's on-disk cache (whose index key does not include the ``parallel`` flag).
    """
    par = njit(parallel=True, **_JIT_OPTS)(fn)
    clone = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    clone.__qualname__ = fn.__qualname__ + "_serial"
    clone.__module__ = fn.__module__
    ser = njit(parallel=False, **_JIT_OPTS)(clone)
    return par, ser


# Shared device functions. Not IR-inlined by default (inline="always" on every helper made the
# parallel separable kernel take ~10 s to compile, cold): LLVM still inlines most of them. The
# GEMM register block is the exception: as a call it took 5 arrays, and the reference-count
# updates of those arguments, shared by every thread, cost ~25 % of the block's time.
helper = njit(**_JIT_OPTS)
inline_helper = njit(inline="always", **_JIT_OPTS)


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

    A 3x3 kernel (every MobileNet layer) with multiplier 1 sends the pixels whose taps are all
    inside the image to ``depthwise3x3_interior``; border pixels, other kernel sizes and depth
    multipliers > 1 take ``depthwise_pixel``.
    """
    H = x.shape[1]
    W = x.shape[2]
    ih0 = i * sh - pt
    ja = j0
    jb = j0
    if multiplier == 1 and KH == 3 and KW == 3 and ih0 >= 0 and ih0 + 2 * dh < H:
        # interior columns: j * sw - pl >= 0 and j * sw - pl + 2 * dw <= W - 1
        ja = min(j1, max(j0, (pl + sw - 1) // sw))
        last = W - 1 - 2 * dw + pl
        jb = max(ja, min(j1, last // sw + 1)) if last >= 0 else ja
    for j in range(j0, ja):
        depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, dst[j - j0])
    if jb > ja:
        depthwise3x3_interior(x, d, n, ih0, ja, jb, sw, dh, dw, pl, bias, dst[ja - j0 :])
    for j in range(jb, j1):
        depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, dst[j - j0])


@helper
def depthwise3x3_interior(x, d, n, ih0, ja, jb, sw, dh, dw, pl, bias, dst):  # pragma: no cover
    """dst[j - ja, :] = bias + the 9 taps of output pixels ja..jb-1 of image n whose input
    window starts at row ih0 and lies inside the image (no bounds checks).

    Channel-vector outer, pixel inner: the 9 weight vectors and the bias of a channel vector
    stay in registers while the row is swept, so each output vector costs 9 input loads and
    9 FMAs. Channels past the last whole vector take a scalar loop.
    """
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    L = VEC_BYTES // x.itemsize
    xf = x.reshape(x.size)
    df = d.reshape(d.size)
    r0 = ((n * H + ih0) * W) * C
    r1 = r0 + dh * W * C
    r2 = r1 + dh * W * C
    tap = dw * C
    c = 0
    while c + L <= C:
        w00 = vload(df, c)
        w01 = vload(df, C + c)
        w02 = vload(df, 2 * C + c)
        w10 = vload(df, 3 * C + c)
        w11 = vload(df, 4 * C + c)
        w12 = vload(df, 5 * C + c)
        w20 = vload(df, 6 * C + c)
        w21 = vload(df, 7 * C + c)
        w22 = vload(df, 8 * C + c)
        b = vload(bias, c)
        for j in range(ja, jb):
            o = (j * sw - pl) * C + c
            acc = vfma(vload(xf, r0 + o), w00, b)
            acc = vfma(vload(xf, r0 + o + tap), w01, acc)
            acc = vfma(vload(xf, r0 + o + 2 * tap), w02, acc)
            acc = vfma(vload(xf, r1 + o), w10, acc)
            acc = vfma(vload(xf, r1 + o + tap), w11, acc)
            acc = vfma(vload(xf, r1 + o + 2 * tap), w12, acc)
            acc = vfma(vload(xf, r2 + o), w20, acc)
            acc = vfma(vload(xf, r2 + o + tap), w21, acc)
            acc = vfma(vload(xf, r2 + o + 2 * tap), w22, acc)
            vstore2(dst, j - ja, c, acc)
        c += L
    if c < C:
        for j in range(ja, jb):
            o = (j * sw - pl) * C
            row = dst[j - ja]
            for cc in range(c, C):
                acc1 = bias[cc]
                for m in range(3):
                    rm = r0 + m * dh * W * C + o + cc
                    for q in range(3):
                        acc1 += xf[rm + q * tap] * df[(m * 3 + q) * C + cc]
                row[cc] = acc1


# The GEMM micro-kernel's register block: GEMM_MR output pixels x 2 vectors of output channels
# (2 x 16 float32 = 32 channels, or 2 x 8 float64), 12 vector accumulators.
GEMM_MR = 6


def gemm_panel_width(itemsize: int) -> int:
    """Output channels per micro-kernel panel: two 64-byte vectors."""
    return 2 * VEC_BYTES // itemsize


@helper
def gemm_tile(a, rows, w, bias, dst, c_lo, c_hi, act, pk, at, part):  # pragma: no cover
    """dst[r, c] = act(bias[c] + sum_k a[r, k] * w[k, c]) for r < rows, c_lo <= c < c_hi.

    a: (>= rows, K), rows contiguous (the depthwise tile, or input pixels); w: (K, C_out) the
    pointwise weights as given; bias: padded to a multiple of the panel width NR; scratch:
    pk (KC, NR), at (GEMM_MR, KC), part (>= rows rounded up to GEMM_MR, NR). c_lo is a
    multiple of NR.

    For each panel of NR output channels and each block of KC reduction channels, the weights
    w[k0:k1, c0:c0+NR] are copied into ``pk`` (contiguous, zero-padded past C_out: it stays in
    L1 and never hits the cache-set conflicts of a 4 KB row stride); then every group of
    GEMM_MR pixel rows runs ``gemm_block``. The last group, if short, is copied into ``at``
    (its last row repeated) so that every block reads GEMM_MR whole rows.
    """
    K = w.shape[0]
    CO = w.shape[1]
    L = VEC_BYTES // w.itemsize
    NR = 2 * L
    KC = pk.shape[0]
    full = rows // GEMM_MR * GEMM_MR
    for c0 in range(c_lo, c_hi, NR):
        ncol = min(NR, CO - c0)
        nout = min(NR, c_hi - c0)
        for k0 in range(0, K, KC):
            nk = min(KC, K - k0)
            for k in range(nk):
                if ncol == NR:
                    vstore2(pk, k, 0, vload2(w, k0 + k, c0))
                    vstore2(pk, k, L, vload2(w, k0 + k, c0 + L))
                else:
                    for j in range(ncol):
                        pk[k, j] = w[k0 + k, c0 + j]
                    for j in range(ncol, NR):
                        pk[k, j] = 0
            final = k0 + nk == K
            for r in range(0, full, GEMM_MR):
                gemm_block(
                    a, r, k0, pk, nk, k0 == 0, bias, c0, part, r, final, dst, GEMM_MR, nout, act
                )
            if full < rows:
                for i in range(GEMM_MR):
                    src = min(full + i, rows - 1)
                    for k in range(nk):
                        at[i, k] = a[src, k0 + k]
                nv = rows - full
                gemm_block(
                    at, 0, 0, pk, nk, k0 == 0, bias, c0, part, full, final, dst, nv, nout, act
                )


@inline_helper
def gemm_block(
    a, ra, ka, pk, nk, first, bias, c0, part, r, final, dst, nvalid, nout, act
):  # pragma: no cover
    """One register block: output rows r..r+GEMM_MR-1, channels c0..c0+NR-1, reduction block
    pk[:nk] (pk[k] = the panel's weights of reduction channel ka + k).

    Reads a[ra + i, ka + k]. The accumulators (12 vectors, in registers for the whole loop)
    start from the bias on the ``first`` reduction block, else from ``part[r + i]``; each
    step is two vector loads of ``pk``, GEMM_MR scalar broadcasts and 12 vector FMAs. On the
    last block the activation is applied in registers and the first ``nvalid`` rows are
    stored to dst[r + i, c0:c0+nout]; otherwise the sums go back to ``part``. Every access is
    by index (no array views: a view costs a reference-count update on the shared array).
    """
    L = VEC_BYTES // pk.itemsize
    if first:
        s00 = vload(bias, c0)
        s01 = vload(bias, c0 + L)
        s10 = s00
        s11 = s01
        s20 = s00
        s21 = s01
        s30 = s00
        s31 = s01
        s40 = s00
        s41 = s01
        s50 = s00
        s51 = s01
    else:
        s00 = vload2(part, r, 0)
        s01 = vload2(part, r, L)
        s10 = vload2(part, r + 1, 0)
        s11 = vload2(part, r + 1, L)
        s20 = vload2(part, r + 2, 0)
        s21 = vload2(part, r + 2, L)
        s30 = vload2(part, r + 3, 0)
        s31 = vload2(part, r + 3, L)
        s40 = vload2(part, r + 4, 0)
        s41 = vload2(part, r + 4, L)
        s50 = vload2(part, r + 5, 0)
        s51 = vload2(part, r + 5, L)
    for k in range(nk):
        w0 = vload2(pk, k, 0)
        w1 = vload2(pk, k, L)
        kk = ka + k
        x = a[ra, kk]
        s00 = vfma(x, w0, s00)
        s01 = vfma(x, w1, s01)
        x = a[ra + 1, kk]
        s10 = vfma(x, w0, s10)
        s11 = vfma(x, w1, s11)
        x = a[ra + 2, kk]
        s20 = vfma(x, w0, s20)
        s21 = vfma(x, w1, s21)
        x = a[ra + 3, kk]
        s30 = vfma(x, w0, s30)
        s31 = vfma(x, w1, s31)
        x = a[ra + 4, kk]
        s40 = vfma(x, w0, s40)
        s41 = vfma(x, w1, s41)
        x = a[ra + 5, kk]
        s50 = vfma(x, w0, s50)
        s51 = vfma(x, w1, s51)
    if not final:
        vstore2(part, r, 0, s00)
        vstore2(part, r, L, s01)
        vstore2(part, r + 1, 0, s10)
        vstore2(part, r + 1, L, s11)
        vstore2(part, r + 2, 0, s20)
        vstore2(part, r + 2, L, s21)
        vstore2(part, r + 3, 0, s30)
        vstore2(part, r + 3, L, s31)
        vstore2(part, r + 4, 0, s40)
        vstore2(part, r + 4, L, s41)
        vstore2(part, r + 5, 0, s50)
        vstore2(part, r + 5, L, s51)
        return
    s00 = vact(s00, act)
    s01 = vact(s01, act)
    s10 = vact(s10, act)
    s11 = vact(s11, act)
    s20 = vact(s20, act)
    s21 = vact(s21, act)
    s30 = vact(s30, act)
    s31 = vact(s31, act)
    s40 = vact(s40, act)
    s41 = vact(s41, act)
    s50 = vact(s50, act)
    s51 = vact(s51, act)
    if nout == 2 * L and nvalid == GEMM_MR:
        vstore2(dst, r, c0, s00)
        vstore2(dst, r, c0 + L, s01)
        vstore2(dst, r + 1, c0, s10)
        vstore2(dst, r + 1, c0 + L, s11)
        vstore2(dst, r + 2, c0, s20)
        vstore2(dst, r + 2, c0 + L, s21)
        vstore2(dst, r + 3, c0, s30)
        vstore2(dst, r + 3, c0 + L, s31)
        vstore2(dst, r + 4, c0, s40)
        vstore2(dst, r + 4, c0 + L, s41)
        vstore2(dst, r + 5, c0, s50)
        vstore2(dst, r + 5, c0 + L, s51)
    else:  # a short group or a panel cut by C_out: lane by lane
        store_lanes(dst, r, c0, nout, s00, s01)
        if nvalid > 1:
            store_lanes(dst, r + 1, c0, nout, s10, s11)
        if nvalid > 2:
            store_lanes(dst, r + 2, c0, nout, s20, s21)
        if nvalid > 3:
            store_lanes(dst, r + 3, c0, nout, s30, s31)
        if nvalid > 4:
            store_lanes(dst, r + 4, c0, nout, s40, s41)
        if nvalid > 5:
            store_lanes(dst, r + 5, c0, nout, s50, s51)


@helper
def store_lanes(dst, r, c0, n, v0, v1):  # pragma: no cover - compiled
    """dst[r, c0 : c0 + n] = (v0 ++ v1)[:n]."""
    L = VEC_BYTES // dst.itemsize
    for j in range(min(n, L)):
        dst[r, c0 + j] = vget(v0, j)
    for j in range(L, n):
        dst[r, c0 + j] = vget(v1, j - L)


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
