"""The tiled GEMM kernel the three ops that end in a matrix product share (pointwise, the fused
separable, conv2d as an implicit GEMM).

A block owns a tile of TP output pixels x TN output channels. For each chunk of TK reduction
channels it loads the A tile (TP pixels x TK channels) into shared memory with the op's
*producer* (pointwise.py, separable.py, conv2d.py: the value of A at one pixel and channel),
loads the matching B tile (the weights), and multiplies them into a register tile of RP x RN
outputs per thread. A thread's RP pixels and RN channels are consecutive in the (16-byte
aligned) tiles, so each step of the inner product is two vector loads and RP * RN FMAs. Biases
and activations are fused into the epilogue. The halo-tiled separable build also *stages* an
input halo and the chunk's depthwise weights in shared memory before producing A from them.
Every build carries launch bounds that cap its registers (``launch_bounds``).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numba
import numpy as np
from numba import cuda, int32, int64

from .. import _config
from .._spec import ConvSpec
from ._jit import SIMULATOR, activation, device_function, kernel_options, launch_bounds
from .conv2d import conv2d_value
from .depthwise import GENERIC, specialisation
from .pointwise import pointwise_value
from .separable import halo_shape, halo_sizes, separable_halo, separable_value

OPS = ("pointwise", "separable", "conv2d")

# Static shared memory a block may declare (the CUDA limit without opt-in).
SHARED_LIMIT = 48 * 1024


def shared_bytes(
    tile: tuple[int, int, int, int, int],
    itemsize: int,
    geo: tuple[int, int, int, int] = GENERIC,
    halo: tuple[int, int] = (0, 0),
) -> int:
    """Static shared memory of a gemm_kernel build (the A and B tiles, the pixel table, and for
    a halo build the input halo and the chunk's depthwise weights)."""
    tp, tn, tk, _, _ = tile
    items = tk * (tp + 4) + tk * tn  # the A tile's rows are padded by 4 (see TPA)
    if halo[0]:
        hsize, dwsize = halo_sizes(geo, tk, halo)
        items += hsize + dwsize
    return items * itemsize + 3 * tp * 4


def halo_possible(
    geo: tuple[int, int, int, int], dtype: np.dtype, tile: tuple[int, int, int, int, int]
) -> bool:
    """Whether a halo build exists for this specialisation: float32 (in float64 the halo
    builds spill registers at the 128-register budget) and its shared memory fits."""
    if geo == GENERIC or np.dtype(dtype) != np.float32:
        return False
    return shared_bytes(tile, np.dtype(dtype).itemsize, geo, halo_shape(tile)) <= SHARED_LIMIT


def _producer(op: str, key: tuple[int, int, int, int], dt: np.dtype, tile: tuple, halo: tuple):
    """(stage, value) device functions of ``op``'s A tile (stage: a no-op but for halo)."""
    if op == "separable" and halo[0]:
        return separable_halo(key, dt, tile, halo)
    value = {"pointwise": pointwise_value, "separable": separable_value, "conv2d": conv2d_value}
    return _no_stage(), value[op](dt)


@cache
def _no_stage():
    @device_function
    def stage(halo_t, dw_t, x, dwk, k0, K, ptile, tiles_h, tiles_w, g, tid):
        return

    return stage


def _check_build(op: str, key: tuple, dt: np.dtype, tile: tuple, halo: tuple) -> None:
    TP, TN, _, RP, RN = tile
    if TP % RP or TN % RN:
        raise ValueError(f"CUDA tile {tile}: TP must be a multiple of RP and TN of RN")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    if halo[0]:
        if op != "separable" or 0 in key or halo[0] * halo[1] != TP:
            raise ValueError(
                f"halo tile {halo}: only for specialised separable builds with TH * TW == TP"
            )
        if shared_bytes(tile, dt.itemsize, key, halo) > SHARED_LIMIT:
            raise ValueError(f"halo tile {halo} for {key} exceeds shared memory")


@cache
def gemm_kernel(
    op: str,
    KH: int,
    KW: int,
    SH: int,
    SW: int,
    dtype: np.dtype,
    tile: tuple[int, int, int, int, int],
    halo: tuple[int, int] = (0, 0),
    registers: int = 0,
):
    """The tiled GEMM kernel of ``op``; ``tile`` = (TP, TN, TK, RP, RN); ``registers``: the
    per-thread register budget (see launch_bounds). ``KH == 0`` (and so on) selects the generic
    build, which reads the kernel size and stride from its geometry argument.

    ``halo`` = (TH, TW) != (0, 0) builds the halo-tiled fused separable kernel: a block owns a
    TH x TW rectangle of output pixels of one image (TH * TW == TP); see separable.py.
    """
    TP, TN, TK, RP, RN = tile
    TH, TW = halo
    HALO = TH > 0
    dt = np.dtype(dtype)
    key = (KH, KW, SH, SW)
    _check_build(op, key, dt, tile, halo)
    HSIZE, DWSIZE = halo_sizes(key, TK, halo) if HALO else (1, 1)
    stage, a_value = _producer(op, key, dt, tile, halo)
    MID = op == "separable"  # the fused depthwise's activation
    nbt = numba.from_dtype(dt)
    zero = dt.type(0)
    TPT = TP // RP  # threads along pixels
    TNT = TN // RN  # threads along output channels
    NT = TPT * TNT  # threads per block
    # 16-byte aligned tiles, so a thread's consecutive tile values load as vectors (the
    # simulator takes no alignment)
    ALIGN = None if SIMULATOR else 16
    TPA = TP + 4  # A-tile row length: 16-byte rows, and the producer's writes spread over banks

    tile_pixels = _tile_pixels(tile, halo)
    load_a = _load_a(tile, dt, a_value, MID)
    load_b = _load_b(tile, dt)
    multiply = _multiply(tile)
    epilogue = _epilogue(tile, dt)

    @cuda.jit(**kernel_options(launch_bounds(NT, registers)))
    def gemm(x, dwk, dw_bias, b, bias, out, geo, mid_act, act):
        # the specialised kernel size and stride are compile-time constants
        gkh, gkw, gsh, gsw, dil_h, dil_w, pt, pl, M = geo
        g = (
            KH if KH != 0 else gkh,
            KW if KW != 0 else gkw,
            SH if SH != 0 else gsh,
            SW if SW != 0 else gsw,
            dil_h,
            dil_w,
            pt,
            pl,
            M,
        )
        OH = out.shape[1]
        OW = out.shape[2]
        CO = out.shape[3]
        K = b.shape[0]
        P = int64(out.shape[0]) * OH * OW
        a_tile = cuda.shared.array((TK, TPA), nbt, alignment=ALIGN)  # [channel, pixel]
        halo_t = cuda.shared.array(HSIZE, nbt)  # [halo row, halo column, channel]
        dw_t = cuda.shared.array(DWSIZE, nbt)  # [tap, channel]
        b_tile = cuda.shared.array((TK, TN), nbt, alignment=ALIGN)
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
        for t in range(int64(cuda.blockIdx.x), n_ptiles * n_ctiles, int64(cuda.gridDim.x)):
            # channel tiles fastest: neighbouring blocks reuse the same input pixels from L2
            c0 = (t % n_ctiles) * TN
            ptile = t // n_ctiles
            cuda.syncthreads()  # the previous tile's epilogue is done with pix_*
            tile_pixels(pix_n, pix_i, pix_j, ptile, P, OH, OW, tiles_h, tiles_w, tid)
            for a in range(RP):
                for bb in range(RN):
                    acc[a, bb] = zero
            cuda.syncthreads()
            for k0 in range(0, K, TK):
                if HALO:
                    # (the tile's origin is recomputed from t: fewer registers live across
                    # the chunk loop)
                    stage(halo_t, dw_t, x, dwk, k0, K, t // n_ctiles, tiles_h, tiles_w, g, tid)
                    cuda.syncthreads()
                load_a(a_tile, halo_t, dw_t, x, dwk, dw_bias, pix_n, pix_i, pix_j, k0, K, g,
                       mid_act, tid)  # fmt: skip
                load_b(b_tile, b, k0, c0, K, CO, tid)
                cuda.syncthreads()
                multiply(acc, av, bv, a_tile, b_tile, tp, tn)
                cuda.syncthreads()  # the tiles are overwritten by the next chunk
            epilogue(out, acc, bias, pix_n, pix_i, pix_j, c0, CO, tp, tn, act)

    return gemm


# --------------------------------------------------------------------------------------------
# the steps of the kernel, one device function each (built per tile, dtype and producer)


def _threads(tile: tuple[int, int, int, int, int]) -> int:
    return (tile[0] // tile[3]) * (tile[1] // tile[4])


@cache
def _tile_pixels(tile: tuple[int, int, int, int, int], halo: tuple[int, int]):
    TP, NT = tile[0], _threads(tile)
    TH, TW = halo
    HALO = TH > 0

    @device_function
    def tile_pixels(pix_n, pix_i, pix_j, ptile, P, OH, OW, tiles_h, tiles_w, tid):
        """The tile's pixels as (image, row, column), decomposed once per tile (n = -1: past
        the last pixel): the producer and the epilogue would otherwise divide a 64-bit index
        by runtime sizes per element. Halo tiles are TH x TW rectangles of one image."""
        n0 = ptile // (tiles_h * tiles_w)
        i0 = (ptile // tiles_w) % tiles_h * TH
        j0 = ptile % tiles_w * TW
        for e in range(tid, TP, NT):
            n = -1
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

    return tile_pixels


@cache
def _load_a(tile: tuple[int, int, int, int, int], dt: np.dtype, a_value, MID: bool):
    TP, TK, NT = tile[0], tile[2], _threads(tile)
    zero = dt.type(0)
    activate = activation(dt)

    @device_function
    def load_a(a_tile, halo_t, dw_t, x, dwk, dw_bias, pix_n, pix_i, pix_j, k0, K, g, mid, tid):
        """A[pixel, channel] for the chunk k0.. (zero past the last pixel or channel)."""
        for e in range(tid, TP * TK, NT):
            pp = e // TK  # TK is a compile-time constant: no division instruction
            kk = e - pp * TK
            k = k0 + kk
            n = pix_n[pp]
            v = zero
            if n >= 0 and k < K:
                v = a_value(x, dwk, dw_bias, halo_t, dw_t, n, pix_i[pp], pix_j[pp], pp, k, kk, g)
                if MID:  # the fused depthwise's activation
                    v = activate(v, mid)
            a_tile[kk, pp] = v

    return load_a


@cache
def _load_b(tile: tuple[int, int, int, int, int], dt: np.dtype):
    TN, TK, NT = tile[1], tile[2], _threads(tile)
    zero = dt.type(0)

    @device_function
    def load_b(b_tile, b, k0, c0, K, CO, tid):
        """The B tile (TK x TN weights), coalesced along output channels."""
        for e in range(tid, TK * TN, NT):
            kk = e // TN
            cc = e - kk * TN
            k = k0 + kk
            co = c0 + cc
            w = zero
            if k < K and co < CO:
                w = b[k, co]
            b_tile[kk, cc] = w

    return load_b


@cache
def _multiply(tile: tuple[int, int, int, int, int]):
    _, _, TK, RP, RN = tile

    @device_function
    def multiply(acc, av, bv, a_tile, b_tile, tp, tn):
        """acc += A tile x B tile for this thread's RP pixels x RN channels."""
        for kk in range(TK):
            # a thread's RP pixels and RN channels are contiguous: two vector loads
            for a in range(RP):
                av[a] = a_tile[kk, tp * RP + a]
            for bb in range(RN):
                bv[bb] = b_tile[kk, tn * RN + bb]
            for a in range(RP):
                for bb in range(RN):
                    acc[a, bb] += av[a] * bv[bb]

    return multiply


@cache
def _epilogue(tile: tuple[int, int, int, int, int], dt: np.dtype):
    RP, RN = tile[3], tile[4]
    activate = activation(dt)

    @device_function
    def epilogue(out, acc, bias, pix_n, pix_i, pix_j, c0, CO, tp, tn, act):
        """out = act(acc + bias) for this thread's valid pixels and channels."""
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

    return epilogue


def pixel_tiles(
    spec: ConvSpec, key: tuple[int, int, int, int], dtype: np.dtype, tile: tuple[int, ...]
) -> tuple[tuple[int, int], int]:
    """(halo shape or (0, 0), number of pixel tiles) for a GEMM launch (see _config.CUDA_HALO).

    Flat tiles are runs of TP flattened output pixels; halo tiles are TH x TW rectangles of
    one image, which waste slots where TH or TW does not divide the output (14 x 14: 4 tiles
    of 64 for 196 pixels, against 3.06 flat tiles), so "auto" takes them only where they
    need no more tiles than the flat ones.
    """
    choice = _config.CUDA_HALO
    if choice not in ("auto", "always", "never"):
        raise ValueError(f"_config.CUDA_HALO must be 'auto', 'always' or 'never'; got {choice!r}")
    flat = math.ceil(spec.pixels / tile[0])
    if (
        choice == "never"
        or spec.op != "separable"
        or (spec.dilation_h, spec.dilation_w) != (1, 1)
        or not halo_possible(key, dtype, tile)
    ):
        return (0, 0), flat
    th, tw = halo_shape(tile)
    rects = spec.n * math.ceil(spec.out_h / th) * math.ceil(spec.out_w / tw)
    if choice == "always" or rects <= flat:
        return (th, tw), rects
    return (0, 0), flat


def gemm_launch(spec: ConvSpec, dtype: np.dtype) -> tuple[Any, int, int]:
    """(kernel build, blocks, threads per block) of a GEMM call, from the _config tile, halo
    choice and register budget."""
    tile = tuple(_config.CUDA_GEMM_TILE)
    key = specialisation(spec.kh, spec.kw, spec.stride_h, spec.stride_w)
    if spec.op == "pointwise":
        key = GENERIC
    halo, ptiles = pixel_tiles(spec, key, dtype, tile)
    kern = gemm_kernel(spec.op, *key, dtype, tile, halo, _config.CUDA_GEMM_REGISTERS)
    tp, tn, _, rp, rn = tile
    blocks = max(1, min(ptiles * math.ceil(spec.c_out / tn), _config.CUDA_MAX_BLOCKS))
    return kern, blocks, (tp // rp) * (tn // rn)


def gemm_args(
    spec: ConvSpec, x: Any, dwk: Any, dw_bias: Any, b: Any, bias: Any, out: Any
) -> tuple[Any, ...]:
    """The arguments of a GEMM kernel for one call: x (N,H,W,C) NHWC; dwk (KH,KW,C*M) and
    dw_bias (C*M,) for separable (placeholders otherwise); b the (K, C_out) weight matrix;
    bias (C_out,); out (N,OH,OW,C_out)."""
    acts = (int(spec.mid_activation), int(spec.activation))
    return (x, dwk, dw_bias, b, bias, out, spec.geometry, *acts)
