"""Zero-copy interop with CUDA arrays and the caller's stream.

Foreign CUDA arrays (CuPy, torch, anything with ``__cuda_array_interface__`` or a CUDA DLPack
device) are viewed as numba device arrays once per call, without a copy and without the
implicit synchronisation numba would do (we launch on the caller's stream instead). Results are
allocated with the caller's own library, so a CuPy array in gives a CuPy array out, a torch
tensor gives a torch tensor, on the same device.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from numba import cuda

from .._dispatch import check_torch, library
from ._jit import SIMULATOR


def device_index(a: Any) -> int | None:
    """The CUDA device a foreign array lives on, where its library says."""
    lib = library(a)
    if lib == "torch.cuda":
        return a.device.index
    if lib == "cupy":
        return int(a.device.id)
    if lib == "dlpack":
        return int(a.__dlpack_device__()[1])
    if lib == "numba" and not SIMULATOR:
        try:  # the context that owns the allocation
            return int(a.gpu_data.context.device.id)
        except AttributeError:
            return None
    return None


def as_device_array(a: Any, name: str, writable: bool = False) -> Any:
    """A numba device array viewing ``a`` (no copy, no implicit sync; ``writable``: the
    caller's out=, never a copy)."""
    lib = library(a)
    if lib == "numba":
        return a
    if lib == "torch.cuda":
        # (a tensor that requires grad is refused in grad mode, else detached)
        a = check_torch(a, name, writable=writable)
    elif lib == "dlpack":
        try:
            import cupy

            a = cupy.from_dlpack(a)
        except ImportError:
            try:
                import torch.utils.dlpack
            except ImportError:
                raise TypeError(
                    f"{name} is a DLPack CUDA array without __cuda_array_interface__; "
                    "install CuPy or torch to bridge it, or pass a CuPy/torch/numba array"
                ) from None
            a = torch.utils.dlpack.from_dlpack(a)
    return cuda.as_cuda_array(a, sync=False)


def view(arr: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A strided view of a device array's memory (permuted or with added unit axes)."""
    if SIMULATOR:
        base = arr._ary
        return type(arr)(np.lib.stride_tricks.as_strided(base, shape, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, arr.dtype, stream=arr.stream, gpu_data=arr.gpu_data)


def byte_range(arr: Any) -> tuple[int, int]:
    """[lo, hi) byte addresses a (device or host) array can touch."""
    if SIMULATOR and not isinstance(arr, np.ndarray):
        arr = arr._ary
    if isinstance(arr, np.ndarray):
        ptr = arr.__array_interface__["data"][0]
    else:
        ptr = arr.__cuda_array_interface__["data"][0]
    lo = hi = ptr
    for n, s in zip(arr.shape, arr.strides, strict=True):
        if n == 0:
            return (ptr, ptr)
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return (lo, hi + arr.dtype.itemsize)


_STREAMS: dict[int, Any] = {}  # external streams by handle
_DEFAULT_STREAMS: dict[int, Any] = {}  # numba's default stream object by device


def caller_stream(template: Any, index: int) -> Any:
    """The caller's current stream: torch's or CuPy's for their arrays, else the default."""
    lib = library(template)
    ptr = 0
    if lib == "torch.cuda":
        import torch

        ptr = int(torch.cuda.current_stream(index).cuda_stream)
    elif lib == "cupy":
        import cupy

        ptr = int(cupy.cuda.get_current_stream().ptr)
    if ptr == 0 or SIMULATOR:
        s = _DEFAULT_STREAMS.get(index)
        if s is None:
            # numba's built-in simulator (numba without numba-cuda) has no default_stream()
            default = getattr(cuda, "default_stream", None)
            s = _DEFAULT_STREAMS[index] = default() if default is not None else cuda.stream()
        return s
    s = _STREAMS.get(ptr)
    if s is None:
        s = _STREAMS[ptr] = cuda.external_stream(ptr)
    return s


def allocate(template: Any, shape: tuple[int, ...], dtype: np.dtype, index: int, stream: Any):
    """(caller-type array, numba view of it) of ``shape``: torch/CuPy allocators where used."""
    lib = library(template)
    if lib == "torch.cuda":
        import torch

        tdt = torch.float32 if dtype == np.float32 else torch.float64
        t = torch.empty(shape, dtype=tdt, device=f"cuda:{index}")
        return t, cuda.as_cuda_array(t, sync=False)
    if lib == "cupy":
        import cupy

        with cupy.cuda.Device(index):
            c = cupy.empty(shape, dtype=dtype)
        return c, cuda.as_cuda_array(c, sync=False)
    d = cuda.device_array(shape, dtype=dtype, stream=stream)
    return d, d


_NO_SWITCH = contextlib.nullcontext()
_DEVICE_COUNT: list[int] = []


def gpu_context(index: int) -> Any:
    """A context manager making device ``index`` current for numba's calls inside it.

    With one visible GPU, and no context or that GPU's primary context current in this thread
    (numba binds the primary context, the one torch and CuPy use too, on first use), there is
    nothing to switch: no context push and pop (driver calls behind a lock). Another context
    current (PyCUDA, a green context) still gets numba's push of the primary one.
    """
    if SIMULATOR:
        return _NO_SWITCH
    if not _DEVICE_COUNT:
        _DEVICE_COUNT.append(len(cuda.gpus))
    if _DEVICE_COUNT[0] == 1 and _primary_or_none_current():
        return _NO_SWITCH
    return cuda.gpus[index]


def _primary_or_none_current() -> bool:
    from numba.cuda.cudadrv.driver import driver

    with driver.get_active_context() as active:
        if not active:
            return True
        primary = cuda.gpus[0].get_primary_context()
        return int(active.context_handle) == int(primary.handle)
