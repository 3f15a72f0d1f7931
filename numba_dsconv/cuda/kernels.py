"""The @cuda.jit kernels, built lazily by small cached factories.

Nothing here compiles at import: each factory returns a ``@cuda.jit`` kernel without an eager
signature, so importing works on a machine without a GPU or driver. Factories are keyed by what
is worth a compile-time constant:

* ``copy4d``: layout/contiguity/dtype conversion of any strided 4-D view (NCHW <-> NHWC).
* ``depthwise_kernel(KH, KW, SH, SW, dtype)``: one thread per DEPTHWISE_JB output pixels of a
  row and one channel, channel fastest (coalesced in NHWC), grid-stride loop over a 64-bit flat
  index.
* ``gemm_kernel(mode, KH, KW, SH, SW, dtype, tile)``: one tiled GEMM skeleton for the three
  ops that end in a matrix product. A block owns a tile of TP output pixels x TN output
  channels; for each chunk of TK reduction channels it first *produces* the A tile into shared
  memory, then multiplies it with the matching B tile (also staged in shared memory) into a
  register tile of RP x RN outputs per thread. The producer is what differs:

  - ``POINTWISE``: A[p, k] = x[p, k];
  - ``SEPARABLE``: A[p, k] = mid_act(dw_bias[k] + depthwise(x)[p, k]), computed right there:
    the intermediate lives only in shared memory, never in global memory (the fused kernel);
  - ``CONV2D``: A[p, (tap, c)] = padded x at that tap (implicit GEMM, B = w as (K*K*C, C_out)).

  Biases and activations are fused into the epilogue. ``KH == 0`` (and so on) selects the
  generic build, which reads the kernel size and stride from its arguments.
"""

from __future__ import annotations

from functools import cache

import numba
import numpy as np
from numba import cuda, int32, int64

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

    @cuda.jit
    def depthwise(x, d, bias, out, kh_, kw_, sh_, sw_, dh, dw, pt, pl, M, act):
        """out[n,i,j,cM+q] = act(bias + sum x[n, i*sh+m*dh-pt, j*sw+q'*dw-pl, c] d[m,q',cM+q]).

        One thread per (image, output row, block of JB output columns, output channel),
        channel fastest (coalesced in NHWC); grid-stride loop over a 64-bit flat index.
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
        total = int64(out.shape[0]) * OH * OWB * CM
        acc = cuda.local.array(JB, nbt)
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            cm = e % CM
            r = e // CM
            j0 = (r % OWB) * JB
            r = r // OWB
            i = r % OH
            n = r // OH
            c = cm // M
            b = bias[cm]
            for jj in range(JB):
                acc[jj] = b
            ih0 = i * sh - pt
            for m in range(kh):
                ih = ih0 + m * dh
                row_inside = ih >= 0 and ih < H
                for q in range(kw):
                    wv = d[m, q, cm]
                    for jj in range(JB):
                        iw = (j0 + jj) * sw - pl + q * dw
                        xv = zero  # the zero padding: 0 * weight, so NaN/Inf weights propagate
                        if row_inside and iw >= 0 and iw < W:
                            xv = x[n, ih, iw, c]
                        acc[jj] += xv * wv
            for jj in range(JB):
                if j0 + jj < OW:
                    out[n, i, j0 + jj, cm] = activate(acc[jj], act)

    return depthwise


@cache
def gemm_kernel(
    mode: int,
    KH: int,
    KW: int,
    SH: int,
    SW: int,
    dtype: np.dtype,
    tile: tuple[int, int, int, int, int],
):
    """The tiled GEMM kernel for ``mode``; ``tile`` = (TP, TN, TK, RP, RN)."""
    TP, TN, TK, RP, RN = tile
    if TP % RP or TN % RN:
        raise ValueError(f"CUDA tile {tile}: TP must be a multiple of RP and TN of RN")
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)
    activate = _activation(dt)
    TPT = TP // RP  # threads along pixels
    TNT = TN // RN  # threads along output channels
    NT = TPT * TNT  # threads per block

    @cuda.jit
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
        a_tile = cuda.shared.array((TP, TK), nbt)
        b_tile = cuda.shared.array((TK, TN), nbt)
        # the tile's pixels as (image, row, column), decomposed once per tile: the producer and
        # the epilogue would otherwise divide a 64-bit index by runtime sizes per element
        pix_n = cuda.shared.array(TP, int32)
        pix_i = cuda.shared.array(TP, int32)
        pix_j = cuda.shared.array(TP, int32)
        acc = cuda.local.array((RP, RN), nbt)
        tid = cuda.threadIdx.x
        tn = tid % TNT
        tp = tid // TNT
        n_ptiles = (P + TP - 1) // TP
        n_ctiles = (CO + TN - 1) // TN
        ntiles = n_ptiles * n_ctiles
        for t in range(int64(cuda.blockIdx.x), ntiles, int64(cuda.gridDim.x)):
            # channel tiles fastest: neighbouring blocks reuse the same input pixels from L2
            ct = t % n_ctiles
            p0 = (t // n_ctiles) * TP
            c0 = ct * TN
            cuda.syncthreads()  # the previous tile's epilogue is done with pix_*
            for e in range(tid, TP, NT):
                p = p0 + e
                n = -1  # past the last pixel
                i = 0
                j = 0
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
                # produce the A tile (TP pixels x TK reduction channels) into shared memory
                for e in range(tid, TP * TK, NT):
                    pp = e // TK  # TK is a compile-time constant: no division instruction
                    kk = e - pp * TK
                    k = k0 + kk
                    n = pix_n[pp]
                    v = zero
                    if n >= 0 and k < K:
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
                    a_tile[pp, kk] = v
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
                    for a in range(RP):
                        av = a_tile[tp + a * TPT, kk]
                        for bb in range(RN):
                            acc[a, bb] += av * b_tile[kk, tn + bb * TNT]
                cuda.syncthreads()  # the tiles are overwritten by the next chunk
            for a in range(RP):
                pp = tp + a * TPT
                n = pix_n[pp]
                if n >= 0:
                    i = pix_i[pp]
                    j = pix_j[pp]
                    for bb in range(RN):
                        co = c0 + tn + bb * TNT
                        if co < CO:
                            out[n, i, j, co] = activate(acc[a, bb] + bias[co], act)

    return gemm


# --------------------------------------------------------------------------------------------
# PTX: every shipped specialisation, with the argument types the backend launches it with


def _arr(dt: np.dtype, ndim: int, layout: str = "C"):
    return numba.types.Array(numba.from_dtype(dt), ndim, layout)


def ptx_cases(tile: tuple[int, int, int, int, int]):
    """(name, python function, signature) for every kernel build the backend can launch."""
    i64 = numba.types.int64
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        a4, a3, a2, a1 = _arr(dt, 4), _arr(dt, 3), _arr(dt, 2), _arr(dt, 1)
        # layout, contiguity and dtype conversions: any source to any destination layout
        for sdt in (np.dtype(np.float32), np.dtype(np.float64)):
            for sl in ("C", "A"):
                for dl in ("C", "A"):
                    sig = (_arr(sdt, 4, sl), _arr(dt, 4, dl))
                    yield (f"copy4d {sdt}[{sl}]->{dt}[{dl}]", copy4d().py_func, sig)
        for key in (*SPECIALISED, GENERIC):
            dw = depthwise_kernel(*key, dt)
            sig = (a4, a3, a1, a4) + (i64,) * 10
            yield (f"depthwise {key} {dt}", dw.py_func, sig)
            for mode in (SEPARABLE, CONV2D):
                g = gemm_kernel(mode, *key, dt, tile)
                sig = (a4, a3, a1, a2, a1, a4) + (i64,) * 11
                yield (f"{MODE_NAMES[mode]} {key} {dt}", g.py_func, sig)
        g = gemm_kernel(POINTWISE, *GENERIC, dt, tile)
        yield (f"pointwise {dt}", g.py_func, (a4, a3, a1, a2, a1, a4) + (i64,) * 11)
