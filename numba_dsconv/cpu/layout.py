"""The memory layouts the CPU kernels take: NCHW <-> NHWC transposes, NHWC views of a caller's
``out=``, contiguous bias vectors. The kernels work in NHWC, C-contiguous."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ._jit import helper, kernel
from ._simd import address


def transpose_batched(src, dst):  # pragma: no cover - compiled
    """dst[n, j, i] = src[n, i, j] (casting to dst's dtype), in 32 x 32 blocks.

    Used to convert NCHW <-> NHWC ((C, H*W) <-> (H*W, C) per image): a plain strided copy
    (numpy's ``.T`` copy) thrashes the cache and the TLB and took longer than the convolution.
    """
    N = src.shape[0]
    R = src.shape[1]
    C = src.shape[2]
    nrb = (R + 31) // 32
    ncb = (C + 31) // 32
    for t in prange(N * nrb * ncb):
        n = t // (nrb * ncb)
        b = t - n * (nrb * ncb)
        r0 = (b // ncb) * 32
        c0 = (b % ncb) * 32
        s = src[n]
        d = dst[n]
        for c in range(c0, min(C, c0 + 32)):
            row = d[c]
            for r in range(r0, min(R, r0 + 32)):
                row[r] = s[r, c]


TRANSPOSE = kernel(transpose_batched, None)


# the least size of a result (or NHWC copy of an input) that starts on a cache line
RESULT_ALIGN_MIN_BYTES = 1 << 20


@helper
def _aligned_nd(shape, like, align):  # pragma: no cover - compiled
    """An uninitialised C-contiguous array of ``shape`` and like's dtype starting on an
    ``align``-byte boundary (a multiple of its itemsize): a view of a slightly larger one."""
    n = 1
    for s in shape:
        n *= s
    buf = np.empty(n + align // like.itemsize, like.dtype)
    k = (-address(buf) % align) // like.itemsize
    return buf[k : k + n].reshape(shape)


_LIKE: dict[int, np.ndarray] = {}  # dtype.num -> an empty array of it: _aligned_nd's dtype
_JIT_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.uint8))  # (native)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array starting on an ``align``-byte boundary (NumPy's own
    large arrays start 16 bytes past one: malloc's header), a view of a slightly larger one:
    the GEMM micro-kernel reads weight panels by 64-byte vectors, each of which would
    otherwise span two cache lines (packed pointwise N=8, 512 -> 512: 0.90-0.93 the time
    aligned); the depthwise reads x so (``result_allocator``). Made in one jitted call (the
    allocation, the offset and the view: as NumPy's allocation, a jitted function asking the
    offset and the view's slicing, ~1.5-2 us more of the Python between two kernels) for the
    dtypes the kernels use; others (or an item size that does not divide ``align``) are a
    view of a byte buffer."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    like = _LIKE.get(dtype.num)
    if like is None or like.dtype is not dtype or align % dtype.itemsize:
        if align % dtype.itemsize or dtype not in _JIT_DTYPES:  # (in bytes: the others)
            n = math.prod(shape) * dtype.itemsize
            return aligned_empty((n,), np.dtype(np.uint8), align)[:n].view(dtype).reshape(shape)
        like = _LIKE[dtype.num] = np.empty(0, dtype)  # (NumPy's native dtypes: singletons)
    return _aligned_nd(shape if type(shape) is tuple else tuple(shape), like, align)


def result_allocator(nbytes: int) -> Callable[..., np.ndarray]:
    """``alloc(shape, dtype)`` for a kernel's result of ``nbytes``: from RESULT_ALIGN_MIN_BYTES
    on, starting on a cache line (``aligned_empty``). A layer's result is the next layer's
    input, whose depthwise reads whole vectors of each pixel's channels: from NumPy's
    placement (16 bytes past a line) each load spans two lines; and a result's rows are
    stored whole lines at a time. The fused separable with x and the result 16 bytes past a
    line against both aligned: N=8 rows 1, 2: 1.17-1.20x the time, rows 3, 8, 9 1.03-1.06x; N=1
    rows 1, 2, 8, 9 1.05-1.10x (benchmarks/design_measurements.md). The alignment costs ~3 us
    of Python between two kernels (a larger allocation, a view of it, the offset asked of a
    jitted function): smaller results, whose kernels take less than ~100 us, skip it."""
    return np.empty if nbytes < RESULT_ALIGN_MIN_BYTES else aligned_empty


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array of the calling thread's, reused call after call: the backward's
    partial sums of d pw and its packed weights, conv2d's packed weights, megabytes each, would
    otherwise be fresh pages in every call (first-touch page faults took longer than the GEMM
    they feed on the development machine: layer 7 at N=8, 26 ms instead of 13). Kept: the
    largest of each name, per thread; each starts on a 64-byte boundary (``aligned_empty``)."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    nbytes = math.prod(shape) * dtype.itemsize
    buf = pool.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = pool[name] = aligned_empty((max(nbytes, 1),), np.dtype(np.uint8))
    return buf[:nbytes].view(dtype).reshape(shape)


def transposed(src: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(N, R, C) -> C-contiguous (N, C, R) of ``dtype``, blocked, parallel when large."""
    src = np.ascontiguousarray(src)
    shape = (src.shape[0], src.shape[2], src.shape[1])
    dst = result_allocator(src.size * np.dtype(dtype).itemsize)(shape, dtype)
    copy_transposed(src, dst)
    return dst


def copy_transposed(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[n, j, i] = src[n, i, j] for 3-D arrays of any strides (views of others too), in
    blocks, parallel when large. NumPy's copy of a transposed view thrashes the cache and the
    TLB: a gradient into torch's weight layout, 2 threads, caches cold, (3, 3, 512, 512) ->
    (512, 512, 3, 3) 17.2 -> 1.3 ms, (1024, 1024) -> its transpose 7.7 -> 0.46 ms, (256, 256)
    80 -> 16 us (torch's own copy: 8.4 ms, 1.1 ms, 109 us)."""
    if _config.use_parallel(src.size):
        with _config.call_guard():
            TRANSPOSE.parallel(src, dst)
    elif src.size:
        TRANSPOSE.serial(src, dst)


def contiguous(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype``: itself where it is one; a transposed 2-D
    view (torch's (C_out, C_in) pointwise weight seen as (C_in, C_out)) through the blocked
    transpose (numpy's strided copy of a 1024 x 1024 matrix took ~8 ms, this well under 1)."""
    if a.ndim == 2 and not a.flags.c_contiguous and a.T.flags.c_contiguous:
        return transposed(a.T[np.newaxis], dtype)[0]
    return np.ascontiguousarray(a, dtype=dtype)


def channels_last(x: np.ndarray, spec: ConvSpec) -> bool:
    """Whether an NCHW ``x`` holds its values in NHWC order (torch's channels_last): then its
    NHWC view is C-contiguous, and the results keep that order."""
    if spec.layout != "NCHW":
        return False
    x4 = x if spec.batched else x[np.newaxis]
    return bool(x4.transpose(0, 2, 3, 1).flags.c_contiguous and not x4.flags.c_contiguous)


def to_nhwc(x: np.ndarray, spec: ConvSpec, dtype: np.dtype) -> np.ndarray:
    """The input as a C-contiguous (N,H,W,C) array of ``dtype``; copies only when needed (an
    NCHW array in channels-last memory is a view)."""
    x4 = x if spec.batched else x[np.newaxis]
    if spec.layout == "NCHW":
        t = x4.transpose(0, 2, 3, 1)
        if t.flags.c_contiguous:
            return np.ascontiguousarray(t, dtype=dtype)
        n, c, h, w = x4.shape
        return transposed(x4.reshape(n, c, h * w), dtype).reshape(n, h, w, c)
    return np.ascontiguousarray(x4, dtype=dtype)


def from_nhwc(y: np.ndarray, spec: ConvSpec, keep_nhwc: bool = False) -> np.ndarray:
    """A batched NHWC result in the caller's layout and batchedness (NCHW: C-contiguous, or
    with ``keep_nhwc`` a view of y's NHWC memory, as a channels-last x gives)."""
    if spec.layout == "NCHW":
        if keep_nhwc:
            y = y.transpose(0, 3, 1, 2)
        else:
            n, oh, ow, co = y.shape
            y = transposed(y.reshape(n, oh * ow, co), y.dtype).reshape(n, co, oh, ow)
    return y if spec.batched else y[0]


def nhwc_view(out: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """The caller's out= (or an x whose NHWC view is C-contiguous) as a batched NHWC view
    (no copy)."""
    o4 = out if spec.batched else out[np.newaxis]
    return o4.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else o4


@functools.lru_cache(maxsize=256)
def _zeros(size: int, dtype: np.dtype) -> np.ndarray:
    """A zero vector standing in for a missing bias, shared between calls (kernels only read
    biases; a read-only flag would make Numba compile a second specialisation)."""
    return np.zeros(size, dtype)


def bias_vector(b: np.ndarray | None, size: int, dtype: np.dtype, multiple: int = 1) -> np.ndarray:
    """The bias as a contiguous ``dtype`` vector, zero-padded to a multiple of ``multiple``
    (the GEMM kernels load it a whole panel at a time); zeros where there is none."""
    n = -(-size // multiple) * multiple
    if b is None:
        return _zeros(n, dtype)
    b = np.ascontiguousarray(b, dtype=dtype)
    if n == size:
        return b
    padded = np.zeros(n, dtype)
    padded[:size] = b
    return padded
