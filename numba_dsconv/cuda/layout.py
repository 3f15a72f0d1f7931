"""Layouts on the GPU: the one conversion kernel (any strided 4-D view to any other, casting)
and the zero-copy NHWC views of the caller's arrays."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from numba import cuda, int64

from . import _interop


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


def copy4d_args(src: Any, dst: Any) -> tuple[Any, ...]:
    """The arguments of copy4d for one conversion (two 4-D views of one shape)."""
    return (src, dst)


def lead_stride(arr: Any) -> int:
    """The C stride of a unit axis put in front of ``arr`` (a 0 stride would make numba
    call the view non-contiguous and force a copy)."""
    return int(arr.dtype.itemsize * max(1, math.prod(arr.shape)))


def as4d(arr: Any, shape4: tuple[int, ...]) -> Any:
    """View a device array of <= 4 dims as 4-D (unit axes in front) without copying."""
    extra = 4 - len(arr.shape)
    return _interop.view(arr, shape4, (lead_stride(arr),) * extra + tuple(arr.strides))


def nhwc_view(arr: Any, shape4: tuple[int, ...], batched: bool, layout: str) -> Any:
    """The batched NHWC view ``shape4`` of a device array in ``layout`` (no copy)."""
    st = tuple(arr.strides)
    if not batched:
        st = (lead_stride(arr), *st)
    if layout == "NCHW":
        st = (st[0], st[2], st[3], st[1])
    return _interop.view(arr, shape4, st)
