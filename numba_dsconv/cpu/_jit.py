"""Shared pieces of the CPU kernels: the jit decorator pair and the fused epilogue helpers."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from numba import njit

from .. import _config


def parallel_and_serial(fn: Callable[..., Any]) -> tuple[Any, Any]:
    """Compile one kernel body twice: ``parallel=True`` and a serial build for tiny inputs.

    The serial build is a clone with its own ``__qualname__`` so the two never share an entry
    in Numba's on-disk cache (whose index key does not include the ``parallel`` flag).
    """
    opts = dict(fastmath=set(_config.FASTMATH), cache=_config.CACHE, nogil=True)
    par = njit(parallel=True, **opts)(fn)
    clone = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    clone.__qualname__ = fn.__qualname__ + "_serial"
    clone.__module__ = fn.__module__
    ser = njit(parallel=False, **opts)(clone)
    return par, ser


helper = njit(inline="always", fastmath=set(_config.FASTMATH), cache=_config.CACHE, nogil=True)


@helper
def activate_row(row, code):  # pragma: no cover - compiled
    """In-place None (0) / relu (1) / relu6 (2). NaN stays NaN: only v < 0 and v > 6 change."""
    if code == 1:
        for k in range(row.shape[0]):
            if row[k] < 0:
                row[k] = 0
    elif code == 2:
        for k in range(row.shape[0]):
            v = row[k]
            if v < 0:
                row[k] = 0
            elif v > 6:
                row[k] = 6


@helper
def depthwise_pixel(
    x, d, n, i, j, sh, sw, dh, dw, pt, pl, multiplier, bias, dst
):  # pragma: no cover
    """dst[c*M+q] = bias + sum over the taps of output pixel (i, j) of image n.

    x: (N,H,W,C); d: (KH,KW,C*M); dst: (C*M,). Taps outside the input are the zero padding
    and are skipped.
    """
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    KH = d.shape[0]
    KW = d.shape[1]
    CM = d.shape[2]
    for c in range(CM):
        dst[c] = bias[c]
    for m in range(KH):
        ih = i * sh - pt + m * dh
        if ih < 0 or ih >= H:
            continue
        for q in range(KW):
            iw = j * sw - pl + q * dw
            if iw < 0 or iw >= W:
                continue
            xr = x[n, ih, iw]
            dr = d[m, q]
            if multiplier == 1:
                for c in range(C):
                    dst[c] += xr[c] * dr[c]
            else:
                for c in range(C):
                    xv = xr[c]
                    base = c * multiplier
                    for mq in range(multiplier):
                        dst[base + mq] += xv * dr[base + mq]


@helper
def gemm_rows(a, b, bias, dst, rows, act):  # pragma: no cover - compiled
    """dst[r, :] = act(bias + a[r, :] @ b) for r < rows.

    a: (>=rows, K), b: (K, CO) row-major, dst: (>=rows, CO). The output row stays in L1 while
    the reduction runs; the channel loop is innermost and contiguous so it vectorises.
    """
    K = b.shape[0]
    CO = b.shape[1]
    for r in range(rows):
        o = dst[r]
        ar = a[r]
        for co in range(CO):
            o[co] = bias[co]
        for k in range(K):
            av = ar[k]
            br = b[k]
            for co in range(CO):
                o[co] += av * br[co]
        activate_row(o, act)
