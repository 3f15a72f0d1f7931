"""Shared pieces of the CPU kernels: the jit decorator pair, the depthwise pixel, the pointwise
GEMM micro-kernel and the fused epilogue helpers."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit, prange

from .. import _config
from ._simd import (
    VEC_BYTES,
    address,
    loadp,
    prefetch,
    storep,
    vact,
    vadd,
    vfma,
    vload2,
    vloadp,
    vstore2,
    vstorep,
    vzero,
)

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


# Shared device functions. Not IR-inlined (inline="always" made the parallel separable kernel
# take ~10 s to compile, cold): LLVM still inlines them.
helper = njit(**_JIT_OPTS)


@helper
def activated(v, code):  # pragma: no cover - compiled
    """act(v) for None (0) / relu (1) / relu6 (2). NaN stays NaN: only v < 0 and v > 6 change."""
    if code != 0 and v < 0:
        return 0.0
    if code == 2 and v > 6:
        return 6.0
    return v


@helper
def depthwise_pixel(
    x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, act, o
):  # pragma: no cover
    """o[c*M+q] = act(bias + the taps of output pixel (i, j) of image n), any geometry.

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
    if act != 0:
        for c in range(CM):
            o[c] = activated(o[c], act)


@helper
def depthwise_row(
    x, d, n, i, j0, j1, KH, KW, sh, sw, dh, dw, pt, pl, multiplier, bias, act, dst
):  # pragma: no cover - compiled
    """dst[j - j0, :] = act(bias + depthwise taps of output pixels (i, j0..j1-1) of image n).

    x: (N,H,W,C), d: (KH,KW,C*M), bias, dst: C-contiguous, one dtype. A 3x3 kernel (every
    MobileNet layer) with multiplier 1 takes ``depthwise3x3_row`` (vector code, on addresses);
    other kernel sizes and depth multipliers take ``depthwise_pixel`` per pixel.
    """
    if multiplier == 1 and KH == 3 and KW == 3:
        H = x.shape[1]
        W = x.shape[2]
        C = x.shape[3]
        depthwise3x3_row(
            address(x), address(d), address(bias), address(dst), dst.strides[0], H, W, C,
            n, i, j0, j1, sh, sw, dh, dw, pt, pl, act, x.dtype, x.itemsize,
        )  # fmt: skip
        return
    for j in range(j0, j1):
        depthwise_pixel(x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, act, dst[j - j0])


@helper
def depthwise3x3_row(
    px, pd, pb, pdst, sdst, H, W, C, n, i, j0, j1, sh, sw, dh, dw, pt, pl, act, dt, sz
):  # pragma: no cover - compiled
    """The 3x3, multiplier-1 row: output pixels (i, j0..j1-1) of image n, on byte addresses
    (px: x (N,H,W,C), pd: weights (3,3,C), pb: bias, pdst: the row's first output pixel,
    ``sdst`` bytes apart). Three segments: the left border, the interior (every tap inside the
    image: no bounds checks), the right border; a row whose taps leave the image vertically is
    all border. Addresses, not arrays: a call taking arrays pays an atomic reference-count
    update per array, on counters every thread shares.
    """
    ih0 = i * sh - pt
    ja = j1
    jb = j1
    if ih0 >= 0 and ih0 + 2 * dh < H:
        # interior columns: j * sw - pl >= 0 and j * sw - pl + 2 * dw <= W - 1
        ja = min(j1, max(j0, (pl + sw - 1) // sw))
        last = W - 1 - 2 * dw + pl
        jb = max(ja, min(j1, last // sw + 1)) if last >= 0 else ja
    # one call site: one compilation of the segment code
    for seg in range(3):
        lo = j0 if seg == 0 else (ja if seg == 1 else jb)
        hi = ja if seg == 0 else (jb if seg == 1 else j1)
        if hi > lo:
            depthwise3x3(
                px, pd, pb, pdst + (lo - j0) * sdst, sdst, H, W, C, n, ih0, lo, hi, sw, dh, dw,
                pl, act, seg != 1, dt, sz,
            )  # fmt: skip


@helper
def depthwise3x3(
    px, pd, pb, pdst, sdst, H, W, C, n, ih0, ja, jb, sw, dh, dw, pl, act, checked, dt, sz
):  # pragma: no cover - compiled
    """Output pixels ja..jb-1 (stored from ``pdst``, ``sdst`` bytes apart) = act(bias + the 9
    taps), the input window starting at row ih0, column j * sw - pl (addresses as in
    ``depthwise3x3_row``).

    Channel-vector outer, pixel inner: the 9 weight vectors and the bias of one or two channel
    vectors stay in registers while the row is swept; three FMA chains per pixel and vector
    (one per kernel row).
    Unless ``checked``, every tap must lie inside the image (no bounds checks); with it, a tap
    on the zero padding contributes 0 * weight, so NaN/Inf weights propagate as the formula
    says. Channels past the last whole vector take a scalar loop.
    """
    L = VEC_BYTES // sz
    row = W * C * sz  # bytes per input image row
    r0 = px + (n * H + ih0) * row
    r1 = r0 + dh * row
    r2 = r1 + dh * row
    tap = dw * C * sz
    pix = sw * C * sz  # bytes between the windows of neighbouring output pixels
    o0 = (ja * sw - pl) * C * sz
    c = 0
    while c + L <= C:
        cb = c * sz
        # two channel vectors per sweep where the interior has them: each pixel then reads two
        # neighbouring 64-byte lines per tap (memory-bound layers: 8-28 % faster than one)
        two = not checked and c + 2 * L <= C
        vb = cb + VEC_BYTES if two else cb  # (in bounds either way)
        w00 = vloadp(pd + cb, dt)
        w01 = vloadp(pd + C * sz + cb, dt)
        w02 = vloadp(pd + 2 * C * sz + cb, dt)
        w10 = vloadp(pd + 3 * C * sz + cb, dt)
        w11 = vloadp(pd + 4 * C * sz + cb, dt)
        w12 = vloadp(pd + 5 * C * sz + cb, dt)
        w20 = vloadp(pd + 6 * C * sz + cb, dt)
        w21 = vloadp(pd + 7 * C * sz + cb, dt)
        w22 = vloadp(pd + 8 * C * sz + cb, dt)
        b = vloadp(pb + cb, dt)
        zero = vzero(dt)
        if two:
            v00 = vloadp(pd + vb, dt)
            v01 = vloadp(pd + C * sz + vb, dt)
            v02 = vloadp(pd + 2 * C * sz + vb, dt)
            v10 = vloadp(pd + 3 * C * sz + vb, dt)
            v11 = vloadp(pd + 4 * C * sz + vb, dt)
            v12 = vloadp(pd + 5 * C * sz + vb, dt)
            v20 = vloadp(pd + 6 * C * sz + vb, dt)
            v21 = vloadp(pd + 7 * C * sz + vb, dt)
            v22 = vloadp(pd + 8 * C * sz + vb, dt)
            b2 = vloadp(pb + vb, dt)
            B = VEC_BYTES
            for j in range(ja, jb):
                o = o0 + (j - ja) * pix + cb
                # one chain per kernel row and vector: 3 FMAs deep (FMA latency bound)
                a0 = vfma(vloadp(r0 + o, dt), w00, b)
                a1 = vfma(vloadp(r1 + o, dt), w10, zero)
                a2 = vfma(vloadp(r2 + o, dt), w20, zero)
                e0 = vfma(vloadp(r0 + o + B, dt), v00, b2)
                e1 = vfma(vloadp(r1 + o + B, dt), v10, zero)
                e2 = vfma(vloadp(r2 + o + B, dt), v20, zero)
                a0 = vfma(vloadp(r0 + o + tap, dt), w01, a0)
                a1 = vfma(vloadp(r1 + o + tap, dt), w11, a1)
                a2 = vfma(vloadp(r2 + o + tap, dt), w21, a2)
                e0 = vfma(vloadp(r0 + o + tap + B, dt), v01, e0)
                e1 = vfma(vloadp(r1 + o + tap + B, dt), v11, e1)
                e2 = vfma(vloadp(r2 + o + tap + B, dt), v21, e2)
                a0 = vfma(vloadp(r0 + o + 2 * tap, dt), w02, a0)
                a1 = vfma(vloadp(r1 + o + 2 * tap, dt), w12, a1)
                a2 = vfma(vloadp(r2 + o + 2 * tap, dt), w22, a2)
                e0 = vfma(vloadp(r0 + o + 2 * tap + B, dt), v02, e0)
                e1 = vfma(vloadp(r1 + o + 2 * tap + B, dt), v12, e1)
                e2 = vfma(vloadp(r2 + o + 2 * tap + B, dt), v22, e2)
                acc = vadd(vadd(a0, a1), a2)
                acc2 = vadd(vadd(e0, e1), e2)
                if act != 0:
                    acc = vact(acc, act)
                    acc2 = vact(acc2, act)
                vstorep(pdst + (j - ja) * sdst + cb, acc)
                vstorep(pdst + (j - ja) * sdst + cb + B, acc2)
        elif not checked:
            for j in range(ja, jb):
                o = o0 + (j - ja) * pix + cb
                a0 = vfma(vloadp(r0 + o, dt), w00, b)
                a1 = vfma(vloadp(r1 + o, dt), w10, zero)
                a2 = vfma(vloadp(r2 + o, dt), w20, zero)
                a0 = vfma(vloadp(r0 + o + tap, dt), w01, a0)
                a1 = vfma(vloadp(r1 + o + tap, dt), w11, a1)
                a2 = vfma(vloadp(r2 + o + tap, dt), w21, a2)
                a0 = vfma(vloadp(r0 + o + 2 * tap, dt), w02, a0)
                a1 = vfma(vloadp(r1 + o + 2 * tap, dt), w12, a1)
                a2 = vfma(vloadp(r2 + o + 2 * tap, dt), w22, a2)
                acc = vadd(vadd(a0, a1), a2)
                if act != 0:
                    acc = vact(acc, act)
                vstorep(pdst + (j - ja) * sdst + cb, acc)
        else:
            for j in range(ja, jb):
                iw0 = j * sw - pl
                acc = b
                for m in range(3):
                    ih = ih0 + m * dh
                    for q in range(3):
                        iw = iw0 + q * dw
                        wv = vloadp(pd + (m * 3 + q) * C * sz + cb, dt)
                        if ih >= 0 and ih < H and iw >= 0 and iw < W:
                            xv = vloadp(px + ((n * H + ih) * W + iw) * C * sz + cb, dt)
                            acc = vfma(xv, wv, acc)
                        else:
                            acc = vfma(zero, wv, acc)
                if act != 0:
                    acc = vact(acc, act)
                vstorep(pdst + (j - ja) * sdst + cb, acc)
        c += 2 * L if two else L
    if c < C:
        for j in range(ja, jb):
            iw0 = j * sw - pl
            for cc in range(c, C):
                acc1 = loadp(pb + cc * sz, dt)
                for m in range(3):
                    ih = ih0 + m * dh
                    for q in range(3):
                        iw = iw0 + q * dw
                        wq = loadp(pd + ((m * 3 + q) * C + cc) * sz, dt)
                        if ih >= 0 and ih < H and iw >= 0 and iw < W:
                            xq = loadp(px + (((n * H + ih) * W + iw) * C + cc) * sz, dt)
                            acc1 += xq * wq
                        else:
                            acc1 += 0 * wq
                storep(pdst + (j - ja) * sdst + cc * sz, activated(acc1, act), dt)


# The GEMM micro-kernel's register block: GEMM_MR output pixels x 2 vectors of output channels
# (2 x 16 float32 = 32 channels, or 2 x 8 float64), 12 vector accumulators.
GEMM_MR = 6


def gemm_panel_width(itemsize: int) -> int:
    """Output channels per micro-kernel panel: two 64-byte vectors."""
    return 2 * VEC_BYTES // itemsize


@helper
def gemm_scratch(kc, rows, like):  # pragma: no cover - compiled
    """One task's scratch for ``gemm_tile`` (pk, at, part), in ``like``'s dtype."""
    NR = 2 * VEC_BYTES // like.itemsize
    pk = np.empty((kc, NR), dtype=like.dtype)
    at = np.empty((GEMM_MR, kc), dtype=like.dtype)
    part = np.empty((rows + GEMM_MR, NR), dtype=like.dtype)
    return pk, at, part


@helper
def gemm_tile(a, rows, w, bias, dst, c_lo, c_hi, act, pk, at, part, pf, pf_len):  # pragma: no cover
    """dst[r, c] = act(bias[c] + sum_k a[r, k] * w[k, c]) for r < rows, c_lo <= c < c_hi.

    a: (>= rows, K), rows contiguous (the depthwise tile, or input pixels); w: (K, C_out) the
    pointwise weights as given; bias: padded to a multiple of the panel width NR; scratch:
    pk (KC, NR), at (GEMM_MR, KC), part (>= rows rounded up to GEMM_MR, NR); all C-contiguous,
    one dtype. c_lo is a multiple of NR.

    For each panel of NR output channels and each block of KC reduction channels, the weights
    w[k0:k1, c0:c0+NR] are copied into ``pk`` (contiguous, zero-padded past C_out: it stays in
    L1 and never hits the cache-set conflicts of a 4 KB row stride); then every group of
    GEMM_MR pixel rows runs ``gemm_block``. The last group, if short, is copied into ``at``
    (its last row repeated) so that every block reads GEMM_MR whole rows.

    ``pf_len`` bytes from address ``pf`` (the input the caller's next task reads) are
    prefetched into L2 a few lines per block, so that the memory traffic of the next task's
    first phase overlaps this task's arithmetic.
    """
    K = w.shape[0]
    CO = w.shape[1]
    dt = w.dtype
    sz = w.itemsize
    L = VEC_BYTES // sz
    NR = 2 * L
    KC = pk.shape[0]
    full = rows // GEMM_MR * GEMM_MR
    # byte addresses and row strides (the arrays stay alive in this frame)
    pa, sa = address(a), a.strides[0]
    pat, sat = address(at), at.strides[0]
    ppk, spk = address(pk), pk.strides[0]
    ppart, spart = address(part), part.strides[0]
    pdst, sdst = address(dst), dst.strides[0]
    pbias = address(bias)
    nblocks = -(-(c_hi - c_lo) // NR) * -(-K // KC) * -(-rows // GEMM_MR)
    pf_step = -(-pf_len // (64 * max(1, nblocks))) * 64
    pf_end = pf + pf_len
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
            first = k0 == 0
            final = k0 + nk == K
            cb = pbias + c0 * sz
            cd = pdst + c0 * sz
            for r in range(0, rows, GEMM_MR):
                q = pf
                pf = min(pf_end, pf + pf_step)
                while q < pf:
                    prefetch(q)
                    q += 64
                src, stride = pa + r * sa + k0 * sz, sa
                if r == full:  # the short last group, copied (one call site: one inlined copy)
                    for i in range(GEMM_MR):
                        ri = min(full + i, rows - 1)
                        for k in range(nk):
                            at[i, k] = a[ri, k0 + k]
                    src, stride = pat, sat
                gemm_block(
                    src, stride, ppk, spk, nk, first, cb, ppart + r * spart, spart, final,
                    cd + r * sdst, sdst, min(GEMM_MR, rows - r), nout, act, dt, sz,
                )  # fmt: skip


@helper
def gemm_block(
    pa, sa, ppk, spk, nk, first, pbias, ppart, spart, final, pdst, sdst, nvalid, nout, act, dt, sz
):  # pragma: no cover - compiled
    """One register block of GEMM_MR pixel rows x NR output channels, on byte addresses.

    pa: a[row 0, first reduction channel], rows ``sa`` bytes apart; ppk: the packed panel
    (``nk`` rows, ``spk`` bytes apart); pbias: bias[c0]; ppart / pdst: row 0 of the partial
    sums / of the output at column c0 (strides ``spart`` / ``sdst``); ``dt``/``sz``: the dtype
    and its size. The 12 accumulators live in registers for the whole reduction loop: they
    start from the bias on the ``first`` reduction block, else from ``part``; each step is two
    vector loads of the panel, GEMM_MR scalar broadcasts and 12 vector FMAs. On the ``final``
    block the activation is applied in registers and the first ``nvalid`` rows x ``nout``
    channels are stored to dst; otherwise the sums go back to ``part``. Addresses, not arrays:
    a helper taking arrays pays an atomic reference-count update per array per call (and the
    IR-inlined version still did), which cost half the block's time at K=32.
    """
    B = VEC_BYTES
    if first:
        s00 = vloadp(pbias, dt)
        s01 = vloadp(pbias + B, dt)
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
        s00 = vloadp(ppart, dt)
        s01 = vloadp(ppart + B, dt)
        s10 = vloadp(ppart + spart, dt)
        s11 = vloadp(ppart + spart + B, dt)
        s20 = vloadp(ppart + 2 * spart, dt)
        s21 = vloadp(ppart + 2 * spart + B, dt)
        s30 = vloadp(ppart + 3 * spart, dt)
        s31 = vloadp(ppart + 3 * spart + B, dt)
        s40 = vloadp(ppart + 4 * spart, dt)
        s41 = vloadp(ppart + 4 * spart + B, dt)
        s50 = vloadp(ppart + 5 * spart, dt)
        s51 = vloadp(ppart + 5 * spart + B, dt)
    for k in range(nk):
        pw = ppk + k * spk
        w0 = vloadp(pw, dt)
        w1 = vloadp(pw + B, dt)
        p = pa + k * sz
        x = loadp(p, dt)
        s00 = vfma(x, w0, s00)
        s01 = vfma(x, w1, s01)
        x = loadp(p + sa, dt)
        s10 = vfma(x, w0, s10)
        s11 = vfma(x, w1, s11)
        x = loadp(p + 2 * sa, dt)
        s20 = vfma(x, w0, s20)
        s21 = vfma(x, w1, s21)
        x = loadp(p + 3 * sa, dt)
        s30 = vfma(x, w0, s30)
        s31 = vfma(x, w1, s31)
        x = loadp(p + 4 * sa, dt)
        s40 = vfma(x, w0, s40)
        s41 = vfma(x, w1, s41)
        x = loadp(p + 5 * sa, dt)
        s50 = vfma(x, w0, s50)
        s51 = vfma(x, w1, s51)
    if final and act != 0:
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
    # final and whole: straight to dst; partial sums, a short group or a panel cut by C_out:
    # to part (the last two then copied lane by lane)
    full = final and nout * sz == 2 * B and nvalid == GEMM_MR
    po = pdst if full else ppart
    so = sdst if full else spart
    vstorep(po, s00)
    vstorep(po + B, s01)
    vstorep(po + so, s10)
    vstorep(po + so + B, s11)
    vstorep(po + 2 * so, s20)
    vstorep(po + 2 * so + B, s21)
    vstorep(po + 3 * so, s30)
    vstorep(po + 3 * so + B, s31)
    vstorep(po + 4 * so, s40)
    vstorep(po + 4 * so + B, s41)
    vstorep(po + 5 * so, s50)
    vstorep(po + 5 * so + B, s51)
    if final and not full:
        for i in range(nvalid):
            for j in range(nout):
                storep(pdst + i * sdst + j * sz, loadp(ppart + i * spart + j * sz, dt), dt)


def transpose_batched(src, dst):  # pragma: no cover - compiled
    """dst[n, j, i] = src[n, i, j] (casting to dst's dtype), in 32 x 32 blocks.

    Used to convert NCHW <-> NHWC ((C, H*W) <-> (H*W, C) per image): a plain strided copy
    (numpy's ``.T`` copy) thrashes the cache and the TLB and took longer than the convolution.
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
