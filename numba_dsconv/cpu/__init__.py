"""The CPU backend: layout handling, allocation and kernel choice around the Numba kernels.

``run`` receives host arrays that api.py has validated (dtype float32/float64, shapes checked)
and returns the result in the caller's layout. Internally everything is NHWC, C-contiguous.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from .. import _config
from .._spec import ConvSpec
from ._jit import (
    GEMM_MR,
    gemm_panel_width,
    transpose_batched_parallel,
    transpose_batched_serial,
)
from .conv2d import conv2d_nhwc_parallel, conv2d_nhwc_serial
from .depthwise import depthwise_nhwc_parallel, depthwise_nhwc_serial
from .pointwise import pointwise_nhwc_parallel, pointwise_nhwc_serial
from .separable import separable_nhwc_parallel, separable_nhwc_serial

__all__ = ["gemm_split", "run", "threading_layer"]


def threading_layer() -> str:
    """The Numba threading layer in use (runs one tiny parallel kernel to make Numba pick it)."""
    a = np.ones((1, 1, 1), np.float32)
    transpose_batched_parallel(a, np.empty_like(a))
    return str(numba.threading_layer())


def _transposed(src: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(N, R, C) -> C-contiguous (N, C, R) of ``dtype``, blocked, parallel when large."""
    src = np.ascontiguousarray(src)
    dst = np.empty((src.shape[0], src.shape[2], src.shape[1]), dtype=dtype)
    if src.size:
        big = src.size > _config.SERIAL_MAX_MACS
        (transpose_batched_parallel if big else transpose_batched_serial)(src, dst)
    return dst


def _to_nhwc(x: np.ndarray, spec: ConvSpec, dtype: np.dtype) -> np.ndarray:
    """The input as a C-contiguous (N,H,W,C) array of ``dtype``; copies only when needed."""
    x4 = x if spec.batched else x[np.newaxis]
    if spec.layout == "NCHW":
        n, c, h, w = x4.shape
        return _transposed(x4.reshape(n, c, h * w), dtype).reshape(n, h, w, c)
    return np.ascontiguousarray(x4, dtype=dtype)


def _nhwc_view(out: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """The caller's out= as an (N,OH,OW,C_out) view (no copy)."""
    o4 = out if spec.batched else out[np.newaxis]
    return o4.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else o4


def gemm_split(
    pixels: int, c_red: int, c_out: int, itemsize: int, dw_taps: int, parallel: bool
) -> tuple[int, int]:
    """(tile, cblock): output pixels and output channels per task of a GEMM kernel.

    A tile's A operand (tile x c_red: the depthwise result in the fused kernel) stays within
    CPU_TILE_BYTES (L2) and CPU_TILE_MAX_PIXELS; tiles are whole GEMM_MR row groups, channel
    blocks whole panels. A serial call takes the largest tile and every channel. A parallel
    call picks the split with the shortest estimated critical path: Numba hands each thread
    one contiguous chunk of the task list, so the cost is the largest chunk, counted in
    multiply-adds (a task's GEMM, plus its depthwise work, ``dw_taps`` per reduction channel
    and pixel, which every channel block of a pixel block repeats, plus the weight packing).
    """
    nr = gemm_panel_width(itemsize)
    panels = -(-c_out // nr)
    fit = _config.CPU_TILE_BYTES // max(1, c_red * itemsize)
    max_tile = max(GEMM_MR, min(_config.CPU_TILE_MAX_PIXELS, fit) // GEMM_MR * GEMM_MR)
    if not parallel or pixels == 0:
        return max_tile, panels * nr
    threads = numba.get_num_threads()
    best: tuple[tuple[int, int], int, int] | None = None
    nb_min = -(-pixels // max_tile)
    for nb in range(nb_min, nb_min + threads):
        per_block = -(-pixels // nb)
        tile = -(-per_block // GEMM_MR) * GEMM_MR
        nb_eff = -(-pixels // tile)
        for nc in range(1, panels + 1):
            per = -(-panels // nc)
            nc_eff = -(-panels // per)
            if nc > 1 and nc_eff != nc:
                continue  # the same split as a smaller nc
            tasks = nb_eff * nc_eff
            task = tile * (per * nr * c_red + dw_taps * c_red) + per * nr * c_red
            key = (-(-tasks // threads) * task, tasks)
            if best is None or key < best[0]:
                best = (key, tile, per * nr)
    assert best is not None
    return best[1], best[2]


@functools.lru_cache(maxsize=256)
def _zeros(size: int, dtype: np.dtype) -> np.ndarray:
    """A zero vector standing in for a missing bias, shared between calls (kernels only read
    biases; a read-only flag would make Numba compile a second specialisation)."""
    return np.zeros(size, dtype)


def _bias(b: np.ndarray | None, size: int, dtype: np.dtype, pad: bool) -> np.ndarray:
    """The bias as a contiguous ``dtype`` vector; with ``pad``, zero-padded to whole
    micro-kernel panels (the GEMM loads it a vector at a time)."""
    full = -(-size // gemm_panel_width(dtype.itemsize)) * gemm_panel_width(dtype.itemsize)
    n = full if pad else size
    if b is None:
        return _zeros(n, dtype)
    b = np.ascontiguousarray(b, dtype=dtype)
    if n == size:
        return b
    padded = np.zeros(n, dtype)
    padded[:size] = b
    return padded


_PLANS: dict[tuple, tuple] = {}


def _plan(spec: ConvSpec, dtype: np.dtype) -> tuple:
    """(kernel, constant trailing arguments) of a call: everything that depends only on the
    geometry, the dtype, the thread count and the tunables, computed once per combination."""
    threads = numba.get_num_threads()
    key = (spec, dtype, threads, _config.SERIAL_MAX_MACS, _config.CPU_GEMM_KC)
    key += (_config.CPU_TILE_BYTES, _config.CPU_TILE_MAX_PIXELS)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    parallel = spec.macs > _config.SERIAL_MAX_MACS
    itemsize = dtype.itemsize
    geo = (spec.stride_h, spec.stride_w, spec.dilation_h, spec.dilation_w)
    geo += (spec.pad_top, spec.pad_left, spec.multiplier)
    pixels = spec.n * spec.out_h * spec.out_w
    if spec.op == "separable":
        kern = separable_nhwc_parallel if parallel else separable_nhwc_serial
        taps = spec.kh * spec.kw
        tile, cblock = gemm_split(pixels, spec.c_mid, spec.c_out, itemsize, taps, parallel)
        tail = (spec.out_h, spec.out_w, spec.kh, spec.kw, *geo, spec.mid_activation)
        tail += (spec.activation, tile, cblock, _config.CPU_GEMM_KC)
    elif spec.op == "depthwise":
        kern = depthwise_nhwc_parallel if parallel else depthwise_nhwc_serial
        tail = (spec.kh, spec.kw, *geo, spec.activation)
    elif spec.op == "pointwise":
        kern = pointwise_nhwc_parallel if parallel else pointwise_nhwc_serial
        block, cblock = gemm_split(pixels, spec.c_in, spec.c_out, itemsize, 0, parallel)
        tail = (block, cblock, _config.CPU_GEMM_KC, spec.activation)
    else:
        kern = conv2d_nhwc_parallel if parallel else conv2d_nhwc_serial
        tail = (*geo[:6], spec.activation)
    plan = (kern, parallel, tail)
    if len(_PLANS) < 1024:
        _PLANS[key] = plan
    return plan


def _launch(spec: ConvSpec, xh, weights, biases, target: np.ndarray) -> None:
    kern, parallel, tail = _plan(spec, target.dtype)
    dtype = target.dtype
    if spec.op == "separable":
        d, p = weights
        dwb, b = biases
        pixels = spec.n * spec.out_h * spec.out_w
        t2 = target.reshape(pixels, spec.c_out)
        args = (xh, d, _bias(dwb, spec.c_mid, dtype, False), p)
        args += (_bias(b, spec.c_out, dtype, True), t2, *tail)
    elif spec.op == "pointwise":
        (p,) = weights
        (b,) = biases
        rows = spec.n * spec.out_h * spec.out_w
        x2 = xh.reshape(rows, spec.c_in)
        t2 = target.reshape(rows, spec.c_out)
        args = (x2, p, _bias(b, spec.c_out, dtype, True), t2, *tail)
    else:  # depthwise, conv2d
        (w,) = weights
        (b,) = biases
        args = (xh, w, _bias(b, w.shape[-1], dtype, False), target, *tail)
    if parallel:
        with _config.call_guard():
            kern(*args)
    else:
        kern(*args)


def run(
    spec: ConvSpec,
    dtype: np.dtype,
    x: np.ndarray,
    weights: tuple[np.ndarray, ...],
    biases: tuple[np.ndarray | None, ...],
    out: np.ndarray | None,
) -> np.ndarray:
    """Compute one call. ``weights`` are in the kernels' shapes (see api.py); ``out`` validated."""
    ws = tuple(np.ascontiguousarray(w, dtype=dtype) for w in weights)
    out_view = None if out is None else _nhwc_view(out, spec)
    if out_view is not None and out_view.flags.c_contiguous:
        target = out_view
    else:
        target = np.empty(spec.out_nhwc, dtype=dtype)
    if spec.n > 0:
        _launch(spec, _to_nhwc(x, spec, dtype), ws, biases, target)
    if out is not None:
        if target is not out_view:
            out_view[...] = target
        return out
    if spec.layout == "NCHW":
        n, oh, ow, co = target.shape
        target = _transposed(target.reshape(n, oh * ow, co), dtype).reshape(n, co, oh, ow)
    return target if spec.batched else target[0]
