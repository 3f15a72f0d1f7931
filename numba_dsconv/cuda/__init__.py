"""The CUDA backend: @cuda.jit kernels (kernels.py), interop and streams (_interop.py), and the
launch logic (backend.py).

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
