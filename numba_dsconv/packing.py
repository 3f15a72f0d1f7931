"""GEMM weights packed once for the CPU kernels: ``pack(pw)`` (pointwise weights) or
``pack(w)`` (conv2d's).

Each call of ``pointwise``, ``separable`` or ``conv2d`` on the CPU copies its weights, panel by
panel, into the layout the GEMM micro-kernel reads (cpu/pointwise.py, ``gemm_tile``), because
an array can change between calls. Inference runtimes pack once, when the model is loaded;
``pack`` does the same for a layer whose weights are fixed: the result is a snapshot (a private
copy of the weights and their panels) that every later call reads as it is. On a weight-bound
layer (few pixels, many channels: MobileNetV1's last layers at batch 1) this saves a tenth to a
third of the call (BENCHMARKS.md).

A ``PackedWeights`` is accepted wherever ``pw`` is, or for packed conv2d weights wherever
conv2d's ``w`` is (forward and gradient functions, NumPy and torch CPU inputs, dask arrays);
the CUDA backend and the gradients read its weights. Pack again after changing the weights:
the snapshot never sees the change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PackedWeights", "pack"]


class PackedWeights:
    """Pointwise weights (C_in, C_out) or (1, 1, C_in, C_out), or conv2d weights
    (K_h, K_w, C_in, C_out), packed for the CPU GEMM: make one with :func:`numba_dsconv.pack`.
    Read-only; ``shape``, ``dtype`` and ``ndim`` are those of the array given, and
    ``numpy.asarray`` gives its values back."""

    __slots__ = ("_panels", "_shape", "_signature", "_stand_in", "_weights")

    def __init__(self, weights: np.ndarray, panels: np.ndarray, shape: tuple[int, ...]) -> None:
        # kept writable (never written) so that the kernels see the array types of a plain
        # call: a read-only array is another Numba type, another compilation
        self._weights = weights  # the GEMM's (C_in, C_out), or (K_h * K_w * C_in, C_out)
        self._panels = panels  # cpu.pointwise.pack_panels' layout
        self._shape = shape
        # what every call reads, worked out once (a snapshot never changes): the api fast
        # path's key, and the kernels' stand-in for w (``kernel_operands``)
        self._signature = (shape, PackedWeights, weights.dtype)
        self._stand_in = panels[0]  # (no zero-sized weights: at least one panel)

    @property
    def weights(self) -> np.ndarray:
        """The weights as the GEMM's matrix, read-only: (C_in, C_out), or for conv2d weights
        (K_h * K_w * C_in, C_out)."""
        v = self._weights.view()
        v.flags.writeable = False
        return v

    @property
    def panels(self) -> np.ndarray:
        """The weights in the GEMM micro-kernel's panel layout, read-only."""
        v = self._panels.view()
        v.flags.writeable = False
        return v

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._weights.dtype  # (every fast-path call reads it: no view made)

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def reshape(self, shape: tuple[int, ...]) -> Any:
        """The same packed weights seen as the GEMM's matrix (how the calls read a 4-D pw; a
        conv2d pack so seen serves as pw of K_h * K_w * C_in input channels), or as
        (1, 1, rows, C_out); a NumPy array of any other shape."""
        shape = tuple(shape)
        if shape == self._shape:
            return self
        if shape in (self._weights.shape, (1, 1, *self._weights.shape)):
            return PackedWeights(self._weights, self._panels, shape)
        return self.weights.reshape(shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.weights.reshape(self._shape)
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a.copy() if copy else a

    def __repr__(self) -> str:
        return f"PackedWeights(shape={self._shape}, dtype={self.dtype})"


def pack(pw: Any) -> PackedWeights:
    """Pack weights once for the CPU kernels: the pointwise weights of
    :func:`numba_dsconv.pointwise` and :func:`numba_dsconv.separable`, or the weights of
    :func:`numba_dsconv.conv2d`.

    Parameters
    ----------
    pw : array, float32 or float64 (NumPy, a torch CPU tensor, anything ``numpy.asarray``
        takes): pointwise weights (C_in, C_out) or (1, 1, C_in, C_out), or conv2d weights
        (K_h, K_w, C_in, C_out).

    Returns
    -------
    PackedWeights: a snapshot of ``pw``; pass it as ``pw`` (or as conv2d's ``w``). It is read
    by calls of its own dtype; a call computing in another dtype (x float64, pw float32)
    converts its weights as it would convert an array's.

    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((1, 7, 7, 64), np.float32)
    >>> pw = np.full((64, 128), 0.5, np.float32)
    >>> packed = nd.pack(pw)
    >>> packed
    PackedWeights(shape=(64, 128), dtype=float32)
    >>> bool((nd.pointwise(x, packed) == nd.pointwise(x, pw)).all())
    True
    >>> w = np.full((3, 3, 64, 32), 0.5, np.float32)
    >>> bool((nd.conv2d(x, nd.pack(w)) == nd.conv2d(x, w)).all())
    True
    """
    from . import _config, api
    from ._dispatch import as_host_array
    from .cpu.layout import contiguous
    from .cpu.pointwise import packed_weights

    if isinstance(pw, PackedWeights):
        return pw
    arr = as_host_array(pw, "pw")
    api._check_float(arr, "pw")
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 4 and shape[:2] != (1, 1):  # conv2d weights: the GEMM's rows tap by tap
        if 0 in shape:
            raise ValueError(f"pw must have no zero-sized dimension; got shape {shape}")
        m = arr.reshape(shape[0] * shape[1] * shape[2], shape[3])
    else:
        api._check_ndim(
            arr, "pw", (2, 4), "2-D (C_in, C_out) or 4-D (1, 1, C_in, C_out) or (K_h, K_w, C_in, "
            "C_out)"
        )  # fmt: skip
        m = api.pointwise_matrix(arr, "pw", lambda a, shape, name: a.reshape(shape))
    weights = contiguous(m, m.dtype)  # a private copy: the caller's array may change
    if np.may_share_memory(weights, arr):
        weights = weights.copy()
    panels = packed_weights(weights, _config.use_parallel(weights.size))
    return PackedWeights(weights, panels, shape)


def unpacked(a: Any) -> Any:
    """``a``'s weights in its shape where it is a PackedWeights, else ``a``."""
    return a._weights.reshape(a._shape) if type(a) is PackedWeights else a


def kernel_operands(pw: Any, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, packed) for ``gemm_tile``: packed weights as their panels (w then only a stand-in
    of the same array type: gemm_tile reads no weight of w when given panels), else pw as it
    is and ``empty`` (no panels: each task packs its own)."""
    if type(pw) is PackedWeights:
        return pw._stand_in, pw._panels
    return pw, empty
