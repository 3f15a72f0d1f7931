"""The fused depthwise separable convolution on the GPU: the GEMM kernel (gemm.py) whose A tile
is the depthwise result, computed right there in shared memory (never in global memory).

Two producers:

- flat tiles (any geometry): A[pixel, k] = mid_act(dw_bias[k] + depthwise(x)[pixel, k]) from
  the input in global memory, tap by tap;
- halo tiles (float32, specialised kernel sizes and strides, dilation 1): a block owns a TH x TW
  rectangle of output pixels of one image, *stages* the input it needs ((TH-1)*SH+KH rows x
  (TW-1)*SW+KW columns x TK channels, zero padding included) and the chunk's depthwise weights
  in shared memory with coalesced channel-fastest loads, and computes the depthwise tile from
  there: every input element is read from global memory once per chunk instead of once per tap.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ._jit import device_function


@cache
def separable_value(dtype: np.dtype):
    """The flat producer: the depthwise result (plus dw_bias) at pixel (n, i, j), channel k."""
    zero = np.dtype(dtype).type(0)

    @device_function
    def value(x, dwk, dw_bias, halo_t, dw_t, n, i, j, pp, k, kk, g):
        kh, kw, sh, sw, dil_h, dil_w, pt, pl, M = g
        H = x.shape[1]
        W = x.shape[2]
        c = k // M
        v = dw_bias[k]
        ih0 = i * sh - pt
        iw0 = j * sw - pl
        for m in range(kh):
            ih = ih0 + m * dil_h
            row_inside = ih >= 0 and ih < H
            for q in range(kw):
                iw = iw0 + q * dil_w
                xv = zero  # zero padding: 0 * weight, as the formula says
                if row_inside and iw >= 0 and iw < W:
                    xv = x[n, ih, iw, c]
                v += xv * dwk[m, q, k]
        return v

    return value


def halo_shape(tile: tuple[int, int, int, int, int]) -> tuple[int, int]:
    """The (rows, columns) of output pixels a halo-tiled block owns: TP pixels, near square."""
    tp = tile[0]
    th = 1 << ((tp.bit_length() - 1) // 2)
    while tp % th:
        th //= 2
    return th, tp // th


def halo_sizes(key: tuple[int, int, int, int], tk: int, halo: tuple[int, int]) -> tuple[int, int]:
    """Elements of the shared input halo and of the chunk's depthwise weights."""
    kh, kw, sh, sw = key
    th, tw = halo
    return ((th - 1) * sh + kh) * ((tw - 1) * sw + kw) * tk, kh * kw * tk


@cache
def separable_halo(
    key: tuple[int, int, int, int],
    dtype: np.dtype,
    tile: tuple[int, int, int, int, int],
    halo: tuple[int, int],
):
    """(stage, value) device functions of the halo-tiled producer."""
    KH, KW, SH, SW = key
    TP, TN, TK, RP, RN = tile
    TH, TW = halo
    NT = (TP // RP) * (TN // RN)  # threads per block
    HW = (TW - 1) * SW + KW  # halo columns
    HSIZE, DWSIZE = halo_sizes(key, TK, halo)
    zero = np.dtype(dtype).type(0)

    @device_function
    def stage(halo_t, dw_t, x, dwk, k0, K, ptile, tiles_h, tiles_w, g, tid):
        """The input halo of rectangle ``ptile`` and the chunk's depthwise weights, channel
        fastest, so a warp reads TK neighbouring channels of consecutive pixels."""
        H = x.shape[1]
        W = x.shape[2]
        M = g[8]
        n0 = ptile // (tiles_h * tiles_w)
        ih0 = (ptile // tiles_w) % tiles_h * (TH * SH) - g[6]
        iw0 = ptile % tiles_w * (TW * SW) - g[7]
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
                w = dwk[tap // KW, tap - (tap // KW) * KW, k]
            dw_t[e] = w

    @device_function
    def value(x, dwk, dw_bias, halo_t, dw_t, n, i, j, pp, k, kk, g):
        row = pp // TW  # the pixel's row and column in the rectangle
        base = (row * SH * HW + (pp - row * TW) * SW) * TK + kk
        v = dw_bias[k]
        for m in range(KH):
            for q in range(KW):
                v += halo_t[base + (m * HW + q) * TK] * dw_t[(m * KW + q) * TK + kk]
        return v

    return stage, value
