"""The cuda.jit options of the CUDA kernels and the activation device function they share.

Nothing here compiles or touches a GPU at import. Under Numba's CUDA simulator (set
NUMBA_ENABLE_CUDASIM=1 before Python starts) the kernels run as Python; the simulator's jit takes
no launch bounds and no inlining hints, so those are only passed to the real target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import config, cuda

from .._spec import Activation

SIMULATOR = bool(config.ENABLE_CUDASIM)

NO_ACTIVATION = int(Activation.NONE)
RELU6 = int(Activation.RELU6)


def launch_bounds(threads: int, registers: int) -> tuple[int, int] | None:
    """(max threads per block, min resident blocks per multiprocessor) that hold a kernel of
    ``threads`` per block to at most ``registers`` per thread (64K registers per
    multiprocessor: 2 blocks of 256 threads at 128). None: no bounds (``registers`` <= 0).
    The shipped builds assemble without spills at 128 (the PTX tests check it)."""
    if registers <= 0:
        return None
    return (threads, max(1, 65536 // (registers * threads)))


def kernel_options(bounds: tuple[int, int] | None) -> dict[str, Any]:
    """cuda.jit keyword arguments of a kernel with these launch bounds."""
    return {} if bounds is None or SIMULATOR else {"launch_bounds": bounds}


def device_function(fn: Any) -> Any:
    """A device function the kernels call, inlined into them at the Numba IR level: the local
    and shared arrays it takes stay registers and ``ld.shared``, and PTX compiles without a
    GPU (a device function compiled on its own asks the current device for its compute
    capability)."""
    return cuda.jit(device=True, **({} if SIMULATOR else {"inline": "always"}))(fn)


def activation(dtype: np.dtype) -> Any:
    """The Activation device function for ``dtype``: act(v, code)."""
    zero = dtype.type(0)
    six = dtype.type(6)

    @device_function
    def activate(v, code):
        """NaN is neither < 0 nor > 6, so it propagates."""
        if code != NO_ACTIVATION:
            if v < zero:
                v = zero
            elif code == RELU6 and v > six:
                v = six
        return v

    return activate
