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
