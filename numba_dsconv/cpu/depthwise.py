"""Depthwise convolution on the CPU: the kernel (NHWC, parallel over batch x output rows) and
the depthwise family it is built from, which the fused separable kernel shares.

- ``depthwise_tile``: a run of output pixels flattened over images, rows and columns (the fused
  kernels' tiles), row segment by row segment through ``depthwise_row``.
- ``depthwise_row``: the output pixels (i, j0..j1-1) of one image; 3x3 kernels with depth
  multiplier 1 (every MobileNet layer) take ``depthwise3x3_row``, anything else
  ``depthwise_pixel`` per pixel.
- ``depthwise3x3_row`` cuts a row into the left border, the interior (every tap inside the image)
  and the right border; ``depthwise3x3_segment`` sweeps one of them, per channel vector, with one
  of four paths: ``dw3x3_interior2`` (two channel vectors, no bounds checks),
  ``dw3x3_interior`` (one vector, no checks), the border loop (one vector, a tap on the padding
  read as a zero vector, summed in the interior's three chains; kept inline in the segment: as a
  helper of its own LLVM compiled it to slower code, see BENCHMARKS.md, "Design measurements")
  and ``dw3x3_tail`` (scalar, where C is less than one vector). The vectors start at x's first
  vector boundary (``vector_head``); a last vector past C is moved back to end at C, overlapping
  the one before (the same values twice).

The 3x3 code works on byte addresses, not arrays: a call taking arrays pays an atomic
reference-count update per array, on counters every thread shares.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import prange

from .._spec import ConvSpec
from ._jit import NO_ACTIVATION, Kernel, activated, helper, kernel
from ._simd import (
    VEC_BYTES,
    address,
    loadp,
    opaque,
    storep,
    vact,
    vadd,
    vfma,
    vloadp,
    vstorep,
    vzero,
)
from .layout import bias_vector


@helper
def depthwise_pixel(x, dwk, n, i, j, geo, bias, act, o):  # pragma: no cover - compiled
    """o[c*M+q] = act(bias + the taps of output pixel (i, j) of image n), any geometry.

    The general path (border pixels, depth multiplier > 1): a tap on the zero padding
    contributes 0 * weight, so NaN/Inf weights propagate as the formula says.
    """
    _, _, sh, sw, dil_h, dil_w, pt, pl, mult = geo
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    CM = dwk.shape[2]
    for c in range(CM):
        o[c] = bias[c]
    for m in range(dwk.shape[0]):
        ih = i * sh - pt + m * dil_h
        row_inside = ih >= 0 and ih < H
        for q in range(dwk.shape[1]):
            iw = j * sw - pl + q * dil_w
            dq = dwk[m, q]
            if row_inside and iw >= 0 and iw < W:
                if mult == 1:
                    for c in range(C):
                        o[c] += x[n, ih, iw, c] * dq[c]
                else:
                    for c in range(C):
                        xv = x[n, ih, iw, c]
                        base = c * mult
                        for mq in range(mult):
                            o[base + mq] += xv * dq[base + mq]
            else:
                for c in range(CM):
                    o[c] += 0 * dq[c]
    if act != NO_ACTIVATION:
        for c in range(CM):
            o[c] = activated(o[c], act)


@helper
def depthwise_row(x, dwk, n, i, j0, j1, geo, bias, act, dst):  # pragma: no cover - compiled
    """dst[j - j0, :] = act(bias + depthwise taps of output pixels (i, j0..j1-1) of image n).

    x: (N,H,W,C), dwk: (KH,KW,C*M), bias, dst: C-contiguous, one dtype.
    """
    kh, kw, _, _, _, _, _, _, mult = geo
    if mult == 1 and kh == 3 and kw == 3:
        depthwise3x3_row(
            address(x), address(dwk), address(bias), address(dst), dst.strides[0],
            x.shape[1], x.shape[2], x.shape[3], n, i, j0, j1, geo, act, x.dtype, x.itemsize,
        )  # fmt: skip
        return
    for j in range(j0, j1):
        depthwise_pixel(x, dwk, n, i, j, geo, bias, act, dst[j - j0])


@helper
def depthwise_tile(x, dwk, p0, p1, oh, ow, geo, bias, act, dst):  # pragma: no cover - compiled
    """dst[p - p0] = the depthwise forward of output pixels p0..p1-1 (flattened over images,
    rows, columns), row segment by row segment."""
    p = p0
    while p < p1:
        j = p % ow
        r = p // ow
        seg = min(p1 - p, ow - j)
        row = dst[p - p0 : p - p0 + seg]
        depthwise_row(x, dwk, r // oh, r % oh, j, j + seg, geo, bias, act, row)
        p += seg


@helper
def interior3x3(H, W, i, j0, j1, geo):  # pragma: no cover - compiled
    """(ih0, ja, jb) of a 3x3 row segment j0..j1-1 of output row i: its first input row, and
    the interior columns ja..jb-1 whose every tap lies inside the image (none where the row's
    taps leave the image vertically); the forward and the backward split rows alike."""
    _, _, sh, sw, dil_h, dil_w, pt, pl, _ = geo
    ih0 = i * sh - pt
    ja = j1
    jb = j1
    if ih0 >= 0 and ih0 + 2 * dil_h < H:
        # interior columns: j * sw - pl >= 0 and j * sw - pl + 2 * dil_w <= W - 1
        ja = min(j1, max(j0, (pl + sw - 1) // sw))
        last = W - 1 - 2 * dil_w + pl
        jb = max(ja, min(j1, last // sw + 1)) if last >= 0 else ja
    return ih0, ja, jb


@helper
def depthwise3x3_row(
    px, pd, pb, pdst, sdst, H, W, C, n, i, j0, j1, geo, act, dt, sz
):  # pragma: no cover - compiled
    """The 3x3, multiplier-1 row: output pixels (i, j0..j1-1) of image n, on byte addresses
    (px: x (N,H,W,C), pd: weights (3,3,C), pb: bias, pdst: the row's first output pixel,
    ``sdst`` bytes apart). Three segments: the left border, the interior (every tap inside the
    image: no bounds checks), the right border; a row whose taps leave the image vertically is
    all border.
    """
    ih0, ja, jb = interior3x3(H, W, i, j0, j1, geo)
    # one call site: one compilation of the segment code
    for seg in range(3):
        lo = j0 if seg == 0 else (ja if seg == 1 else jb)
        hi = ja if seg == 0 else (jb if seg == 1 else j1)
        if hi > lo:
            depthwise3x3_segment(
                px, pd, pb, pdst + (lo - j0) * sdst, sdst, H, W, C, n, ih0, lo, hi, geo, act,
                seg != 1, dt, sz,
            )  # fmt: skip


@helper
def depthwise3x3_segment(
    px, pd, pb, pdst, sdst, H, W, C, n, ih0, ja, jb, geo, act, checked, dt, sz
):  # pragma: no cover - compiled
    """Output pixels ja..jb-1 (stored from ``pdst``, ``sdst`` bytes apart) = act(bias + the 9
    taps), the input window starting at row ih0, column j * sw - pl (addresses as in
    ``depthwise3x3_row``).

    Channel-vector outer, pixel inner: the 9 weight vectors and the bias of one or two channel
    vectors stay in registers while the segment is swept. Unless ``checked``, every tap must
    lie inside the image (no bounds checks); with it, a tap on the zero padding contributes
    0 * weight, so NaN/Inf weights propagate as the formula says.
    """
    _, _, _, sw, dil_h, dil_w, _, pl, _ = geo
    L = VEC_BYTES // sz
    row = W * C * sz  # bytes per input image row
    r0 = px + (n * H + ih0) * row
    r1 = r0 + dil_h * row
    r2 = r1 + dil_h * row
    tap = dil_w * C * sz
    pix = sw * C * sz  # bytes between the windows of neighbouring output pixels
    o0 = (ja * sw - pl) * C * sz
    count = jb - ja
    if C < L:  # no whole vector
        dw3x3_tail(px, pd, pb, pdst, sdst, H, W, C, n, ih0, ja, jb, geo, 0, act, dt, sz)
        return
    head = vector_head(px, C, sz)
    c = 0
    while c < C:
        if c + L > C:  # the last vector ends at C, overlapping the one before it
            c = C - L
        cb = c * sz
        if checked:  # border pixels: a tap on the padding reads a zero vector (0 * weight)
            # and the sum runs in the interior's three chains (``taps3x3_dot``), the weights
            # in registers
            zero = vzero(dt)
            b = vloadp(pb + cb, dt)
            w00, w01, w02, w10, w11, w12, w20, w21, w22 = taps3x3(pd + cb, C * sz, dt)
            in0 = ih0 >= 0 and ih0 < H
            in1 = ih0 + dil_h >= 0 and ih0 + dil_h < H
            in2 = ih0 + 2 * dil_h >= 0 and ih0 + 2 * dil_h < H
            for j in range(ja, jb):
                iw0 = j * sw - pl
                o = o0 + (j - ja) * pix + cb
                q0 = iw0 >= 0 and iw0 < W
                q1 = iw0 + dil_w >= 0 and iw0 + dil_w < W
                q2 = iw0 + 2 * dil_w >= 0 and iw0 + 2 * dil_w < W
                a0 = vfma(vloadp(r0 + o, dt) if in0 and q0 else zero, w00, b)
                a1 = vfma(vloadp(r1 + o, dt) if in1 and q0 else zero, w10, zero)
                a2 = vfma(vloadp(r2 + o, dt) if in2 and q0 else zero, w20, zero)
                a0 = vfma(vloadp(r0 + o + tap, dt) if in0 and q1 else zero, w01, a0)
                a1 = vfma(vloadp(r1 + o + tap, dt) if in1 and q1 else zero, w11, a1)
                a2 = vfma(vloadp(r2 + o + tap, dt) if in2 and q1 else zero, w21, a2)
                a0 = vfma(vloadp(r0 + o + 2 * tap, dt) if in0 and q2 else zero, w02, a0)
                a1 = vfma(vloadp(r1 + o + 2 * tap, dt) if in1 and q2 else zero, w12, a1)
                a2 = vfma(vloadp(r2 + o + 2 * tap, dt) if in2 and q2 else zero, w22, a2)
                acc = vadd(vadd(a0, a1), a2)
                if act != NO_ACTIVATION:
                    acc = vact(acc, act)
                vstorep(pdst + (j - ja) * sdst + cb, acc)
            c += L
        elif c + 2 * L <= C and (c > 0 or head == 0):
            # two channel vectors per sweep: each pixel then reads two neighbouring 64-byte
            # lines per tap (BENCHMARKS.md, "Design measurements")
            dw3x3_interior2(r0, r1, r2, o0 + cb, tap, pix, pd + cb, pb + cb, C * sz,
                            pdst + cb, sdst, count, act, dt)  # fmt: skip
            c += 2 * L
        else:
            dw3x3_interior(r0, r1, r2, o0 + cb, tap, pix, pd + cb, pb + cb, C * sz,
                           pdst + cb, sdst, count, act, dt)  # fmt: skip
            c += L
        if c == L and head > 0:  # past the unaligned first vector: on to the aligned ones
            c = head


# the fewest channel vectors per pixel for which ``vector_head`` aligns the loads of x. Measured
# with 64-byte vectors (AVX-512): at 8 (C = 128 float32) the extra vector pays (depthwise 0.9x
# the time), at 4 it costs 1.085x, at 2 1.5x (benchmarks/design_measurements.md); 32-byte
# vectors (AVX2) not measured
HEAD_MIN_VECTORS = 8


@helper
def vector_head(px, C, sz):  # pragma: no cover - compiled
    """The first channel whose vectors start on a vector boundary (VEC_BYTES: 64 bytes with
    AVX-512, 32 with AVX2) in every pixel of x (at ``px``, C channels of ``sz`` bytes per
    pixel), or 0 where they already do or cannot (a pixel not a whole number of vectors, or
    fewer than ``HEAD_MIN_VECTORS`` vectors of channels: the extra vector costs more than the
    split loads it saves).

    numpy places large arrays 16 bytes past a 64-byte line: every whole-vector load of x would
    then span two cache lines (20-35 % of the 3x3 depthwise's time on AMD Zen 5). The segment code
    then runs the first vector at channel 0 as given, the next ones from ``head`` on, aligned,
    and the last one ending at C; the channels they overlap get the same values twice, the
    same bits (every lane's sum is computed alike)."""
    L = VEC_BYTES // sz
    off = px % VEC_BYTES
    if off == 0 or off % sz != 0 or C * sz % VEC_BYTES != 0 or C < HEAD_MIN_VECTORS * L:
        return 0
    return (VEC_BYTES - off) // sz


@helper
def taps3x3(pw, srow, dt):  # pragma: no cover - compiled
    """The 9 weight vectors at address ``pw``, ``srow`` bytes from one tap to the next."""
    return (
        vloadp(pw, dt),
        vloadp(pw + srow, dt),
        vloadp(pw + 2 * srow, dt),
        vloadp(pw + 3 * srow, dt),
        vloadp(pw + 4 * srow, dt),
        vloadp(pw + 5 * srow, dt),
        vloadp(pw + 6 * srow, dt),
        vloadp(pw + 7 * srow, dt),
        vloadp(pw + 8 * srow, dt),
    )


@helper
def taps3x3_dot(r0, r1, r2, o, tap, w, b, zero, dt):  # pragma: no cover - compiled
    """b + the 9 taps of one channel vector of one pixel: r0..r2 the three input rows, ``o``
    the window's byte offset in them, ``tap`` bytes between its columns, ``w`` the 9 weight
    vectors. One FMA chain per kernel row (3 deep: FMA-latency bound, not 9 deep)."""
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = w
    a0 = vfma(vloadp(r0 + o, dt), w00, b)
    a1 = vfma(vloadp(r1 + o, dt), w10, zero)
    a2 = vfma(vloadp(r2 + o, dt), w20, zero)
    a0 = vfma(vloadp(r0 + o + tap, dt), w01, a0)
    a1 = vfma(vloadp(r1 + o + tap, dt), w11, a1)
    a2 = vfma(vloadp(r2 + o + tap, dt), w21, a2)
    a0 = vfma(vloadp(r0 + o + 2 * tap, dt), w02, a0)
    a1 = vfma(vloadp(r1 + o + 2 * tap, dt), w12, a1)
    a2 = vfma(vloadp(r2 + o + 2 * tap, dt), w22, a2)
    return vadd(vadd(a0, a1), a2)


@helper
def dw3x3_interior(
    r0, r1, r2, o0, tap, pix, pw, pb, srow, pdst, sdst, count, act, dt
):  # pragma: no cover - compiled
    """One channel vector of ``count`` interior pixels: r0..r2 the three input rows, o0 the
    first window's byte offset in them (channel offset included), ``pix`` bytes between
    windows, ``tap`` bytes between a window's columns; pw / pb the vector's weights (9 taps,
    ``srow`` bytes apart) and bias."""
    w = taps3x3(pw, srow, dt)
    b = vloadp(pb, dt)
    zero = vzero(dt)
    d1, d2 = r1 - r0, r2 - r0
    q, d = r0 + o0, pdst  # the window's first column in row 0, the output (``opaque``)
    for _ in range(count):
        acc = taps3x3_dot(q, q + d1, q + d2, 0, tap, w, b, zero, dt)
        if act != NO_ACTIVATION:
            acc = vact(acc, act)
        vstorep(d, acc)
        q = opaque(q + pix)
        d = opaque(d + sdst)


@helper
def dw3x3_interior2(
    r0, r1, r2, o0, tap, pix, pw, pb, srow, pdst, sdst, count, act, dt
):  # pragma: no cover - compiled
    """``dw3x3_interior`` for two neighbouring channel vectors at once (18 weight vectors in
    registers, six FMA chains per pixel)."""
    B = VEC_BYTES
    w = taps3x3(pw, srow, dt)
    v = taps3x3(pw + B, srow, dt)
    b = vloadp(pb, dt)
    b2 = vloadp(pb + B, dt)
    zero = vzero(dt)
    d1, d2 = r1 - r0, r2 - r0
    q, d = r0 + o0, pdst  # as in dw3x3_interior
    for _ in range(count):
        acc = taps3x3_dot(q, q + d1, q + d2, 0, tap, w, b, zero, dt)
        acc2 = taps3x3_dot(q, q + d1, q + d2, B, tap, v, b2, zero, dt)
        if act != NO_ACTIVATION:
            acc = vact(acc, act)
            acc2 = vact(acc2, act)
        vstorep(d, acc)
        vstorep(d + B, acc2)
        q = opaque(q + pix)
        d = opaque(d + sdst)


@helper
def dw3x3_tail(
    px, pd, pb, pdst, sdst, H, W, C, n, ih0, ja, jb, geo, c0, act, dt, sz
):  # pragma: no cover - compiled
    """Channels c0..C-1 of pixels ja..jb-1, scalar, checked (C less than one vector)."""
    _, _, _, sw, dil_h, dil_w, _, pl, _ = geo
    for j in range(ja, jb):
        iw0 = j * sw - pl
        for cc in range(c0, C):
            acc = loadp(pb + cc * sz, dt)
            for m in range(3):
                ih = ih0 + m * dil_h
                for q in range(3):
                    iw = iw0 + q * dil_w
                    wq = loadp(pd + ((m * 3 + q) * C + cc) * sz, dt)
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        acc += loadp(px + (((n * H + ih) * W + iw) * C + cc) * sz, dt) * wq
                    else:
                        acc += 0 * wq
            storep(pdst + (j - ja) * sdst + cc * sz, activated(acc, act), dt)


def depthwise_nhwc(x, dwk, bias, out, geo, act):  # pragma: no cover - compiled
    """out[n,i,j,c*M+q] = act(bias + sum_{m,q'} x[n, i*sh+m*dh-pt, j*sw+q'*dw-pl, c] ...
    ... * dwk[m,q',c*M+q]), parallel over (batch x output rows).

    x: (N,H,W,C) C-contiguous; dwk: (KH,KW,C*M); bias: (C*M,); out: (N,OH,OW,C*M);
    geo: the spec's geometry tuple (_spec.GEOMETRY_FIELDS); act: an Activation code.
    """
    N, OH, OW, _ = out.shape
    for t in prange(N * OH):
        n = t // OH
        i = t - n * OH
        depthwise_row(x, dwk, n, i, 0, OW, geo, bias, act, out[n, i])


def depthwise_args(spec: ConvSpec, dtype: np.dtype, parallel: bool) -> Callable[..., tuple]:
    """``build(x, weights, biases, out)``: the arguments of depthwise_nhwc for a call of this
    signature (x and out NHWC, C-contiguous; see ``kernel``)."""
    c_mid, geo, act = spec.c_mid, spec.geometry, int(spec.activation)
    zeros = bias_vector(None, c_mid, dtype)  # (no bias: worked out here, not per call)

    def build(x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> tuple:
        b = zeros if biases[0] is None else bias_vector(biases[0], c_mid, dtype)
        return (x, weights[0], b, out, geo, act)

    return build


DEPTHWISE: Kernel = kernel(depthwise_nhwc, depthwise_args)
