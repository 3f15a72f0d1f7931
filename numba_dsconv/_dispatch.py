"""Device resolution, the one array classifier, the backend protocol, host array round trips.

NumPy (and anything ``numpy.asarray`` accepts) and PyTorch CPU tensors run on the CPU backend;
arrays living on a CUDA device (numba device arrays, CuPy, torch CUDA tensors: anything with
``__cuda_array_interface__`` or a CUDA DLPack device) run on the CUDA backend. The result comes
back as the caller's array type.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .packing import PackedWeights

if TYPE_CHECKING:
    from ._spec import ConvSpec

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
DLPACK_CUDA = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged

# What ``library`` answers for arrays in CUDA memory; everything else is a host array.
CUDA_LIBRARIES = frozenset({"numba", "torch.cuda", "cupy", "cai", "dlpack"})


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def library(a: object) -> str:
    """The one array classifier.

    Host arrays: 'numpy', 'torch' (a CPU tensor), 'dask' (a dask array, lazy: only api's
    dask path takes it), 'host' (anything else: lists, scalars, other array-likes, None).
    CUDA arrays: 'numba' (numba device arrays and the simulator's, and numba's managed and
    mapped arrays, which are NumPy arrays too: see ``is_cuda_array``),
    'torch.cuda', 'cupy', 'cai' (another ``__cuda_array_interface__``), 'dlpack' (a CUDA DLPack
    device without that interface).
    """
    t = type(a)
    if t is np.ndarray:
        return "numpy"
    mod = t.__module__
    if mod.startswith("numba.cuda"):
        return "numba"
    if isinstance(a, np.ndarray):
        return "numpy"
    if mod.startswith("torch") and hasattr(a, "is_cuda"):
        return "torch.cuda" if a.is_cuda else "torch"  # type: ignore[attr-defined]
    if mod.startswith("cupy"):
        return "cupy"
    if mod.startswith("dask.") and hasattr(a, "chunks"):
        return "dask"
    if hasattr(a, "__cuda_array_interface__"):
        return "cai"
    dl = getattr(a, "__dlpack_device__", None)
    if dl is not None:
        with contextlib.suppress(Exception):
            if int(dl()[0]) in DLPACK_CUDA:
                return "dlpack"
    return "host"


def is_cuda_array(a: object) -> bool:
    """True for an array that lives in CUDA device memory only. Memory both sides can read
    (numba's managed and mapped arrays, NumPy subclasses) is host memory for ``device=None``
    (the CPU computes) and a numba array for ``device='cuda'`` (viewed without a copy)."""
    return not isinstance(a, np.ndarray) and library(a) in CUDA_LIBRARIES


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


class Backend(Protocol):
    """What api.py asks of a backend (cpu/backend.py and cuda/backend.py implement it).

    A backend is made for one call: it knows the device and the input's array type.
    """

    def asarray(self, a: Any, name: str) -> Any:
        """``a`` as the backend's array type (a view where possible; never a write)."""

    def out_array(self, out: Any) -> Any:
        """The caller's ``out=`` as a writeable array of the backend (raises, naming out)."""

    def reshape(self, a: Any, shape: tuple[int, ...], name: str) -> Any:
        """``a`` with ``shape`` (a copy where a view would reinterpret memory)."""

    def overlaps(self, a: Any, b: Any) -> bool:
        """Whether two arrays may share memory."""

    def run(
        self,
        spec: ConvSpec,
        dtype: np.dtype,
        x: Any,
        weights: tuple[Any, ...],
        biases: tuple[Any, ...],
        out: Any,
    ) -> Any:
        """Compute one call; the result in the caller's layout (``out`` when given)."""

    def wrap(self, result: Any, template: Any) -> Any:
        """``result`` as the array type of ``template`` (the caller's x)."""


# --------------------------------------------------------------------------------------------
# host arrays (both backends take them)


def refuse_autograd(a: Any, name: str) -> None:
    """A torch tensor that requires grad, in grad mode: the core functions record no
    autograd graph, so detaching it would silently drop its gradient. TypeError, pointing at
    numba_dsconv.torch (under torch.no_grad() the tensor is read as it is)."""
    import torch

    if torch.is_grad_enabled():
        raise TypeError(
            f"{name} is a torch tensor that requires grad, and numba_dsconv.{{conv2d, "
            f"depthwise, pointwise, separable}} record no autograd graph: use numba_dsconv.torch "
            f"(its ops and modules train), or pass {name}.detach(), or call under "
            f"torch.no_grad()"
        )


def check_torch(a: Any, name: str, *, writable: bool = False) -> Any:
    """A torch tensor we can read (or, with ``writable``, write) through NumPy or
    ``__cuda_array_interface__``: strided, holding data, float32/float64, no autograd; a lazy
    conjugate or negative view is resolved (a copy) for reading and refused for writing, where
    a copy would lose the result. Raises, naming ``name``."""
    import torch

    if a.layout is not torch.strided:
        raise TypeError(
            f"{name} is a torch tensor with layout {a.layout}; pass a dense (strided) tensor, "
            f"e.g. {name}.to_dense()"
        )
    if a.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{name} is a torch tensor on device {str(a.device)!r}, which holds no data we can "
            f"read here; pass a CPU or CUDA tensor"
        )
    if a.dtype not in (torch.float32, torch.float64) and not (
        name == "mask" and a.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be float32 or float64; got torch dtype {a.dtype}")
    if a.requires_grad:
        refuse_autograd(a, name)
    if a.is_conj() or a.is_neg():
        if writable:
            raise ValueError(
                f"{name} is a lazily negated or conjugated torch view (its negative or "
                f"conjugate bit is set), which cannot be written in place; pass a plain tensor"
            )
        a = a.resolve_conj().resolve_neg()
    # (no gradient to lose here: refuse_autograd let it through only outside grad mode)
    return a.detach()


def _torch_numpy(a: Any, name: str, writable: bool = False) -> np.ndarray:
    """A CPU tensor as a NumPy view: the common case straight through ``.numpy()`` (which
    refuses meta, sparse and negative-bit tensors itself); ``check_torch`` for the rest."""
    if a.requires_grad:
        refuse_autograd(a, name)
    try:
        arr = a.detach().numpy()
    except (RuntimeError, TypeError):
        return check_torch(a, name, writable=writable).numpy()
    if arr.dtype.kind != "f":  # (never a conjugate view: that needs a complex dtype)
        check_torch(a, name)  # the torch dtype error (a gradient's bool mask passes)
    return arr


def _native(arr: np.ndarray) -> np.ndarray:
    """A float array in the machine's byte order (a big-endian input converted once)."""
    if arr.dtype.kind == "f" and not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _unmasked(a: np.ndarray, name: str, *, writable: bool = False) -> np.ndarray:
    """A masked array's data where nothing is masked; else TypeError (the mask would be
    ignored). An out= is refused with any mask (a masked result would be a new decision)."""
    if isinstance(a, np.ma.MaskedArray):
        mask = np.ma.getmask(a)
        if writable or (mask is not np.ma.nomask and mask.any()):
            raise TypeError(
                f"{name} is a NumPy masked array; its mask would be ignored. Pass "
                f"{name}.filled(value) (the value masked elements should take) or {name}.data"
            )
        return a.data
    return a


def as_host_array(a: object, name: str) -> np.ndarray:
    """A NumPy view (or conversion) of a host array-like; a CUDA array is an error."""
    if type(a) is np.ndarray:
        return a if a.dtype.isnative else _native(a)
    if isinstance(a, np.ndarray):
        return _native(_unmasked(a, name))
    if type(a) is PackedWeights:
        if name not in ("pw", "w"):
            raise TypeError(
                f"{name} is a PackedWeights (numba_dsconv.pack): only pw, the pointwise "
                f"weights, and w, conv2d's, may be packed"
            )
        return a  # type: ignore[return-value]  # the CPU backend reads its panels
    lib = library(a)
    if lib in CUDA_LIBRARIES:
        raise ValueError(
            f"{name} lives on a CUDA device but the computation runs on the CPU "
            f"(device='cpu' or x on the host); move it to the host or pass device='cuda'"
        )
    if lib == "torch":
        return _torch_numpy(a, name)
    if lib == "dask":  # never computed behind the caller's back
        raise TypeError(
            f"{name} is a dask array; only x may be one (the result is then a lazy dask "
            f"array); pass {name}.compute() for weights, biases and out"
        )
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be an array; got {type(a).__name__}: {exc}") from None
    return _native(arr)


def self_overlapping(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether two elements of an array may share memory (a zero stride, an expanded tensor,
    an ``as_strided`` view). Sufficient for disjointness: with the dimensions sorted by
    stride, each stride spans every element of the smaller ones. Arrays it cannot prove
    disjoint (exotic interleaved strides) count as overlapping."""
    dims = sorted((abs(st), n) for n, st in zip(shape, strides, strict=True) if n > 1)
    span = itemsize
    for st, n in dims:
        if st < span:
            return True
        span = st * (n - 1) + span
    return False


def check_out_elements(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> None:
    """Refuse an ``out=`` whose elements alias each other (its result would be garbage)."""
    if self_overlapping(tuple(shape), tuple(strides), itemsize):
        raise ValueError(
            f"out has elements that share memory (shape {tuple(shape)}, strides "
            f"{tuple(strides)} bytes: an expanded or as_strided view); pass a buffer with one "
            f"element per result value, e.g. numpy.empty"
        )


def host_out(out: object, expected: str) -> np.ndarray:
    """A host ``out=`` (a NumPy array or a torch tensor) as a writeable NumPy view; anything
    else raises TypeError "out must be {expected}; got <type>" (a torch CUDA tensor, the
    ValueError that it lives on a CUDA device)."""
    if not isinstance(out, np.ndarray) and library(out) not in ("torch", "torch.cuda"):
        raise TypeError(f"out must be {expected}; got {type(out).__name__}")
    if isinstance(out, np.ndarray):
        arr = _unmasked(out, "out", writable=True)
    elif library(out) == "torch":
        arr = _torch_numpy(out, "out", writable=True)
    else:
        arr = as_host_array(out, "out")  # a CUDA tensor: the error that says so
    if not arr.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):  # (contiguous: disjoint)
        check_out_elements(arr.shape, arr.strides, arr.itemsize)
    return arr


def host_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two host arrays may share memory (conservative when numpy cannot tell)."""
    if type(a) is PackedWeights or type(b) is PackedWeights:
        return False  # a private copy
    try:
        return bool(np.shares_memory(a, b, max_work=10**6))
    except np.exceptions.TooHardError:
        return True  # cannot prove they are disjoint: refuse rather than risk it


def wrap_host(result: np.ndarray, template: object) -> Any:
    """Return ``result`` as the caller's host array type (NumPy or a torch CPU tensor)."""
    if library(template) == "torch":
        import torch

        return torch.from_numpy(result)
    return result
