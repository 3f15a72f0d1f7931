"""Device resolution and the round trip of array types.

NumPy (and anything ``numpy.asarray`` accepts) and PyTorch CPU tensors run on the CPU backend;
arrays living on a CUDA device (numba device arrays, CuPy, torch CUDA tensors: anything with
``__cuda_array_interface__`` or a CUDA DLPack device) run on the CUDA backend. The result comes
back as the caller's array type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
_DLPACK_CUDA = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def _is_torch(a: object) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "is_cuda")


def is_cuda_array(a: object) -> bool:
    """True for an array that lives in CUDA device memory."""
    if a is None or isinstance(a, np.ndarray):
        return False
    if _is_torch(a):
        return bool(a.is_cuda)  # type: ignore[attr-defined]
    if type(a).__module__.startswith("numba.cuda"):  # numba device arrays (and the simulator's)
        return True
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dl = getattr(a, "__dlpack_device__", None)
    if dl is not None:
        try:
            return int(dl()[0]) in _DLPACK_CUDA
        except Exception:
            return False
    return False


def parse_device(device: object) -> Device | None:
    """None | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> Device; anything else raises."""
    if device is None:
        return None
    if not isinstance(device, str):
        kind = getattr(device, "type", None)
        if isinstance(kind, str):  # torch.device and look-alikes
            index = getattr(device, "index", None)
            device = kind if index is None else f"{kind}:{index}"
        else:
            raise TypeError(
                f"device must be None, 'cpu', 'cuda' or 'cuda:N' (a string); got {device!r}"
            )
    m = _DEVICE_RE.match(device.strip().lower())
    if m is None:
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" and index not in (None, "0"):
        raise ValueError(f"device 'cpu' takes no index other than 0; got {device!r}")
    return Device(kind, None if index is None or kind == "cpu" else int(index))


def resolve_device(device: object, x: object) -> Device:
    """The device to compute on: the one asked for, else where ``x`` lives."""
    dev = parse_device(device)
    if dev is not None:
        return dev
    return Device("cuda") if is_cuda_array(x) else Device("cpu")


def _torch_host(a: Any, name: str) -> np.ndarray:
    import torch

    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64; got torch dtype {a.dtype}")
    # No autograd: the result never tracks gradients, so detaching loses nothing.
    return a.detach().resolve_conj().numpy()


def as_host_array(a: object, name: str) -> np.ndarray:
    """A NumPy view (or conversion) of a host array-like; a CUDA array is an error."""
    if isinstance(a, np.ndarray):
        return a
    if is_cuda_array(a):
        raise ValueError(
            f"{name} lives on a CUDA device but the computation runs on the CPU "
            f"(device='cpu' or x on the host); move it to the host or pass device='cuda'"
        )
    if _is_torch(a):
        return _torch_host(a, name)
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be an array; got {type(a).__name__}: {exc}") from None
    return arr


def host_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two host arrays may share memory (conservative when numpy cannot tell)."""
    try:
        return bool(np.shares_memory(a, b, max_work=10**6))
    except np.exceptions.TooHardError:
        return True  # cannot prove they are disjoint: refuse rather than risk it


def wrap_like(result: np.ndarray, template: object) -> Any:
    """Return ``result`` as the caller's host array type (NumPy or a torch CPU tensor)."""
    if _is_torch(template):
        import torch

        return torch.from_numpy(result)
    return result
