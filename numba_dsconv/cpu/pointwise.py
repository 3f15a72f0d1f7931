"""Pointwise (1x1) convolution on the CPU, and the GEMM micro-kernel it shares with the fused
separable kernel.

- ``gemm_tile``: dst = act(bias + a @ w) for a block of rows and a range of output channels;
  with AVX-512 pairs of panels go to ``gemm_wide`` where its 6-row groups (and a 7- or 8-row
  narrow tail) pay (``wide_pays``), the rest to ``gemm_narrow``: each packs its (reduction
  block x panel) blocks of weights (within a quarter of L2) and runs its register block on
  every group of rows.
- ``gemm_block``: the narrow register block, ``mr`` pixel rows x 2 vectors of output channels
  (2 x 16 float32 = 32 channels, or 2 x 8 float64) in 16 or 14 (AVX-512: 8 or 7 rows,
  ``row_group``) or 12 (AVX2: 6 rows) vector accumulators; ``gemm_block_wide``: 6 rows x 4
  vectors (two panels) in 24 (AVX-512 only); for conv2d's direct path (``conv2d.conv_wide``)
  the wide block's pieces (``wide_start`` / ``wide_steps`` / ``wide_finish``) with a tap loop,
  and the tap block's (``tap_*``: 8 rows x one panel, masked past C_out) for the panel a pair
  leaves over. They are written out by hand, the accumulators
  by name: they must be SSA values for LLVM to keep them in registers (a loop over a small
  array of them put them in memory).
- ``gemm_split``: how many output pixels and channels one parallel task takes.
- ``pointwise_nhwc``: the kernel, parallel over (pixel block x output-channel block) tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ..packing import kernel_operands
from ._jit import NO_ACTIVATION, Kernel, helper, inlined, kernel
from ._simd import (
    VEC_BYTES,
    address,
    loadp,
    opaque,
    prefetch,
    prefetch_l1,
    storep,
    vact,
    vfma,
    vloadp,
    vloadp_part,
    vstorep,
    vstorep_part,
    vtranspose,
)
from .layout import aligned_empty, bias_vector, scratch

# The GEMM micro-kernel's register block: GEMM_MR output pixels x 2 vectors of output channels
# (2 x 16 float32 = 32 channels, or 2 x 8 float64): 16 vector accumulators with AVX-512's 32
# vector registers, 12 with AVX2's 16 (two more registers hold the panel's vectors, one or two
# the broadcasts). With A in L1 the 8-row block ran at ~80-85 % of the FMA peak, the 6-row
# one at ~72-78 % (BENCHMARKS.md, "Design measurements"). GEMM_MR is the most rows a block
# has; with AVX-512 a GEMM whose rows come out fewer in groups of 7 takes 7-row blocks
# (``row_group``): convolution outputs of 7 x 7, 14 x 14 pixels are multiples of 7 and 49
# rows in 8-row groups computed 56.
GEMM_MR = 8 if VEC_BYTES == 64 else 6
GEMM_MRS = (8, 7) if VEC_BYTES == 64 else (6,)  # the block heights, preferred first
_ROW6 = GEMM_MR >= 7
_ROW7 = GEMM_MR >= 8
# The wide block (``gemm_block_wide``, AVX-512 only: its 24 accumulators need 32 registers):
# WIDE_MR rows x 4 vectors (two panels), 24 FMAs per 10 loads where the 8 x 2 block has 16 per
# 10. On data in L1 87 % of the FMA peak against 82 %; in the kernels less (BENCHMARKS.md,
# "Design measurements"). WIDE_GAIN: the speed ratio ``wide_pays`` counts on.
WIDE = VEC_BYTES == 64
WIDE_MR = 6
WIDE_GAIN = 1.1
WIDE_SLAB_BYTES = _config.L2_BYTES // 4
# The tap block (``tap_steps``, AVX-512 only): TAP_MR rows x 2 vectors (one panel) read tap by
# tap from conv2d's band, for the panels conv2d's direct path has left over after its pairs
TAP_MR = 8


def gemm_panel_width(itemsize: int) -> int:
    """Output channels per micro-kernel panel: two 64-byte vectors."""
    return 2 * VEC_BYTES // itemsize


@helper
def row_group(rows):  # pragma: no cover - compiled
    """The block height (``GEMM_MRS``) of a GEMM of ``rows`` rows: the one computing the
    fewest rows (the last group is computed whole), the taller on a tie."""
    best = GEMM_MRS[0]
    for m in GEMM_MRS:
        if -(-rows // m) * m < -(-rows // best) * best:
            best = m
    return best


@helper
def gemm_task(t, nc, block, cblock, rows, cols):  # pragma: no cover - compiled
    """Task ``t`` of a GEMM kernel's task list, channel blocks fastest (``nc`` of them): (its
    channel block, rows r0..r1, channels c0..c1)."""
    cb = t % nc
    r0 = (t // nc) * block
    c0 = cb * cblock
    return cb, r0, min(rows, r0 + block), c0, min(cols, c0 + cblock)


@helper
def aligned_rows(rows, cols, like, phase=0):  # pragma: no cover - compiled
    """An uninitialised (rows, cols) array of ``like``'s dtype starting ``phase`` bytes (a
    multiple of its itemsize) past a 64-byte boundary (Numba allocates on 32: half of the
    64-byte vector loads of a panel would span two lines; a depthwise tile takes x's phase,
    ``depthwise.vector_head``)."""
    n = rows * cols
    buf = np.empty(n + 64 // like.itemsize, dtype=like.dtype)
    off = (phase - address(buf)) % 64 // like.itemsize
    return buf[off : off + n].reshape((rows, cols))


@helper
def gemm_scratch_shapes(kc, rows, sz):  # pragma: no cover - compiled
    """The (rows, cols) of ``gemm_tile``'s scratch pk, at and part for reduction blocks of
    ``kc`` and tiles of up to ``rows`` rows of ``sz``-byte values."""
    NR = 2 * VEC_BYTES // sz
    return ((kc, NR), (GEMM_MR, kc), (rows + GEMM_MR, NR))


@helper
def gemm_scratch(kc, rows, like):  # pragma: no cover - compiled
    """One task's scratch for ``gemm_tile`` (pk, at, part), in ``like``'s dtype; pk, the panel
    the micro-kernel reads by whole vectors, on a 64-byte boundary."""
    (r0, c0), at_shape, part_shape = gemm_scratch_shapes(kc, rows, like.itemsize)
    pk = aligned_rows(r0, c0, like)
    at = np.empty(at_shape, dtype=like.dtype)
    part = np.empty(part_shape, dtype=like.dtype)
    return pk, at, part


def pack_panels(w, wt, packed):  # pragma: no cover - compiled
    """packed[p, k, j] = W[k, p * NR + j] (0 past C_out): the GEMM micro-kernel's weight panels,
    packed once for a whole call (the backward, whose chunks all reuse them); W is w
    (K, C_out), or with ``wt`` w's transpose (w stored (C_out, K), C-contiguous: one pass
    instead of a transpose and a pack). In parallel, reading w row by row."""
    npan, K, _ = packed.shape
    NR = 2 * VEC_BYTES // packed.itemsize  # a constant (panels: ``gemm_panel_width``)
    CO = w.shape[0] if wt else w.shape[1]
    if wt:  # panel by panel, in square blocks of L rows of w x L reductions, each read as L
        # vectors, transposed in registers and stored as L vectors (``vtranspose``): the
        # scalar loop this replaced (blocks of 16 reductions x 4 rows, each row's cache line
        # read whole: the rows of w are C_in values apart, all in one L1 set at 1024
        # channels) moved ~1.5 cycles per value: 512 x 512 86 us, 1024 x 1024 222 us on 2
        # threads, torch's pointwise weight packed on every forward call
        L = VEC_BYTES // packed.itemsize
        dt = packed.dtype
        sz = packed.itemsize
        pw, sw = address(w), w.strides[0]
        pp, sp, sk = address(packed), packed.strides[0], packed.strides[1]
        for pn in prange(npan):
            c0 = pn * NR
            ncol = min(NR, CO - c0)
            whole = K // L * L if ncol == NR else 0
            for k0 in range(0, whole, L):
                for jb in range(0, NR, L):
                    vtranspose(pw + (c0 + jb) * sw + k0 * sz, sw,
                               pp + pn * sp + k0 * sk + jb * sz, sk, dt)  # fmt: skip
            for j in range(NR):  # the rest: a block cut by K, a panel cut by C_out
                for k in range(whole, K):
                    packed[pn, k, j] = w[c0 + j, k] if j < ncol else 0
    else:  # runs of rows of w, each read whole into every panel (not panel by panel: that
        # read NR values from each row, a page apart at C_out=1024: 1.1 ms for 1024 x 1024)
        for kb in prange((K + 15) // 16):
            for k in range(kb * 16, min(K, kb * 16 + 16)):
                for pn in range(npan):
                    c0 = pn * NR
                    for j in range(NR):
                        packed[pn, k, j] = w[k, c0 + j] if c0 + j < CO else 0


PACK = kernel(pack_panels, None)


def packed_weights(w: np.ndarray, parallel: bool, scratch=None, name: str = "") -> np.ndarray:
    """W = w (K, C_out), C- or F-contiguous, as the micro-kernel's panels (``pack_panels``),
    in a new array or ``scratch(name, shape, dtype)``'s."""
    k, co = w.shape
    wt = not w.flags.c_contiguous
    src = w.T if wt else w
    if not src.flags.c_contiguous:  # neither order
        src, wt = np.ascontiguousarray(w), False
    nr = gemm_panel_width(w.itemsize)
    shape = (-(-co // nr), k, nr)
    packed = aligned_empty(shape, w.dtype) if scratch is None else scratch(name, shape, w.dtype)
    if parallel:
        with _config.call_guard():
            PACK.parallel(src, wt, packed)
    else:
        PACK.serial(src, wt, packed)
    return packed


def packs_once(pixels: int, tile: int, weight_bytes: int, parallel: bool) -> bool:
    """Whether a GEMM kernel's call packs its weights (``weight_bytes`` of them) into panels
    once (``packed_weights``, into the thread's reused scratch) instead of in every task:
    where each thread runs two or more of the pixel blocks of ``tile`` pixels that share them,
    the weights do not stay in cache beside a tile (an eighth of L2 or more), and the weights
    a thread would pack again exceed its L2. Weights that stay in cache are packed again
    cheaply, and a pass of its own (another parallel launch) then costs more than it saves:
    the fused separable at N=1, rows 1-4, 1.02-1.04x the time, N=8 row 3 1.02-1.03; with a
    block per thread or fewer each weight is packed about once either way (37.7 MB of panels
    for 7x7x1024 -> 1024 at N=1: 1.05-1.1x). BENCHMARKS.md, "Design measurements"."""
    threads = _config.thread_count() if parallel else 1
    blocks = -(-pixels // max(1, tile))
    l2 = _config.L2_BYTES
    return (
        blocks >= 2 * threads and 8 * weight_bytes >= l2 and blocks * weight_bytes >= threads * l2
    )


def kernel_panels(
    pw: object, nopack: np.ndarray, once: bool, parallel: bool, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(w, panels) for ``gemm_tile`` from a weight argument (``kernel_operands``): the
    caller's packed panels, else, where the call ``packs_once``, pw packed here into the
    thread's scratch ``name``, else none (each task packs its own)."""
    w, panels = kernel_operands(pw, nopack)
    if once and panels.shape[0] == 0:
        panels = packed_weights(w, parallel, scratch, name)
    return w, panels


NO_PACKED = {}  # dtype -> an empty (0, 1, 1) array: "pack w here" for gemm_tile


def no_packed(dtype: np.dtype) -> np.ndarray:
    arr = NO_PACKED.get(dtype.str)
    if arr is None:
        arr = NO_PACKED[dtype.str] = np.empty((0, 1, 1), dtype)
    return arr


@helper
def zero_tail(a, rows):  # pragma: no cover - compiled
    """Zero the rows of ``a`` from ``rows`` to the end of its last row group (``row_group``'s,
    or with AVX-512 the wide block's, whichever ends later; within a): the short group
    ``gemm_tile`` reads in place."""
    mr = row_group(rows)
    end = -(-rows // mr) * mr
    if WIDE:
        end = max(end, -(-rows // WIDE_MR) * WIDE_MR)
    for r in range(rows, min(a.shape[0], end)):
        for c in range(a.shape[1]):
            a[r, c] = 0


@helper
def gemm_tile(
    a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at, part, pf, pf_len, fresh
):  # pragma: no cover - compiled
    """dst[r, c] = act(bias[c] + sum_k A[r, k] * W[k, c]) for r < rows, c_lo <= c < c_hi: the
    GEMM of every kernel (arguments: ``gemm_narrow``).

    With AVX-512, where it pays (``wide_pays``), the whole pairs of panels go to ``gemm_wide``
    (its 6 x 4-vector block: ~5 % more of the FMA peak than the 8 x 2 one), the panel left
    over (an odd one, or one cut by C_out) to ``gemm_narrow``. Each sum runs in reduction
    order either way: the same bits."""
    c_mid = wide_columns(rows, c_lo, c_hi, pk.shape[0], dst.itemsize)
    if c_mid > c_lo:
        gemm_wide(a, a_t, rows, w, packed, bias, dst, c_lo, c_mid, act, acc, pk, at, pf, pf_len,
                  fresh)  # fmt: skip
        if c_mid < c_hi:  # the panel left over
            gemm_narrow(a, a_t, rows, w, packed, bias, dst, c_mid, c_hi, act, acc, pk, at,
                        part, pf, 0, fresh)  # fmt: skip
    else:
        gemm_narrow(a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at, part, pf,
                    pf_len, fresh)  # fmt: skip


@helper
def wide_columns(rows, c_lo, c_hi, kc, itemsize):  # pragma: no cover - compiled
    """The end of the channels c_lo..c_mid that ``gemm_tile`` gives the wide block: the whole
    pairs of panels, with AVX-512, a reduction block of 2 or more (its two panels' blocks
    share the scratch) and where its row groups pay (``wide_pays``); c_lo (none) otherwise."""
    if not WIDE or kc < 2 or not wide_pays(rows):
        return c_lo
    pair = 4 * VEC_BYTES // itemsize
    return c_lo + (c_hi - c_lo) // pair * pair


@helper
def wide_tail(rows):  # pragma: no cover - compiled
    """The last rows ``gemm_wide`` gives one narrow block (``gemm_block``, 7 or 8 rows: the
    heights of GEMM_MRS with AVX-512) instead of a short 6-row group: where rows % 6 is 1 or
    2 (49 rows as 7 x 6 + 7, 50 as 7 x 6 + 8, not 9 x 6); 0 otherwise."""
    r = rows % WIDE_MR
    tail = r + WIDE_MR if r == 1 or r == 2 else 0
    return tail if WIDE and rows >= tail else 0


@helper
def wide_groups_pay(rows):  # pragma: no cover - compiled
    """Whether ``rows`` rows in groups of WIDE_MR on the wide block, the last one short (a wide
    row counting 1 / WIDE_GAIN of a narrow one), take less time than in ``row_group``'s narrow
    groups: 196 rows as 33 x 6 do, 49 as 9 x 6 do not (conv2d's direct path, whose wide loop
    has no narrow tail)."""
    return -(-rows // WIDE_MR) * WIDE_MR < WIDE_GAIN * narrow_rows(rows)


@helper
def wide_pays(rows):  # pragma: no cover - compiled
    """``wide_groups_pay`` for ``gemm_wide``, whose last ``wide_tail`` rows run one narrow
    block instead of a short group: 49 rows as 7 x 6 + 7 pay, 8 stay narrow."""
    tail = wide_tail(rows)
    if tail == 0:
        return wide_groups_pay(rows)
    return rows - tail + WIDE_GAIN * tail < WIDE_GAIN * narrow_rows(rows)


@helper
def narrow_rows(rows):  # pragma: no cover - compiled
    """The rows ``row_group``'s narrow groups compute for ``rows`` (the last group whole)."""
    mr = row_group(rows)
    return -(-rows // mr) * mr


@helper
def pack_block(w, k0, nk, c0, ppk, spk, dt, sz):  # pragma: no cover - compiled
    """Copy rows k0..k0+nk of w's panel of columns c0..c0+NR into the block at byte address
    ``ppk`` (rows ``spk`` bytes apart), zero past w's last column (on addresses: w may be a
    view with padded rows; its columns are contiguous)."""
    NR = spk // sz
    L = VEC_BYTES // sz
    ncol = min(NR, w.shape[1] - c0)
    pw, sw = address(w) + c0 * sz, w.strides[0]
    for k in range(nk):
        src_w = pw + (k0 + k) * sw
        if ncol == NR:
            vstorep(ppk + k * spk, vloadp(src_w, dt))
            vstorep(ppk + k * spk + VEC_BYTES, vloadp(src_w + VEC_BYTES, dt))
        else:  # a panel cut by C_out: lanes past it read nothing and hold zeros
            vstorep(ppk + k * spk, vloadp_part(src_w, ncol, dt))
            vstorep(ppk + k * spk + VEC_BYTES, vloadp_part(src_w + VEC_BYTES, ncol - L, dt))


@helper
def panel_block(w, packed, pk, half, c0, k0, nk, dt, sz):  # pragma: no cover - compiled
    """The byte address of rows k0..k0+nk of the panel of columns c0..c0+NR: in ``packed``
    (the call's or the caller's panels) where it is not empty, else packed here from w into
    half ``half`` (0 or 1) of pk."""
    NR = 2 * VEC_BYTES // sz
    spk = NR * sz
    if packed.shape[0] > 0:
        return address(packed) + (c0 // NR) * packed.strides[0] + k0 * spk
    p = address(pk) + half * (pk.shape[0] // 2) * spk
    pack_block(w, k0, nk, c0, p, spk, dt, sz)
    return p


@helper
def pair_block(w, packed, pk, c0, k0, nk, dt, sz):  # pragma: no cover - compiled
    """(pw0, pw1): the byte addresses of the wide block's two panels' blocks, rows k0..k0+nk
    of the panels of columns c0 and c0 + NR (``panel_block``: in ``packed``, or packed here
    into the two halves of pk)."""
    NR = 2 * VEC_BYTES // sz
    pw0 = panel_block(w, packed, pk, 0, c0, k0, nk, dt, sz)
    return pw0, panel_block(w, packed, pk, 1, c0 + NR, k0, nk, dt, sz)


@helper
def prefetch_share(pf, pf_end, step):  # pragma: no cover - compiled
    """Ask for the lines from byte address ``pf`` to ``pf + step`` (not past ``pf_end``) into
    L2; returns where the next share starts (a row group's share of the next task's input)."""
    q = pf
    pf = min(pf_end, pf + step)
    while q < pf:
        prefetch(q)
        q += 64
    return pf


@helper
def prefetch_stores(p, stride, rows, nbytes):  # pragma: no cover - compiled
    """Ask for the lines of ``rows`` rows of ``nbytes`` bytes from byte address ``p`` (rows
    ``stride`` apart) for stores: a register block that will store its sums into lines not in
    cache (a new output) asks for them before its reduction loop. Else its stores wait in the
    store buffer for the lines, and the next block's loads whose addresses match theirs in
    the low 12 bits (4K aliasing: the next rows of A, the panel's first rows) wait behind them:
    the pointwise backward's dx ran 1.4-2.1x the time at some placements of dx against grad
    (BENCHMARKS.md, "Design measurements")."""
    for i in range(rows):
        q = p + i * stride
        for off in range(0, nbytes, 64):
            prefetch_l1(q + off)
        prefetch_l1(q + nbytes - 1)


@helper
def copy_short_group(a, a_t, full, rows, mr, k0, nk, at):  # pragma: no cover - compiled
    """at[i, k] = A[min(full + i, rows - 1), k0 + k] for i < mr, k < nk (A: a, or a's transpose
    with ``a_t``): the short last row group as a whole block, its last row repeated."""
    for i in range(mr):
        ri = min(full + i, rows - 1)
        for k in range(nk):
            at[i, k] = a[k0 + k, ri] if a_t else a[ri, k0 + k]


@helper
def gemm_wide(
    a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at, pf, pf_len, fresh
):  # pragma: no cover - compiled
    """``gemm_tile`` on the whole panel pairs of c_lo..c_hi with the 6 x 4-vector block
    (``gemm_block_wide``); A is a, or with ``a_t`` a's transpose (as ``gemm_narrow``).

    The reduction runs in slabs whose columns of A (rows x slab) fit WIDE_SLAB_BYTES, a quarter
    of L2, or of one reduction block where that is more (with the default blocks a reduction of
    up to 1024 channels is one block and one slab): within a slab, for each pair of panels and
    each block of KCW = KC / 2 reduction channels (both panels' blocks, 2 x KCW x NR weights,
    stay in cache) every group of WIDE_MR rows runs the block, so a slab of A stays in cache
    while every pair reads it (with the pairs outermost a deep reduction read all of A again for
    each pair while the weights streamed past it: K = 2304 ran 1.08-1.1x the time). The partial
    sums between reduction blocks stay in dst (a short last group keeps only its rows). That
    group reads its rows in place where ``a`` (not transposed) has them up to the next multiple
    of WIDE_MR (their sums are never stored; ``zero_tail`` makes them finite), else from a copy
    in ``at`` (its last row repeated). Where rows % 6 is 1 or 2 there is no short group: the
    last 7 or 8 rows (``wide_tail``) run the narrow block (``gemm_block``, the same sums in the
    same order) on each panel of the pair's blocks: 49 rows as 7 x 6 + 7 instead of 9 x 6 (or
    of 7 x 7 on the narrow block alone, which ``wide_pays`` chose before): pointwise 7 x 7 x
    1024 -> 1024 at N=1 0.93x the time (BENCHMARKS.md, "Design measurements")."""
    prepacked = packed.shape[0] > 0
    K = packed.shape[1] if prepacked else w.shape[0]
    dt = dst.dtype
    sz = dst.itemsize
    NR = 2 * VEC_BYTES // sz
    KCW = pk.shape[0] // 2
    KCW = -(-K // -(-K // KCW))  # blocks of even depth
    pa, sa = address(a), a.strides[0]
    spk = NR * sz
    pdst, sdst = address(dst), dst.strides[0]
    tail = wide_tail(rows)
    rw = rows - tail  # the rows in 6-row groups (then whole where there is a tail)
    ngroups = -(-rw // WIDE_MR)
    full = rw // WIDE_MR * WIDE_MR
    in_place = not a_t and a.shape[0] >= ngroups * WIDE_MR
    sr, sk = (sz, sa) if a_t else (sa, sz)  # bytes to A's next row, next reduction channel
    pat, sat = address(at), at.strides[0]
    nblocks = (c_hi - c_lo) // (2 * NR) * -(-K // KCW) * (ngroups + (2 if tail else 0))
    pf_step = -(-pf_len // (64 * max(1, nblocks))) * 64
    pf_end = pf + pf_len
    kslab = max(KCW, WIDE_SLAB_BYTES // max(1, rows * sz) // KCW * KCW)
    for ks in range(0, K, kslab):
        for c0 in range(c_lo, c_hi, 2 * NR):
            for k0 in range(ks, min(K, ks + kslab), KCW):
                nk = min(KCW, K - k0)
                pw0, pw1 = pair_block(w, packed, pk, c0, k0, nk, dt, sz)
                first = k0 == 0 and not acc
                final = k0 + nk == K
                for r in range(0, rw, WIDE_MR):
                    pf = prefetch_share(pf, pf_end, pf_step)
                    src, stride, kstep = pa + r * sr + k0 * sk, sr, sk
                    if r == full and not in_place:  # the short last group, copied
                        copy_short_group(a, a_t, full, rows, WIDE_MR, k0, nk, at)
                        src, stride, kstep = pat, sat, sz
                    rd = pdst + r * sdst + c0 * sz
                    if fresh and first:  # dst unread before the block's stores
                        prefetch_stores(rd, sdst, min(WIDE_MR, rows - r), 4 * VEC_BYTES)
                    gemm_block_wide(src, stride, kstep, pw0, pw1, spk, nk, first,
                                    address(bias) + c0 * sz, rd, sdst, min(WIDE_MR, rows - r),
                                    final, act, dt, sz)  # fmt: skip
                for h in range(2 if tail else 0):  # the tail: one narrow block per panel,
                    # on the pair's blocks while they are in cache; partial sums in dst
                    pf = prefetch_share(pf, pf_end, pf_step)
                    cc = c0 + h * NR
                    rd = pdst + rw * sdst + cc * sz
                    if fresh and first:
                        prefetch_stores(rd, sdst, tail, 2 * VEC_BYTES)
                    gemm_block(pa + rw * sr + k0 * sk, sr, sk, pw0 + h * (pw1 - pw0), spk, nk,
                               first, address(bias) + cc * sz, rd, sdst, final, rd, sdst, tail,
                               tail, NR, act, dt, sz)  # fmt: skip


@helper
def gemm_narrow(
    a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at, part, pf, pf_len, fresh
):  # pragma: no cover - compiled
    """dst[r, c] = act(bias[c] + sum_k A[r, k] * W[k, c]) for r < rows, c_lo <= c < c_hi, where
    A is a (rows, K), or with ``a_t`` a's transpose (a stored (K, rows): the backward's weight
    gradients read the depthwise tile and grad this way, untransposed), and W is w (K, C_out),
    C-contiguous, packed here panel by panel, or where ``packed`` is not empty, those panels
    packed once for the whole call or by the caller (``pack_panels``; w then unread); with ``acc``,
    dst[r, c] = act(dst[r, c] + ...) (bias unread): the backward kernels accumulate weight
    gradients tile after tile, each element's sum running in reduction order across calls.

    a: (>= rows, K), rows contiguous (the depthwise tile, or input pixels); bias: padded to a
    multiple of the panel width NR; scratch: pk (KC, NR), at (GEMM_MR, KC), part (>= rows
    rounded up to GEMM_MR, NR); all C-contiguous, one dtype. c_lo is a multiple of NR. The rows
    go in groups of ``mr = row_group(rows)``.

    For each panel of NR output channels and each block of KC reduction channels (KC x NR
    weights: they stay in L2 while every group of mr rows runs ``gemm_block`` on them)
    the block comes from ``packed``, or is copied from w into ``pk`` (zero-padded past C_out).
    The last group of rows, if short, is read in place where ``a`` has the rows up to the next
    multiple of mr (their sums are never stored; the caller makes them finite: zeros,
    ``zero_tail``), else copied into ``at`` (its last row repeated), so that every block reads
    mr whole rows.

    ``pf_len`` bytes from address ``pf`` (the input the caller's next task reads) are
    prefetched into L2 a few lines per block, so that the memory traffic of the next task's
    first phase overlaps this task's arithmetic.

    ``fresh``: dst's lines are not in cache (the backward's dx, its partial sums): each block
    asks for the lines of its rows before its reduction loop (``prefetch_stores``). The
    forward's outputs go without: they showed no slow placements, and the prefetches cost
    1-2.5 % there.
    """
    prepacked = packed.shape[0] > 0
    K = packed.shape[1] if prepacked else w.shape[0]
    dt = dst.dtype
    sz = dst.itemsize
    L = VEC_BYTES // sz
    NR = 2 * L
    KC = pk.shape[0]
    KC = -(-K // -(-K // KC))  # blocks of even depth: K = 288 as 2 x 144, not 256 + 32
    mr = row_group(rows)
    full = rows // mr * mr
    # the short group in place (no copy per block: at 49 rows, a seventh of the time)
    in_place = not a_t and a.shape[0] >= -(-rows // mr) * mr
    # byte addresses and row strides (the arrays stay alive in this frame)
    pa = address(a)
    sa, ska = (sz, a.strides[0]) if a_t else (a.strides[0], sz)  # bytes to the next row, k
    pat, sat = address(at), at.strides[0]
    ppacked = address(packed)
    spk = NR * sz
    ppart, spart = address(part), part.strides[0]
    pdst, sdst = address(dst), dst.strides[0]
    pbias = address(bias)
    nblocks = -(-(c_hi - c_lo) // NR) * -(-K // KC) * -(-rows // mr)
    pf_step = -(-pf_len // (64 * max(1, nblocks))) * 64
    pf_end = pf + pf_len
    for c0 in range(c_lo, c_hi, NR):
        nout = min(NR, c_hi - c0)
        for k0 in range(0, K, KC):
            nk = min(KC, K - k0)
            if prepacked:
                ppk = ppacked + (c0 // NR) * packed.strides[0] + k0 * spk
            else:
                ppk = address(pk)
                pack_block(w, k0, nk, c0, ppk, spk, dt, sz)
            first = k0 == 0
            final = k0 + nk == K
            cb = pbias + c0 * sz
            cd = pdst + c0 * sz
            for r in range(0, rows, mr):
                pf = prefetch_share(pf, pf_end, pf_step)
                src, stride, kstep = pa + r * sa + k0 * ska, sa, ska
                if r == full and not in_place:  # the short last group, copied
                    copy_short_group(a, a_t, full, rows, mr, k0, nk, at)
                    src, stride, kstep = pat, sat, sz
                nvalid = min(mr, rows - r)
                pp, sp, start = ppart + r * spart, spart, first
                if acc:  # the sums start from dst
                    start = False
                    if nvalid == mr and nout == NR:  # a whole block: dst holds the sums
                        pp, sp = cd + r * sdst, sdst
                    elif first:  # an edge block: dst's part copied in, zeros past its edges
                        for i in range(mr):
                            for j in range(NR):
                                v = dst[r + i, c0 + j] if i < nvalid and j < nout else 0
                                part[r + i, j] = v
                if fresh and final and not acc:  # dst unread before the block's stores
                    prefetch_stores(cd + r * sdst, sdst, nvalid, nout * sz)
                gemm_block(
                    src, stride, kstep, ppk, spk, nk, start, cb, pp, sp, final, cd + r * sdst,
                    sdst, mr, nvalid, nout, act, dt, sz,
                )  # fmt: skip


@inlined
def gemm_block(
    pa,
    sa,
    ska,
    ppk,
    spk,
    nk,
    first,
    pbias,
    ppart,
    spart,
    final,
    pdst,
    sdst,
    mr,
    nvalid,
    nout,
    act,
    dt,
    sz,
):  # pragma: no cover - compiled
    """One register block of ``mr`` pixel rows (one of GEMM_MRS) x NR output channels, on byte
    addresses.

    pa: a[row 0, first reduction channel], rows ``sa`` bytes apart, reduction channels ``ska``
    bytes apart (the element size, or a row for a transposed a); ppk: the packed panel
    (``nk`` rows, ``spk`` bytes apart); pbias: bias[c0]; ppart / pdst: row 0 of the partial
    sums / of the output at column c0 (strides ``spart`` / ``sdst``); ``dt``/``sz``: the dtype
    and its size. The 2 * mr accumulators live in registers for the whole reduction loop:
    they start from the bias on the ``first`` reduction block, else from ``part``; each step is
    two vector loads of the panel, mr scalar broadcasts and 2 * mr vector FMAs. On the
    ``final`` block the activation is applied in registers and the first ``nvalid`` rows x
    ``nout`` channels are stored to dst; otherwise the sums go back to ``part``. Addresses, not
    arrays: a helper taking arrays pays an atomic reference-count update per array per call (and
    the IR-inlined version still did), which cost half the block's time at K=32.
    """
    B = VEC_BYTES
    eight = _ROW7 and mr == 8
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
        s60 = s00
        s61 = s01
        s70 = s00
        s71 = s01
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
        s60 = s00
        s61 = s01
        s70 = s00
        s71 = s01
        if _ROW6:
            s60 = vloadp(ppart + 6 * spart, dt)
            s61 = vloadp(ppart + 6 * spart + B, dt)
        if eight:
            s70 = vloadp(ppart + 7 * spart, dt)
            s71 = vloadp(ppart + 7 * spart + B, dt)
    # one loop per block height: a row tested inside the loop would be a branch per step.
    # The 8-row loop asks for A's data 8 steps ahead in L1: for a transposed A (the backward's
    # d pw GEMM, whose C*M rows come in 8-row groups) each step reads another row, more than
    # 2 KB apart, which the hardware does not prefetch (that GEMM: 0.85-0.93x the time); for
    # the forward's A it is a line already on its way (0.98-1.03x: noise). In the 7-row loop
    # (the forward's 7 x 7-pixel layers; a transposed A only where C*M comes out fewer in 7s)
    # it cost 1.01-1.08x the forward's time. (``gemm_wide``'s 7- and 8-row tails run these
    # loops too, a transposed A's included.)
    # the rows' byte offsets from row 0, loop-invariant registers, and one pointer per stream
    # advanced through ``opaque``: LLVM otherwise chained the row addresses (p + sa, + sa,
    # ...: seven adds per step beside the 16 FMAs, on the ports Intel's FMAs use)
    d1 = sa
    d2 = 2 * sa
    d3 = 3 * sa
    d4 = 4 * sa
    d5 = 5 * sa
    d6 = 6 * sa
    d7 = 7 * sa
    p = pa
    pw = ppk
    if eight:
        for _ in range(nk):
            w0 = vloadp(pw, dt)
            w1 = vloadp(pw + B, dt)
            prefetch_l1(p + 8 * ska)
            x = loadp(p, dt)
            s00 = vfma(x, w0, s00)
            s01 = vfma(x, w1, s01)
            x = loadp(p + d1, dt)
            s10 = vfma(x, w0, s10)
            s11 = vfma(x, w1, s11)
            x = loadp(p + d2, dt)
            s20 = vfma(x, w0, s20)
            s21 = vfma(x, w1, s21)
            x = loadp(p + d3, dt)
            s30 = vfma(x, w0, s30)
            s31 = vfma(x, w1, s31)
            x = loadp(p + d4, dt)
            s40 = vfma(x, w0, s40)
            s41 = vfma(x, w1, s41)
            x = loadp(p + d5, dt)
            s50 = vfma(x, w0, s50)
            s51 = vfma(x, w1, s51)
            x = loadp(p + d6, dt)
            s60 = vfma(x, w0, s60)
            s61 = vfma(x, w1, s61)
            x = loadp(p + d7, dt)
            s70 = vfma(x, w0, s70)
            s71 = vfma(x, w1, s71)
            p = opaque(p + ska)
            pw = opaque(pw + spk)
    else:
        for _ in range(nk):
            w0 = vloadp(pw, dt)
            w1 = vloadp(pw + B, dt)
            x = loadp(p, dt)
            s00 = vfma(x, w0, s00)
            s01 = vfma(x, w1, s01)
            x = loadp(p + d1, dt)
            s10 = vfma(x, w0, s10)
            s11 = vfma(x, w1, s11)
            x = loadp(p + d2, dt)
            s20 = vfma(x, w0, s20)
            s21 = vfma(x, w1, s21)
            x = loadp(p + d3, dt)
            s30 = vfma(x, w0, s30)
            s31 = vfma(x, w1, s31)
            x = loadp(p + d4, dt)
            s40 = vfma(x, w0, s40)
            s41 = vfma(x, w1, s41)
            x = loadp(p + d5, dt)
            s50 = vfma(x, w0, s50)
            s51 = vfma(x, w1, s51)
            if _ROW6:
                x = loadp(p + d6, dt)
                s60 = vfma(x, w0, s60)
                s61 = vfma(x, w1, s61)
            p = opaque(p + ska)
            pw = opaque(pw + spk)
    if final and act != NO_ACTIVATION:
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
        s60 = vact(s60, act)
        s61 = vact(s61, act)
        s70 = vact(s70, act)
        s71 = vact(s71, act)
    # final and whole: straight to dst; partial sums, a short group or a panel cut by C_out:
    # to part (the last two then copied lane by lane)
    full = final and nout * sz == 2 * B and nvalid == mr
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
    if _ROW6:
        vstorep(po + 6 * so, s60)
        vstorep(po + 6 * so + B, s61)
    if eight:
        vstorep(po + 7 * so, s70)
        vstorep(po + 7 * so + B, s71)
    if final and not full:
        for i in range(nvalid):
            for j in range(nout):
                storep(pdst + i * sdst + j * sz, loadp(ppart + i * spart + j * sz, dt), dt)


@inlined
def wide_start(first, pbias, pdst, sdst, nvalid, dt):  # pragma: no cover - compiled
    """The wide block's 24 accumulators (row-major: s00..s03, s10.., ..s53): four vectors of
    the bias on the ``first`` reduction block, else dst's partial sums (rows ``sdst`` bytes
    apart; a row past ``nvalid`` starts from row 0's: its sums are never stored)."""
    B = VEC_BYTES
    s00 = vloadp(pbias + 0 * B, dt) if first else vloadp(pdst + 0 * B, dt)
    s01 = vloadp(pbias + 1 * B, dt) if first else vloadp(pdst + 1 * B, dt)
    s02 = vloadp(pbias + 2 * B, dt) if first else vloadp(pdst + 2 * B, dt)
    s03 = vloadp(pbias + 3 * B, dt) if first else vloadp(pdst + 3 * B, dt)
    s10 = s00 if first or nvalid <= 1 else vloadp(pdst + 1 * sdst + 0 * B, dt)
    s11 = s01 if first or nvalid <= 1 else vloadp(pdst + 1 * sdst + 1 * B, dt)
    s12 = s02 if first or nvalid <= 1 else vloadp(pdst + 1 * sdst + 2 * B, dt)
    s13 = s03 if first or nvalid <= 1 else vloadp(pdst + 1 * sdst + 3 * B, dt)
    s20 = s00 if first or nvalid <= 2 else vloadp(pdst + 2 * sdst + 0 * B, dt)
    s21 = s01 if first or nvalid <= 2 else vloadp(pdst + 2 * sdst + 1 * B, dt)
    s22 = s02 if first or nvalid <= 2 else vloadp(pdst + 2 * sdst + 2 * B, dt)
    s23 = s03 if first or nvalid <= 2 else vloadp(pdst + 2 * sdst + 3 * B, dt)
    s30 = s00 if first or nvalid <= 3 else vloadp(pdst + 3 * sdst + 0 * B, dt)
    s31 = s01 if first or nvalid <= 3 else vloadp(pdst + 3 * sdst + 1 * B, dt)
    s32 = s02 if first or nvalid <= 3 else vloadp(pdst + 3 * sdst + 2 * B, dt)
    s33 = s03 if first or nvalid <= 3 else vloadp(pdst + 3 * sdst + 3 * B, dt)
    s40 = s00 if first or nvalid <= 4 else vloadp(pdst + 4 * sdst + 0 * B, dt)
    s41 = s01 if first or nvalid <= 4 else vloadp(pdst + 4 * sdst + 1 * B, dt)
    s42 = s02 if first or nvalid <= 4 else vloadp(pdst + 4 * sdst + 2 * B, dt)
    s43 = s03 if first or nvalid <= 4 else vloadp(pdst + 4 * sdst + 3 * B, dt)
    s50 = s00 if first or nvalid <= 5 else vloadp(pdst + 5 * sdst + 0 * B, dt)
    s51 = s01 if first or nvalid <= 5 else vloadp(pdst + 5 * sdst + 1 * B, dt)
    s52 = s02 if first or nvalid <= 5 else vloadp(pdst + 5 * sdst + 2 * B, dt)
    s53 = s03 if first or nvalid <= 5 else vloadp(pdst + 5 * sdst + 3 * B, dt)
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23,
            s30, s31, s32, s33, s40, s41, s42, s43, s50, s51, s52, s53)  # fmt: skip


@inlined
def wide_step(s, b0, b1, b2, b3, b4, b5, p0, p1, dt):  # pragma: no cover - compiled
    """One reduction step of the wide block: the accumulators ``s`` plus the products of the
    six rows' values (at byte addresses b0..b5) with the two panels' rows (at p0 / p1): four
    vector loads, six broadcasts, 24 FMAs."""
    B = VEC_BYTES
    (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23,
     s30, s31, s32, s33, s40, s41, s42, s43, s50, s51, s52, s53) = s  # fmt: skip
    w0 = vloadp(p0, dt)
    w1 = vloadp(p0 + B, dt)
    w2 = vloadp(p1, dt)
    w3 = vloadp(p1 + B, dt)
    x = loadp(b0, dt)
    s00 = vfma(x, w0, s00)
    s01 = vfma(x, w1, s01)
    s02 = vfma(x, w2, s02)
    s03 = vfma(x, w3, s03)
    x = loadp(b1, dt)
    s10 = vfma(x, w0, s10)
    s11 = vfma(x, w1, s11)
    s12 = vfma(x, w2, s12)
    s13 = vfma(x, w3, s13)
    x = loadp(b2, dt)
    s20 = vfma(x, w0, s20)
    s21 = vfma(x, w1, s21)
    s22 = vfma(x, w2, s22)
    s23 = vfma(x, w3, s23)
    x = loadp(b3, dt)
    s30 = vfma(x, w0, s30)
    s31 = vfma(x, w1, s31)
    s32 = vfma(x, w2, s32)
    s33 = vfma(x, w3, s33)
    x = loadp(b4, dt)
    s40 = vfma(x, w0, s40)
    s41 = vfma(x, w1, s41)
    s42 = vfma(x, w2, s42)
    s43 = vfma(x, w3, s43)
    x = loadp(b5, dt)
    s50 = vfma(x, w0, s50)
    s51 = vfma(x, w1, s51)
    s52 = vfma(x, w2, s52)
    s53 = vfma(x, w3, s53)
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23,
            s30, s31, s32, s33, s40, s41, s42, s43, s50, s51, s52, s53)  # fmt: skip


@inlined
def wide_steps(
    s, a0, a1, a2, a3, a4, a5, t0, t1, kw, sm, sq, pw0, pw1, spk, nk, dt, sz
):  # pragma: no cover - compiled
    """The wide block's reduction: the accumulators ``s`` (``wide_start``) plus, for each tap
    t0 <= t < t1 (m, q = divmod(t, kw): A's rows at byte offset m * sm + q * sq; a GEMM has
    one tap, offset 0) and each of its ``nk`` reduction channels (contiguous in A), the
    products of the six rows' values (at byte addresses a0..a5 plus the offset) with the two
    panels' rows (at pw0 / pw1, ``spk`` bytes apart, the taps' blocks one after the other):
    ``wide_step`` per channel, two per loop pass.

    The rows' offsets from row 0 (d1..d5) and the second panel's from the first (dq) are
    loop-invariant registers, and the loop advances one pointer per stream through
    ``_simd.opaque``: each load is a base plus an index register, two pointer adds per pass.
    Left to itself LLVM gave each of the six rows and both panels a pointer of its own (eight
    adds per step beside the 24 FMAs; unrolled by two, twelve registers rotated by moves), and
    Intel's cores issue scalar adds on the ports their FMAs use: conv2d packed, in-process A/B
    on the Intel Xeon, 0.93-0.99x the time (N=1 and 8, rows 1-11), separable packed
    0.95-0.99x (one step per pass). Two steps per pass (the adds over 48 FMAs): conv2d
    0.94-1.01x, pointwise 0.98-1.00x, separable 0.96-1.00x; the same for ``gemm_block``'s
    narrow loops was 0.97-1.01x forward and 1.04-1.06x on the backward (separable_grad N=8
    row 3), so they take one step per pass (BENCHMARKS.md, "Design measurements")."""
    d1 = a1 - a0
    d2 = a2 - a0
    d3 = a3 - a0
    d4 = a4 - a0
    d5 = a5 - a0
    dq = pw1 - pw0
    m = t0 // kw  # tap t = m * kw + q, stepped without a division per tap
    q = t0 - m * kw
    for t in range(t0, t1):
        pa = a0 + m * sm + q * sq
        pw = pw0 + (t - t0) * nk * spk
        q += 1
        if q == kw:
            q = 0
            m += 1
        for _ in range(nk // 2):
            s = wide_step(s, pa, pa + d1, pa + d2, pa + d3, pa + d4, pa + d5, pw, pw + dq, dt)
            qa = pa + sz
            qw = pw + spk
            s = wide_step(s, qa, qa + d1, qa + d2, qa + d3, qa + d4, qa + d5, qw, qw + dq, dt)
            pa = opaque(pa + 2 * sz)
            pw = opaque(pw + 2 * spk)
        if nk % 2:
            s = wide_step(s, pa, pa + d1, pa + d2, pa + d3, pa + d4, pa + d5, pw, pw + dq, dt)
    return s


@inlined
def wide_finish(s, pdst, sdst, nvalid, final, act):  # pragma: no cover - compiled
    """Store the wide block's accumulators ``s``, the activation applied on the ``final``
    reduction block: the first ``nvalid`` rows (``sdst`` bytes apart) of four vectors."""
    B = VEC_BYTES
    (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23,
     s30, s31, s32, s33, s40, s41, s42, s43, s50, s51, s52, s53) = s  # fmt: skip
    if final and act != NO_ACTIVATION:
        s00 = vact(s00, act)
        s01 = vact(s01, act)
        s02 = vact(s02, act)
        s03 = vact(s03, act)
        s10 = vact(s10, act)
        s11 = vact(s11, act)
        s12 = vact(s12, act)
        s13 = vact(s13, act)
        s20 = vact(s20, act)
        s21 = vact(s21, act)
        s22 = vact(s22, act)
        s23 = vact(s23, act)
        s30 = vact(s30, act)
        s31 = vact(s31, act)
        s32 = vact(s32, act)
        s33 = vact(s33, act)
        s40 = vact(s40, act)
        s41 = vact(s41, act)
        s42 = vact(s42, act)
        s43 = vact(s43, act)
        s50 = vact(s50, act)
        s51 = vact(s51, act)
        s52 = vact(s52, act)
        s53 = vact(s53, act)
    vstorep(pdst + 0 * B, s00)
    vstorep(pdst + 1 * B, s01)
    vstorep(pdst + 2 * B, s02)
    vstorep(pdst + 3 * B, s03)
    if nvalid > 1:
        vstorep(pdst + 1 * sdst + 0 * B, s10)
        vstorep(pdst + 1 * sdst + 1 * B, s11)
        vstorep(pdst + 1 * sdst + 2 * B, s12)
        vstorep(pdst + 1 * sdst + 3 * B, s13)
    if nvalid > 2:
        vstorep(pdst + 2 * sdst + 0 * B, s20)
        vstorep(pdst + 2 * sdst + 1 * B, s21)
        vstorep(pdst + 2 * sdst + 2 * B, s22)
        vstorep(pdst + 2 * sdst + 3 * B, s23)
    if nvalid > 3:
        vstorep(pdst + 3 * sdst + 0 * B, s30)
        vstorep(pdst + 3 * sdst + 1 * B, s31)
        vstorep(pdst + 3 * sdst + 2 * B, s32)
        vstorep(pdst + 3 * sdst + 3 * B, s33)
    if nvalid > 4:
        vstorep(pdst + 4 * sdst + 0 * B, s40)
        vstorep(pdst + 4 * sdst + 1 * B, s41)
        vstorep(pdst + 4 * sdst + 2 * B, s42)
        vstorep(pdst + 4 * sdst + 3 * B, s43)
    if nvalid > 5:
        vstorep(pdst + 5 * sdst + 0 * B, s50)
        vstorep(pdst + 5 * sdst + 1 * B, s51)
        vstorep(pdst + 5 * sdst + 2 * B, s52)
        vstorep(pdst + 5 * sdst + 3 * B, s53)


@inlined
def tap_start(first, pbias, pdst, sdst, nvalid, nout, dt, sz):  # pragma: no cover - compiled
    """The tap block's 16 accumulators (s00, s01, s10, .., s71): two vectors of the bias on the
    ``first`` reduction block, else dst's partial sums (rows ``sdst`` bytes apart, the first
    ``nout`` channels read: a panel cut by C_out; a row past ``nvalid`` starts from row 0's:
    its sums are never stored)."""
    B = VEC_BYTES
    L = B // sz
    s00 = vloadp(pbias, dt) if first else vloadp_part(pdst, nout, dt)
    s01 = vloadp(pbias + B, dt) if first else vloadp_part(pdst + B, nout - L, dt)
    s10 = s00 if first or nvalid <= 1 else vloadp_part(pdst + 1 * sdst, nout, dt)
    s11 = s01 if first or nvalid <= 1 else vloadp_part(pdst + 1 * sdst + B, nout - L, dt)
    s20 = s00 if first or nvalid <= 2 else vloadp_part(pdst + 2 * sdst, nout, dt)
    s21 = s01 if first or nvalid <= 2 else vloadp_part(pdst + 2 * sdst + B, nout - L, dt)
    s30 = s00 if first or nvalid <= 3 else vloadp_part(pdst + 3 * sdst, nout, dt)
    s31 = s01 if first or nvalid <= 3 else vloadp_part(pdst + 3 * sdst + B, nout - L, dt)
    s40 = s00 if first or nvalid <= 4 else vloadp_part(pdst + 4 * sdst, nout, dt)
    s41 = s01 if first or nvalid <= 4 else vloadp_part(pdst + 4 * sdst + B, nout - L, dt)
    s50 = s00 if first or nvalid <= 5 else vloadp_part(pdst + 5 * sdst, nout, dt)
    s51 = s01 if first or nvalid <= 5 else vloadp_part(pdst + 5 * sdst + B, nout - L, dt)
    s60 = s00 if first or nvalid <= 6 else vloadp_part(pdst + 6 * sdst, nout, dt)
    s61 = s01 if first or nvalid <= 6 else vloadp_part(pdst + 6 * sdst + B, nout - L, dt)
    s70 = s00 if first or nvalid <= 7 else vloadp_part(pdst + 7 * sdst, nout, dt)
    s71 = s01 if first or nvalid <= 7 else vloadp_part(pdst + 7 * sdst + B, nout - L, dt)
    return (s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51, s60, s61, s70, s71)


@inlined
def tap_steps(
    s, a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, kw, sm, sq, pw, spk, nk, dt, sz
):  # pragma: no cover - compiled
    """The tap block's reduction, as ``wide_steps`` on one panel (at pw) and eight rows (at
    byte addresses a0..a7), one step per loop pass: each step two vector loads, eight
    broadcasts and 16 FMAs."""
    B = VEC_BYTES
    (s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51, s60, s61, s70, s71) = s
    d1 = a1 - a0  # the row offsets and opaque pointer advances of ``wide_steps``
    d2 = a2 - a0
    d3 = a3 - a0
    d4 = a4 - a0
    d5 = a5 - a0
    d6 = a6 - a0
    d7 = a7 - a0
    m = t0 // kw  # as in ``wide_steps``
    q = t0 - m * kw
    for t in range(t0, t1):
        pa = a0 + m * sm + q * sq
        p = pw + (t - t0) * nk * spk
        q += 1
        if q == kw:
            q = 0
            m += 1
        for _ in range(nk):
            w0 = vloadp(p, dt)
            w1 = vloadp(p + B, dt)
            x = loadp(pa, dt)
            s00 = vfma(x, w0, s00)
            s01 = vfma(x, w1, s01)
            x = loadp(pa + d1, dt)
            s10 = vfma(x, w0, s10)
            s11 = vfma(x, w1, s11)
            x = loadp(pa + d2, dt)
            s20 = vfma(x, w0, s20)
            s21 = vfma(x, w1, s21)
            x = loadp(pa + d3, dt)
            s30 = vfma(x, w0, s30)
            s31 = vfma(x, w1, s31)
            x = loadp(pa + d4, dt)
            s40 = vfma(x, w0, s40)
            s41 = vfma(x, w1, s41)
            x = loadp(pa + d5, dt)
            s50 = vfma(x, w0, s50)
            s51 = vfma(x, w1, s51)
            x = loadp(pa + d6, dt)
            s60 = vfma(x, w0, s60)
            s61 = vfma(x, w1, s61)
            x = loadp(pa + d7, dt)
            s70 = vfma(x, w0, s70)
            s71 = vfma(x, w1, s71)
            pa = opaque(pa + sz)
            p = opaque(p + spk)
    return (s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51, s60, s61, s70, s71)


@inlined
def tap_finish(s, pdst, sdst, nvalid, nout, final, act, sz):  # pragma: no cover - compiled
    """Store the tap block's accumulators ``s``, the activation applied on the ``final``
    reduction block: the first ``nvalid`` rows (``sdst`` bytes apart), of each the first
    ``nout`` channels (masked stores: a panel cut by C_out)."""
    B = VEC_BYTES
    (s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51, s60, s61, s70, s71) = s
    L = B // sz
    if final and act != NO_ACTIVATION:
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
        s60 = vact(s60, act)
        s61 = vact(s61, act)
        s70 = vact(s70, act)
        s71 = vact(s71, act)
    vstorep_part(pdst, s00, nout)
    vstorep_part(pdst + B, s01, nout - L)
    if nvalid > 1:
        vstorep_part(pdst + 1 * sdst, s10, nout)
        vstorep_part(pdst + 1 * sdst + B, s11, nout - L)
    if nvalid > 2:
        vstorep_part(pdst + 2 * sdst, s20, nout)
        vstorep_part(pdst + 2 * sdst + B, s21, nout - L)
    if nvalid > 3:
        vstorep_part(pdst + 3 * sdst, s30, nout)
        vstorep_part(pdst + 3 * sdst + B, s31, nout - L)
    if nvalid > 4:
        vstorep_part(pdst + 4 * sdst, s40, nout)
        vstorep_part(pdst + 4 * sdst + B, s41, nout - L)
    if nvalid > 5:
        vstorep_part(pdst + 5 * sdst, s50, nout)
        vstorep_part(pdst + 5 * sdst + B, s51, nout - L)
    if nvalid > 6:
        vstorep_part(pdst + 6 * sdst, s60, nout)
        vstorep_part(pdst + 6 * sdst + B, s61, nout - L)
    if nvalid > 7:
        vstorep_part(pdst + 7 * sdst, s70, nout)
        vstorep_part(pdst + 7 * sdst + B, s71, nout - L)


@inlined
def gemm_block_wide(
    pa, sa, ska, pw0, pw1, spk, nk, first, pbias, pdst, sdst, nvalid, final, act, dt, sz
):  # pragma: no cover - compiled
    """The wide register block: WIDE_MR (6) rows x 4 vectors (two panels of NR channels), on
    byte addresses. pa: A[row 0, first reduction channel], rows ``sa`` bytes apart, reduction
    channels ``ska`` (the element size, or a row of a transposed A: then each step asks for
    A's data 8 steps ahead in L1, as the narrow block's 8-row loop does); pw0 / pw1: the two
    panels' blocks (``nk`` rows, ``spk`` bytes apart); pbias: bias[c0], four vectors; pdst:
    dst[row 0, c0] (rows ``sdst`` bytes apart), of which the first ``nvalid`` rows are
    stored; ``dt``/``sz``: the dtype and its size. The 24 accumulators start from the bias on
    the ``first`` block, else from dst (``wide_start``); each step is four vector loads, six
    broadcasts and 24 FMAs (``wide_steps``); on the ``final`` block the activation is applied
    (``wide_finish``)."""
    s = wide_start(first, pbias, pdst, sdst, nvalid, dt)
    if ska == sz:  # A's reduction channels contiguous: one tap of wide_steps
        s = wide_steps(s, pa, pa + sa, pa + 2 * sa, pa + 3 * sa, pa + 4 * sa, pa + 5 * sa,
                       0, 1, 1, 0, 0, pw0, pw1, spk, nk, dt, sz)  # fmt: skip
        wide_finish(s, pdst, sdst, nvalid, final, act)
    else:  # a transposed A: each step another row
        d1 = sa  # row offsets and opaque pointer advances, as in ``wide_steps``
        d2 = 2 * sa
        d3 = 3 * sa
        d4 = 4 * sa
        d5 = 5 * sa
        dq = pw1 - pw0
        p = pa
        pw = pw0
        for _ in range(nk):
            prefetch_l1(p + 8 * ska)
            s = wide_step(s, p, p + d1, p + d2, p + d3, p + d4, p + d5, pw, pw + dq, dt)
            p = opaque(p + ska)
            pw = opaque(pw + spk)
        # each branch stores its own sums: with one store after the branches (the tuple
        # merged) separable_grad at N=8 ran 1.01-1.04x the time (layers 1 and 3)
        wide_finish(s, pdst, sdst, nvalid, final, act)


def gemm_split(
    spec: ConvSpec,
    c_red: int,
    dw_taps: int,
    itemsize: int,
    parallel: bool,
    prefetched: bool = True,
    a_bytes: int = 0,
    max_pixels: int = 0,
    panel_group: int = 1,
) -> tuple[int, int, int]:
    """One GEMM task of a kernel call, the kernels' ``split`` argument: (tile, cblock, kc) =
    ``tile`` output pixels (a multiple of one of GEMM_MRS) x ``cblock`` output channels (a
    multiple of the panel width), ``kc`` reduction channels per packed block (CPU_GEMM_KC, at
    most ``c_red``, or twice it with the wide block, whose pairs take kc / 2: a deeper block
    would only enlarge every task's scratch); ``prefetched``: the tile budget leaves half a
    reduction block's weights room (False: conv2d, the whole budget for the tile);
    ``a_bytes``: the bytes per output pixel counted against the tile budget where they are not
    ``c_red`` values (conv2d's direct path); ``max_pixels``: the most pixels per tile where not
    CPU_TILE_MAX_PIXELS; ``panel_group``: cblock whole groups of this many panels. A plain
    tuple (see _spec.GEOMETRY_FIELDS). The tunables are read here, so a test that patches them
    gets a new split; the search itself is memoised (``_gemm_split``)."""
    threads = _config.thread_count() if parallel else 1
    kc = block_depth(_config.CPU_GEMM_KC, c_red)
    # the tile budget in the units _gemm_split counts (c_red values per pixel)
    budget = _config.CPU_TILE_BYTES * c_red * itemsize // a_bytes if a_bytes else None
    tile, cblock = _gemm_split(
        spec.pixels, c_red, spec.c_out, itemsize, dw_taps, parallel, threads,
        budget or _config.CPU_TILE_BYTES, max_pixels or _config.CPU_TILE_MAX_PIXELS,
        kc if prefetched else 0, SPLIT_SLACK, panel_group,
    )  # fmt: skip
    return (tile, cblock, kc)


def block_depth(kc: int, depth: int) -> int:
    """The reduction block a GEMM scratch is sized for: ``kc`` (CPU_GEMM_KC), at most the
    deepest reduction it serves, twice that with the wide block (whose pairs of panels take
    kc / 2): a deeper block would run the same and only enlarge every task's scratch."""
    return max(1, min(kc, 2 * depth if WIDE else depth))


@functools.lru_cache(maxsize=1024)
def _gemm_split(
    pixels: int,
    c_red: int,
    c_out: int,
    itemsize: int,
    dw_taps: int,
    parallel: bool,
    threads: int,
    tile_bytes: int,
    tile_max_pixels: int,
    kc: int,
    slack: float,
    panel_group: int = 1,
) -> tuple[int, int]:
    """(tile, cblock): output pixels and output channels per task of a GEMM kernel; cblock a
    whole number of ``panel_group`` panels (2: pairs, for conv2d's direct path, whose wide
    block writes two panels at a time).

    A tile's A operand (tile x c_red: the depthwise result in the fused kernel) stays within
    ``tile_bytes`` less half the weights one reduction block reads (kc / 2 or fewer rows of a
    pair of panels with the wide block, kc or fewer of one panel without it; kc 0: a kernel
    that does not prefetch, the whole budget) and within ``tile_max_pixels``: with the default
    half of L2, the tile, the next task's input (about as large, prefetched while the GEMM
    runs) and the weight block share L2 (392 x 1024 -> 1024 in tiles of 98 pixels overran it:
    1.7 or 3.2-4.4 ms from one process to the next, in tiles of 49 1.6 ms). Tiles are whole row
    groups of one height, channel blocks whole panels.

    A serial call takes the largest tile and every channel. A parallel call estimates each
    split's critical path: Numba hands each thread one contiguous chunk of the task list (the
    fused separable kernel cuts the same runs itself, one per worker), so the cost is the
    largest chunk, counted in multiply-adds (a task's GEMM, plus its depthwise
    work, ``dw_taps`` per reduction channel and pixel, which every channel block of a pixel
    block repeats, plus the weight packing). Of the splits within ``slack`` (SPLIT_SLACK) of the
    shortest path it takes the one of fewest tasks (each task has costs the count leaves out: its
    scratch, its tile's halo of input rows), then the shorter path.
    """
    nr = gemm_panel_width(itemsize)
    width = nr * panel_group  # channel blocks are whole units of this many channels
    units = -(-c_out // width)
    weight_block = (min(2 * c_red, kc) if WIDE else min(c_red, kc)) * nr * itemsize
    fit = max(0, tile_bytes - weight_block // 2) // max(1, c_red * itemsize)
    max_tile = max(GEMM_MR, min(tile_max_pixels, fit) // GEMM_MR * GEMM_MR)
    if not parallel or pixels == 0:
        return max_tile, units * width
    splits = []  # (critical path, tasks, tile, cblock)
    nb_min = -(-pixels // max_tile)
    for nb in range(nb_min, 2 * nb_min + threads):  # up to half the largest tile, and more
        per_block = -(-pixels // nb)
        for mr in GEMM_MRS:  # tiles of whole row groups of each height (the first on a tie)
            tile = -(-per_block // mr) * mr
            if tile > max_tile and mr != GEMM_MR:
                continue
            nb_eff = -(-pixels // tile)
            for nc in range(1, units + 1):
                per = -(-units // nc)
                nc_eff = -(-units // per)
                if nc > 1 and nc_eff != nc:
                    continue  # the same split as a smaller nc
                tasks = nb_eff * nc_eff
                task = tile * (per * width * c_red + dw_taps * c_red) + per * width * c_red
                splits.append((-(-tasks // threads) * task, tasks, tile, per * width))
    shortest = min(s[0] for s in splits)
    near = [s for s in splits if s[0] <= (1 + slack) * shortest]
    _, _, tile, cblock = min(near, key=lambda s: (s[1], s[0]))
    return tile, cblock


# splits whose estimated critical path is within this fraction of the shortest count as equal
# (``_gemm_split``): N=1 layer 1 in 56 tiles of 224 pixels (0.4 % shorter on paper) ran 1.02x
# the time of 50 tiles of 252, and 49 tiles of 256 (1.6 % longer) 1.035x (one process)
SPLIT_SLACK = 0.01


def pointwise_nhwc(x2, pw, nopack, bias, out2, split, act):  # pragma: no cover - compiled
    """out2[r, c] = act(bias[c] + x2[r, :] @ pw[:, c]) for every pixel r.

    x2: (pixels, C_in) C-contiguous; pw: (C_in, C_out) C-contiguous (each task packs its
    panels: at N=1 a weight is read once, and packing it in a pass of its own cost a third more
    time on late layers); nopack: ``no_packed``; bias padded to a multiple of the micro-kernel's
    panel width; out2: (pixels, C_out); split: see ``gemm_split``.
    """
    block, cblock, kc = split
    rows = x2.shape[0]
    CO = out2.shape[1]
    nb = (rows + block - 1) // block
    nc = (CO + cblock - 1) // cblock
    for t in prange(nb * nc):
        cb, r0, r1, c0, c1 = gemm_task(t, nc, block, cblock, rows, CO)
        pk, at, part = gemm_scratch(kc, block, out2)
        # the rows of this thread's next task (prange hands out contiguous chunks), to prefetch
        # while the GEMM runs; none if the next task reuses these rows
        n0 = min(rows, r1)
        n1 = min(rows, n0 + block) if cb == nc - 1 else n0
        pf = address(x2) + n0 * x2.strides[0]
        pf_len = (n1 - n0) * x2.strides[0]
        gemm_tile(x2[r0:r1], False, r1 - r0, pw, nopack, bias, out2[r0:r1], c0, c1, act, False,
                  pk, at, part, pf, pf_len, False)  # fmt: skip


def pointwise_args(spec: ConvSpec, dtype: np.dtype, parallel: bool) -> Callable[..., tuple]:
    """``build(x, weights, biases, out)``: the arguments of pointwise_nhwc for a call of this
    signature (x and out NHWC, C-contiguous; see ``kernel``)."""
    rows, c_in, c_out = spec.pixels, spec.c_in, spec.c_out
    split = gemm_split(spec, c_in, 0, dtype.itemsize, parallel)
    nr = gemm_panel_width(dtype.itemsize)
    nopack = no_packed(dtype)
    act = int(spec.activation)
    once = packs_once(rows, split[0], c_in * c_out * dtype.itemsize, parallel)
    zeros = bias_vector(None, c_out, dtype, nr)  # (no bias: worked out here, not per call)

    def build(x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> tuple:
        w, panels = kernel_panels(weights[0], nopack, once, parallel, "pointwise_pw")
        b = zeros if biases[0] is None else bias_vector(biases[0], c_out, dtype, nr)
        return (x.reshape(rows, c_in), w, panels, b, out.reshape(rows, c_out), split, act)

    return build


POINTWISE: Kernel = kernel(pointwise_nhwc, pointwise_args)
