"""The backward kernels on the CPU: the gradients of every operation.

- ``backward_nhwc``: one kernel for the separable, depthwise and pointwise backward. The output
  pixels are cut into *chunks* of whole flattened output rows; each chunk is one task, which
  walks its pixels tile by tile:

  1. recompute the depthwise tile from x, as the forward does (``depthwise_row``): the
     intermediate ``A = mid_act(DW(x) + dw_bias)`` exists only as a tile x C*M buffer;
  2. ``gz = grad * act'(z)``, the mask read from the forward output y when the caller has it,
     else from ``z = A @ pw + bias`` recomputed with the forward's GEMM micro-kernel;
  3. ``d pw += A^T @ gz`` and ``d bias += colsum(gz)`` into the chunk's own partial sums (the
     micro-kernel in accumulate mode, reading A transposed in place);
  4. ``gm = (gz @ pw^T) * mid_act'(A)`` (the micro-kernel again), ``d dw_bias += colsum(gm)``;
  5. the depthwise backward of gm: ``dx`` as the transposed correlation (each tap's product
     added into dx at the input pixel it read; 3x3 rows two channel vectors per pass where
     the pixels' addresses alias, ``dx3x3_pair``) and ``d dw += x * gm`` into the chunk's
     partial.

  The pointwise op is the same walk without a depthwise stage (A is x; gm is dx itself), the
  depthwise op without a pointwise stage (gm = grad * act'(y)). A call with too few pixels for
  a second chunk (N=1, 7x7) runs its one chunk as two tasks: steps 1-3 for d pw and d bias,
  steps 1, 2, 4, 5 for the rest; the depthwise op's one chunk as two tasks on two halves of
  its channels (``cut``).

- ``conv2d_grads``: the standard convolution's gradients through the GEMMs above: d x at
  stride 1 as a convolution by the forward's kernel (the transposed convolution), else tap by
  tap through the pointwise forward's GEMM; d w tap by tap through the pointwise backward's
  d pw GEMM; d b by chunked sums (``conv2d_grad_bias_nhwc``).

Determinism: chunks are cut from the problem's size and the thread pool's size
(``backward_plan``: NUMBA_NUM_THREADS, never the threads launched) and every sum runs in a fixed
order: within a chunk in pixel order, then over the chunks in chunk order (``combine_parts``,
in the same launch). No atomics. dx receives the taps of two neighbouring chunks, which may read
the same input rows: chunks then run in two phases (even chunks, then odd ones), each chunk at
least as tall as the kernel's reach, so no two chunks of one phase touch the same row of dx.
The result is the same bits run after run and with any number of threads launched
(numba.set_num_threads); another pool size (NUMBA_NUM_THREADS, a machine with other cores) can
cut other chunks and round differently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numba
import numpy as np
from numba import prange

from .. import _config
from .._spec import Activation, ConvSpec
from ..packing import PackedWeights
from ._jit import NO_ACTIVATION, RELU6, helper, kernel
from ._simd import (
    VEC_BYTES,
    address,
    loadp,
    opaque,
    storep,
    vadd,
    vfma,
    vloadp,
    vpassed,
    vstorep,
    vzero,
)
from .conv2d import CONV2D, im2col_slab
from .depthwise import depthwise_tile, interior3x3, taps3x3
from .layout import aligned_empty, bias_vector, copy_transposed, result_allocator, scratch
from .pointwise import (
    GEMM_MR,
    POINTWISE,
    block_depth,
    gemm_panel_width,
    gemm_scratch_shapes,
    gemm_tile,
    no_packed,
    packed_weights,
    row_group,
)

# Whether a backward of one chunk runs as two tasks (backward_nhwc's ``split``); tests switch it
# off to compare the bits.
ROLE_SPLIT = True

# Flags of backward_nhwc, in the order of its ``flags`` tuple.
FLAG_FIELDS = ("has_dw", "has_pw", "have_y", "need_x", "need_dw", "need_pw", "need_db", "need_b")


# The element-wise tile helpers work on addresses, rows ``strides[0]`` bytes apart and elements
# contiguous within a row: the tile buffers' rows are padded (``unaliased``), which makes them
# (and every array sharing a variable with them) Numba 'A' arrays, whose element loops LLVM left
# scalar: 3.5x the whole backward's time on layer 2 with an activation. A mask is a float array
# (an activation's output or input) or uint8 (the caller's bool mask, viewed).


@helper
def masked_copy(src, mask, code, dst, rows):  # pragma: no cover - compiled
    """dst[t, c] = src[t, c] where act'(mask[t, c]) is 1, else 0, for t < rows: relu passes
    where the mask value m > 0, relu6 where 0 < m < 6 (torch's convention at the kinks: 0;
    NaN: 0). By whole vectors (``vpassed``), the row's last channels one by one: the loop by
    elements through a helper's test stayed scalar (separable_grad N=8 row 1 with a final
    relu6, output given: 11.1 ms against 6.0 without the activation)."""
    n = src.shape[1]
    dt, mt = src.dtype, mask.dtype
    sz, msz = src.itemsize, mask.itemsize
    L = VEC_BYTES // sz
    whole = n // L * L
    ps, pm, pd = address(src), address(mask), address(dst)
    for t in range(rows):
        rs, rm, rd = ps + t * src.strides[0], pm + t * mask.strides[0], pd + t * dst.strides[0]
        for c in range(0, whole, L):
            vstorep(rd + c * sz, vpassed(vloadp(rs + c * sz, dt), rm + c * msz, mt, code))
        for c in range(whole, n):
            v = loadp(rs + c * sz, dt)
            m = loadp(rm + c * msz, mt)
            keep = code == NO_ACTIVATION or (m > 0 and (code != RELU6 or m < 6))
            storep(rd + c * sz, v if keep else 0, dt)


@helper
def mask_in_place(a, mask, code, rows):  # pragma: no cover - compiled
    """a[t, c] = 0 where the activation's derivative at mask[t, c] is 0 (``masked_copy``), for
    t < rows."""
    masked_copy(a, mask, code, a, rows)


@helper
def unaliased(width, itemsize):  # pragma: no cover - compiled
    """A row length for a tile buffer: ``width``, plus a cache line where rows of ``width``
    would be a multiple of 512 bytes apart (their columns would crowd into a few L1 sets)."""
    return width + 64 // itemsize if (width * itemsize) % 512 == 0 else width


@helper
def tile_step(pixels, tile):  # pragma: no cover - compiled
    """The pixels per tile of a backward chunk of ``pixels``: tiles of even size within
    ``tile``, whole row groups (784 pixels as 4 x 196, not 3 x 256 + 16: the d pw GEMM reads
    and writes all its partial sums once per tile)."""
    if pixels <= 0:
        return 0
    step = -(-pixels // -(-pixels // tile))
    mr = row_group(step)
    return min(tile, -(-step // mr) * mr)


@helper
def chunk_shapes(step, CM, CO, need_z, kc, sz):  # pragma: no cover - compiled
    """The (rows, cols) of a backward task's buffers, in ``chunk_buffers``' order: its tiles,
    then ``gemm_tile``'s scratch (rows: a tile's, C*M or C_out)."""
    tiles = ((step, unaliased(CM, sz)), (step, CM), (step, unaliased(CO, sz)),
             (step if need_z else 1, CO))  # fmt: skip
    return tiles + gemm_scratch_shapes(kc, max(step, CM, CO), sz)


@helper
def chunk_offsets(shapes, sz):  # pragma: no cover - compiled
    """Where each buffer of ``shapes`` starts in its task's row of scratch (in elements), and
    the row's length: buffer j at a page boundary plus 5j cache lines. Every tile buffer has
    rows of the same length, so on page-aligned starts row i of each would share its address
    bits 0-11 with row i of the others: the GEMM writing gm's rows as it reads gz's, the mask
    reading A's, would wait on 4K aliasing (layer 2, N=8: 1.06x the time)."""
    page = 4096 // sz
    line = 64 // sz
    offs = []
    o = 0
    for j in range(len(shapes)):
        o = -(-o // page) * page + 5 * j * line
        offs.append(o)
        o += shapes[j][0] * shapes[j][1]
    return offs, o


@helper
def chunk_buffers(work, step, CM, CO, need_z, kc):  # pragma: no cover - compiled
    """A backward task's tile buffers and GEMM scratch in its row of the call's reused scratch
    ``work`` (``chunk_offsets``), each on a 64-byte line: the A and gz tiles in rows padded by
    a line (the d pw GEMM reads one of them down its columns, and rows 4 KB apart all fall in
    one L1 set: C*M = 1024 floats, 3.6x slower), the gm and z tiles, and ``gemm_tile``'s pk,
    at and part."""
    shapes = chunk_shapes(step, CM, CO, need_z, kc, work.itemsize)
    offs, _ = chunk_offsets(shapes, work.itemsize)
    (r0, c0), (r1, c1), (r2, c2), (r3, c3), (r4, c4), (r5, c5), (r6, c6) = shapes
    abuf = work[offs[0] : offs[0] + r0 * c0].reshape((r0, c0))
    gmbuf = work[offs[1] : offs[1] + r1 * c1].reshape((r1, c1))
    gzbuf = work[offs[2] : offs[2] + r2 * c2].reshape((r2, c2))
    zbuf = work[offs[3] : offs[3] + r3 * c3].reshape((r3, c3))
    pk = work[offs[4] : offs[4] + r4 * c4].reshape((r4, c4))
    at = work[offs[5] : offs[5] + r5 * c5].reshape((r5, c5))
    part = work[offs[6] : offs[6] + r6 * c6].reshape((r6, c6))
    return abuf[:, :CM], gmbuf, gzbuf[:, :CO], zbuf, pk, at, part


@helper
def zero_rows(a, lo, hi, C, c_lo, c_hi):  # pragma: no cover - compiled
    """Channels c_lo..c_hi-1 of rows lo..hi-1 of ``a`` (dx as (N*H, W*C), C-contiguous) = 0;
    returns max(lo, hi), the next row to zero. All channels: each row as one run (LLVM's
    stores); a range: per pixel, in vectors on addresses (indexed element by element, that
    loop was left scalar)."""
    if c_lo == 0 and c_hi == C:
        for r in range(lo, hi):
            for e in range(a.shape[1]):
                a[r, e] = 0
        return max(lo, hi)
    dt, sz = a.dtype, a.itemsize
    L = VEC_BYTES // sz
    z = vzero(dt)
    run = c_hi - c_lo
    for r in range(lo, hi):
        for w in range(a.shape[1] // C):
            p = address(a) + (r * a.shape[1] + w * C + c_lo) * sz
            e = 0
            while e + L <= run:
                vstorep(p + e * sz, z)
                e += L
            for t in range(e, run):
                storep(p + t * sz, 0, dt)
    return max(lo, hi)


@helper
def copy_rows(src, dst, rows):  # pragma: no cover - compiled
    n = src.shape[1]
    dt, sz = src.dtype, src.itemsize
    ps, pd = address(src), address(dst)
    for t in range(rows):
        rs, rd = ps + t * src.strides[0], pd + t * dst.strides[0]
        for c in range(n):
            storep(rd + c * sz, loadp(rs + c * sz, dt), dt)


@helper
def add_colsum(src, rows, acc):  # pragma: no cover - compiled
    """acc[c] += src[t, c] for t < rows, in row order (acc C-contiguous): a vector of columns
    at a time, its sums in a register down the rows. The adds are FMAs by 1 (exact, the
    same rounding as an add), not adds: Numba gives every float add of a fast-math kernel
    LLVM's reassoc flag, and LLVM then split such a sum into partial sums differently in two
    compilations of the kernel (the bits of d bias changed with the mask's dtype). The
    columns past the last whole vector add in memory, as before."""
    n = src.shape[1]
    dt, sz = src.dtype, src.itemsize
    L = VEC_BYTES // sz
    ps, pa, ss = address(src), address(acc), src.strides[0]
    full = n // L * L
    for c0 in range(0, full, L):
        v = vloadp(pa + c0 * sz, dt)
        for t in range(rows):
            v = vfma(1, vloadp(ps + t * ss + c0 * sz, dt), v)
        vstorep(pa + c0 * sz, v)
    for t in range(rows):
        for c in range(full, n):
            acc[c] += loadp(ps + t * ss + c * sz, dt)


@helper
def depthwise_backward_tile(
    x, dwk, gm, p0, rows, oh, ow, geo, gx, gdw, need_x, need_dw, c_lo, c_hi
):  # pragma: no cover - compiled
    """The depthwise backward of gm (rows x C*M) at output pixels p0..p0+rows-1: every tap
    inside the image adds gm * w into gx at the input pixel it read (``need_x``) and x * gm
    into gdw[tap] (``need_dw``); pixels in order, taps in order; input channels c_lo..c_hi-1
    (all of them but where ``backward_nhwc`` cuts a chunk's channels in two). 3x3 kernels with
    multiplier 1 (every MobileNet layer) take ``dw3x3_backward_row`` per row segment."""
    kh, kw, sh, sw, dil_h, dil_w, pt, pl, mult = geo
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    if mult == 1 and kh == 3 and kw == 3:
        p = p0
        while p < p0 + rows:
            j = p % ow
            r = p // ow
            seg = min(p0 + rows - p, ow - j)
            dw3x3_backward_row(
                address(x), address(gx), address(dwk), address(gdw),
                address(gm) + (p - p0) * gm.strides[0], gm.strides[0], H, W, C, r // oh, r % oh,
                j, j + seg, geo, need_x, need_dw, c_lo, c_hi, x.dtype, x.itemsize,
            )  # fmt: skip
            p += seg
        return
    for t in range(rows):
        p = p0 + t
        j = p % ow
        r = p // ow
        n = r // oh
        i = r - n * oh
        for m in range(kh):
            ih = i * sh - pt + m * dil_h
            if ih < 0 or ih >= H:
                continue
            for q in range(kw):
                iw = j * sw - pl + q * dil_w
                if iw < 0 or iw >= W:
                    continue
                tap = m * kw + q
                if mult == 1:
                    if need_x:
                        for c in range(c_lo, c_hi):
                            gx[n, ih, iw, c] += gm[t, c] * dwk[m, q, c]
                    if need_dw:
                        for c in range(c_lo, c_hi):
                            gdw[tap, c] += x[n, ih, iw, c] * gm[t, c]
                else:
                    for c in range(c_lo, c_hi):
                        base = c * mult
                        if need_x:
                            s = gm[t, base] * dwk[m, q, base]
                            for u in range(1, mult):
                                s += gm[t, base + u] * dwk[m, q, base + u]
                            gx[n, ih, iw, c] += s
                        if need_dw:
                            xv = x[n, ih, iw, c]
                            for u in range(mult):
                                gdw[tap, base + u] += xv * gm[t, base + u]


@helper
def dw3x3_backward_row(
    px, pgx, pd, pgdw, pgm, sgm, H, W, C, n, i, j0, j1, geo, need_x, need_dw, c_lo, c_hi, dt, sz
):  # pragma: no cover - compiled
    """The 3x3, multiplier-1 backward of output pixels (i, j0..j1-1) of image n, on byte
    addresses (px / pgx: x and dx (N,H,W,C); pd / pgdw: the weights and d dw (9, C); pgm: the
    row's first gm pixel, ``sgm`` bytes apart). As ``depthwise3x3_row``: the left border, the
    interior (every tap inside the image: no bounds checks), the right border."""
    ih0, ja, jb = interior3x3(H, W, i, j0, j1, geo)
    for seg in range(3):
        lo = j0 if seg == 0 else (ja if seg == 1 else jb)
        hi = ja if seg == 0 else (jb if seg == 1 else j1)
        if hi > lo:
            dw3x3_backward_segment(
                px, pgx, pd, pgdw, pgm + (lo - j0) * sgm, sgm, H, W, C, n, ih0, lo, hi, geo,
                need_x, need_dw, seg != 1, c_lo, c_hi, dt, sz,
            )  # fmt: skip


@helper
def dw3x3_backward_segment(
    px,
    pgx,
    pd,
    pgdw,
    pgm,
    sgm,
    H,
    W,
    C,
    n,
    ih0,
    ja,
    jb,
    geo,
    need_x,
    need_dw,
    checked,
    c_lo,
    c_hi,
    dt,
    sz,
):  # pragma: no cover - compiled
    """Output pixels ja..jb-1 of one row (gm from ``pgm``), channel vector by channel vector:
    ``dw3x3_backward_interior`` where every tap is inside the image, else each tap checked (d dw
    of border pixels summed in registers over the segment, as the interior's, and added once;
    dx tap by tap); the channels past the last whole vector one by one. Channels c_lo..c_hi-1
    (c_lo 0 or a multiple of two vectors)."""
    _, _, _, sw, dil_h, dil_w, _, pl, _ = geo
    L = VEC_BYTES // sz
    row = W * C * sz
    r0 = (n * H + ih0) * row  # byte offsets of the three input rows (in x and in dx)
    tap = dil_w * C * sz
    pix = sw * C * sz
    o0 = (ja * sw - pl) * C * sz
    c = c_lo
    while c + L <= c_hi:
        cb = c * sz
        if checked and need_dw:
            # d dw of border pixels: the nine sums in registers over the segment, as the
            # interior's (a tap outside the image adds nothing), added to d dw once at the
            # end. Summed in d dw's memory, each tap's sum waited on its own store from the
            # pixel before (half the pixels of a 7 x 7 image are on its border: depthwise_grad
            # of layer 7, N=8, 0.96x the time; in one unaligned placement 818 -> 305-362 us)
            in0 = ih0 >= 0 and ih0 < H
            in1 = ih0 + dil_h >= 0 and ih0 + dil_h < H
            in2 = ih0 + 2 * dil_h >= 0 and ih0 + 2 * dil_h < H
            a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = vzero(dt)
            for j in range(ja, jb):
                g = vloadp(pgm + (j - ja) * sgm + cb, dt)
                iw0 = j * sw - pl
                q0 = iw0 >= 0 and iw0 < W
                q1 = iw0 + dil_w >= 0 and iw0 + dil_w < W
                q2 = iw0 + 2 * dil_w >= 0 and iw0 + 2 * dil_w < W
                o = r0 + iw0 * C * sz + cb  # the window's first tap in row ih0 (maybe outside)
                if in0:
                    a00 = vfma(vloadp(px + o, dt), g, a00) if q0 else a00
                    a01 = vfma(vloadp(px + o + tap, dt), g, a01) if q1 else a01
                    a02 = vfma(vloadp(px + o + 2 * tap, dt), g, a02) if q2 else a02
                o += dil_h * row
                if in1:
                    a10 = vfma(vloadp(px + o, dt), g, a10) if q0 else a10
                    a11 = vfma(vloadp(px + o + tap, dt), g, a11) if q1 else a11
                    a12 = vfma(vloadp(px + o + 2 * tap, dt), g, a12) if q2 else a12
                o += dil_h * row
                if in2:
                    a20 = vfma(vloadp(px + o, dt), g, a20) if q0 else a20
                    a21 = vfma(vloadp(px + o + tap, dt), g, a21) if q1 else a21
                    a22 = vfma(vloadp(px + o + 2 * tap, dt), g, a22) if q2 else a22
            acc = (a00, a01, a02, a10, a11, a12, a20, a21, a22)
            for t in range(9):
                pa = pgdw + t * C * sz + cb
                vstorep(pa, vadd(vloadp(pa, dt), acc[t]))
        if checked and need_x:
            for j in range(ja, jb):
                g = vloadp(pgm + (j - ja) * sgm + cb, dt)
                for m in range(3):
                    ih = ih0 + m * dil_h
                    if ih < 0 or ih >= H:
                        continue
                    for q in range(3):
                        iw = j * sw - pl + q * dil_w
                        if iw < 0 or iw >= W:
                            continue
                        off = ((n * H + ih) * W + iw) * C * sz + cb
                        t = (m * 3 + q) * C * sz + cb
                        vstorep(pgx + off, vfma(g, vloadp(pd + t, dt), vloadp(pgx + off, dt)))
        if not checked:
            # dx two channel vectors at a time where the row's windows allow it (stride 1 or
            # 2, dilation 1 along the row) and its pixels' addresses repeat their bits 0-11
            # within 4 windows, or 8 at stride 2 (``dx3x3_pair``: 4K aliasing); elsewhere one
            # vector, its weights in registers, is faster (cycles per vector, one thread:
            # C = 32 13 against 16, 56x56x128 16.4 against 19.2; 112x112x64 at stride 2 28.4
            # against 24.8)
            pair = need_x and c + 2 * L <= c_hi and tap == C * sz and (pix == tap or pix == 2 * tap)
            pair = pair and ((4 if pix == tap else 8) * pix) % 4096 == 0
            for v in range(2 if pair else 1):
                vb = cb + v * L * sz
                dw3x3_backward_interior(
                    px + r0, pgx + r0, dil_h * row, o0 + vb, tap, pix, pd + vb, pgdw + vb,
                    C * sz, pgm + vb, sgm, jb - ja, need_x and not pair, need_dw, dt,
                )  # fmt: skip
            if pair:
                dx3x3_pair(pgx + r0, dil_h * row, o0 + cb, tap, pix, pd + cb, C * sz, pgm + cb,
                           sgm, jb - ja, dt)  # fmt: skip
                c += L
        c += L
    for cc in range(c, c_hi):  # the tail, scalar
        for j in range(ja, jb):
            g = loadp(pgm + (j - ja) * sgm + cc * sz, dt)
            for m in range(3):
                ih = ih0 + m * dil_h
                if ih < 0 or ih >= H:
                    continue
                for q in range(3):
                    iw = j * sw - pl + q * dil_w
                    if iw < 0 or iw >= W:
                        continue
                    off = (((n * H + ih) * W + iw) * C + cc) * sz
                    t = ((m * 3 + q) * C + cc) * sz
                    if need_dw:
                        storep(pgdw + t, loadp(pgdw + t, dt) + loadp(px + off, dt) * g, dt)
                    if need_x:
                        storep(pgx + off, loadp(pgx + off, dt) + g * loadp(pd + t, dt), dt)


@helper
def dx3x3_pair(
    g0, drow, o0, tap, pix, pw, srow, pgm, sgm, count, dt
):  # pragma: no cover - compiled
    """dx of two channel vectors (``VEC_BYTES`` apart) of ``count`` interior pixels at stride 1
    or 2 (``pix`` = ``tap`` or twice it), dilation 1 along the row: the sums of
    ``dw3x3_backward_interior``'s rolling (stride 1) and pending (stride 2) schemes, in the
    same order (the same bits), for both vectors in one pass; the weights read from L1 at each
    use (18 of them would not fit the registers beside the sums).

    One vector per pass waited on 4K aliasing: MobileNet's rows of dx are a multiple of 4 KiB
    apart (W * C * 4 = 28672) and its pixels 2^k bytes, so a pixel's loads of dx match the
    address bits 0-11 of the stores of a pixel 4096 / ``pix`` before, still in the store
    buffer. With two vectors per pass those stores are twice as old: the 3x3 dx of a 28x28x256
    tile, one thread, 48 -> 19.5 cycles per vector, 14x14x512 67 -> 23 (C = 240: 12.5, no
    aliasing)."""
    B = VEC_BYTES
    z = vzero(dt)
    if pix == tap:  # stride 1: rolling sums, two columns pending per kernel row and vector
        b00 = b01 = b10 = b11 = b20 = b21 = z
        c00 = c01 = c10 = c11 = c20 = c21 = z
        q0, pg = g0 + o0, pgm  # one pointer per stream (``opaque``)
        for _ in range(count):
            q1 = q0 + drow
            q2 = q1 + drow
            g = vloadp(pg, dt)
            h = vloadp(pg + B, dt)
            d0 = vloadp(q0, dt)
            e0 = vloadp(q0 + B, dt)
            d1 = vloadp(q1, dt)
            e1 = vloadp(q1 + B, dt)
            d2 = vloadp(q2, dt)
            e2 = vloadp(q2 + B, dt)
            vstorep(q0, vadd(d0, vfma(g, vloadp(pw, dt), b00)))
            vstorep(q0 + B, vadd(e0, vfma(h, vloadp(pw + B, dt), c00)))
            b00 = vfma(g, vloadp(pw + srow, dt), b01)
            c00 = vfma(h, vloadp(pw + srow + B, dt), c01)
            b01 = vfma(g, vloadp(pw + 2 * srow, dt), z)
            c01 = vfma(h, vloadp(pw + 2 * srow + B, dt), z)
            vstorep(q1, vadd(d1, vfma(g, vloadp(pw + 3 * srow, dt), b10)))
            vstorep(q1 + B, vadd(e1, vfma(h, vloadp(pw + 3 * srow + B, dt), c10)))
            b10 = vfma(g, vloadp(pw + 4 * srow, dt), b11)
            c10 = vfma(h, vloadp(pw + 4 * srow + B, dt), c11)
            b11 = vfma(g, vloadp(pw + 5 * srow, dt), z)
            c11 = vfma(h, vloadp(pw + 5 * srow + B, dt), z)
            vstorep(q2, vadd(d2, vfma(g, vloadp(pw + 6 * srow, dt), b20)))
            vstorep(q2 + B, vadd(e2, vfma(h, vloadp(pw + 6 * srow + B, dt), c20)))
            b20 = vfma(g, vloadp(pw + 7 * srow, dt), b21)
            c20 = vfma(h, vloadp(pw + 7 * srow + B, dt), c21)
            b21 = vfma(g, vloadp(pw + 8 * srow, dt), z)
            c21 = vfma(h, vloadp(pw + 8 * srow + B, dt), z)
            q0 = opaque(q0 + pix)
            pg = opaque(pg + sgm)
        e = o0 + count * pix  # the two columns still pending
        for r, (b0, b1, c0, c1) in enumerate(((b00, b01, c00, c01), (b10, b11, c10, c11),
                                              (b20, b21, c20, c21))):  # fmt: skip
            q = g0 + r * drow + e
            vstorep(q, vadd(vloadp(q, dt), b0))
            vstorep(q + B, vadd(vloadp(q + B, dt), c0))
            vstorep(q + tap, vadd(vloadp(q + tap, dt), b1))
            vstorep(q + tap + B, vadd(vloadp(q + tap + B, dt), c1))
        return
    # stride 2: a window's last column (the next one's first) pending per kernel row and vector
    b0 = b1 = b2 = c0 = c1 = c2 = z
    q0, pg = g0 + o0, pgm
    for _ in range(count):
        q1 = q0 + drow
        q2 = q1 + drow
        g = vloadp(pg, dt)
        h = vloadp(pg + B, dt)
        d00 = vloadp(q0, dt)
        e00 = vloadp(q0 + B, dt)
        d01 = vloadp(q0 + tap, dt)
        e01 = vloadp(q0 + tap + B, dt)
        d10 = vloadp(q1, dt)
        e10 = vloadp(q1 + B, dt)
        d11 = vloadp(q1 + tap, dt)
        e11 = vloadp(q1 + tap + B, dt)
        d20 = vloadp(q2, dt)
        e20 = vloadp(q2 + B, dt)
        d21 = vloadp(q2 + tap, dt)
        e21 = vloadp(q2 + tap + B, dt)
        vstorep(q0, vadd(d00, vfma(g, vloadp(pw, dt), b0)))
        vstorep(q0 + B, vadd(e00, vfma(h, vloadp(pw + B, dt), c0)))
        vstorep(q0 + tap, vfma(g, vloadp(pw + srow, dt), d01))
        vstorep(q0 + tap + B, vfma(h, vloadp(pw + srow + B, dt), e01))
        b0 = vfma(g, vloadp(pw + 2 * srow, dt), z)
        c0 = vfma(h, vloadp(pw + 2 * srow + B, dt), z)
        vstorep(q1, vadd(d10, vfma(g, vloadp(pw + 3 * srow, dt), b1)))
        vstorep(q1 + B, vadd(e10, vfma(h, vloadp(pw + 3 * srow + B, dt), c1)))
        vstorep(q1 + tap, vfma(g, vloadp(pw + 4 * srow, dt), d11))
        vstorep(q1 + tap + B, vfma(h, vloadp(pw + 4 * srow + B, dt), e11))
        b1 = vfma(g, vloadp(pw + 5 * srow, dt), z)
        c1 = vfma(h, vloadp(pw + 5 * srow + B, dt), z)
        vstorep(q2, vadd(d20, vfma(g, vloadp(pw + 6 * srow, dt), b2)))
        vstorep(q2 + B, vadd(e20, vfma(h, vloadp(pw + 6 * srow + B, dt), c2)))
        vstorep(q2 + tap, vfma(g, vloadp(pw + 7 * srow, dt), d21))
        vstorep(q2 + tap + B, vfma(h, vloadp(pw + 7 * srow + B, dt), e21))
        b2 = vfma(g, vloadp(pw + 8 * srow, dt), z)
        c2 = vfma(h, vloadp(pw + 8 * srow + B, dt), z)
        q0 = opaque(q0 + pix)
        pg = opaque(pg + sgm)
    e = o0 + count * pix  # the column still pending
    for r, (b, c) in enumerate(((b0, c0), (b1, c1), (b2, c2))):
        q = g0 + r * drow + e
        vstorep(q, vadd(vloadp(q, dt), b))
        vstorep(q + B, vadd(vloadp(q + B, dt), c))


@helper
def dw3x3_backward_interior(
    r0, g0, drow, o0, tap, pix, pw, pgdw, srow, pgm, sgm, count, need_x, need_dw, dt
):  # pragma: no cover - compiled
    """One channel vector of ``count`` interior pixels: r0 / g0 the first input row of x / dx
    (the others ``drow`` bytes further), o0 the first window's offset in them, ``pix`` bytes
    between windows, ``tap`` between a window's columns; pw / pgdw the vector's weights and
    d dw (9 taps, ``srow`` bytes apart); gm from ``pgm``, ``sgm`` bytes apart.

    d dw: nine accumulators in registers over the segment, added to pgdw once at the end.
    dx: with stride and dilation 1 along the row, each input column's three taps of one kernel
    row are summed in registers (a rolling pair of pending sums per kernel row) and added into
    dx once, when the column is complete; at stride 2 (dilation 1) a window's last column,
    the next window's first, is kept pending likewise (one pending sum per kernel row);
    otherwise each tap's g * w is added at its pixel."""
    z = vzero(dt)
    if need_dw:
        a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = z
        q0, pg = r0 + o0, pgm  # one pointer per stream (``opaque``)
        for _ in range(count):
            g = vloadp(pg, dt)
            q1 = q0 + drow
            q2 = q1 + drow
            a00 = vfma(vloadp(q0, dt), g, a00)
            a01 = vfma(vloadp(q0 + tap, dt), g, a01)
            a02 = vfma(vloadp(q0 + 2 * tap, dt), g, a02)
            a10 = vfma(vloadp(q1, dt), g, a10)
            a11 = vfma(vloadp(q1 + tap, dt), g, a11)
            a12 = vfma(vloadp(q1 + 2 * tap, dt), g, a12)
            a20 = vfma(vloadp(q2, dt), g, a20)
            a21 = vfma(vloadp(q2 + tap, dt), g, a21)
            a22 = vfma(vloadp(q2 + 2 * tap, dt), g, a22)
            q0 = opaque(q0 + pix)
            pg = opaque(pg + sgm)
        acc = (a00, a01, a02, a10, a11, a12, a20, a21, a22)
        for t in range(9):
            vstorep(pgdw + t * srow, vadd(vloadp(pgdw + t * srow, dt), acc[t]))
    if not need_x:
        return
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = taps3x3(pw, srow, dt)
    g1 = g0 + drow
    g2 = g1 + drow
    if pix == srow and tap == srow:  # stride and dilation 1 along the row: rolling sums
        b00 = b01 = b10 = b11 = b20 = b21 = z
        q0, pg = g0 + o0, pgm  # one pointer per stream (``opaque``)
        for _ in range(count):
            g = vloadp(pg, dt)
            q1 = q0 + drow
            q2 = q1 + drow
            vstorep(q0, vadd(vloadp(q0, dt), vfma(g, w00, b00)))
            b00 = vfma(g, w01, b01)
            b01 = vfma(g, w02, z)
            vstorep(q1, vadd(vloadp(q1, dt), vfma(g, w10, b10)))
            b10 = vfma(g, w11, b11)
            b11 = vfma(g, w12, z)
            vstorep(q2, vadd(vloadp(q2, dt), vfma(g, w20, b20)))
            b20 = vfma(g, w21, b21)
            b21 = vfma(g, w22, z)
            q0 = opaque(q0 + pix)
            pg = opaque(pg + sgm)
        e = o0 + count * pix  # the two columns still pending
        vstorep(g0 + e, vadd(vloadp(g0 + e, dt), b00))
        vstorep(g0 + e + tap, vadd(vloadp(g0 + e + tap, dt), b01))
        vstorep(g1 + e, vadd(vloadp(g1 + e, dt), b10))
        vstorep(g1 + e + tap, vadd(vloadp(g1 + e + tap, dt), b11))
        vstorep(g2 + e, vadd(vloadp(g2 + e, dt), b20))
        vstorep(g2 + e + tap, vadd(vloadp(g2 + e + tap, dt), b21))
        return
    if pix == 2 * tap and tap == srow:  # stride 2, dilation 1 along the row: a window's
        # last column is the next one's first: its sum is kept pending in a register (two
        # adds into dx per kernel row and pixel, not three), dx read before it is stored
        b0 = b1 = b2 = z
        q0, pg = g0 + o0, pgm
        for _ in range(count):
            g = vloadp(pg, dt)
            q1 = q0 + drow
            q2 = q1 + drow
            d00 = vloadp(q0, dt)
            d01 = vloadp(q0 + tap, dt)
            d10 = vloadp(q1, dt)
            d11 = vloadp(q1 + tap, dt)
            d20 = vloadp(q2, dt)
            d21 = vloadp(q2 + tap, dt)
            vstorep(q0, vadd(d00, vfma(g, w00, b0)))
            vstorep(q0 + tap, vfma(g, w01, d01))
            b0 = vfma(g, w02, z)
            vstorep(q1, vadd(d10, vfma(g, w10, b1)))
            vstorep(q1 + tap, vfma(g, w11, d11))
            b1 = vfma(g, w12, z)
            vstorep(q2, vadd(d20, vfma(g, w20, b2)))
            vstorep(q2 + tap, vfma(g, w21, d21))
            b2 = vfma(g, w22, z)
            q0 = opaque(q0 + pix)
            pg = opaque(pg + sgm)
        e = o0 + count * pix  # the column still pending
        vstorep(g0 + e, vadd(vloadp(g0 + e, dt), b0))
        vstorep(g1 + e, vadd(vloadp(g1 + e, dt), b1))
        vstorep(g2 + e, vadd(vloadp(g2 + e, dt), b2))
        return
    q0, pg = g0 + o0, pgm
    for _ in range(count):
        g = vloadp(pg, dt)
        q1 = q0 + drow
        q2 = q1 + drow
        vstorep(q0, vfma(g, w00, vloadp(q0, dt)))
        vstorep(q0 + tap, vfma(g, w01, vloadp(q0 + tap, dt)))
        vstorep(q0 + 2 * tap, vfma(g, w02, vloadp(q0 + 2 * tap, dt)))
        vstorep(q1, vfma(g, w10, vloadp(q1, dt)))
        vstorep(q1 + tap, vfma(g, w11, vloadp(q1 + tap, dt)))
        vstorep(q1 + 2 * tap, vfma(g, w12, vloadp(q1 + 2 * tap, dt)))
        vstorep(q2, vfma(g, w20, vloadp(q2, dt)))
        vstorep(q2 + tap, vfma(g, w21, vloadp(q2 + tap, dt)))
        vstorep(q2 + 2 * tap, vfma(g, w22, vloadp(q2 + 2 * tap, dt)))
        q0 = opaque(q0 + pix)
        pg = opaque(pg + sgm)


@helper
def backward_chunk(
    k,
    x,
    dwk,
    db,
    dims,
    pw_t,
    packed_gm,
    packed_z,
    nopack,
    b,
    g2,
    y2,
    gx,
    owned,
    gpw,
    gdw,
    gdb,
    gb,
    zeros,
    geo,
    mid_act,
    act,
    flags,
    plan,
    oh,
    ow,
    work,
    c_lo,
    c_hi,
):  # pragma: no cover - compiled
    """Chunk ``k`` of backward_nhwc (see the module docstring), tile by tile, its buffers in
    ``work`` (its task's row of the call's scratch); the depthwise stage's input channels
    c_lo..c_hi-1 (all, but where backward_nhwc ``cut``s the depthwise op's one chunk)."""
    has_dw, has_pw, have_y, need_x, need_dw, need_pw, need_db, need_b = flags
    rows_per_chunk, _, _, tile, kc = plan
    P = g2.shape[0]
    CM, CO = dims
    p_lo = k * rows_per_chunk * ow
    p_hi = min(P, p_lo + rows_per_chunk * ow)
    need_gm = need_x or need_dw or need_db
    # the mask of the final activation needs z (recomputed) when y is not given
    need_z = has_pw and act != NO_ACTIVATION and not have_y
    need_a = has_pw and (need_pw or need_z or (need_gm and mid_act != NO_ACTIVATION))
    need_a = need_a or (not has_pw and mid_act != NO_ACTIVATION and not have_y)
    step = tile_step(p_hi - p_lo, tile)
    abuf, gmbuf, gzbuf, zbuf, pk, at, part = chunk_buffers(work, step, CM, CO, need_z, kc)
    x2 = x.reshape(-1, x.shape[3])
    # dx starts at zero in the input rows this chunk owns: each zeroed just before the first
    # tile whose taps reach it (while it is in cache for their adds), the rest at the end
    rows_of_dx = gx.reshape(-1, gx.shape[2] * gx.shape[3])
    mult = geo[8]
    m_lo, m_hi = c_lo * mult, c_hi * mult  # the same channels of gm (C*M)
    zeroed, owned_end = owned[k, 0], owned[k, 1]
    if not (has_dw and need_x):
        zeroed = owned_end
    kh, _, sh, _, dil_h, _, pt, _, _ = geo
    H = x.shape[1]
    p = p_lo
    while p < p_hi:
        p1 = min(p_hi, p + step)
        T = p1 - p
        if has_dw:
            if need_a:
                depthwise_tile(x, dwk, p, p1, oh, ow, geo, db, mid_act, abuf)
            a = abuf[:T]
        elif need_pw and not pw_t and x2.strides[0] % 512 == 0:  # read down its columns
            copy_rows(x2[p:p1], abuf, T)
            a = abuf[:T]
        else:
            a = x2[p:p1]
        gm = gmbuf[:T]
        if has_pw:
            gz = g2[p:p1]
            if act != NO_ACTIVATION:
                if need_z:
                    gemm_tile(a, False, T, zbuf, packed_z, b, zbuf, 0, CO, NO_ACTIVATION, False,
                              pk, at, part, 0, 0, False)  # fmt: skip
                    masked_copy(gz, zbuf, act, gzbuf, T)
                else:
                    masked_copy(gz, y2[p:p1], act, gzbuf, T)
                gz = gzbuf[:T]
            elif need_pw and pw_t and g2.strides[0] % 512 == 0:  # read down its columns
                copy_rows(gz, gzbuf, T)
                gz = gzbuf[:T]
            if need_b:
                add_colsum(gz, T, gb[k])
            if need_pw:  # A^T gz (gz^T A if pw_t), both read in place; the chunk's first
                # tile writes its partial sums, the others add
                lhs, rhs = (gz, a) if pw_t else (a, gz)
                gemm_tile(lhs, True, lhs.shape[1], rhs, nopack, zeros, gpw[k], 0, rhs.shape[1],
                          NO_ACTIVATION, p > p_lo, pk, at, part, 0, 0, True)  # fmt: skip
            if need_gm:
                if not has_dw:
                    gm = gx.reshape(-1, CM)[p:p1]  # pointwise: gm is dx itself
                gemm_tile(gz, False, T, gm, packed_gm, zeros, gm, 0, CM, NO_ACTIVATION, False, pk,
                          at, part, 0, 0, True)  # fmt: skip
                if has_dw and mid_act != NO_ACTIVATION:
                    mask_in_place(gm, a, mid_act, T)
        elif need_gm:  # depthwise alone: gm = grad * act'(y), y given or recomputed
            if mid_act == NO_ACTIVATION:
                gm = g2[p:p1]  # read in place
            elif have_y:
                masked_copy(g2[p:p1, m_lo:m_hi], y2[p:p1, m_lo:m_hi], mid_act, gm[:, m_lo:m_hi],
                            T)  # fmt: skip
            else:
                masked_copy(g2[p:p1, m_lo:m_hi], a[:, m_lo:m_hi], mid_act, gm[:, m_lo:m_hi], T)
        if need_db:
            add_colsum(gm[:, m_lo:m_hi], T, gdb[k][m_lo:m_hi])
        if zeroed < owned_end:  # up to the last input row the tile's taps reach
            r = (p1 - 1) // ow
            reach = (r // oh) * H + min(H - 1, (r % oh) * sh - pt + (kh - 1) * dil_h) + 1
            zeroed = zero_rows(rows_of_dx, zeroed, min(owned_end, reach), gx.shape[3], c_lo, c_hi)
        if has_dw and (need_x or need_dw):
            depthwise_backward_tile(x, dwk, gm, p, T, oh, ow, geo, gx, gdw[k], need_x, need_dw,
                                    c_lo, c_hi)  # fmt: skip
        p = p1
    zero_rows(rows_of_dx, zeroed, owned_end, gx.shape[3], c_lo, c_hi)


def backward_nhwc(
    x,
    dwk,
    db,
    dims,
    pw_t,
    packed_gm,
    packed_z,
    nopack,
    b,
    g2,
    y2,
    gx,
    owned,
    gpw,
    gdw,
    gdb,
    gb,
    zeros,
    geo,
    mid_act,
    act,
    flags,
    plan,
    oh,
    ow,
    split,
    cut,
    work,
    opw,
    odw,
    odb,
    ob,
    comb,
    opw_t,
):  # pragma: no cover - compiled
    """The separable / depthwise / pointwise backward (module docstring), chunks in parallel;
    with ``split`` (one chunk: too few pixels to cut), its one chunk as two tasks instead, one
    computing d pw and d bias, the other dx, d dw and d dw_bias (each recomputes the tiles it
    reads); with ``cut`` (the depthwise op's one chunk), two tasks on the input channels
    below and from ``cut`` (no two touch the same element of dx, d dw or d bias). Either way
    each gradient's sums run as they would in the one chunk, so the bits are the same.

    x: (N,H,W,C) NHWC; dwk: (KH,KW,C*M); db: the depthwise bias (C*M); dims: (C*M, C_out);
    pw_t: d pw computed transposed, (C_out, C*M) (the memory order of torch's weight; see
    ``transposed_dpw``), in gpw;
    packed_gm / packed_z: P^T and P packed for the micro-kernel
    (``packed_weights``; empty where unused), nopack: an empty one (the d pw GEMM packs the
    tile's data itself); b: the final bias padded to the panel width; g2, y2:
    grad and the forward output as (pixels, channels) (y2 unread unless ``have_y``); gx: dx,
    NHWC, uninitialised: the depthwise stage adds into it, after each chunk of the first phase
    has zeroed the input rows ``owned[k]`` gives it (flattened over images: every row once, and
    before any chunk adds to it); gpw, gdw, gdb, gb: per-chunk partial sums (gpw
    uninitialised: each chunk's first tile writes it; the others zeroed); opw, odw, odb, ob:
    the results the chunks' sums are added into where ``comb`` says so, else the one chunk's
    own partial sums (nothing to do); zeros: a zero bias for the GEMMs; plan:
    ``backward_plan``; work: one row of scratch per task of a phase (``chunk_offsets``: the
    phase's u-th chunk's row u, or with ``split`` or ``cut`` the two tasks' rows 0 and 1),
    reused from call to call (when
    the kernel allocated them per call, glibc served them from the worker threads' arenas,
    whose tops it trims or not depending on what the process freed before: the same call then
    page-faulted on every run, up to 3x its time).

    Then, in this launch, the partial sums of each slot ``comb`` (pw, dw, db, b) names are
    added up in chunk order into its result, opw, odw, odb or ob (``combine_parts``; d pw
    with ``opw_t`` into its transpose, the memory order of an F-ordered pw: torch's weight):
    as separate launches (and torch's layout copy of d pw) they cost a training step at
    N=8 ~0.15 ms between kernels.
    """
    _, nchunks, phases, _, _ = plan
    C = x.shape[3]
    if cut:
        for u in prange(2):
            backward_chunk(
                0, x, dwk, db, dims, pw_t, packed_gm, packed_z, nopack, b, g2, y2, gx, owned,
                gpw, gdw, gdb, gb, zeros, geo, mid_act, act, flags, plan, oh, ow, work[u],
                0 if u == 0 else cut, cut if u == 0 else C,
            )  # fmt: skip
    elif split:
        has_dw, has_pw, have_y, need_x, need_dw, need_pw, need_db, need_b = flags
        for u in prange(2):
            role = (has_dw, has_pw, have_y, need_x and u == 1, need_dw and u == 1,
                    need_pw and u == 0, need_db and u == 1, need_b and u == 0)  # fmt: skip
            backward_chunk(
                0, x, dwk, db, dims, pw_t, packed_gm, packed_z, nopack, b, g2, y2, gx, owned,
                gpw, gdw, gdb, gb, zeros, geo, mid_act, act, role, plan, oh, ow, work[u], 0, C,
            )  # fmt: skip
    else:
        for phase in range(phases):
            count = (nchunks - phase + phases - 1) // phases
            for u in prange(count):
                backward_chunk(
                    u * phases + phase, x, dwk, db, dims, pw_t, packed_gm, packed_z, nopack, b,
                    g2, y2, gx, owned, gpw, gdw, gdb, gb, zeros, geo, mid_act, act, flags, plan,
                    oh, ow, work[u], 0, C,
                )  # fmt: skip
    c_pw, c_dw, c_db, c_b = comb
    if c_pw and opw_t:  # d pw into its transpose in 32 x 32 blocks, in parallel
        rb, cb = -(-gpw.shape[1] // 32), -(-gpw.shape[2] // 32)
        for t in prange(rb * cb):
            r0, c0 = t // cb * 32, t % cb * 32
            combine_parts(gpw, opw, True, r0, r0 + 32, c0, c0 + 32)
    elif c_pw:  # by rows, in parallel
        for r in prange(gpw.shape[1]):
            combine_parts(gpw, opw, False, r, r + 1, 0, gpw.shape[2])
    big = 1 << 30
    if c_dw:  # the small ones in this thread
        combine_parts(gdw, odw, False, 0, big, 0, big)
    if c_db:
        combine_parts(gdb.reshape(gdb.shape[0], 1, gdb.shape[1]), odb.reshape(1, odb.size), False,
                      0, big, 0, big)  # fmt: skip
    if c_b:
        combine_parts(gb.reshape(gb.shape[0], 1, gb.shape[1]), ob.reshape(1, ob.size), False, 0,
                      big, 0, big)  # fmt: skip


BACKWARD = kernel(backward_nhwc, None)


@helper
def combine_parts(parts, out, transposed, r0, r1, c0, c1):  # pragma: no cover - compiled
    """out[r, c] (with ``transposed`` out[c, r]) = parts[0, r, c] + parts[1, r, c] + ... in
    chunk order, for r0 <= r < r1, c0 <= c < c1 (clipped to parts' shape): each chunk's run
    of a row added into the output's row at once (a vector loop; the chunks innermost, per
    element, with the order's test inside, left it scalar: the training step N=8 rows 6-7,
    4 MB of d pw, ~0.5 ms more than the separate combine launch it replaced)."""
    K, R, C = parts.shape
    r1, c1 = min(R, r1), min(C, c1)
    if transposed:
        for c in range(c0, c1):
            row = out[c]
            for r in range(r0, r1):
                row[r] = parts[0, r, c]
            for k in range(1, K):
                for r in range(r0, r1):
                    row[r] += parts[k, r, c]
    else:
        for r in range(r0, r1):
            row = out[r]
            for c in range(c0, c1):
                row[c] = parts[0, r, c]
            for k in range(1, K):
                run = parts[k, r]
                for c in range(c0, c1):
                    row[c] += run[c]


def combine_chunks(parts, out):  # pragma: no cover - compiled
    """out[r, c] = parts[0, r, c] + parts[1, r, c] + ... in chunk order (rows in parallel:
    ``combine_parts`` per row)."""
    for r in prange(parts.shape[1]):
        combine_parts(parts, out, False, r, r + 1, 0, parts.shape[2])


COMBINE = kernel(combine_chunks, None)


# --------------------------------------------------------------------------------------------
# the standard convolution


def conv2d_grad_bias_nhwc(gy, gb, rows_per_chunk):  # pragma: no cover - compiled
    """gb[k, o] = chunk k's sum of gy[..., o], pixels in order."""
    N, OH, OW, CO = gy.shape
    for k in prange(gb.shape[0]):
        for r in range(k * rows_per_chunk, min(N * OH, (k + 1) * rows_per_chunk)):
            n = r // OH
            i = r - n * OH
            for j in range(OW):
                for o in range(CO):
                    gb[k, o] += gy[n, i, j, o]


CONV2D_GRAD_BIAS = kernel(conv2d_grad_bias_nhwc, None)


# --------------------------------------------------------------------------------------------
# plans and argument builders


def backward_plan(
    rows: int, oh: int, ow: int, reach: int, partial_bytes: int, tile_row_bytes: int
) -> tuple[int, int, int, int, int]:
    """(rows per chunk, chunks, phases, tile, kc) of a backward call, from the problem alone.

    rows: output rows over the batch (N * OH); reach: the fewest output rows a chunk needs so
    that chunks two apart never touch the same input row (``reach_rows``); partial_bytes: one
    chunk's partial sums; tile_row_bytes: the scratch one tile pixel needs. The tunables are
    read here (a test that patches them gets a new plan); the arithmetic is memoised. Each
    one read here is also in ``backward_settings()``, the key of ``backward_layout``.
    """
    return _backward_plan(
        rows, oh, ow, reach, partial_bytes, tile_row_bytes, _config.BACKWARD_CHUNKS,
        numba.config.NUMBA_NUM_THREADS, _config.BACKWARD_MIN_PIXELS,
        _config.BACKWARD_PARTIAL_BYTES, _config.CPU_TILE_BYTES, _config.CPU_TILE_MAX_PIXELS,
        _config.BACKWARD_TILE_FACTOR, _config.CPU_GEMM_KC,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _backward_plan(
    rows, oh, ow, reach, partial_bytes, tile_row_bytes, max_chunks, pool, min_pixels, budget,
    tile_bytes, tile_max, tile_factor, kc,
):  # fmt: skip
    """Chunks: each with at least ``min_pixels`` pixels and their partial sums within
    ``budget`` bytes, and at most ``max_chunks``, or where that is 0: one per thread of the
    ``pool`` in whole images where the images share out evenly (no two chunks share an input
    row: one phase), else two per thread in runs of rows (two phases). Every chunk adds a
    partial sum of the weight gradients that is read back at the end, so no more are cut than
    keep the threads busy. Tiles: the A tile within ``tile_factor`` x ``tile_bytes``, at most
    ``tile_factor`` x ``tile_max`` pixels."""
    n = rows // oh
    pixels = rows * ow
    if not max_chunks:
        even = n % pool == 0 or n >= 4 * pool
        max_chunks = pool if even else 2 * pool
    limit = max(1, budget // max(1, partial_bytes))
    nchunks = min(max_chunks, limit, max(1, pixels // min_pixels))
    nchunks = max(1, min(nchunks, rows // reach))
    per = -(-rows // nchunks)
    if per >= oh and nchunks > 1:
        per = -(-per // oh) * oh  # whole images
    nchunks = -(-rows // per)
    phases = 1 if nchunks == 1 or per % oh == 0 else 2
    fit = tile_factor * tile_bytes // max(1, tile_row_bytes)
    tile = max(GEMM_MR, min(tile_factor * tile_max, fit) // GEMM_MR * GEMM_MR)
    return per, nchunks, phases, tile, kc


def owned_rows(spec: ConvSpec, plan: tuple[int, ...]) -> np.ndarray:
    """[lo, hi) of the input rows (flattened over images) each chunk zeroes in dx before adding
    to it: a partition of all rows among the chunks of the first phase, each chunk owning from
    the first row its taps read up to the next first-phase chunk's first row (the second-phase
    chunk between them only adds, after the first phase). Whole-image chunks own their images.
    """
    per, nchunks, phases = plan[:3]
    rows = spec.n * spec.out_h
    owned = np.zeros((nchunks, 2), np.int64)
    total = spec.n * spec.h
    if phases == 1:
        for k in range(nchunks):
            r0, r1 = k * per, min(rows, (k + 1) * per)
            first = r0 // spec.out_h * spec.h
            last = total if k == nchunks - 1 else (r1 // spec.out_h) * spec.h
            owned[k] = (first, last)
        owned[0, 0] = 0
        return owned

    def first_row(k: int) -> int:
        """The first input row chunk k's taps can read: within its first image (an output row
        below the image, in the bottom padding, reads none: the image's end)."""
        n, i = divmod(k * per, spec.out_h)
        return n * spec.h + min(spec.h, max(0, i * spec.stride_h - spec.pad_top))

    for k in range(0, nchunks, 2):
        lo = 0 if k == 0 else first_row(k)
        hi = total if k + 2 >= nchunks else first_row(k + 2)
        owned[k] = (min(lo, total), min(max(lo, hi), total))
    return owned


def reach_rows(spec: ConvSpec) -> int:
    """The fewest output rows per chunk for two-phase chunks (see backward_plan)."""
    return max(1, (spec.kh - 1) * spec.dilation_h // spec.stride_h)


def chunk_parts(nchunks: int, shape: tuple[int, ...], dtype: np.dtype, need: bool,
                scratch_name: str = "", result: bool = False) -> np.ndarray:  # fmt: skip
    """Per-chunk partial sums: zeros, or with ``scratch_name`` uninitialised (the kernel
    writes them first): the calling thread's reused buffer of that name, or where ``result``
    (one chunk, its sums the gradient as they stand) a new array; a dummy where they are not
    needed."""
    if not need:
        return np.zeros((1,) * (len(shape) + 1), dtype)
    if scratch_name and result:
        return aligned_empty((1, *shape), dtype)
    if scratch_name:
        return scratch(scratch_name, (nchunks, *shape), dtype)
    return np.zeros((nchunks, *shape), dtype)


def combine(parts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The chunks' partial sums added in chunk order, as an array of ``shape``: the one chunk's
    own (a view), or a new array where there are several (conv2d's d b; the other backward
    sums in their kernel's launch, ``combine_parts``)."""
    if parts.shape[0] == 1:
        return parts[0].reshape(shape)
    k = parts.shape[0]
    p3 = parts.reshape(k, parts.shape[1], -1) if parts.ndim >= 3 else parts.reshape(k, 1, -1)
    out = np.empty(p3.shape[1:], parts.dtype)
    if _config.use_parallel(parts.size):
        with _config.call_guard():
            COMBINE.parallel(p3, out)
    else:
        COMBINE.serial(p3, out)
    return out.reshape(shape)


SLOT_ORDER = ("x", "dw", "pw", "db", "b")  # backward_layout's ``need``, in this order
_SUMMED = ("pw", "dw", "db", "b")  # the slots summed over pixels: backward_nhwc's ``comb``


def backward_settings() -> tuple:
    """Every setting the backward's chunks, tiles and tasks depend on (the forward's
    _config.launch_settings and the backward's own), read per call: a test or ``numba-dsconv
    tune`` that changes one gets a new ``backward_layout``."""
    return (
        _config.launch_settings(False), numba.config.NUMBA_NUM_THREADS, _config.BACKWARD_CHUNKS,
        _config.BACKWARD_MIN_PIXELS, _config.BACKWARD_PARTIAL_BYTES,
        _config.BACKWARD_TILE_FACTOR, ROLE_SPLIT,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def backward_layout(
    spec: ConvSpec, dt: np.dtype, need: tuple[bool, ...], has_y: bool, settings: tuple,
) -> tuple:  # fmt: skip
    """What a separable / depthwise / pointwise backward's shape fixes, worked out once per
    (spec, dtype, slots needed in SLOT_ORDER, output given, ``settings``): the
    kernel's static arguments and the sizes of its buffers (a tiny separable_grad spent ~57 %
    of its Python here). ``settings`` (``backward_settings()``) is only the cache key: the
    values are read from _config as they stand. Returns (activations, parallel, need_gm,
    need_z, plan, owned rows, flags, split, cut, (tasks, words) of the work buffer, C_out of
    the kernel's scratch)."""
    del settings
    want = dict(zip(SLOT_ORDER, need, strict=True))
    op = spec.op
    has_dw, has_pw = op != "pointwise", op != "depthwise"
    sz = dt.itemsize
    cm, co = spec.c_mid, spec.c_out if has_pw else 1  # one output channel: a small scratch
    if has_pw:
        acts = (int(spec.mid_activation), int(spec.activation))
    else:  # the depthwise op: its activation is the stage's own
        acts = (int(spec.activation), NO_ACTIVATION)
    parallel = _config.use_parallel(3 * spec.macs)
    need_gm = has_pw and (want["x"] or want["dw"] or want["db"])
    need_z = has_pw and acts[1] != NO_ACTIVATION and not has_y
    # the plan counts every partial sum, needed or not: the chunks (and so the bits of every
    # gradient) do not depend on which gradients are asked for
    partial = cm * co + spec.kh * spec.kw * cm + cm + co
    tile_row = cm * sz  # the A tile in L2, as in the forward
    rows = spec.n * spec.out_h
    plan = backward_plan(rows, spec.out_h, spec.out_w, reach_rows(spec), partial * sz, tile_row)
    # the reduction block for the deepest of its GEMMs' reductions: a tile, C*M or C_out
    plan = (*plan[:4], block_depth(plan[4], max(plan[3], cm, co)))
    nchunks = plan[1]
    owned = owned_rows(spec, plan) if has_dw and want["x"] else np.zeros((nchunks, 2), np.int64)
    flags = (has_dw, has_pw, has_y, want["x"], want["dw"], want["pw"], want["db"], want["b"])
    threads = numba.config.NUMBA_NUM_THREADS
    # one chunk (N=1, late layers: 49 pixels) would leave every other thread idle: its d pw
    # and its dx side as two tasks (layer 7, N=1: 3.2 -> 2.1 ms)
    split = bool(
        ROLE_SPLIT and nchunks == 1 and parallel and threads > 1
        and (want["pw"] or want["b"]) and (want["x"] or want["dw"] or want["db"])
    )  # fmt: skip
    # the depthwise op's one chunk: its channels in two halves of whole pairs of vectors (the
    # 3x3 sweep's step), one task each (depthwise_grad N=1, layers 5 / 6 / 7 / 10 / 11:
    # 0.63-0.84x the time of the one task). With an activation and no output given, each
    # task recomputes the depthwise tile of every channel for its mask
    pair = 2 * VEC_BYTES // sz
    cut = (cm + pair) // (2 * pair) * pair  # cm / 2 to the nearest whole pair
    one = nchunks == 1 and parallel and threads > 1
    cut = cut if (0 < cut < cm and ROLE_SPLIT and one and not has_pw
                  and spec.multiplier == 1) else 0  # fmt: skip
    # each task's buffers: sized for the largest chunk's tiles (the first, or the last where
    # its fewer pixels cut into tiles of another size)
    per_chunk = plan[0] * spec.out_w
    steps = (per_chunk, spec.pixels - (nchunks - 1) * per_chunk)
    step = max(tile_step.py_func(p, plan[3]) for p in steps)
    shapes = chunk_shapes.py_func(step, cm, co, need_z, plan[4], sz)
    page = 4096 // sz  # rows of whole pages: the same offsets mod 4 KB in each
    words = -(-chunk_offsets.py_func(shapes, sz)[1] // page) * page
    tasks = 2 if split or cut else -(-nchunks // plan[2])  # the most at once (a phase's)
    return acts, parallel, need_gm, need_z, plan, owned, flags, split, cut, (tasks, words), co


def gemm_backward_args(
    spec: ConvSpec, x, g, y, dwk, pw, biases, need: dict[str, bool], dt: np.dtype
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(arguments of backward_nhwc, its outputs by slot) for one separable, depthwise or
    pointwise backward on NHWC, C-contiguous, writable x, g (and y, or None).

    ``need`` says which gradients to compute, by the kernel's slots: "x", "dw", "pw", "db"
    (the depthwise stage's bias: dw_bias, or the depthwise op's bias) and "b" (the pointwise
    stage's bias); every slot present, False where the op has no such stage. The outputs,
    filled by the launch: "x" (dx, NHWC) and the other slots' gradients (d pw in P's shape,
    F-ordered where pw is, d dw (K_h, K_w, C*M)); a slot not needed holds a dummy. What the
    shapes fix comes from ``backward_layout``.
    """
    op = spec.op
    has_dw, has_pw = op != "pointwise", op != "depthwise"
    cm = spec.c_mid
    nr = gemm_panel_width(dt.itemsize)
    if not has_dw:
        dwk = np.zeros((1, 1, 1), dt)
    if not has_pw:  # never read
        pw = np.zeros((cm, 1), dt)
    pw_t = transposed_dpw(spec, pw, dt.itemsize)
    layout = backward_layout(
        spec, dt, tuple(need[s] for s in SLOT_ORDER), y is not None, backward_settings()
    )
    acts, parallel, need_gm, need_z, plan, owned, flags, split, cut, work_shape, co = layout
    db = bias_vector(biases[0], cm, dt) if has_dw else np.zeros(1, dt)
    nopack = no_packed(dt)
    # the GEMMs' weights packed once for every chunk: P^T for gm, P for z
    pw = pw.astype(dt, order="K", copy=False)
    packed_gm = packed_weights(pw.T, parallel, scratch, "packed_gm") if need_gm else nopack
    packed_z = packed_weights(pw, parallel, scratch, "packed_z") if need_z else nopack
    b = bias_vector(biases[-1] if has_pw else None, co, dt, nr)
    nchunks = plan[1]
    # d pw in pw's memory order: an F-ordered pw's (torch's weight) is the transpose of the
    # sums where the kernel computes them in P's shape (the combine writes it so)
    f_pw = has_pw and pw.flags.f_contiguous and not pw.flags.c_contiguous
    opw_t = f_pw and not pw_t
    comb = tuple(need[s] and (nchunks > 1 or (s == "pw" and opw_t)) for s in _SUMMED)
    shapes = {"pw": (co, cm) if pw_t else (cm, co), "dw": (spec.kh * spec.kw, cm),
              "db": (cm,), "b": (co,)}  # fmt: skip
    parts = {
        "pw": chunk_parts(nchunks, shapes["pw"], dt, need["pw"], "gpw", result=not comb[0]),
        **{s: chunk_parts(nchunks, shapes[s], dt, need[s]) for s in _SUMMED[1:]},
    }
    # each result: the one chunk's sums, or a new array the kernel adds the chunks' sums into
    sums = {
        s: np.empty(shapes[s][::-1] if s == "pw" and opw_t else shapes[s], dt) if c
        else parts[s][0]
        for s, c in zip(_SUMMED, comb, strict=True)
    }  # fmt: skip
    if not need["x"]:
        gx = np.zeros((1, 1, 1, cm), dt)
    else:  # the depthwise stage adds into dx (zeroed by the chunks); the pointwise op's GEMM
        gx = _grad_x_empty((spec.n, spec.h, spec.w, spec.c_in), dt)  # writes it whole
    g2 = g.reshape(spec.pixels, g.shape[3])
    y2 = y.reshape(spec.pixels, y.shape[3]) if y is not None else g2[:0]
    if y2.dtype == np.bool_:  # the element-wise helpers read the mask by address, as bytes
        y2 = y2.view(np.uint8)
    zeros = np.zeros(-(-max(cm, co) // nr) * nr, dt)
    work = scratch("backward_work", work_shape, dt)
    args = (x, dwk, db, (cm, co), pw_t, packed_gm, packed_z, nopack, b, g2, y2, gx, owned,
            parts["pw"],
            parts["dw"], parts["db"], parts["b"], zeros, spec.geometry, *acts, flags, plan,
            spec.out_h, spec.out_w, split, cut, work, sums["pw"], sums["dw"], sums["db"],
            sums["b"], comb, opw_t)  # fmt: skip
    found = {"x": gx, **sums}
    found["pw"] = sums["pw"].T if f_pw else sums["pw"]  # (C*M, C_out), P's shape
    if need["dw"]:
        found["dw"] = sums["dw"].reshape(spec.kh, spec.kw, cm)
    return args, found


# The d pw GEMM computed transposed (gz^T A, C_out x C*M) only where the grad tiles it then
# reads down their columns need no copy, or the copies come to less than this many times d pw:
# a copied tile costs a plain copy of the grad (N=8, layers 2-4: 12.8, 12.8, 6.4 MB per step,
# ~0.25 ms per 6.4 MB on 2 threads), the other order adds the chunks' sums into d pw's
# transpose (32 KB - 256 KB there, ~1-4 MB on layers 5-7; one chunk's copied into it).
DPW_COPY_RATIO = 4


def transposed_dpw(spec: ConvSpec, pw: np.ndarray, itemsize: int) -> bool:
    """Whether the backward computes d pw transposed, in the memory order of an F-ordered pw
    (torch's weight, (C_out, C*M) C-contiguous): so where pw is F-ordered, but for the fused
    separable backward where its grad tiles would need a copy (rows a multiple of 512 bytes
    apart: read down their columns they fall in few L1 sets, ``backward_chunk``; with a final
    activation they are copied masked into a padded buffer in either order, so no) of more
    than DPW_COPY_RATIO times the size of d pw. It then reads its recomputed A tile down its
    columns (a buffer with padded rows) and adds the chunks' sums into d pw's transpose (the
    same sums in the same order: the same bits), so d pw has pw's memory order either way."""
    if not (pw.flags.f_contiguous and not pw.flags.c_contiguous):
        return False
    copies = (
        spec.op == "separable"
        and spec.activation == Activation.NONE
        and spec.c_out * itemsize % 512 == 0
    )
    return not (copies and spec.pixels > DPW_COPY_RATIO * spec.c_mid)


def _launch(k: Any, work: int, *args: Any) -> None:
    if _config.use_parallel(work):
        with _config.call_guard():
            k.parallel(*args)
    else:
        k.serial(*args)


def _grad_x_empty(shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    """d x, placed as the forward places its results (``result_allocator``): it is the grad
    of the layer before, whose backward reads it by whole vectors. The fused separable's
    backward, N=8, grad and d x aligned against 16 bytes past a line: rows 1, 2, 3, 8
    0.89, 0.94, 0.93, 0.95x the time."""
    return result_allocator(math.prod(shape) * dt.itemsize)(shape, dt)


def _empty_batch(
    spec: ConvSpec, need: dict[str, bool], shapes: dict, dt: np.dtype, f_order: tuple = ()
) -> dict:  # fmt: skip
    """N = 0: an empty dx, zero weight and bias gradients (sums over no pixel; F-ordered for
    the slots in ``f_order``, as their weights are)."""
    found = {
        k: np.zeros(shapes[k], dt, order="F" if k in f_order else "C")
        for k, v in need.items() if v and k != "x"
    }  # fmt: skip
    if need.get("x"):
        found["x"] = np.empty((0, spec.h, spec.w, spec.c_in), dt)
    return found


def gemm_grads(spec: ConvSpec, x, g, y, weights, biases, need, dt: np.dtype) -> dict[str, Any]:
    """The separable / depthwise / pointwise gradients ``need`` asks for (slots, as in
    grad.SLOTS): dx NHWC, weights in the kernels' shapes (d pw in pw's memory order:
    F-ordered for an F-ordered pw, as torch's weight gives); x, g, y NHWC, C-contiguous,
    writable."""
    op = spec.op
    dwk = weights[0] if op != "pointwise" else None
    pw = weights[-1] if op != "depthwise" else None
    want = {s: bool(need.get(s, False)) for s in ("x", "dw", "pw", "db", "b")}
    shapes = {"pw": (spec.c_mid, spec.c_out), "dw": (spec.kh, spec.kw, spec.c_mid),
              "db": (spec.c_mid,), "b": (spec.c_out,)}  # fmt: skip
    if spec.n == 0:
        f_pw = pw is not None and pw.flags.f_contiguous and not pw.flags.c_contiguous
        return _empty_batch(spec, want, shapes, dt, ("pw",) if f_pw else ())
    if not any(want.values()):
        return {}
    args, outs = gemm_backward_args(spec, x, g, y, dwk, pw, biases, want, dt)
    _launch(BACKWARD, 3 * spec.macs, *args)
    return {slot: outs[slot] for slot in outs if want[slot]}


def conv2d_grads(spec: ConvSpec, x, g, y, w, bias, need, dt: np.dtype) -> dict[str, Any]:
    """The conv2d gradients ``need`` asks for ("x", "w", "b"), as gemm_grads, through the
    register-blocked GEMMs: d x (``conv2d_grad_x``) and d w (``conv2d_grad_w``); d b by its
    own chunked sums. Against the loops these replace (a gather per input pixel for d x,
    chunked loops for d w), all three gradients, N=1 and N=8, suite rows 1-7: 0.11-0.42x the
    time. As in the forward, the zeros of the padding enter the sums (0 * an Inf weight or
    grad gives NaN there, where the loops skipped those terms)."""
    want = {s: bool(need.get(s, False)) for s in ("x", "w", "b")}
    shapes = {"w": tuple(w.shape), "b": (spec.c_out,)}
    if spec.n == 0:
        return _empty_batch(spec, want, shapes, dt)
    gy = g
    if spec.activation != 0 and any(want.values()):
        if y is None:  # the forward again, for the activation's mask
            y = np.empty(spec.out_nhwc, dt)
            par = _config.use_parallel(spec.macs)
            _launch(CONV2D, spec.macs, *CONV2D.args(spec, y.dtype, par)(x, (w,), (bias,), y))
        if y.dtype == np.bool_:
            mask = y
        else:
            mask = (y > 0) & (y < 6) if spec.activation == RELU6 else y > 0
        gy = np.where(mask, g, np.zeros((), dt))
    found = {}
    if want["x"]:
        found["x"] = conv2d_grad_x(spec, gy, w, dt)
    if want["w"]:
        found["w"] = conv2d_grad_w(spec, x, gy, dt)
    if want["b"]:  # chunks cut as for the per-chunk d w sums of the loops d w had before the
        # GEMMs: d b keeps its bits
        rows = spec.n * spec.out_h
        per, nchunks = backward_plan(rows, spec.out_h, spec.out_w, 1, w.size * dt.itemsize, 1)[:2]
        gb = np.zeros((nchunks, spec.c_out), dt)
        _launch(CONV2D_GRAD_BIAS, spec.pixels * spec.c_out, gy, gb, per)
        found["b"] = combine(gb, shapes["b"])
    return found


def _plain(spec: ConvSpec, **fields: Any) -> ConvSpec:
    """``spec`` with ``fields`` changed, no activation: the spec of a GEMM the gradients run."""
    none = Activation.NONE
    return dataclasses.replace(spec, activation=none, mid_activation=none, **fields)


def conv2d_grad_x(spec: ConvSpec, gy: np.ndarray, w: np.ndarray, dt: np.dtype) -> np.ndarray:
    """d x of conv2d. At stride 1 the transposed convolution is a convolution: of gy, by the
    kernel turned half round with its channels swapped (w'[m, q, o, c] = w[K_h-1-m, K_w-1-q,
    c, o]), padded (K-1)*dilation - pad on each side, run by the forward's kernel (its
    register-blocked implicit GEMM). At larger strides, and where that padding would be
    negative (padding past the kernel's reach), tap by tap: gy . w[m, q]^T through the
    pointwise forward's GEMM, added into the input pixels the tap read (in tap order)."""
    kh, kw, dh, dw_ = spec.kh, spec.kw, spec.dilation_h, spec.dilation_w
    n, oh, ow, c_in, c_out = spec.n, spec.out_h, spec.out_w, spec.c_in, spec.c_out
    pads = ((kh - 1) * dh - spec.pad_top, (kh - 1) * dh - spec.pad_bottom,
            (kw - 1) * dw_ - spec.pad_left, (kw - 1) * dw_ - spec.pad_right)  # fmt: skip
    gx = _grad_x_empty((n, spec.h, spec.w, c_in), dt)
    if spec.stride_h == 1 and spec.stride_w == 1 and min(pads) >= 0:
        turned = np.empty((kh, kw, c_out, c_in), dt)
        flipped = w[::-1, ::-1].reshape(kh * kw, c_in, c_out)
        copy_transposed(flipped, turned.reshape(kh * kw, c_out, c_in))
        tspec = _plain(
            spec, h=oh, w=ow, c_in=c_out, c_mid=c_out, c_out=c_in, pad_top=pads[0],
            pad_bottom=pads[1], pad_left=pads[2], pad_right=pads[3], out_h=spec.h, out_w=spec.w,
        )  # fmt: skip
        par = _config.use_parallel(tspec.macs)
        _launch(CONV2D, tspec.macs, *CONV2D.args(tspec, dt, par)(gy, (turned,), (None,), gx))
        return gx
    gx[...] = 0
    pspec = _plain(spec, op="pointwise", h=oh, w=ow, c_in=c_out, c_mid=c_out, c_out=c_in,
                   **_ONE_BY_ONE)  # fmt: skip
    par = _config.use_parallel(pspec.macs)
    build = POINTWISE.args(pspec, dt, par)
    taps = np.empty((n, oh, ow, c_in), dt)
    for m, (i0, i1, r0, r1), q, (j0, j1, c0, c1) in _tap_spans(spec):
        wt = w[m, q].T  # (C_out, C_in): packed from the transposed view in one pass
        packed = PackedWeights(wt, packed_weights(wt, par), wt.shape)
        _launch(POINTWISE, pspec.macs, *build(gy, (packed,), (None,), taps))
        gx[:, r0 : r1 : spec.stride_h, c0 : c1 : spec.stride_w] += taps[:, i0:i1, j0:j1]
    return gx


# a 1 x 1 kernel at stride 1, unpadded (``_plain``: the pointwise GEMMs of conv2d's gradients)
_ONE_BY_ONE = dict(kh=1, kw=1, stride_h=1, stride_w=1, dilation_h=1, dilation_w=1, pad_top=0,
                   pad_bottom=0, pad_left=0, pad_right=0)  # fmt: skip


def _tap_spans(spec: ConvSpec):
    """Per tap (m, q) whose reads are not all on the padding: m, (first, stop) of the output
    rows that read inside the image and (first, stop) of the input rows they read, q and the
    same for the columns."""
    for m in range(spec.kh):
        rows = _tap_span(spec.out_h, spec.h, spec.stride_h, m * spec.dilation_h - spec.pad_top)
        for q in range(spec.kw):
            cols = _tap_span(spec.out_w, spec.w, spec.stride_w, q * spec.dilation_w - spec.pad_left)
            if rows[0] < rows[1] and cols[0] < cols[1]:
                yield m, rows, q, cols


def _tap_span(out: int, size: int, stride: int, offset: int) -> tuple[int, int, int, int]:
    """(first, stop) of the outputs o in [0, out) whose input o * stride + offset lies in
    [0, size), and (first, stop) of those inputs (a slice with step ``stride``)."""
    first = max(0, -(offset // stride))
    stop = max(first, min(out, (size - 1 - offset) // stride + 1))
    return first, stop, first * stride + offset, (stop - 1) * stride + offset + 1


def tap_rows(x, oh, ow, geo, kw, tap, buf):  # pragma: no cover - compiled
    """buf[p] = the input pixel tap ``tap`` of output pixel p reads (zeros on the padding;
    ``im2col_slab`` for one tap), in blocks of 64 pixels in parallel."""
    rows = buf.shape[0]
    for b in prange((rows + 63) // 64):
        p0 = b * 64
        p1 = min(rows, p0 + 64)
        im2col_slab(x, p0, p1, oh, ow, geo, kw, tap, tap + 1, buf[p0:p1])


TAP_ROWS = kernel(tap_rows, None)


def conv2d_grad_w(spec: ConvSpec, x: np.ndarray, gy: np.ndarray, dt: np.dtype) -> np.ndarray:
    """d w of conv2d, tap by tap: d w[m, q] = X_mq^T gy, X_mq the input pixels tap (m, q)
    reads (zeros on the padding, ``tap_rows``) in one buffer, through the pointwise
    backward's d pw GEMM (register blocked, per-chunk partial sums in a fixed order). (One
    GEMM over the whole im2col matrix, taps x channels deep, in blocks of pixels: 1.1-2.1x the
    time: its per-chunk partial sums, K_h*K_w times as large, leave L2.)"""
    n, oh, ow, c_in, c_out = spec.n, spec.out_h, spec.out_w, spec.c_in, spec.c_out
    gw = np.zeros((spec.kh, spec.kw, c_in, c_out), dt)
    pspec = _plain(spec, op="pointwise", h=oh, w=ow, **_ONE_BY_ONE)
    taps = np.empty((n, oh, ow, c_in), dt)
    stand_in = np.empty((c_in, c_out), dt)  # the pointwise weights: d pw alone reads none
    rows = taps.reshape(spec.pixels, c_in)
    for m, _, q, _ in _tap_spans(spec):
        _launch(TAP_ROWS, taps.size, x, oh, ow, spec.geometry, spec.kw, m * spec.kw + q, rows)
        found = gemm_grads(pspec, taps, gy, None, (stand_in,), (None,), {"pw": True}, dt)
        gw[m, q] = found["pw"]
    return gw
