"""The backward kernels on the GPU: the gradients of every operation, deterministic (no atomics:
every sum runs in a fixed order, partial sums are added in a fixed order by ``combine``).

Separable (and its two halves):

- ``pw_grad``: d pw = A^T gz and d bias = colsum(gz) as a tiled GEMM reducing over pixels,
  the pixels split into S ranges (S from the problem's size alone) whose partial sums
  ``combine`` adds in order. The A tile is recomputed from x by the forward's producer (the
  depthwise result plus dw_bias, through the mid activation; x itself for pointwise), gz is
  grad masked by the final activation (read from the forward output or a bool mask).
- then band by band (runs of output rows, the band's size bounded by
  _config.CUDA_BACKWARD_BAND_BYTES): ``gm`` = (gz pw^T) masked by the mid activation (A
  recomputed) into a band-sized buffer (the pointwise op writes dx itself instead), then
  ``dx_band`` gathers each input pixel's taps from the band into dx (read, add, write: the
  bands run one after another, each input element is one thread's), and ``dw_band`` reduces
  x * gm (and gm, for d dw_bias) over the band's pixels in a fixed order into per-band
  partial sums. The intermediate exists only a band at a time; the depthwise op's gm is grad
  itself (masked).

Standard convolution: ``conv2d_dx`` (a gather per input element), ``conv2d_dw`` (split pixel
ranges, partial sums), the bias through ``colsum``.

Every kernel grid-strides in 64 bits; tiles and block sizes come from _config (tests patch them
small so the simulator runs several blocks).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numba
import numpy as np
from numba import cuda, int64

from .. import _config
from .._spec import ConvSpec
from ._jit import NO_ACTIVATION, RELU6, activation, device_function
from .pointwise import pointwise_value
from .separable import separable_value

# how the final activation's mask is read: none (no activation), from the forward output, from
# a bool mask
Y_NONE, Y_OUTPUT, Y_MASK = 0, 1, 2


@cache
def _passes(dtype: np.dtype):
    zero = np.dtype(dtype).type(0)
    six = np.dtype(dtype).type(6)

    @device_function
    def passes(v, code):
        """act'(v) as a bool from the activation's input (or output) v; NaN: False."""
        if code == NO_ACTIVATION:
            return True
        if code == RELU6:
            return v > zero and v < six
        return v > zero

    return passes


@cache
def _gz(dtype: np.dtype, ymode: int):
    """gz = grad * act'(z) at (n, i, j, co), the mask read as ``ymode`` says."""
    zero = np.dtype(dtype).type(0)
    passes = _passes(dtype)

    @device_function
    def gz(g, ysrc, n, i, j, co, act):
        v = g[n, i, j, co]
        if ymode == Y_OUTPUT:
            if not passes(ysrc[n, i, j, co], act):
                v = zero
        elif ymode == Y_MASK:
            if not ysrc[n, i, j, co]:
                v = zero
        return v

    return gz


# --------------------------------------------------------------------------------------------
# d pw and d bias: a GEMM reducing over pixels, split into ranges


@cache
def pw_grad_kernel(dtype: np.dtype, has_dw: bool, ymode: int, tile: tuple[int, int, int, int, int]):
    """part[s, cm, co] = sum over split s's pixels of A[p, cm] * gz[p, co]; bpart[s, co] the
    split's sum of gz (blocks of the first cm tile). ``tile``: (TM cm, TN co, TKP pixels per
    chunk, RM, RN outputs per thread)."""
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)
    TM, TN, TKP, RM, RN = tile
    TMT, TNT = TM // RM, TN // RN
    NT = TMT * TNT
    value = separable_value(dt) if has_dw else pointwise_value(dt)
    gz_at = _gz(dt, ymode)
    activate_mid = activation(dt)

    @cuda.jit
    def pw_grad(x, dwk, dw_bias, g, ysrc, part, bpart, geo, mid_act, act):
        S = part.shape[0]
        CM = part.shape[1]
        CO = part.shape[2]
        OH = g.shape[1]
        OW = g.shape[2]
        P = int64(g.shape[0]) * OH * OW
        per = (P + S - 1) // S
        a_t = cuda.shared.array((TKP, TM), nbt)
        z_t = cuda.shared.array((TKP, TN), nbt)
        acc = cuda.local.array((RM, RN), nbt)
        bacc = cuda.local.array(RN, nbt)
        tid = cuda.threadIdx.x
        tn = tid % TNT
        tm = tid // TNT
        n_mt = (CM + TM - 1) // TM
        n_nt = (CO + TN - 1) // TN
        for t in range(int64(cuda.blockIdx.x), n_mt * n_nt * S, int64(cuda.gridDim.x)):
            s = t // (n_mt * n_nt)
            rem = t - s * (n_mt * n_nt)
            m0 = (rem // n_nt) * TM
            c0 = (rem % n_nt) * TN
            p_lo = s * per
            p_hi = min(P, p_lo + per)
            for a in range(RM):
                for b in range(RN):
                    acc[a, b] = zero
            for b in range(RN):
                bacc[b] = zero
            for p0 in range(p_lo, p_hi, TKP):
                cuda.syncthreads()
                for e in range(tid, TKP * TM, NT):
                    pp = e // TM
                    mm = e - pp * TM
                    p = p0 + pp
                    cm = m0 + mm
                    v = zero
                    if p < p_hi and cm < CM:
                        j = p % OW
                        r = p // OW
                        v = value(x, dwk, dw_bias, x, x, r // OH, r % OH, j, 0, cm, 0, geo)
                        if has_dw:
                            v = activate_mid(v, mid_act)
                    a_t[pp, mm] = v
                for e in range(tid, TKP * TN, NT):
                    pp = e // TN
                    cc = e - pp * TN
                    p = p0 + pp
                    co = c0 + cc
                    v = zero
                    if p < p_hi and co < CO:
                        j = p % OW
                        r = p // OW
                        v = gz_at(g, ysrc, r // OH, r % OH, j, co, act)
                    z_t[pp, cc] = v
                cuda.syncthreads()
                for pp in range(TKP):
                    for a in range(RM):
                        av = a_t[pp, tm * RM + a]
                        for b in range(RN):
                            acc[a, b] += av * z_t[pp, tn * RN + b]
                    if tm == 0:
                        for b in range(RN):
                            bacc[b] += z_t[pp, tn * RN + b]
            for a in range(RM):
                cm = m0 + tm * RM + a
                for b in range(RN):
                    co = c0 + tn * RN + b
                    if cm < CM and co < CO:
                        part[s, cm, co] = acc[a, b]
            if m0 == 0 and tm == 0:
                for b in range(RN):
                    co = c0 + tn * RN + b
                    if co < CO:
                        bpart[s, co] = bacc[b]
            cuda.syncthreads()

    return pw_grad


# --------------------------------------------------------------------------------------------
# gm = (gz pw^T) * mid_act'(A), a band of pixels at a time


@cache
def gm_kernel(dtype: np.dtype, has_dw: bool, ymode: int, tile: tuple[int, int, int, int, int]):
    """out[p - p_lo, cm] = mask(A[p, cm]) * sum_co gz[p, co] pw[cm, co] for p_lo <= p < p_hi
    (has_dw: mask from the mid activation of A recomputed; else no mask). ``tile``: (TP
    pixels, TM cm, TK co per chunk, RP, RM)."""
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)
    TP, TM, TK, RP, RM = tile
    TMT = TM // RM
    NT = (TP // RP) * TMT
    value = separable_value(dt)
    passes = _passes(dt)
    gz_at = _gz(dt, ymode)

    @cuda.jit
    def gm(x, dwk, dw_bias, g, ysrc, pw, out, p_lo, p_hi, geo, mid_act, act):
        CM = pw.shape[0]
        CO = pw.shape[1]
        OH = g.shape[1]
        OW = g.shape[2]
        z_t = cuda.shared.array((TK, TP), nbt)  # [co, pixel]
        w_t = cuda.shared.array((TK, TM), nbt)  # [co, cm]
        acc = cuda.local.array((RP, RM), nbt)
        tid = cuda.threadIdx.x
        tm = tid % TMT
        tp = tid // TMT
        n_pt = (p_hi - p_lo + TP - 1) // TP
        n_mt = (CM + TM - 1) // TM
        for t in range(int64(cuda.blockIdx.x), n_pt * n_mt, int64(cuda.gridDim.x)):
            p0 = p_lo + (t // n_mt) * TP
            m0 = (t % n_mt) * TM
            for a in range(RP):
                for b in range(RM):
                    acc[a, b] = zero
            for k0 in range(0, CO, TK):
                cuda.syncthreads()
                for e in range(tid, TK * TP, NT):
                    pp = e // TK
                    kk = e - pp * TK
                    p = p0 + pp
                    co = k0 + kk
                    v = zero
                    if p < p_hi and co < CO:
                        j = p % OW
                        r = p // OW
                        v = gz_at(g, ysrc, r // OH, r % OH, j, co, act)
                    z_t[kk, pp] = v
                for e in range(tid, TK * TM, NT):
                    mm = e // TK
                    kk = e - mm * TK
                    co = k0 + kk
                    cm = m0 + mm
                    w = zero
                    if co < CO and cm < CM:
                        w = pw[cm, co]
                    w_t[kk, mm] = w
                cuda.syncthreads()
                for kk in range(TK):
                    for a in range(RP):
                        zv = z_t[kk, tp * RP + a]
                        for b in range(RM):
                            acc[a, b] += zv * w_t[kk, tm * RM + b]
            for a in range(RP):
                p = p0 + tp * RP + a
                if p < p_hi:
                    j = p % OW
                    r = p // OW
                    for b in range(RM):
                        cm = m0 + tm * RM + b
                        if cm < CM:
                            v = acc[a, b]
                            if has_dw and mid_act != NO_ACTIVATION:
                                pre = value(
                                    x, dwk, dw_bias, x, x, r // OH, r % OH, j, 0, cm, 0, geo
                                )
                                if not passes(pre, mid_act):
                                    v = zero
                            out[p - p_lo, cm] = v
            cuda.syncthreads()

    return gm


@cache
def dw_gm_kernel(dtype: np.dtype, ymode: int):
    """The depthwise op's gm over a band: grad masked by its activation (read as ``ymode``
    says, or recomputed from x when ``ymode`` is Y_NONE and an activation is set)."""
    dt = np.dtype(dtype)
    zero = dt.type(0)
    passes = _passes(dt)
    gz_at = _gz(dt, ymode)
    value = separable_value(dt)

    @cuda.jit
    def dw_gm(x, dwk, dw_bias, g, ysrc, out, p_lo, p_hi, geo, act):
        OH = g.shape[1]
        OW = g.shape[2]
        CM = g.shape[3]
        total = (p_hi - p_lo) * CM
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            cm = e % CM
            p = p_lo + e // CM
            j = p % OW
            r = p // OW
            n = r // OH
            i = r % OH
            v = gz_at(g, ysrc, n, i, j, cm, act)
            if ymode == Y_NONE and act != NO_ACTIVATION:
                if not passes(value(x, dwk, dw_bias, x, x, n, i, j, 0, cm, 0, geo), act):
                    v = zero
            out[p - p_lo, cm] = v

    return dw_gm


# --------------------------------------------------------------------------------------------
# the depthwise backward of a band of gm


@cache
def dx_band_kernel(dtype: np.dtype):
    """dx[n, r, s, c] += the taps of output pixels p_lo..p_hi-1 that read input pixel (r, s),
    for the input rows ri_lo..ri_hi-1 (flattened over images): one thread per element."""
    dt = np.dtype(dtype)
    zero = dt.type(0)

    @cuda.jit
    def dx_band(gm, dwk, dx, p_lo, p_hi, ri_lo, ri_hi, OH, OW, geo):
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, M = geo
        H = dx.shape[1]
        W = dx.shape[2]
        C = dx.shape[3]
        total = (ri_hi - ri_lo) * W * C
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            c = e % C
            rest = e // C
            s = rest % W
            row = ri_lo + rest // W
            n = row // H
            r = row % H
            acc = zero
            hit = False
            for m in range(kh):
                a = r + pt - m * dil_h
                if a < 0 or a % sh != 0 or a // sh >= OH:
                    continue
                i = a // sh
                for q in range(kw):
                    b = s + pl - q * dil_w
                    if b < 0 or b % sw != 0 or b // sw >= OW:
                        continue
                    p = (n * OH + i) * OW + b // sw
                    if p < p_lo or p >= p_hi:
                        continue
                    hit = True
                    for u in range(M):
                        acc += gm[p - p_lo, c * M + u] * dwk[m, q, c * M + u]
            if hit:
                dx[n, r, s, c] += acc

    return dx_band


@cache
def dw_band_kernel(dtype: np.dtype, lanes: int, CW: int):
    """part[band, tap - first_tap, cm] = sum over the band's pixels of x[tap's input pixel] *
    gm (tap < KH*KW; 0 where the tap reads padding), and for tap KH*KW the sum of gm: one block
    per (tap, CW channels) for the taps from ``first_tap`` (KH*KW: the sums of gm alone),
    ``lanes`` pixel lanes per channel, summed in lane order."""
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)

    @cuda.jit
    def dw_band(x, gm, part, band, first_tap, p_lo, p_hi, OH, OW, geo):
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, M = geo
        H = x.shape[1]
        W = x.shape[2]
        CM = gm.shape[1]
        red = cuda.shared.array((lanes, CW), nbt)
        tid = cuda.threadIdx.x
        lane = tid // CW
        cc = tid % CW
        n_ct = (CM + CW - 1) // CW
        taps = kh * kw
        n_t = (taps + 1 - first_tap) * n_ct
        for t in range(int64(cuda.blockIdx.x), n_t, int64(cuda.gridDim.x)):
            tap = first_tap + t // n_ct
            cm = (t % n_ct) * CW + cc
            m = tap // kw if tap < taps else 0
            q = tap % kw if tap < taps else 0
            acc = zero
            if cm < CM:
                for p in range(p_lo + lane, p_hi, lanes):
                    gv = gm[p - p_lo, cm]
                    if tap == taps:
                        acc += gv
                        continue
                    j = p % OW
                    r = p // OW
                    n = r // OH
                    ih = (r % OH) * sh - pt + m * dil_h
                    iw = j * sw - pl + q * dil_w
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        acc += x[n, ih, iw, cm // M] * gv
            red[lane, cc] = acc
            cuda.syncthreads()
            if lane == 0 and cm < CM:
                s = red[0, cc]
                for u in range(1, lanes):
                    s += red[u, cc]
                part[band, tap - first_tap, cm] = s
            cuda.syncthreads()

    return dw_band


# --------------------------------------------------------------------------------------------
# the standard convolution, sums, zero fill


@cache
def conv2d_dx_kernel(dtype: np.dtype, ymode: int):
    dt = np.dtype(dtype)
    zero = dt.type(0)
    gz_at = _gz(dt, ymode)

    @cuda.jit
    def conv2d_dx(g, ysrc, w, dx, geo, act):
        """dx[n, r, s, c] = sum over the taps that read (r, s) of gy[n, i, j, :] . w[m, q, c, :]."""
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, _ = geo
        N = dx.shape[0]
        H = dx.shape[1]
        W = dx.shape[2]
        C = dx.shape[3]
        OH = g.shape[1]
        OW = g.shape[2]
        CO = g.shape[3]
        total = int64(N) * H * W * C
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            c = e % C
            rest = e // C
            s = rest % W
            rest = rest // W
            r = rest % H
            n = rest // H
            acc = zero
            for m in range(kh):
                a = r + pt - m * dil_h
                if a < 0 or a % sh != 0 or a // sh >= OH:
                    continue
                for q in range(kw):
                    b = s + pl - q * dil_w
                    if b < 0 or b % sw != 0 or b // sw >= OW:
                        continue
                    for o in range(CO):
                        acc += gz_at(g, ysrc, n, a // sh, b // sw, o, act) * w[m, q, c, o]
            dx[n, r, s, c] = acc

    return conv2d_dx


@cache
def conv2d_dw_kernel(dtype: np.dtype, ymode: int):
    dt = np.dtype(dtype)
    zero = dt.type(0)
    gz_at = _gz(dt, ymode)

    @cuda.jit
    def conv2d_dw(x, g, ysrc, part, geo, act):
        """part[s, m, q, c, o] = sum over split s's pixels of x[tap's pixel, c] * gy[p, o]."""
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, _ = geo
        S = part.shape[0]
        C = part.shape[3]
        CO = part.shape[4]
        H = x.shape[1]
        W = x.shape[2]
        OH = g.shape[1]
        OW = g.shape[2]
        P = int64(g.shape[0]) * OH * OW
        per = (P + S - 1) // S
        total = int64(S) * kh * kw * C * CO
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            o = e % CO
            rest = e // CO
            c = rest % C
            rest = rest // C
            q = rest % kw
            rest = rest // kw
            m = rest % kh
            s = rest // kh
            acc = zero
            for p in range(s * per, min(P, (s + 1) * per)):
                j = p % OW
                r = p // OW
                n = r // OH
                ih = (r % OH) * sh - pt + m * dil_h
                iw = j * sw - pl + q * dil_w
                if ih >= 0 and ih < H and iw >= 0 and iw < W:
                    acc += x[n, ih, iw, c] * gz_at(g, ysrc, n, r % OH, j, o, act)
            part[s, m, q, c, o] = acc

    return conv2d_dw


@cache
def colsum_kernel(dtype: np.dtype, ymode: int):
    dt = np.dtype(dtype)
    zero = dt.type(0)
    gz_at = _gz(dt, ymode)

    @cuda.jit
    def colsum(g, ysrc, part, act):
        """part[s, o] = sum over split s's pixels of gz[p, o]."""
        S = part.shape[0]
        OH = g.shape[1]
        OW = g.shape[2]
        CO = g.shape[3]
        P = int64(g.shape[0]) * OH * OW
        per = (P + S - 1) // S
        for e in range(cuda.grid(1), int64(S) * CO, cuda.gridsize(1)):
            o = e % CO
            s = e // CO
            acc = zero
            for p in range(s * per, min(P, (s + 1) * per)):
                j = p % OW
                r = p // OW
                acc += gz_at(g, ysrc, r // OH, r % OH, j, o, act)
            part[s, o] = acc

    return colsum


@cache
def combine_kernel():
    @cuda.jit
    def combine(part, out):
        """out[e] = part[0, e] + part[1, e] + ... in order (part: (S, E), out: (E,))."""
        S = part.shape[0]
        for e in range(cuda.grid(1), part.shape[1], cuda.gridsize(1)):
            acc = part[0, e]
            for s in range(1, S):
                acc += part[s, e]
            out[e] = acc

    return combine


@cache
def fill_kernel():
    @cuda.jit
    def fill(a, value):
        """a[...] = value for a C-contiguous 1-D view."""
        for e in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            a[e] = value

    return fill


# --------------------------------------------------------------------------------------------
# the plan of a call and the launches (run by CudaBackend.run_grad)


def splits(pixels: int) -> int:
    """Pixel ranges of the reductions over pixels: from the problem alone (the bits do not
    depend on the GPU), each about _config.CUDA_BACKWARD_SPLIT_PIXELS pixels, at most 256."""
    return max(1, min(256, -(-pixels // _config.CUDA_BACKWARD_SPLIT_PIXELS)))


def bands(spec: ConvSpec, itemsize: int) -> int:
    """Output-row bands of the gm buffer: each within _config.CUDA_BACKWARD_BAND_BYTES."""
    rows = spec.n * spec.out_h
    per_row = spec.out_w * spec.c_mid * itemsize
    rows_per = max(1, min(rows, _config.CUDA_BACKWARD_BAND_BYTES // max(1, per_row)))
    return -(-rows // rows_per)


def blocks_for(items: int) -> int:
    return max(1, min(math.ceil(items / _config.CUDA_THREADS), _config.CUDA_MAX_BLOCKS))


class Launcher:
    """The launches of one backward call on one stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def one_d(self, kern: Any, items: int, *args: Any) -> None:
        kern[blocks_for(items), _config.CUDA_THREADS, self.stream](*args)

    def tiled(self, kern: Any, tiles: int, threads: int, *args: Any) -> None:
        blocks = max(1, min(tiles, _config.CUDA_MAX_BLOCKS))
        kern[blocks, threads, self.stream](*args)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        a = cuda.device_array(shape, dtype=dtype, stream=self.stream)
        if a.size:
            flat = a.reshape(a.size)
            self.one_d(fill_kernel(), a.size, flat, dtype.type(0))
        return a

    def combine(self, part: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """The partial sums (S, ...) added in order, as a new (shape) array."""
        s = part.shape[0]
        flat = part.reshape(s, part.size // s)
        out = cuda.device_array(flat.shape[1], dtype=dtype, stream=self.stream)
        self.one_d(combine_kernel(), flat.shape[1], flat, out)
        return out.reshape(shape)


def gemm_grads(spec: ConvSpec, dt: np.dtype, launch: Launcher, x, g, ysrc, ymode, dwk, dw_bias,
               pw, need: dict[str, bool]) -> dict[str, Any]:  # fmt: skip
    """The separable / depthwise / pointwise gradients ``need`` asks for (slots as in
    grad.SLOTS), device arrays: x, g, ysrc NHWC C-contiguous; dwk (KH,KW,C*M); pw (C*M, C_out)
    C-contiguous (placeholders where the op has no such stage)."""
    op = spec.op
    has_dw, has_pw = op != "pointwise", op != "depthwise"
    cm, co = spec.c_mid, spec.c_out
    geo = spec.geometry
    mid_act = int(spec.mid_activation) if has_pw else int(spec.activation)
    act = int(spec.activation)
    pixels = spec.pixels
    found: dict[str, Any] = {}
    tile = tuple(_config.CUDA_BACKWARD_TILE)
    tm, tn, _, rm, rn = tile
    threads = (tm // rm) * (tn // rn)
    if has_pw and need["b"] and not need["pw"]:  # the bias alone: no GEMM
        found["b"] = colsum_grads(dt, launch, g, ysrc, ymode, act, splits(pixels))
    if has_pw and need["pw"]:
        s = splits(pixels)
        part = cuda.device_array((s, cm, co), dtype=dt, stream=launch.stream)
        bpart = cuda.device_array((s, co), dtype=dt, stream=launch.stream)
        kern = pw_grad_kernel(dt, has_dw, ymode, tile)
        tiles = -(-cm // tm) * -(-co // tn) * s
        launch.tiled(kern, tiles, threads, x, dwk, dw_bias, g, ysrc, part, bpart, geo,
                     int(spec.mid_activation), act)  # fmt: skip
        if need["pw"]:
            found["pw"] = launch.combine(part, (cm, co), dt)
        if need["b"]:
            found["b"] = launch.combine(bpart, (co,), dt)
    need_dw_stage = has_dw and (need["x"] or need["dw"] or need["db"])
    if not has_dw and need["x"]:  # pointwise: gm is dx itself
        dx = cuda.device_array((spec.n, spec.h, spec.w, spec.c_in), dtype=dt, stream=launch.stream)
        kern = gm_kernel(dt, False, ymode, tile)
        tiles = -(-pixels // tm) * -(-cm // tn)
        launch.tiled(kern, tiles, threads, x, dwk, dw_bias, g, ysrc, pw,
                     dx.reshape(pixels, cm), 0, pixels, geo, NO_ACTIVATION, act)  # fmt: skip
        found["x"] = dx
    if not need_dw_stage:
        return found
    nb = bands(spec, dt.itemsize)
    rows = spec.n * spec.out_h
    rows_per = -(-rows // nb)
    gmbuf = None
    if has_pw or ymode != Y_NONE or act != NO_ACTIVATION:
        gmbuf = cuda.device_array((rows_per * spec.out_w, cm), dtype=dt, stream=launch.stream)
    dx = launch.zeros((spec.n, spec.h, spec.w, spec.c_in), dt) if need["x"] else None
    taps = spec.kh * spec.kw
    part = None
    first_tap = 0 if need["dw"] else taps  # d dw_bias alone: only the sums of gm
    if need["dw"] or need["db"]:
        part = cuda.device_array((nb, taps + 1 - first_tap, cm), dtype=dt, stream=launch.stream)
    g2 = g.reshape(pixels, cm) if not has_pw else None
    cw = min(32, _config.CUDA_THREADS)  # channels per block of dw_band (32: a warp)
    lanes = max(1, _config.CUDA_THREADS // cw)
    for band in range(nb):
        r0, r1 = band * rows_per, min(rows, (band + 1) * rows_per)
        p_lo, p_hi = r0 * spec.out_w, r1 * spec.out_w
        if has_pw:
            kern = gm_kernel(dt, True, ymode, tile)
            tiles = -(-(p_hi - p_lo) // tm) * -(-cm // tn)
            launch.tiled(kern, tiles, threads, x, dwk, dw_bias, g, ysrc, pw, gmbuf, p_lo, p_hi,
                         geo, int(spec.mid_activation), act)  # fmt: skip
            gm = gmbuf
        elif gmbuf is not None:
            launch.one_d(dw_gm_kernel(dt, ymode), (p_hi - p_lo) * cm, x, dwk, dw_bias, g, ysrc,
                         gmbuf, p_lo, p_hi, geo, mid_act)  # fmt: skip
            gm = gmbuf
        else:  # the depthwise op without an activation: gm is grad itself
            gm = g2[p_lo:p_hi]
        if dx is not None:
            ri_lo, ri_hi = _input_rows(spec, r0, r1)
            if ri_hi > ri_lo:
                launch.one_d(dx_band_kernel(dt), (ri_hi - ri_lo) * spec.w * spec.c_in, gm, dwk,
                             dx, p_lo, p_hi, ri_lo, ri_hi, spec.out_h, spec.out_w, geo)  # fmt: skip
        if part is not None:
            launch.tiled(dw_band_kernel(dt, lanes, cw), (taps + 1 - first_tap) * -(-cm // cw),
                         lanes * cw, x, gm, part, band, first_tap, p_lo, p_hi, spec.out_h,
                         spec.out_w, geo)  # fmt: skip
    if dx is not None:
        found["x"] = dx
    if part is not None:
        total = launch.combine(part, (taps + 1 - first_tap, cm), dt)
        if need["dw"]:
            found["dw"] = total[:taps].reshape(spec.kh, spec.kw, cm)
        if need["db"]:
            found["db"] = total[taps - first_tap]
    return found


def _input_rows(spec: ConvSpec, r0: int, r1: int) -> tuple[int, int]:
    """The flattened input rows (n * H + row) the taps of output rows r0..r1-1 read."""
    n0, i0 = divmod(r0, spec.out_h)
    n1, i1 = divmod(r1 - 1, spec.out_h)
    # (an output row in the bottom padding reads no row of its image: clamped to its end)
    lo = n0 * spec.h + min(spec.h, max(0, i0 * spec.stride_h - spec.pad_top))
    top = i1 * spec.stride_h - spec.pad_top + (spec.kh - 1) * spec.dilation_h
    hi = n1 * spec.h + min(spec.h - 1, top) + 1
    return lo, max(lo, hi)


def conv2d_grads(spec: ConvSpec, dt: np.dtype, launch: Launcher, x, g, ysrc, ymode, w,
                 need: dict[str, bool]) -> dict[str, Any]:  # fmt: skip
    """The conv2d gradients ``need`` asks for ("x", "w", "b"): device arrays, NHWC."""
    act = int(spec.activation)
    geo = spec.geometry
    found: dict[str, Any] = {}
    if need["x"]:
        dx = cuda.device_array((spec.n, spec.h, spec.w, spec.c_in), dtype=dt, stream=launch.stream)
        launch.one_d(conv2d_dx_kernel(dt, ymode), dx.size, g, ysrc, w, dx, geo, act)
        found["x"] = dx
    s = splits(spec.pixels)
    if need["w"]:
        part = cuda.device_array((s, *w.shape), dtype=dt, stream=launch.stream)
        launch.one_d(conv2d_dw_kernel(dt, ymode), part.size, x, g, ysrc, part, geo, act)
        found["w"] = launch.combine(part, tuple(w.shape), dt)
    if need["b"]:
        found["b"] = colsum_grads(dt, launch, g, ysrc, ymode, act, s)
    return found


def colsum_grads(dt: np.dtype, launch: Launcher, g, ysrc, ymode: int, act: int, s: int) -> Any:
    co = g.shape[3]
    part = cuda.device_array((s, co), dtype=dt, stream=launch.stream)
    launch.one_d(colsum_kernel(dt, ymode), s * co, g, ysrc, part, act)
    return launch.combine(part, (co,), dt)
