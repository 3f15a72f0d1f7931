"""The CPU backend: host arrays in, the Numba kernels run, the caller's array type out.

``run`` receives host arrays that api.py has validated (dtype float32/float64, shapes checked)
and returns the result in the caller's layout. Internally everything is NHWC, C-contiguous
(layout.py); each kernel module builds its own arguments (``Kernel.args``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from .. import _config
from .._dispatch import as_host_array, host_out, host_overlap, wrap_host
from .._spec import ConvSpec
from ..packing import PackedWeights, unpacked
from . import backward
from ._jit import Kernel
from .conv2d import CONV2D
from .depthwise import DEPTHWISE
from .layout import (
    TRANSPOSE,
    channels_last,
    contiguous,
    from_nhwc,
    nhwc_view,
    result_allocator,
    to_nhwc,
)
from .pointwise import POINTWISE, packed_weights
from .separable import SEPARABLE

__all__ = ["CPU", "KERNELS", "CpuBackend", "threading_layer"]

KERNELS: dict[str, Kernel] = {
    "conv2d": CONV2D,
    "depthwise": DEPTHWISE,
    "pointwise": POINTWISE,
    "separable": SEPARABLE,
}


def threading_layer() -> str:
    """The Numba threading layer in use (runs one tiny parallel kernel to make Numba pick it,
    unless a layer runs already or this is a forked child that must stay serial)."""
    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel region has run yet
        pass
    if _config.SERIAL_ONLY:  # pragma: no cover - a pool already ran in the parent
        return f"{numba.config.THREADING_LAYER} (not started: serial kernels after fork)"
    a = np.ones((1, 1, 1), np.float32)
    with _config.call_guard():
        TRANSPOSE.parallel(a, np.empty_like(a))
    return str(numba.threading_layer())


def launch(spec: ConvSpec, x: np.ndarray, weights: tuple, biases: tuple, out: np.ndarray) -> None:
    """Run the kernel of ``spec.op`` on NHWC, C-contiguous x and out: the serial build where
    the call has little work (waking the thread pool would cost more), else the parallel
    one."""
    k = KERNELS[spec.op]
    parallel = _config.use_parallel(spec.macs)
    args = k.args(spec, out.dtype, parallel)(x, weights, biases, out)
    run_kernel(k.parallel if parallel else k.serial, parallel, args)


def run_kernel(fn: Any, parallel: bool, args: tuple) -> None:
    """Run one build of a kernel; a parallel one holding the launch lock where the threading
    layer needs one (``_config.launch_lock``, asked per call: a forked child gets a new
    lock)."""
    lock = _config.launch_lock() if parallel else None
    if lock is None:
        fn(*args)
    else:
        with lock:
            fn(*args)


def prepared_launch(
    spec: ConvSpec, dtype: np.dtype, x: Any, weights: tuple, out: Any
) -> Callable[[Any, tuple, tuple, Any], Any] | None:
    """``launch(x, weights, biases, out)`` for later NumPy calls of the signature of this one
    (validated and run: the api's fast path keeps it), or None where x or out would need a
    copy (another dtype or memory order) or the call has no pixels: those take
    ``CpuBackend.run``. x, the weights (kernel-shaped) and out (or
    None) are this call's; the signature fixes their shapes, strides and dtypes, so a later
    call's need no checks. What the signature fixes is worked out here once (the build, the
    kernel's static arguments, the output shape), not per call, and again where
    _config.launch_settings() changed since (the thread count of a dask worker's task, the GEMM
    blocking that ``numba-dsconv tune`` tries). NCHW arrays in channels-last memory are NHWC
    views, as in ``run``."""
    if spec.n == 0 or not (type(x) is np.ndarray and x.dtype == dtype):
        return None
    if not nhwc_view(x, spec).flags.c_contiguous:
        return None
    if spec.layout == "NCHW" and not channels_last(x, spec):
        return None  # (an NCHW x contiguous both ways, C_in = 1: run returns C order)
    # weights in another dtype or memory order (torch's: a transposed pw, a strided dw view)
    # are converted per call, as ``run`` converts them
    convert = any(
        w.dtype != dtype or not (type(w) is PackedWeights or w.flags.c_contiguous) for w in weights
    )
    if out is not None and not (out.dtype == dtype and nhwc_view(out, spec).flags.c_contiguous):
        return None

    def prepare() -> tuple:  # (parallel, the build, its argument builder, settings, lock)
        k = KERNELS[spec.op]
        parallel = _config.use_parallel(spec.macs)
        fn = k.parallel if parallel else k.serial
        # the settings first: their thread count starts the pool where nothing has yet (a plan
        # is remembered without running), and the launch lock is known only once it runs (a
        # forked child changes the settings: prepared again)
        settings = _config.launch_settings(parallel)
        lock = _config.launch_lock() if parallel else None
        return parallel, fn, k.args(spec, dtype, parallel), settings, lock

    state = [prepare()]  # one tuple, replaced whole: a concurrent call sees one preparation
    shape = spec.out_nhwc
    alloc = result_allocator(math.prod(shape) * dtype.itemsize)
    nhwc = spec.batched and spec.layout == "NHWC"  # x and the result as the kernel has them

    def launch(x: Any, weights: tuple, biases: tuple, out: Any) -> Any:
        parallel, fn, build, settings, lock = state[0]
        if _config.launch_settings(parallel) != settings:
            parallel, fn, build, settings, lock = state[0] = prepare()
        y = alloc(shape, dtype) if out is None else nhwc_view(out, spec)
        if convert:
            weights = tuple([_kernel_weights(w, dtype) for w in weights])
        args = build(x if nhwc else nhwc_view(x, spec), weights, biases, y)
        if lock is None:  # (run_kernel, inlined: one Python call less between two kernels)
            fn(*args)
        else:
            with lock:
                fn(*args)
        if out is not None:
            return out
        return y if nhwc else from_nhwc(y, spec, keep_nhwc=True)

    return launch


class CpuBackend:
    """Host arrays (NumPy, torch CPU tensors) on the Numba CPU kernels."""

    @staticmethod
    def asarray(a: Any, name: str) -> np.ndarray:
        return as_host_array(a, name)

    @staticmethod
    def out_array(out: Any) -> np.ndarray:
        return host_out(out, "a NumPy array (or torch CPU tensor) for the CPU backend")

    @staticmethod
    def reshape(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
        return a.reshape(shape)  # copies when a view is impossible; never writes to a

    @staticmethod
    def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
        return host_overlap(a, b)

    @staticmethod
    def run(
        spec: ConvSpec,
        dtype: np.dtype,
        x: np.ndarray,
        weights: tuple[np.ndarray, ...],
        biases: tuple[np.ndarray | None, ...],
        out: np.ndarray | None,
    ) -> np.ndarray:
        """Compute one call. ``weights`` are in the kernels' shapes (see api.py); ``out``
        validated."""
        ws = tuple([_kernel_weights(w, dtype) for w in weights])  # (a list: no generator)
        out_view = None if out is None else nhwc_view(out, spec)
        if out_view is not None and out_view.flags.c_contiguous and out_view.dtype.isnative:
            target = out_view
        else:
            shape = spec.out_nhwc
            target = result_allocator(math.prod(shape) * dtype.itemsize)(shape, dtype)
        if spec.n > 0:
            launch(spec, to_nhwc(x, spec, dtype), ws, biases, target)
        if out_view is None:
            return from_nhwc(target, spec, channels_last(x, spec))
        if target is not out_view:
            out_view[...] = target
        return out

    @staticmethod
    def run_grad(
        spec: ConvSpec,
        dtype: np.dtype,
        grad: np.ndarray,
        x: np.ndarray,
        weights: tuple[np.ndarray, ...],
        biases: tuple[np.ndarray | None, ...],
        output: np.ndarray | None,
        need: dict[str, bool],
        dtypes: dict[str, np.dtype],
    ) -> dict[str, np.ndarray]:
        """The gradients ``need`` asks for, by slot (grad.SLOTS): dx in x's layout (and memory
        order), the weights' in the kernels' shapes, each in ``dtypes[slot]``. ``output``: the
        forward's result or the final activation's bool mask, or None (recomputed)."""
        # the depthwise / conv2d weights C-contiguous; pw as given (gemm_grads takes what it
        # needs of pw and its transpose: torch's layout gives the transpose for free)
        ws = tuple(unpacked(w) if w.ndim == 2 else contiguous(unpacked(w), dtype) for w in weights)
        xn = _writable(to_nhwc(x, spec, dtype))
        g = _writable(to_nhwc(grad, spec, dtype))
        if output is not None:  # the forward's result (dtype) or the activation's bool mask
            kind = np.dtype(np.bool_) if output.dtype == np.bool_ else dtype
            output = _writable(to_nhwc(output, spec, kind))
        y = output
        if spec.op == "conv2d":
            found = backward.conv2d_grads(spec, xn, g, y, ws[0], biases[0], need, dtype)
        else:
            found = backward.gemm_grads(spec, xn, g, y, ws, biases, need, dtype)
        if "x" in found:
            found["x"] = from_nhwc(found["x"], spec, channels_last(x, spec))
        return {k: v.astype(dtypes[k], copy=False) for k, v in found.items()}

    @staticmethod
    def wrap(result: np.ndarray, template: Any) -> Any:
        return wrap_host(result, template)


def _kernel_weights(w: np.ndarray | PackedWeights, dtype: np.dtype) -> Any:
    """Weights as the kernels take them: C-contiguous in the call's dtype, or packed GEMM
    weights (pw, conv2d's w; the kernels' ``*_args`` pass their panels): those packed by the
    caller, where they have the call's dtype, or packed here from a transposed matrix (torch's
    pointwise weight (C_out, C_in) seen as (C_in, C_out)) in one pass, instead of a transposed
    copy that every task then packs again (1024 x 1024: 0.3 ms against 0.5 ms and more)."""
    if type(w) is PackedWeights:
        return w if w.dtype == dtype else contiguous(unpacked(w), dtype)
    if w.ndim == 2 and w.dtype == dtype and w.T.flags.c_contiguous and not w.flags.c_contiguous:
        return PackedWeights(w, packed_weights(w, _config.use_parallel(w.size)), w.shape)
    return contiguous(w, dtype)


def _writable(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy where it is read-only: the backward kernels take one array type for
    the caller's data and their own buffers."""
    return a if a.flags.writeable else a.copy()


CPU = CpuBackend()  # stateless: one instance serves every call
