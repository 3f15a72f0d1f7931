"""The @cuda.jit kernels, built lazily by small cached factories.

Nothing here compiles at import: each factory returns a ``@cuda.jit`` kernel without an eager
signature, so importing works on a machine without a GPU or driver. Factories are keyed by what
is worth a compile-time constant:

* ``copy4d``: layout/contiguity/dtype conversion of any strided 4-D view (NCHW <-> NHWC).
* ``depthwise_kernel(KH, KW, SH, SW, dtype)``: one thread per DEPTHWISE_JB output pixels of a
  row and one channel, channel fastest (coalesced in NHWC); a 2-D grid (a row's columns x
  channels, then rows) with grid-stride loops in 64 bits.
* ``gemm_kernel(mode, KH, KW, SH, SW, dtype, tile)``: one tiled GEMM skeleton for the three
  ops that end in a matrix product. A block owns a tile of TP output pixels x TN output
  channels; for each chunk of TK reduction channels it first *produces* the A tile into shared
  memory, then multiplies it with the matching B tile (also staged in shared memory) into a
  register tile of RP x RN outputs per thread. A thread's RP pixels and RN channels are
  consecutive in the (16-byte aligned) tiles, so each step of the inner product is two vector
  loads and RP * RN FMAs. The producer is what differs:

  - ``POINTWISE``: A[p, k] = x[p, k];
  - ``SEPARABLE``: A[p, k] = mid_act(dw_bias[k] + depthwise(x)[p, k]), computed right there:
    the intermediate lives only in shared memory, never in global memory (the fused kernel);
  - ``CONV2D``: A[p, (tap, c)] = padded x at that tap (implicit GEMM, B = w as (K*K*C, C_out)).

  Biases and activations are fused into the epilogue. ``KH == 0`` (and so on) selects the
  generic build, which reads the kernel size and stride from its arguments. The separable
  mode also has a halo-tiled build (see ``gemm_kernel``), and every GEMM build carries launch
  bounds that cap its registers (``launch_bounds``).
"""

from __future__ import annotations

from functools import cache

import numba
import numpy as np
from numba import cuda, int32, int64

from ._interop import SIMULATOR

POINTWISE, SEPARABLE, CONV2D = 0, 1, 2
MODE_NAMES = {POINTWISE: "pointwise", SEPARABLE: "separable", CONV2D: "conv2d"}

# The kernel sizes and strides that get a specialised build (taps unrolled); any other
# geometry runs the generic build (0, 0, 0, 0). Every entry is compiled to PTX in CI.
SPECIALISED: tuple[tuple[int, int, int, int], ...] = tuple(
    (k, k, s, s) for k in (3, 5, 7) for s in (1, 2)
)
GENERIC = (0, 0, 0, 0)


def specialisation(kh: int, kw: int, sh: int, sw: int) -> tuple[int, int, int, int]:
    key = (kh, kw, sh, sw)
    return key if key in SPECIALISED else GENERIC


@cache
def copy4d():
    @cuda.jit
    def copy4d_kernel(src, dst):
        """dst[i] = src[i] for 4-D arrays of one shape, any strides on either side; casts."""
        n1 = dst.shape[1]
        n2 = dst.shape[2]
        n3 = dst.shape[3]
        total = int64(dst.shape[0]) * n1 * n2 * n3
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            i3 = e % n3
            r = e // n3
            i2 = r % n2
            r = r // n2
            i1 = r % n1
            i0 = r // n1
            dst[i0, i1, i2, i3] = src[i0, i1, i2, i3]

    return copy4d_kernel


def _activation(dtype: np.dtype):
    zero = dtype.type(0)
    six = dtype.type(6)

    @cuda.jit(device=True, inline=True)
    def activate(v, code):
        """None (0) / relu (1) / relu6 (2); NaN is neither < 0 nor > 6, so it propagates."""
        if code != 0:
            if v < zero:
                v = zero
            elif code == 2 and v > six:
                v = six
        return v

    return activate


# Output pixels per thread along a row in the depthwise kernel: the weight of a tap is loaded
# once for all of them, and with stride 1 neighbouring pixels share input loads.
DEPTHWISE_JB = 4


@cache
def depthwise_kernel(KH: int, KW: int, SH: int, SW: int, dtype: np.dtype):
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    activate = _activation(dt)
    zero = dt.type(0)
    JB = DEPTHWISE_JB
    # input columns the JB outputs of a specialised build read in one kernel row (dilation 1):
    # loaded once into registers, each shared by up to KW taps
    WIN = (JB - 1) * SW + KW if KW != 0 else 1

    @cuda.jit
    def depthwise(x, d, bias, out, kh_, kw_, sh_, sw_, dh, dw, pt, pl, M, act):
        """out[n,i,j,cM+q] = act(bias + sum x[n, i*sh+m*dh-pt, j*sw+q'*dw-pl, c] d[m,q',cM+q]).

        One thread per (output row, block of JB output columns, output channel), channel
        fastest (coalesced in NHWC). Grid x covers a row's column blocks x channels (the
        channel and column of a thread are worked out once); grid y strides over the N * OH
        output rows, so the per-row index work is one division.
        """
        kh = KH if KH != 0 else kh_
        kw = KW if KW != 0 else kw_
        sh = SH if SH != 0 else sh_
        sw = SW if SW != 0 else sw_
        H = x.shape[1]
        W = x.shape[2]
        OH = out.shape[1]
        OW = out.shape[2]
        CM = out.shape[3]
        OWB = (OW + JB - 1) // JB
        per_row = int64(OWB) * CM
        rows = int64(out.shape[0]) * OH
        acc = cuda.local.array(JB, nbt)
        win = cuda.local.array(WIN, nbt)
        for ex in range(cuda.grid(1), per_row, cuda.gridsize(1)):
            cm = ex % CM
            j0 = (ex // CM) * JB
            c = cm // M if M != 1 else cm
            b = bias[cm]
            iw0 = j0 * sw - pl
            for r in range(int64(cuda.blockIdx.y), rows, int64(cuda.gridDim.y)):
                i = r % OH
                n = r // OH
                for jj in range(JB):
                    acc[jj] = b
                ih0 = i * sh - pt
                for m in range(kh):
                    ih = ih0 + m * dh
                    row_inside = ih >= 0 and ih < H
                    if KW != 0 and dw == 1:
                        # the row's input window, zero padding included (0 * weight, so
                        # NaN/Inf weights propagate), then KW x JB FMAs from registers
                        for t in range(WIN):
                            iw = iw0 + t
                            xv = zero
                            if row_inside and iw >= 0 and iw < W:
                                xv = x[n, ih, iw, c]
                            win[t] = xv
                        for q in range(KW):
                            wv = d[m, q, cm]
                            for jj in range(JB):
                                acc[jj] += win[jj * SW + q] * wv
                    else:
                        for q in range(kw):
                            wv = d[m, q, cm]
                            for jj in range(JB):
                                iw = iw0 + jj * sw + q * dw
                                xv = zero
                                if row_inside and iw >= 0 and iw < W:
                                    xv = x[n, ih, iw, c]
                                acc[jj] += xv * wv
                for jj in range(JB):
                    if j0 + jj < OW:
                        out[n, i, j0 + jj, cm] = activate(acc[jj], act)

    return depthwise


def halo_shape(tile: tuple[int, int, int, int, int]) -> tuple[int, int]:
    """The (rows, columns) of output pixels a halo-tiled block owns: TP pixels, near square."""
    tp = tile[0]
    th = 1 << ((tp.bit_length() - 1) // 2)
    while tp % th:
        th //= 2
    return th, tp // th


def shared_bytes(
    tile: tuple[int, int, int, int, int],
    itemsize: int,
    geo: tuple[int, int, int, int] = GENERIC,
    halo: tuple[int, int] = (0, 0),
) -> int:
    """Static shared memory of a gemm_kernel build (the A and B tiles, the pixel table, and for
    a halo build the input halo and the chunk's depthwise weights)."""
    tp, tn, tk, _, _ = tile
    kh, kw, sh, sw = geo
    th, tw = halo
    items = tk * (tp + 4) + tk * tn  # the A tile's rows are padded by 4 (see TPA)
    if th:
        items += ((th - 1) * sh + kh) * ((tw - 1) * sw + kw) * tk + kh * kw * tk
    return items * itemsize + 3 * tp * 4


# Static shared memory a block may declare (the CUDA limit without opt-in).
SHARED_LIMIT = 48 * 1024


def launch_bounds(threads: int, registers: int) -> tuple[int, int] | None:
    """(max threads per block, min resident blocks per multiprocessor) that hold a kernel of
    ``threads`` per block to at most ``registers`` per thread (64K registers per
    multiprocessor: 2 blocks of 256 threads at 128). None: no bounds (``registers`` <= 0).
    The shipped builds assemble without spills at 128 (the PTX tests check it)."""
    if registers <= 0:
        return None
    return (threads, max(1, 65536 // (registers * threads)))


def _jit_options(bounds: tuple[int, int] | None) -> dict:
    """cuda.jit keyword arguments; the simulator's jit takes no launch bounds."""
    return {} if bounds is None or SIMULATOR else {"launch_bounds": bounds}


@cache
def gemm_kernel(
    mode: int,
    KH: int,
    KW: int,
    SH: int,
    SW: int,
    dtype: np.dtype,
    tile: tuple[int, int, int, int, int],
    halo: tuple[int, int] = (0, 0),
    registers: int = 0,
):
    """The tiled GEMM kernel for ``mode``; ``tile`` = (TP, TN, TK, RP, RN); ``registers``: the
    per-thread register budget (see launch_bounds).

    ``halo`` = (TH, TW) != (0, 0) builds the halo-tiled fused separable kernel: a block owns a
    TH x TW rectangle of output pixels of one image (TH * TW == TP), stages the input it needs
    ((TH-1)*SH+KH rows x (TW-1)*SW+KW columns x TK channels, zero padding included) and the
    chunk's depthwise weights in shared memory with coalesced channel-fastest loads, and
    computes the depthwise tile from there: every input element is read from global memory
    once per chunk instead of once per tap. Only for specialised geometries with dilation 1
    (the halo's size is a compile-time constant).
    """
    TP, TN, TK, RP, RN = tile
    if TP % RP or TN % RN:
        raise ValueError(f"CUDA tile {tile}: TP must be a multiple of RP and TN of RN")
    TH, TW = halo
    HALO = TH > 0
    dt = np.dtype(dtype)
    if HALO:
        if mode != SEPARABLE or 0 in (KH, KW, SH, SW) or TH * TW != TP:
            raise ValueError(
                f"halo tile {halo}: only for specialised separable builds with TH * TW == TP"
            )
        if shared_bytes(tile, dt.itemsize, (KH, KW, SH, SW), halo) > SHARED_LIMIT:
            raise ValueError(f"halo tile {halo} for {(KH, KW, SH, SW)} exceeds shared memory")
    HH = (TH - 1) * SH + KH if HALO else 1  # halo rows
    HW = (TW - 1) * SW + KW if HALO else 1  # halo columns
    HSIZE = HH * HW * TK
    TAPS = KH * KW if HALO else 1
    DWSIZE = TAPS * TK  # shared array shapes must be constants, not expressions
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)
    activate = _activation(dt)
    TPT = TP // RP  # threads along pixels
    # 16-byte aligned tiles, so a thread's consecutive tile values load as vectors (the
    # simulator takes no alignment)
    ALIGN = None if SIMULATOR else 16
    TPA = TP + 4  # A-tile row length: 16-byte rows, and the producer's writes spread over banks
    TNT = TN // RN  # threads along output channels
    NT = TPT * TNT  # threads per block

    @cuda.jit(**_jit_options(launch_bounds(NT, registers)))
    def gemm(x, d, dw_bias, b, bias, out, kh_, kw_, sh_, sw_, dh, dw, pt, pl, M, mid_act, act):
        kh = KH if KH != 0 else kh_
        kw = KW if KW != 0 else kw_
        sh = SH if SH != 0 else sh_
        sw = SW if SW != 0 else sw_
        H = x.shape[1]
        W = x.shape[2]
        C = x.shape[3]
        OH = out.shape[1]
        OW = out.shape[2]
        CO = out.shape[3]
        K = b.shape[0]
        P = int64(out.shape[0]) * OH * OW
        a_tile = cuda.shared.array((TK, TPA), nbt, alignment=ALIGN)  # [channel, pixel]
        halo_t = cuda.shared.array(HSIZE, nbt)  # [halo row, halo column, channel]
        dw_t = cuda.shared.array(DWSIZE, nbt)  # [tap, channel]
        b_tile = cuda.shared.array((TK, TN), nbt, alignment=ALIGN)
        # the tile's pixels as (image, row, column), decomposed once per tile: the producer and
        # the epilogue would otherwise divide a 64-bit index by runtime sizes per element
        pix_n = cuda.shared.array(TP, int32)
        pix_i = cuda.shared.array(TP, int32)
        pix_j = cuda.shared.array(TP, int32)
        acc = cuda.local.array((RP, RN), nbt)
        av = cuda.local.array(RP, nbt)
        bv = cuda.local.array(RN, nbt)
        tid = cuda.threadIdx.x
        # (tid & (TNT - 1), not tid % TNT, where TNT is a power of two: LLVM then knows
        # tn >= 0, drops the negative-index wraparound code, and merges a thread's RN
        # consecutive b_tile loads into one vector load, as it does for the RP a_tile loads)
        tn = tid & (TNT - 1) if TNT & (TNT - 1) == 0 else tid % TNT
        tp = tid // TNT
        tiles_w = (OW + TW - 1) // TW if HALO else 1
        tiles_h = (OH + TH - 1) // TH if HALO else 1
        if HALO:
            n_ptiles = int64(out.shape[0]) * tiles_h * tiles_w
        else:
            n_ptiles = (P + TP - 1) // TP
        n_ctiles = (CO + TN - 1) // TN
        ntiles = n_ptiles * n_ctiles
        for t in range(int64(cuda.blockIdx.x), ntiles, int64(cuda.gridDim.x)):
            # channel tiles fastest: neighbouring blocks reuse the same input pixels from L2
            ct = t % n_ctiles
            ptile = t // n_ctiles
            c0 = ct * TN
            cuda.syncthreads()  # the previous tile's epilogue is done with pix_*
            # halo tiles: image n0, output rows i0.., columns j0.. (unused by flat tiles)
            n0 = ptile // (tiles_h * tiles_w)
            i0 = (ptile // tiles_w) % tiles_h * TH
            j0 = ptile % tiles_w * TW
            for e in range(tid, TP, NT):
                n = -1  # past the last pixel
                i = 0
                j = 0
                if HALO:
                    i = i0 + e // TW
                    j = j0 + e % TW
                    if i < OH and j < OW:
                        n = n0
                else:
                    p = ptile * TP + e
                    if p < P:
                        j = p % OW
                        r = p // OW
                        i = r % OH
                        n = r // OH
                pix_n[e] = n
                pix_i[e] = i
                pix_j[e] = j
            for a in range(RP):
                for bb in range(RN):
                    acc[a, bb] = zero
            cuda.syncthreads()
            for k0 in range(0, K, TK):
                if HALO:
                    # stage the input halo and the chunk's depthwise weights: channel fastest,
                    # so a warp reads TK neighbouring channels of consecutive pixels. (The
                    # tile's origin is recomputed: fewer registers live across the chunk loop.)
                    ptile = t // n_ctiles
                    n0 = ptile // (tiles_h * tiles_w)
                    ih0 = (ptile // tiles_w) % tiles_h * (TH * SH) - pt
                    iw0 = ptile % tiles_w * (TW * SW) - pl
                    for e in range(tid, HSIZE, NT):
                        hp = e // TK
                        kk = e - hp * TK
                        hr = hp // HW
                        ih = ih0 + hr
                        iw = iw0 + (hp - hr * HW)
                        k = k0 + kk
                        v = zero  # zero padding: 0 * weight, as the formula says
                        if k < K and ih >= 0 and ih < H and iw >= 0 and iw < W:
                            v = x[n0, ih, iw, k // M if M != 1 else k]
                        halo_t[e] = v
                    for e in range(tid, DWSIZE, NT):
                        tap = e // TK
                        kk = e - tap * TK
                        k = k0 + kk
                        w = zero
                        if k < K:
                            w = d[tap // KW, tap - (tap // KW) * KW, k]
                        dw_t[e] = w
                    cuda.syncthreads()
                # produce the A tile (TP pixels x TK reduction channels) into shared memory
                for e in range(tid, TP * TK, NT):
                    pp = e // TK  # TK is a compile-time constant: no division instruction
                    kk = e - pp * TK
                    k = k0 + kk
                    n = pix_n[pp]
                    v = zero
                    if HALO:
                        if n >= 0 and k < K:
                            row = pp // TW  # the pixel's row and column in the tile
                            base = (row * SH * HW + (pp - row * TW) * SW) * TK + kk
                            v = dw_bias[k]
                            for m in range(KH):
                                for q in range(KW):
                                    tap = m * KW + q
                                    v += halo_t[base + (m * HW + q) * TK] * dw_t[tap * TK + kk]
                            v = activate(v, mid_act)
                    elif n >= 0 and k < K:
                        i = pix_i[pp]
                        j = pix_j[pp]
                        if mode == POINTWISE:
                            v = x[n, i, j, k]
                        elif mode == SEPARABLE:
                            c = k // M
                            v = dw_bias[k]
                            ih0 = i * sh - pt
                            iw0 = j * sw - pl
                            for m in range(kh):
                                ih = ih0 + m * dh
                                row_inside = ih >= 0 and ih < H
                                for q in range(kw):
                                    iw = iw0 + q * dw
                                    xv = zero  # zero padding: 0 * weight, as the formula says
                                    if row_inside and iw >= 0 and iw < W:
                                        xv = x[n, ih, iw, c]
                                    v += xv * d[m, q, k]
                            v = activate(v, mid_act)
                        else:
                            tap = k // C
                            c = k - tap * C
                            m = tap // kw
                            q = tap - m * kw
                            ih = i * sh - pt + m * dh
                            iw = j * sw - pl + q * dw
                            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                                v = x[n, ih, iw, c]
                    a_tile[kk, pp] = v
                # stage the B tile (TK x TN), coalesced along output channels
                for e in range(tid, TK * TN, NT):
                    kk = e // TN
                    cc = e - kk * TN
                    k = k0 + kk
                    co = c0 + cc
                    w = zero
                    if k < K and co < CO:
                        w = b[k, co]
                    b_tile[kk, cc] = w
                cuda.syncthreads()
                for kk in range(TK):
                    # a thread's RP pixels and RN channels are contiguous: two vector loads
                    for a in range(RP):
                        av[a] = a_tile[kk, tp * RP + a]
                    for bb in range(RN):
                        bv[bb] = b_tile[kk, tn * RN + bb]
                    for a in range(RP):
                        for bb in range(RN):
                            acc[a, bb] += av[a] * bv[bb]
                cuda.syncthreads()  # the tiles are overwritten by the next chunk
            for a in range(RP):
                pp = tp * RP + a
                n = pix_n[pp]
                if n >= 0:
                    i = pix_i[pp]
                    j = pix_j[pp]
                    for bb in range(RN):
                        co = c0 + tn * RN + bb
                        if co < CO:
                            out[n, i, j, co] = activate(acc[a, bb] + bias[co], act)

    return gemm


# --------------------------------------------------------------------------------------------
# PTX: every shipped specialisation, with the argument types the backend launches it with


def _arr(dt: np.dtype, ndim: int, layout: str = "C"):
    return numba.types.Array(numba.from_dtype(dt), ndim, layout)


def halo_possible(
    geo: tuple[int, int, int, int], dtype: np.dtype, tile: tuple[int, int, int, int, int]
) -> bool:
    """Whether a halo build exists for this specialisation: float32 (in float64 the halo
    builds spill registers at the 128-register budget) and its shared memory fits."""
    if geo == GENERIC or np.dtype(dtype) != np.float32:
        return False
    return shared_bytes(tile, np.dtype(dtype).itemsize, geo, halo_shape(tile)) <= SHARED_LIMIT


def ptx_cases(tile: tuple[int, int, int, int, int], registers: int):
    """(name, python function, signature, compile_ptx options) for every kernel build the
    backend can launch with this tile and register budget."""
    i64 = numba.types.int64
    bounds = launch_bounds((tile[0] // tile[3]) * (tile[1] // tile[4]), registers)
    gopt = {} if bounds is None else {"launch_bounds": bounds}
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        a4, a3, a2, a1 = _arr(dt, 4), _arr(dt, 3), _arr(dt, 2), _arr(dt, 1)
        gsig = (a4, a3, a1, a2, a1, a4) + (i64,) * 11
        # layout, contiguity and dtype conversions: any source to any destination layout
        for sdt in (np.dtype(np.float32), np.dtype(np.float64)):
            for sl in ("C", "A"):
                for dl in ("C", "A"):
                    sig = (_arr(sdt, 4, sl), _arr(dt, 4, dl))
                    yield (f"copy4d {sdt}[{sl}]->{dt}[{dl}]", copy4d().py_func, sig, {})
        for key in (*SPECIALISED, GENERIC):
            dw = depthwise_kernel(*key, dt)
            sig = (a4, a3, a1, a4) + (i64,) * 10
            yield (f"depthwise {key} {dt}", dw.py_func, sig, {})
            for mode in (SEPARABLE, CONV2D):
                g = gemm_kernel(mode, *key, dt, tile, (0, 0), registers)
                yield (f"{MODE_NAMES[mode]} {key} {dt}", g.py_func, gsig, gopt)
            if halo_possible(key, dt, tile):
                halo = halo_shape(tile)
                g = gemm_kernel(SEPARABLE, *key, dt, tile, halo, registers)
                yield (f"separable halo {key} {dt}", g.py_func, gsig, gopt)
        g = gemm_kernel(POINTWISE, *GENERIC, dt, tile, (0, 0), registers)
        yield (f"pointwise {dt}", g.py_func, gsig, gopt)
