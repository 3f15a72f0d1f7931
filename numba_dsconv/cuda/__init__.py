"""The CUDA backend: ``@cuda.jit`` kernels, one module per operation family, mirroring
``numba_dsconv/cpu``.

- ``depthwise.py``: the depthwise kernel
- ``gemm.py``: the tiled GEMM kernel of pointwise, separable and conv2d (load A with the op's
  producer, load B, multiply, epilogue)
- ``pointwise.py``, ``separable.py``, ``conv2d.py``: the producers of the GEMM's A tile (the
  separable one is the fused depthwise, flat or halo-tiled)
- ``layout.py``: the conversion kernel (layouts, strides, dtypes) and zero-copy NHWC views
- ``backend.py``: ``CudaBackend`` (the api's hooks) and the launch plans
- ``_interop.py``: zero-copy views of foreign CUDA arrays, the caller's stream, allocation
- ``_jit.py``: jit options (launch bounds), device functions, the activation
- ``_ptx.py``, ``_resources.py``: every build for PTX compilation, and what ptxas says of it

Nothing here touches the GPU at import time; ``numba.cuda`` itself is imported only when a
call asks for the CUDA device.
"""

from __future__ import annotations

from typing import Any

_NO_GPU = (
    "device={dev!r}: {why}. Use device='cpu' (or install a GPU build: "
    "pip install 'numba-dsconv[cuda12]' or 'numba-dsconv[cuda13]')"
)


def get_backend(device: Any, template: Any) -> Any:
    """A CudaBackend for ``device`` (a _dispatch.Device) and the input ``template``.

    Raises ValueError, naming the device, when no usable GPU exists.
    """
    dev = str(device)
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba without its CUDA target
        why = "numba's CUDA target is not installed"
        raise ValueError(_NO_GPU.format(dev=dev, why=why)) from exc
    if not cuda.is_available():
        raise ValueError(
            _NO_GPU.format(dev=dev, why="no usable CUDA GPU was found (no device or driver)")
        )
    from .backend import CudaBackend

    return CudaBackend(device, template)


def describe_devices() -> list[str]:
    """'cuda:N (name)' for every visible GPU; [] where there is none."""
    try:
        from numba import cuda

        if not cuda.is_available():
            return []
        out = []
        for i, gpu in enumerate(cuda.gpus):
            name = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
            out.append(f"cuda:{i} ({name})")
        return out
    except Exception:  # pragma: no cover - a broken driver must not break `info`
        return []
