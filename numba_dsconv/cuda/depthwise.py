"""Depthwise convolution on the GPU: one thread per DEPTHWISE_JB output pixels of a row and one
channel, channel fastest (coalesced in NHWC); a 2-D grid (a row's column blocks x channels,
then rows) with grid-stride loops in 64 bits. Built per (KH, KW, SH, SW, dtype): the kernel
sizes and strides of ``SPECIALISED`` get their taps unrolled, any other geometry the generic
build (0, 0, 0, 0), which reads them from its geometry argument."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numba
import numpy as np
from numba import cuda, int64

from .. import _config
from .._spec import ConvSpec
from ._jit import activation

# The kernel sizes and strides that get a specialised build; every entry is compiled to PTX
# in CI. The GEMM kernels (gemm.py) specialise on the same keys.
SPECIALISED: tuple[tuple[int, int, int, int], ...] = tuple(
    (k, k, s, s) for k in (3, 5, 7) for s in (1, 2)
)
GENERIC = (0, 0, 0, 0)


def specialisation(kh: int, kw: int, sh: int, sw: int) -> tuple[int, int, int, int]:
    key = (kh, kw, sh, sw)
    return key if key in SPECIALISED else GENERIC


# Output pixels per thread along a row: the weight of a tap is loaded once for all of them,
# and with stride 1 neighbouring pixels share input loads.
DEPTHWISE_JB = 4


@cache
def depthwise_kernel(KH: int, KW: int, SH: int, SW: int, dtype: np.dtype):
    dt = np.dtype(dtype)
    nbt = numba.from_dtype(dt)
    activate = activation(dt)
    zero = dt.type(0)
    JB = DEPTHWISE_JB
    # input columns the JB outputs of a specialised build read in one kernel row (dilation 1):
    # loaded once into registers, each shared by up to KW taps
    WIN = (JB - 1) * SW + KW if KW != 0 else 1

    @cuda.jit
    def depthwise(x, dwk, bias, out, geo, act):
        """out[n,i,j,cM+q] = act(bias + sum x[n, i*sh+m*dh-pt, j*sw+q'*dw-pl, c] d[m,q',cM+q]).

        One thread per (output row, block of JB output columns, output channel), channel
        fastest (coalesced in NHWC). Grid x covers a row's column blocks x channels (the
        channel and column of a thread are worked out once); grid y strides over the N * OH
        output rows, so the per-row index work is one division.
        """
        gkh, gkw, gsh, gsw, dil_h, dil_w, pt, pl, M = geo
        kh = KH if KH != 0 else gkh
        kw = KW if KW != 0 else gkw
        sh = SH if SH != 0 else gsh
        sw = SW if SW != 0 else gsw
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
                    ih = ih0 + m * dil_h
                    row_inside = ih >= 0 and ih < H
                    if KW != 0 and dil_w == 1:
                        # the row's input window, zero padding included (0 * weight, so
                        # NaN/Inf weights propagate), then KW x JB FMAs from registers
                        for t in range(WIN):
                            iw = iw0 + t
                            xv = zero
                            if row_inside and iw >= 0 and iw < W:
                                xv = x[n, ih, iw, c]
                            win[t] = xv
                        for q in range(KW):
                            wv = dwk[m, q, cm]
                            for jj in range(JB):
                                acc[jj] += win[jj * SW + q] * wv
                    else:
                        for q in range(kw):
                            wv = dwk[m, q, cm]
                            for jj in range(JB):
                                iw = iw0 + jj * sw + q * dil_w
                                xv = zero
                                if row_inside and iw >= 0 and iw < W:
                                    xv = x[n, ih, iw, c]
                                acc[jj] += xv * wv
                for jj in range(JB):
                    if j0 + jj < OW:
                        out[n, i, j0 + jj, cm] = activate(acc[jj], act)

    return depthwise


def depthwise_launch(spec: ConvSpec, dtype: np.dtype) -> tuple[Any, tuple[int, int], int]:
    """(kernel build, grid, threads per block) of a depthwise call.

    Grid x: one thread per DEPTHWISE_JB pixels of a row and one channel; grid y: rows (at most
    65535 blocks in y; the kernel strides over the rest).
    """
    kern = depthwise_kernel(*specialisation(spec.kh, spec.kw, spec.stride_h, spec.stride_w), dtype)
    per_row = -(-spec.out_w // DEPTHWISE_JB) * spec.c_mid
    threads = _config.CUDA_THREADS
    bx = max(1, min(math.ceil(per_row / threads), _config.CUDA_MAX_BLOCKS))
    by = max(1, min(spec.n * spec.out_h, 65535, _config.CUDA_MAX_BLOCKS // bx))
    return kern, (bx, by), threads


def depthwise_args(spec: ConvSpec, x: Any, dwk: Any, bias: Any, out: Any) -> tuple[Any, ...]:
    """The arguments of the depthwise kernel for one call (device arrays, NHWC)."""
    return (x, dwk, bias, out, spec.geometry, int(spec.activation))
