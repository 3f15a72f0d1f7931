"""Every kernel build the CUDA backend can launch, with the argument types it launches it with,
for PTX compilation without a GPU (tests/test_cuda_ptx.py, benchmarks/cuda_resources.py).

The signatures are the Numba types of what each kernel's argument builder returns (host arrays
standing in for C-contiguous device arrays, which Numba types alike), so a change to a kernel's
parameters reaches the PTX checks through the same builder the backend calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numba
import numpy as np

from .._spec import Activation, make_spec
from .depthwise import GENERIC, SPECIALISED, depthwise_args, depthwise_kernel
from .gemm import OPS, gemm_args, gemm_kernel, halo_possible
from .layout import copy4d, copy4d_args
from .separable import halo_shape


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(numba.typeof(a) for a in args)


def _sample_spec(op: str) -> Any:
    return make_spec(
        op,
        x_shape=(1, 6, 6, 2),
        layout="NHWC",
        kernel=(3, 3) if op != "pointwise" else (1, 1),
        c_in_kernel=2,
        multiplier=1,
        c_out=2,
        padding=1 if op != "pointwise" else "valid",
        activation=Activation.RELU,
        mid_activation=Activation.RELU6 if op == "separable" else Activation.NONE,
    )


def _strided(dt: np.dtype, layout: str) -> np.ndarray:
    a = np.zeros((2, 2, 2, 4), dt)
    return a if layout == "C" else a[..., ::2]


def ptx_cases(
    tile: tuple[int, int, int, int, int], registers: int
) -> Iterator[tuple[str, Any, tuple[Any, ...], dict[str, Any]]]:
    """(name, python function, signature, compile_ptx options) for every kernel build the
    backend can launch with this tile and register budget."""
    from ._jit import launch_bounds

    bounds = launch_bounds((tile[0] // tile[3]) * (tile[1] // tile[4]), registers)
    gopt = {} if bounds is None else {"launch_bounds": bounds}
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        a4, a3, a2, a1 = (np.zeros((1,) * nd, dt) for nd in (4, 3, 2, 1))
        # layout, contiguity and dtype conversions: any source to any destination layout
        for sdt in (np.dtype(np.float32), np.dtype(np.float64)):
            for sl in ("C", "A"):
                for dl in ("C", "A"):
                    sig = _signature(copy4d_args(_strided(sdt, sl), _strided(dt, dl)))
                    yield (f"copy4d {sdt}[{sl}]->{dt}[{dl}]", copy4d().py_func, sig, {})
        dsig = _signature(depthwise_args(_sample_spec("depthwise"), a4, a3, a1, a4))
        gsig = {op: _signature(gemm_args(_sample_spec(op), a4, a3, a1, a2, a1, a4)) for op in OPS}
        for key in (*SPECIALISED, GENERIC):
            yield (f"depthwise {key} {dt}", depthwise_kernel(*key, dt).py_func, dsig, {})
            for op in ("separable", "conv2d"):
                g = gemm_kernel(op, *key, dt, tile, (0, 0), registers)
                yield (f"{op} {key} {dt}", g.py_func, gsig[op], gopt)
            if halo_possible(key, dt, tile):
                g = gemm_kernel("separable", *key, dt, tile, halo_shape(tile), registers)
                yield (f"separable halo {key} {dt}", g.py_func, gsig["separable"], gopt)
        g = gemm_kernel("pointwise", *GENERIC, dt, tile, (0, 0), registers)
        yield (f"pointwise {dt}", g.py_func, gsig["pointwise"], gopt)
        yield from backward_ptx_cases(dt)


def backward_ptx_cases(dt: np.dtype) -> Iterator[tuple[str, Any, tuple[Any, ...], dict[str, Any]]]:
    """The backward kernels (cuda/backward.py) of ``dt``, for every way the final
    activation's mask is read, with the argument types gemm_grads / conv2d_grads launch them
    with (device arrays C-contiguous, Python ints, the geometry tuple)."""
    from .. import _config
    from . import backward as bw

    tile = tuple(_config.CUDA_BACKWARD_TILE)
    a5, a4, a3, a2, a1 = (np.zeros((1,) * nd, dt) for nd in (5, 4, 3, 2, 1))
    geo = _sample_spec("separable").geometry
    i = 0  # a Python int, as the launches pass band bounds and sizes
    masks = {bw.Y_NONE: a4, bw.Y_OUTPUT: a4, bw.Y_MASK: np.zeros((1,) * 4, np.bool_)}
    for ymode, ysrc in masks.items():
        for has_dw in (True, False):
            k = bw.pw_grad_kernel(dt, has_dw, ymode, tile)
            sig = _signature((a4, a3, a1, a4, ysrc, a3, a2, geo, i, i))
            yield (f"backward pw_grad dw={has_dw} y={ymode} {dt}", k.py_func, sig, {})
            k = bw.gm_kernel(dt, has_dw, ymode, tile)
            sig = _signature((a4, a3, a1, a4, ysrc, a2, a2, i, i, geo, i, i))
            yield (f"backward gm dw={has_dw} y={ymode} {dt}", k.py_func, sig, {})
        k = bw.dw_gm_kernel(dt, ymode)
        sig = _signature((a4, a3, a1, a4, ysrc, a2, i, i, geo, i))
        yield (f"backward dw_gm y={ymode} {dt}", k.py_func, sig, {})
        yield (f"backward conv2d_dx y={ymode} {dt}", bw.conv2d_dx_kernel(dt, ymode).py_func,
               _signature((a4, ysrc, a4, a4, geo, i)), {})  # fmt: skip
        yield (f"backward conv2d_dw y={ymode} {dt}", bw.conv2d_dw_kernel(dt, ymode).py_func,
               _signature((a4, a4, ysrc, a5, geo, i)), {})  # fmt: skip
        yield (f"backward colsum y={ymode} {dt}", bw.colsum_kernel(dt, ymode).py_func,
               _signature((a4, ysrc, a2, i)), {})  # fmt: skip
    yield (f"backward dx_band {dt}", bw.dx_band_kernel(dt).py_func,
           _signature((a2, a3, a4, i, i, i, i, i, i, geo)), {})  # fmt: skip
    yield (f"backward dw_band {dt}", bw.dw_band_kernel(dt, 8, 32).py_func,
           _signature((a4, a2, a3, i, i, i, i, i, i, geo)), {})  # fmt: skip
    yield (f"backward combine {dt}", bw.combine_kernel().py_func, _signature((a2, a1)), {})
    yield (f"backward fill {dt}", bw.fill_kernel().py_func, _signature((a1, dt.type(0))), {})
