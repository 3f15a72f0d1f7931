"""The CUDA backend: device arrays in, kernels launched on the caller's stream, caller type out.

``run`` receives arrays api.py has validated: numba device arrays (zero-copy views of CuPy /
torch / numba arrays) or host NumPy arrays (copied in). Internally everything is NHWC and
C-contiguous; other layouts, strides and dtypes go through one conversion kernel (copy4d).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .. import _config
from .._dispatch import (
    CUDA_LIBRARIES,
    Device,
    as_host_array,
    check_out_elements,
    host_out,
    host_overlap,
    library,
    wrap_host,
)
from .._spec import ConvSpec
from ..packing import unpacked
from . import _interop, backward
from .depthwise import depthwise_args, depthwise_launch
from .gemm import gemm_args, gemm_launch
from .layout import as4d, copy4d, copy4d_args, nhwc_view


def _is_device(a: Any) -> bool:
    return not isinstance(a, np.ndarray)


def _copy(src: Any, dst: Any, stream: Any) -> None:
    """dst[...] = src on the device (any strides, casting), one thread per element."""
    threads = _config.CUDA_THREADS
    blocks = max(1, min(math.ceil(dst.size / threads), _config.CUDA_MAX_BLOCKS))
    copy4d()[blocks, threads, stream](*copy4d_args(src, dst))


_ZEROS: dict[tuple[int, int, str], Any] = {}
_PLANS: dict[tuple, tuple[Any, Any, int]] = {}
_PLANS_MAX = 256


def plan(spec: ConvSpec, dtype: np.dtype) -> tuple[Any, Any, int]:
    """(kernel build, grid, threads per block) for ``spec``: they depend only on the geometry,
    the dtype and the _config knobs, so they are worked out once and kept in a small memo
    (oldest entry dropped first). The stream is not part of a plan: a configured launch would
    keep a foreign stream's handle alive after its owner freed it."""
    knobs = (
        tuple(_config.CUDA_GEMM_TILE),
        _config.CUDA_HALO,
        _config.CUDA_GEMM_REGISTERS,
        _config.CUDA_MAX_BLOCKS,
        _config.CUDA_THREADS,
    )
    memo_key = (spec, dtype.str, knobs)
    found = _PLANS.get(memo_key)
    if found is not None:
        return found
    launch = depthwise_launch if spec.op == "depthwise" else gemm_launch
    found = launch(spec, dtype)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS), None), None)
    _PLANS[memo_key] = found
    return found


INT32_MAX = 2**31 - 1


def _check_int32_extents(spec: ConvSpec) -> None:
    """The GEMM kernels keep each tile pixel's image, row and column in 32-bit shared memory
    (every other index is 64-bit, bounded in _spec; depthwise is 64-bit throughout): refuse
    extents past that, naming x, before anything is allocated or copied."""
    if spec.op == "depthwise":
        return
    extents = {"batch": spec.n, "output rows": spec.out_h, "output columns": spec.out_w}
    for what, size in extents.items():
        if size > INT32_MAX:
            raise ValueError(
                f"x: {size} {what} exceed the CUDA kernels' 32-bit pixel coordinates "
                f"(at most {INT32_MAX}); split the call or use device='cpu'"
            )


class CudaBackend:
    """One call's CUDA context: the device index, the caller's stream, the result's type."""

    def __init__(self, device: Device, template: Any) -> None:
        self.template = template
        index = device.index
        foreign = _interop.device_index(template)
        if index is None:
            index = 0 if foreign is None else foreign
        elif foreign is not None and foreign != index:
            raise ValueError(
                f"device={str(device)!r} but x lives on cuda:{foreign}; pass device=None to "
                f"follow the input or move x"
            )
        if not _interop.SIMULATOR and index >= len(cuda.gpus):
            raise ValueError(
                f"device={str(device)!r}: only {len(cuda.gpus)} CUDA device(s) are visible"
            )
        self.index = index
        self.host_in = library(template) not in CUDA_LIBRARIES
        self.context = _interop.gpu_context(index)  # entered around every CUDA step of the call
        with self.context:
            self.stream = _interop.caller_stream(template, index)

    # -- the hooks api.py calls -----------------------------------------------------------

    def asarray(self, a: Any, name: str, writable: bool = False) -> Any:
        if library(a) not in CUDA_LIBRARIES:
            return unpacked(as_host_array(a, name))  # a PackedWeights' panels are the CPU's
        idx = _interop.device_index(a)
        if idx is not None and idx != self.index:
            raise ValueError(f"{name} lives on cuda:{idx} but the call runs on cuda:{self.index}")
        with self.context:
            arr = _interop.as_device_array(a, name, writable)
        if not np.dtype(arr.dtype).isnative:
            raise TypeError(
                f"{name} is a big-endian ({arr.dtype}) CUDA array, which no CUDA kernel can "
                f"read; convert it to the native byte order (astype('=f4') or '=f8')"
            )
        return arr

    def out_array(self, out: Any) -> Any:
        if library(out) not in CUDA_LIBRARIES:
            return host_out(out, "an array")
        arr = self.asarray(out, "out", writable=True)
        check_out_elements(arr.shape, arr.strides, arr.dtype.itemsize)
        if self.host_in:  # the result lands in the caller's array: use the caller's stream
            with self.context:
                self.stream = _interop.caller_stream(out, self.index)
        return arr

    def reshape(self, a: Any, shape: tuple[int, ...], name: str) -> Any:
        """``a`` reshaped; a non-C-contiguous device array is copied first (numba's reshape
        would reinterpret F-ordered memory with C strides)."""
        if _is_device(a) and not a.is_c_contiguous():
            with self.context:
                a = self._contiguous(a, np.dtype(a.dtype))
        return a if tuple(a.shape) == shape else a.reshape(shape)

    @staticmethod
    def overlaps(a: Any, b: Any) -> bool:
        if _is_device(a) != _is_device(b):
            return False
        if not _is_device(a):
            return host_overlap(a, b)
        lo1, hi1 = _interop.byte_range(a)
        lo2, hi2 = _interop.byte_range(b)
        return lo1 < hi2 and lo2 < hi1

    def wrap(self, result: Any, template: Any) -> Any:
        return wrap_host(result, template) if self.host_in else result

    # -- the computation ------------------------------------------------------------------

    def _contiguous(self, a: Any, dtype: np.dtype) -> Any:
        """A C-contiguous device array of ``dtype`` holding ``a`` (host or device)."""
        if not _is_device(a):
            return cuda.to_device(np.ascontiguousarray(a, dtype=dtype), stream=self.stream)
        if np.dtype(a.dtype) == dtype and a.is_c_contiguous():
            return a
        shape = tuple(a.shape)
        shape4 = (1,) * (4 - len(shape)) + shape
        dst = cuda.device_array(shape4, dtype=dtype, stream=self.stream)
        _copy(as4d(a, shape4), dst, self.stream)
        return dst.reshape(shape)

    def _bias(self, b: Any, size: int, dtype: np.dtype) -> Any:
        if b is not None:
            return self._contiguous(b, dtype)
        # a missing bias is a zeros vector, uploaded once per device, size and dtype (never
        # written: kernels only read biases)
        key = (self.index, size, dtype.str)
        if key not in _ZEROS:
            zeros = cuda.to_device(np.zeros(size, dtype), stream=self.stream)
            self.stream.synchronize()
            _ZEROS[key] = zeros
        return _ZEROS[key]

    def _input_nhwc(self, x: Any, spec: ConvSpec, dtype: np.dtype) -> Any:
        n, h, w, c = spec.n, spec.h, spec.w, spec.c_in
        if not _is_device(x):
            x4 = x if spec.batched else x[np.newaxis]
            if spec.layout == "NCHW":
                x4 = x4.transpose(0, 2, 3, 1)
            return self._contiguous(x4, dtype)
        src = nhwc_view(x, (n, h, w, c), spec.batched, spec.layout)
        if np.dtype(x.dtype) == dtype and src.is_c_contiguous():
            return src
        dst = cuda.device_array((n, h, w, c), dtype=dtype, stream=self.stream)
        _copy(src, dst, self.stream)
        return dst

    def kernel_call(self, spec: ConvSpec, dtype: np.dtype, xd, weights, biases, target):
        """(configured kernel, its arguments) of one call: what ``run`` launches (benchmarks
        time the bare launch with it)."""
        kern, grid, threads = plan(spec, dtype)
        if spec.op == "depthwise":
            d = self._contiguous(weights[0], dtype)
            b = self._bias(biases[0], spec.c_mid, dtype)
            args = depthwise_args(spec, xd, d, b, target)
        elif spec.op == "separable":
            d = self._contiguous(weights[0], dtype)
            dwb = self._bias(biases[0], spec.c_mid, dtype)
            bmat = self._contiguous(weights[1], dtype)
            bias = self._bias(biases[1], spec.c_out, dtype)
            args = gemm_args(spec, xd, d, dwb, bmat, bias, target)
        else:  # pointwise, conv2d: the weights as a (K, C_out) matrix; no depthwise operands
            unused = self._bias(None, 1, dtype)
            w = self._contiguous(weights[0], dtype)
            bmat = w.reshape(spec.kh * spec.kw * spec.c_in, spec.c_out)
            bias = self._bias(biases[0], spec.c_out, dtype)
            args = gemm_args(spec, xd, unused.reshape(1, 1, 1), unused, bmat, bias, target)
        return kern[grid, threads, self.stream], args

    def run(self, spec: ConvSpec, dtype: np.dtype, x, weights, biases, out) -> Any:
        _check_int32_extents(spec)
        dtype = np.dtype(dtype)
        with self.context:
            return self._run(spec, dtype, x, weights, biases, out)

    # -- gradients ----------------------------------------------------------------------------

    def run_grad(
        self, spec: ConvSpec, dtype: np.dtype, grad, x, weights, biases, output, need, dtypes
    ) -> dict[str, Any]:
        """The gradients ``need`` asks for, by slot (grad.SLOTS): dx in x's layout, the
        weights' in the kernels' shapes, each in ``dtypes[slot]`` and the caller's array type
        (backward.py has the kernels)."""
        _check_int32_extents(spec)
        dtype = np.dtype(dtype)
        with self.context:
            found = self._run_grad(spec, dtype, grad, x, weights, biases, output, need)
            return {k: self._deliver(spec, k, v, dtypes[k]) for k, v in found.items()}

    def _nhwc(self, a: Any, shape4: tuple[int, ...], spec: ConvSpec, dtype: np.dtype) -> Any:
        """``a`` (the caller's layout and batchedness) as an NHWC, C-contiguous device array of
        ``shape4`` and ``dtype`` (a view where it already is one)."""
        if not _is_device(a):
            a4 = a if spec.batched else a[np.newaxis]
            if spec.layout == "NCHW":
                a4 = a4.transpose(0, 2, 3, 1)
            return self._contiguous(a4, dtype)
        src = nhwc_view(a, shape4, spec.batched, spec.layout)
        if np.dtype(a.dtype) == dtype and src.is_c_contiguous():
            return src
        dst = cuda.device_array(shape4, dtype=dtype, stream=self.stream)
        _copy(src, dst, self.stream)
        return dst

    def _run_grad(self, spec: ConvSpec, dtype: np.dtype, grad, x, weights, biases, output, need):
        launch = backward.Launcher(self.stream)
        want = {s: bool(need.get(s, False)) for s in ("x", "dw", "pw", "db", "b", "w")}
        if spec.n == 0:
            return self._empty_grads(spec, dtype, weights, want)
        xd = self._input_nhwc(x, spec, dtype)
        gd = self._nhwc(grad, spec.out_nhwc, spec, dtype)
        ymode, ysrc = backward.Y_NONE, gd
        if output is not None:
            is_mask = np.dtype(output.dtype) == np.bool_
            ymode = backward.Y_MASK if is_mask else backward.Y_OUTPUT
            ysrc = self._nhwc(output, spec.out_nhwc, spec, np.dtype(np.bool_) if is_mask else dtype)
        elif spec.activation != 0 and spec.op in ("separable", "pointwise", "conv2d"):
            # the forward again, for the final activation's mask (the depthwise op's is
            # recomputed inside its band kernel)
            ysrc = cuda.device_array(spec.out_nhwc, dtype=dtype, stream=self.stream)
            fwd, args = self.kernel_call(spec, dtype, xd, weights, biases, ysrc)
            fwd(*args)
            ymode = backward.Y_OUTPUT
        if spec.op == "conv2d":
            w = self._contiguous(weights[0], dtype)
            return backward.conv2d_grads(spec, dtype, launch, xd, gd, ysrc, ymode, w, want)
        unused = self._bias(None, 1, dtype)
        if spec.op == "pointwise":
            dwk, dwb, pw = unused.reshape(1, 1, 1), unused, self._contiguous(weights[0], dtype)
        else:
            dwk = self._contiguous(weights[0], dtype)
            dwb = self._bias(biases[0], spec.c_mid, dtype)
            pw = self._contiguous(weights[1], dtype) if spec.op == "separable" else unused
            pw = pw.reshape(spec.c_mid, spec.c_out) if spec.op == "separable" else pw.reshape(1, 1)
        return backward.gemm_grads(spec, dtype, launch, xd, gd, ysrc, ymode, dwk, dwb, pw, want)

    def _empty_grads(self, spec: ConvSpec, dtype: np.dtype, weights, want) -> dict[str, Any]:
        """N = 0: an empty dx, zero weight and bias gradients."""
        launch = backward.Launcher(self.stream)
        cm, co = spec.c_mid, spec.c_out
        shapes = {"w": tuple(weights[0].shape), "dw": (spec.kh, spec.kw, cm), "pw": (cm, co),
                  "db": (cm,), "b": (co,)}  # fmt: skip
        found = {k: launch.zeros(shapes[k], dtype) for k, v in want.items() if v and k != "x"}
        if want["x"]:
            found["x"] = cuda.device_array((0, spec.h, spec.w, spec.c_in), dtype=dtype)
        return found

    def _channels_last(self, spec: ConvSpec) -> bool:
        """Whether the caller's NCHW x is a torch or CuPy array in NHWC memory."""
        x = self.template
        if library(x) not in ("torch.cuda", "cupy") or len(x.shape) != 4:
            return False
        n, c, h, w = (int(v) for v in x.shape)
        st = [int(v) for v in (x.stride() if library(x) == "torch.cuda" else x.strides)]
        unit = 1 if library(x) == "torch.cuda" else x.dtype.itemsize
        want = [h * w * c * unit, unit, w * c * unit, c * unit]  # NHWC strides of (N, C, H, W)
        return all(s == t or size == 1 for s, t, size in zip(st, want, (n, c, h, w), strict=True))

    def _deliver(self, spec: ConvSpec, slot: str, value: Any, dtype: np.dtype) -> Any:
        """A gradient as the caller's array type and ``dtype``: dx in x's layout and
        batchedness; host arrays for host inputs."""
        template = None if self.host_in else self.template
        if slot == "x":
            n, h, w, c = spec.n, spec.h, spec.w, spec.c_in
            lib = library(template)
            if spec.layout == "NCHW" and spec.batched and self._channels_last(spec):
                # x in NHWC memory (torch's channels_last): dx too, one copy, no transposes
                result, res_nb = _interop.allocate(template, (n, h, w, c), dtype, self.index,
                                                   self.stream)  # fmt: skip
                if value.size:
                    _copy(value, res_nb, self.stream)
                return result.permute(0, 3, 1, 2) if lib == "torch.cuda" else (
                    result.transpose(0, 3, 1, 2))  # fmt: skip
            shape4 = (n, h, w, c) if spec.layout == "NHWC" else (n, c, h, w)
            result, res_nb = _interop.allocate(template, shape4, dtype, self.index, self.stream)
            if value.size:
                _copy(value, nhwc_view(res_nb, (n, h, w, c), True, spec.layout), self.stream)
            if not spec.batched:
                result = result[0]
        else:
            shape = tuple(value.shape)
            result, res_nb = _interop.allocate(template, shape, dtype, self.index, self.stream)
            shape4 = (1,) * (4 - len(shape)) + shape
            if value.size:
                _copy(as4d(value, shape4), as4d(res_nb, shape4), self.stream)
        if self.host_in:
            host = result.copy_to_host(stream=self.stream)
            self.stream.synchronize()
            return host
        return result

    def _run(self, spec: ConvSpec, dtype: np.dtype, x, weights, biases, out) -> Any:
        stream = self.stream
        host_out = out is not None and not _is_device(out)
        direct = (
            out is not None and not host_out and spec.layout == "NHWC" and out.is_c_contiguous()
        )
        if direct:
            target = out.reshape(spec.out_nhwc)
            result = out
        else:
            template = None if self.host_in else self.template
            if spec.layout == "NHWC" and out is None:
                result, target4 = _interop.allocate(
                    template, spec.out_nhwc, dtype, self.index, stream
                )
                target = target4
            else:
                result = None
                target = cuda.device_array(spec.out_nhwc, dtype=dtype, stream=stream)
        if spec.n > 0:
            xd = self._input_nhwc(x, spec, dtype)
            launch, args = self.kernel_call(spec, dtype, xd, weights, biases, target)
            launch(*args)
        if out is not None:
            if host_out:
                host = target.copy_to_host(stream=stream)
                stream.synchronize()
                o4 = out if spec.batched else out[np.newaxis]
                (o4.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else o4)[...] = host
            elif not direct:
                _copy(target, nhwc_view(out, spec.out_nhwc, spec.batched, spec.layout), stream)
            return out
        if result is None:  # NCHW: convert into a result of the caller's type
            template = None if self.host_in else self.template
            shape4 = (spec.n, spec.c_out, spec.out_h, spec.out_w)
            result, res_nb = _interop.allocate(template, shape4, dtype, self.index, stream)
            _copy(target, nhwc_view(res_nb, spec.out_nhwc, True, "NCHW"), stream)
        if self.host_in:
            host = result.copy_to_host(stream=stream)
            stream.synchronize()
            return host if spec.batched else host[0]
        return result if spec.batched else result[0]
