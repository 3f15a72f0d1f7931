"""Standard (dense) convolution on the CPU, NHWC: an implicit GEMM through the pointwise
kernel's micro-kernel.

The convolution is the GEMM out[p, k] = sum_r A[p, r] W[r, k] over the pixels p, where a row of
A is the receptive field of output pixel p, tap by tap ((m, q) then the input channel c, the
order of w's rows as (K_h*K_w*C_in, C_out)), zeros on the padding. A is never built whole. A
task (a block of output pixels x a block of output channels, as in ``pointwise_nhwc``) either

- (the direct path: AVX-512, tiles whose 6-row groups pay, ``wide_groups_pay``, split into tasks of
  whole pairs of panels but for the last) copies the input rows its pixels read once, zero
  padded, into a band (``conv_band``), and runs the register blocks on it tap by tap
  (``conv_wide``): each block of pixels reads tap (m, q) at a fixed offset from the pixel's
  first, so there is no im2col. Pairs of panels go to the wide block (6 pixels), the panel
  left over (an odd one, one cut by C_out) to the tap block (8 pixels x one panel). N=8
  layers 1-5 and 7: 0.89-0.95x the time of the im2col path, layer 6 1.01; the tap block:
  layer 8 (C_out 24) 0.76-0.77, layers 10, 11 (C_out 96, 160) 0.92-0.95 (BENCHMARKS.md,
  "Design measurements"); or
- gathers its pixels' rows one slab of taps at a time into a buffer sized for L2
  (``im2col_slab``) and runs ``gemm_tile`` on it, the sums accumulating in the output from slab
  to slab (bias on the first, activation on the last).

Both sum in the same order: the same bits. Where each thread runs several pixel blocks against
the same weights (``packs_once``), the weights are packed into the micro-kernel's panels once
per call, not once per task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ..packing import kernel_operands
from ._jit import NO_ACTIVATION, Kernel, helper, inlined, kernel
from ._simd import VEC_BYTES, address, loadp
from .layout import bias_vector
from .pointwise import (
    TAP_MR,
    WIDE,
    WIDE_MR,
    gemm_panel_width,
    gemm_scratch,
    gemm_split,
    gemm_task,
    gemm_tile,
    kernel_panels,
    no_packed,
    packs_once,
    pair_block,
    panel_block,
    prefetch_share,
    tap_finish,
    tap_start,
    tap_steps,
    wide_finish,
    wide_groups_pay,
    wide_start,
    wide_steps,
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


@helper
def padded_extent(pad, size, out, stride, k, dil):  # pragma: no cover - compiled
    """The rows (or columns) of one image in ``conv_band``'s band: the leading padding and the
    input, or as far as the last output's taps reach, whichever is more."""
    return max(pad + size, (out - 1) * stride + (k - 1) * dil + 1)


@helper
def conv_band(x, p0, p1, oh, ow, geo, like):  # pragma: no cover - compiled
    """The input of the output pixels p0 <= p < p1 (p = (n*oh + i)*ow + j) for ``conv_wide``:
    (band, offs, sm, sq). band: the input rows they read, zero padded, its rows the virtual
    padded rows n * Hp + padded row (Hp per image: the top padding, H and the bottom padding
    the output reaches), so a tile that crosses images is one band; offs[p - p0]: the byte
    offset in band of pixel p's first tap (m, q = 0, 0); tap (m, q) lies m * sm + q * sq bytes
    further. Written in ``like``'s dtype (x's)."""
    kh, kw, sh, sw, dh, dwl, pt, pl = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    sz = like.itemsize
    Hp = padded_extent(pt, H, oh, sh, kh, dh)
    Wp = padded_extent(pl, W, ow, sw, kw, dwl)
    rows = p1 - p0
    n0 = p0 // (oh * ow)
    i0 = (p0 - n0 * oh * ow) // ow
    n1 = (p1 - 1) // (oh * ow)
    i1 = (p1 - 1 - n1 * oh * ow) // ow
    R0 = n0 * Hp + i0 * sh
    nrows = n1 * Hp + i1 * sh + (kh - 1) * dh + 1 - R0
    band = np.empty((nrows, Wp * C), dtype=like.dtype)
    xf = x.reshape(-1)
    for r in range(nrows):
        n = (R0 + r) // Hp
        ih = R0 + r - n * Hp - pt
        row = band[r]
        # loops over views from 0: an index that is not provably >= 0 (pl * C + c) costs
        # Numba's wraparound check per element and the loop its vectorisation (5x the time)
        if ih >= 0 and ih < H:
            src = xf[(n * H + ih) * W * C : (n * H + ih + 1) * W * C]
            left, mid, right = row[: pl * C], row[pl * C : (pl + W) * C], row[(pl + W) * C :]
            for c in range(left.shape[0]):
                left[c] = 0
            for c in range(W * C):
                mid[c] = src[c]
            for c in range(right.shape[0]):
                right[c] = 0
        else:
            for c in range(Wp * C):
                row[c] = 0
    offs = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        p = p0 + r
        n = p // (oh * ow)
        i = (p - n * oh * ow) // ow
        j = p - n * oh * ow - i * ow
        offs[r] = ((n * Hp + i * sh - R0) * Wp + j * sw) * C * sz
    return band, offs, dh * Wp * C * sz, dwl * C * sz


@helper
def input_span(x, p0, p1, oh, ow, geo):  # pragma: no cover - compiled
    """(byte address, length) of the rows of x that the output pixels p0 <= p < p1 read (one
    span: NHWC rows lie one after the other, across images too)."""
    kh, sh, dh, pt = geo[0], geo[2], geo[4], geo[6]
    H = x.shape[1]
    row = x.shape[2] * x.shape[3] * x.itemsize
    n0 = p0 // (oh * ow)
    i0 = (p0 - n0 * oh * ow) // ow
    n1 = (p1 - 1) // (oh * ow)
    i1 = (p1 - 1 - n1 * oh * ow) // ow
    r0 = n0 * H + max(0, i0 * sh - pt)
    r1 = n1 * H + min(H, i1 * sh - pt + (kh - 1) * dh + 1)
    return address(x) + r0 * row, max(0, r1 - r0) * row


@inlined
def band_rows(pc, po, so, r, last, it):  # pragma: no cover - compiled
    """The byte addresses pc + offs[r + i] of a register block's eight rows (i < 8; past row
    ``last``, its: their sums are never stored), offs at byte address ``po``, ``so`` bytes
    apart, of dtype ``it`` (on addresses: an array argument costs reference counts per call)."""
    return (pc + loadp(po + r * so, it), pc + loadp(po + min(r + 1, last) * so, it),
            pc + loadp(po + min(r + 2, last) * so, it),
            pc + loadp(po + min(r + 3, last) * so, it),
            pc + loadp(po + min(r + 4, last) * so, it),
            pc + loadp(po + min(r + 5, last) * so, it),
            pc + loadp(po + min(r + 6, last) * so, it),
            pc + loadp(po + min(r + 7, last) * so, it))  # fmt: skip


@helper
def conv_wide(
    band, offs, sm, sq, kh, kw, w2, packed, bias, dst, c_lo, c_hi, act, pk, pf, pf_len
):  # pragma: no cover - compiled
    """dst[p - p0, c] = act(bias[c] + sum over taps and input channels) for a task's output
    pixels and the channels c_lo..c_hi (c_lo a multiple of 2 NR), with no im2col: each
    register block reads its pixels' receptive fields tap by tap from the task's band
    (``conv_band``: a tap's values at a fixed offset from the pixel's first). Whole pairs of
    panels run on the wide block (``pointwise.wide_steps``: six pixels x four vectors), the
    channels left over (less than a pair: an odd panel, a panel cut by C_out) panel by panel
    on the tap block (``pointwise.tap_steps``: TAP_MR pixels x two vectors, masked loads and
    stores past C_out).

    The reduction runs in blocks of whole taps (as many as KCW = KC / 2 reduction channels
    hold, in blocks of even count) or, where C_in exceeds KCW, of a tap's channels (of even
    depth); w2's rows (tap-major, as (K_h*K_w*C_in, C_out)) are in that order, so each block
    is a run of the caller's ``packed`` panels, or is packed here into pk. ``pf_len`` bytes
    from address ``pf`` (the next task's input) are asked for into L2 a few lines per block
    (``prefetch_share``), so that filling the next band reads them from L2, not memory."""
    C = w2.shape[0] // (kh * kw)
    dt = dst.dtype
    sz = dst.itemsize
    NR = 2 * VEC_BYTES // sz
    rows = offs.shape[0]
    pband = address(band)
    po, so, it = address(offs), offs.strides[0], offs.dtype
    taps = kh * kw
    K = taps * C
    KCW = pk.shape[0] // 2
    if C <= KCW:  # blocks of whole taps, of even count
        tb = max(1, KCW // C)
        tb = -(-taps // -(-taps // tb))
        chunk = C
    else:  # blocks of one tap's channels, of even depth
        tb = 1
        chunk = -(-C // -(-C // KCW))
    spk = NR * sz
    pdst, sdst = address(dst), dst.strides[0]
    pbias = address(bias)
    c_pairs = c_lo + (c_hi - c_lo) // (2 * NR) * 2 * NR  # the pairs end, the panels left over
    nblocks = (
        ((c_pairs - c_lo) // (2 * NR) * -(-rows // WIDE_MR) + -(-(c_hi - c_pairs) // NR)
         * -(-rows // TAP_MR)) * -(-taps // tb) * -(-C // chunk)
    )  # fmt: skip
    pf_step = -(-pf_len // (64 * max(1, nblocks))) * 64
    pf_end = pf + pf_len
    for c0 in range(c_lo, c_hi, 2 * NR):
        pair = c0 < c_pairs
        for t0 in range(0, taps, tb):
            t1 = min(taps, t0 + tb)
            for cs in range(0, C, chunk):
                nc = min(chunk, C - cs)
                k0 = t0 * C + cs
                nk = (t1 - t0) * nc
                first = k0 == 0
                final = k0 + nk == K
                pc = pband + cs * sz
                if pair:
                    pw0, pw1 = pair_block(w2, packed, pk, c0, k0, nk, dt, sz)
                    for r in range(0, rows, WIDE_MR):
                        pf = prefetch_share(pf, pf_end, pf_step)
                        nvalid = min(WIDE_MR, rows - r)
                        a0, a1, a2, a3, a4, a5, _, _ = band_rows(pc, po, so, r, rows - 1, it)
                        rd = pdst + r * sdst + c0 * sz
                        s = wide_start(first, pbias + c0 * sz, rd, sdst, nvalid, dt)
                        s = wide_steps(s, a0, a1, a2, a3, a4, a5, t0, t1, kw, sm, sq, pw0, pw1,
                                       spk, nc, dt, sz)  # fmt: skip
                        wide_finish(s, rd, sdst, nvalid, final, act)
                    continue
                # the panels left over (an odd one, one cut by C_out), each on the tap block
                for c1 in range(c0, c_hi, NR):
                    nout = min(NR, c_hi - c1)
                    pw = panel_block(w2, packed, pk, 0, c1, k0, nk, dt, sz)
                    for r in range(0, rows, TAP_MR):
                        pf = prefetch_share(pf, pf_end, pf_step)
                        nvalid = min(TAP_MR, rows - r)
                        a0, a1, a2, a3, a4, a5, a6, a7 = band_rows(pc, po, so, r, rows - 1, it)
                        rd = pdst + r * sdst + c1 * sz
                        s = tap_start(first, pbias + c1 * sz, rd, sdst, nvalid, nout, dt, sz)
                        s = tap_steps(s, a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, kw, sm, sq,
                                      pw, spk, nc, dt, sz)  # fmt: skip
                        tap_finish(s, rd, sdst, nvalid, nout, final, act, sz)


def conv2d_nhwc(
    x, w2, packed, bias, out, geo, act, split, slab, direct
):  # pragma: no cover - compiled
    """out = act(bias + conv(x, w)), task by task: with ``direct`` on ``conv_wide`` (no
    im2col), else through im2col ``slab`` taps at a time and ``gemm_tile``.

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
        pk, at, part = gemm_scratch(kc, tile, out)
        dst = out2[p0:p1]
        if direct:
            band, offs, sm, sq = conv_band(x, p0, p1, oh, ow, geo, out)
            # the input rows of this thread's next task (prange hands out contiguous chunks),
            # asked for while the GEMM runs; none where the next task reads the same rows
            # (another channel block of these pixels)
            pf, pf_len = address(x), 0
            if cb == nc - 1 and p1 < P:
                pf, pf_len = input_span(x, p1, min(P, p1 + tile), oh, ow, geo)
            conv_wide(band, offs, sm, sq, kh, kw, w2, packed, bias, dst, c0, c1, act, pk, pf,
                      pf_len)  # fmt: skip
        else:
            buf = np.empty((tile, slab * C), dtype=out.dtype)
            zero_tail(buf, p1 - p0)  # the short row group's rows past p1 (no slab writes them)
            for t0 in range(0, taps, slab):
                t1 = min(taps, t0 + slab)
                im2col_slab(x, p0, p1, oh, ow, geo, kw, t0, t1, buf)
                a = act if t1 == taps else NO_ACTIVATION
                gemm_tile(buf, False, p1 - p0, w2[t0 * C : t1 * C], packed[:, t0 * C : t1 * C],
                          bias, dst, c0, c1, a, t0 > 0, pk, at, part, address(x), 0,
                          False)  # fmt: skip


# conv2d's tiles on the direct path (``conv_wide``) hold up to this many times
# CPU_TILE_MAX_PIXELS, their own input (not the band's halo rows) within L2: the direct path's
# A is the band, about the input's share of the tile, not im2col's K_h*K_w times that. N=8,
# one process, against 256 pixels: layer 1 in tiles of 448-1344 pixels ran 0.93-0.96x the time,
# layer 3 in 448-896 0.98-0.99x, layer 4 in 784 0.98x; layers 6-7 (7 x 7 outputs) in 196
# 0.97-0.99x the time of 98, 0.88-0.92x that of 49.
DIRECT_TILE_FACTOR = 3


def conv2d_args(spec: ConvSpec, dtype: np.dtype, parallel: bool) -> Callable[..., tuple]:
    """``build(x, weights, biases, out)``: the arguments of conv2d_nhwc for a call of this
    signature (x and out NHWC, C-contiguous; see ``kernel``): whether it takes the direct path,
    and the task split: on the direct path for tiles of up to DIRECT_TILE_FACTOR times
    CPU_TILE_MAX_PIXELS whose own input fits L2, else for the taps per slab such that a full
    tile's slab of A fits the GEMM tile budget (all of them where it does)."""
    sz = dtype.itemsize
    c_in, c_out, taps = spec.c_in, spec.c_out, spec.kh * spec.kw
    # the direct path where the band's padded rows stay near the input's size (padding far
    # past the image, or a dilation that spreads the taps far apart, would make each task's
    # band huge: 2**31 columns was "array is too big"; im2col gathers only the taps)
    geo = spec.geometry
    extent = padded_extent.py_func  # the kernel's own rule, here in Python
    hp = extent(spec.pad_top, spec.h, spec.out_h, geo[2], spec.kh, geo[4])
    wp = extent(spec.pad_left, spec.w, spec.out_w, geo[3], spec.kw, geo[5])
    direct = WIDE and hp <= 2 * spec.h + spec.kh and wp <= 2 * spec.w + spec.kw
    if direct:  # tiles of up to DIRECT_TILE_FACTOR times as many pixels
        most = DIRECT_TILE_FACTOR * _config.CPU_TILE_MAX_PIXELS
        _, _, sh, sw = geo[:4]
        a_bytes = max(1, sh * sw * c_in * sz * _config.CPU_TILE_BYTES // _config.L2_BYTES)
        split = gemm_split(spec, taps * c_in, 1, sz, parallel, False, a_bytes, most, 2)
        slab = taps  # unused
        # where the wide block's 6-row groups do not pay (a 7 x 7 output at N=1: 49 rows as
        # 9 x 6, the direct path having no narrow tail as ``gemm_wide`` has; a serial call's
        # tile is its largest, so the pixels count), im2col and ``gemm_tile``: layers 6-7 N=1
        # ran 1.00-1.05x the time of im2col on the direct path (when gemm_tile ran 49 rows as
        # 7 x 7 on the narrow block; now 7 x 6 and a 7-row tail). A reduction block under 2
        # (CPU_GEMM_KC 1) leaves the wide block's pair no rows (as ``wide_columns``).
        direct = split[2] >= 2 and bool(wide_groups_pay(min(split[0], spec.pixels)))
    if not direct:
        row_bytes = c_in * sz * _config.CPU_TILE_MAX_PIXELS
        slab = max(1, min(taps, _config.CPU_TILE_BYTES // max(1, row_bytes)))
        split = gemm_split(spec, slab * c_in, 1, sz, parallel, prefetched=False)
    nr = gemm_panel_width(sz)
    nopack = no_packed(dtype)
    act = int(spec.activation)
    once = packs_once(spec.pixels, split[0], taps * c_in * c_out * sz, parallel)

    zeros = bias_vector(None, c_out, dtype, nr)  # (no bias: worked out here, not per call)

    def build(x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> tuple:
        w2, packed = kernel_operands(weights[0], nopack)  # the caller's panels (numba_dsconv.pack)
        if packed.shape[0] == 0:
            w2 = np.ascontiguousarray(w2).reshape(taps * c_in, c_out)
            _, packed = kernel_panels(w2, nopack, once, parallel, "conv2d_w")
        b = zeros if biases[0] is None else bias_vector(biases[0], c_out, dtype, nr)
        return (x, w2, packed, b, out, geo, act, split, slab, direct)

    return build


CONV2D: Kernel = kernel(conv2d_nhwc, conv2d_args)
