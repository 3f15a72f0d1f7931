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
from .._dispatch import Device, _is_torch, as_host_array, host_overlap, wrap_like
from .._spec import ConvSpec
from . import _interop, kernels


def _is_device(a: Any) -> bool:
    return not isinstance(a, np.ndarray)


def _launch_1d(kernel: Any, total: int, stream: Any, *args: Any) -> None:
    threads = _config.CUDA_THREADS
    blocks = max(1, min(math.ceil(total / threads), _config.CUDA_MAX_BLOCKS))
    kernel[blocks, threads, stream](*args)


_ZEROS: dict[tuple[int, int, str], Any] = {}
_PLANS: dict[tuple, tuple[Any, Any, int, tuple[int, ...]]] = {}
_PLANS_MAX = 256


def _lead_stride(arr: Any) -> int:
    """The C stride of a unit axis put in front of ``arr`` (a 0 stride would make numba
    call the view non-contiguous and force a copy)."""
    return int(arr.dtype.itemsize * max(1, math.prod(arr.shape)))


def _as4d(arr: Any, shape4: tuple[int, ...]) -> Any:
    """View a device array of <= 4 dims as 4-D (unit axes in front) without copying."""
    extra = 4 - len(arr.shape)
    return _interop.view(arr, shape4, (_lead_stride(arr),) * extra + tuple(arr.strides))


def _nhwc_view(arr: Any, shape4: tuple[int, ...], batched: bool, layout: str) -> Any:
    """The batched NHWC view ``shape4`` of a device array in ``layout`` (no copy)."""
    st = tuple(arr.strides)
    if not batched:
        st = (_lead_stride(arr), *st)
    if layout == "NCHW":
        st = (st[0], st[2], st[3], st[1])
    return _interop.view(arr, shape4, st)


def _pixel_tiles(
    spec: ConvSpec, key: tuple[int, int, int, int], dtype: np.dtype, tile: tuple[int, ...]
) -> tuple[tuple[int, int], int]:
    """(halo shape or (0, 0), number of pixel tiles) for a GEMM launch (see _config.CUDA_HALO).

    Flat tiles are runs of TP flattened output pixels; halo tiles are TH x TW rectangles of
    one image, which waste slots where TH or TW does not divide the output (14 x 14: 4 tiles
    of 64 for 196 pixels, against 3.06 flat tiles), so "auto" takes them only where they
    need no more tiles than the flat ones.
    """
    choice = _config.CUDA_HALO
    if choice not in ("auto", "always", "never"):
        raise ValueError(f"_config.CUDA_HALO must be 'auto', 'always' or 'never'; got {choice!r}")
    tp = tile[0]
    flat = math.ceil(spec.n * spec.out_h * spec.out_w / tp)
    if (
        choice == "never"
        or spec.op != "separable"
        or (spec.dilation_h, spec.dilation_w) != (1, 1)
        or not kernels.halo_possible(key, dtype, tile)
    ):
        return (0, 0), flat
    th, tw = kernels.halo_shape(tile)
    rects = spec.n * math.ceil(spec.out_h / th) * math.ceil(spec.out_w / tw)
    if choice == "always" or rects <= flat:
        return (th, tw), rects
    return (0, 0), flat


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
        self.host_in = _interop.library(template) == "host"
        self.context = _interop.gpu_context(index)  # entered around every CUDA step of the call
        with self.context:
            self.stream = _interop.caller_stream(template, index)

    # -- the hooks api.py calls -----------------------------------------------------------

    def asarray(self, a: Any, name: str) -> Any:
        if _interop.library(a) == "host":
            return as_host_array(a, name)
        idx = _interop.device_index(a)
        if idx is not None and idx != self.index:
            raise ValueError(f"{name} lives on cuda:{idx} but the call runs on cuda:{self.index}")
        with self.context:
            return _interop.as_device_array(a, name)

    def out_array(self, out: Any) -> Any:
        if _interop.library(out) == "host":
            if not isinstance(out, np.ndarray) and not _is_torch(out):
                raise TypeError(f"out must be an array; got {type(out).__name__}")
            arr = as_host_array(out, "out")
            if not arr.flags.writeable:
                raise ValueError("out is read-only; pass a writeable array")
            return arr
        arr = self.asarray(out, "out")
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
        return wrap_like(result, template) if self.host_in else result

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
        _launch_1d(kernels.copy4d(), dst.size, self.stream, _as4d(a, shape4), dst)
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
        src = _nhwc_view(x, (n, h, w, c), spec.batched, spec.layout)
        if np.dtype(x.dtype) == dtype and src.is_c_contiguous():
            return src
        dst = cuda.device_array((n, h, w, c), dtype=dtype, stream=self.stream)
        _launch_1d(kernels.copy4d(), dst.size, self.stream, src, dst)
        return dst

    def _plan(self, spec: ConvSpec, dtype: np.dtype) -> tuple[Any, Any, int, tuple[int, ...]]:
        """(kernel build, blocks, threads, its integer arguments) for ``spec``: they depend only
        on the geometry, the dtype and the _config knobs, so they are worked out once and kept
        in a small memo (oldest entry dropped first). The stream is not part of a plan: a
        configured launch would keep a foreign stream's handle alive after its owner freed it.
        """
        knobs = (
            tuple(_config.CUDA_GEMM_TILE),
            _config.CUDA_HALO,
            _config.CUDA_GEMM_REGISTERS,
            _config.CUDA_MAX_BLOCKS,
            _config.CUDA_THREADS,
        )
        memo_key = (spec, dtype.str, knobs)
        plan = _PLANS.get(memo_key)
        if plan is not None:
            return plan
        geo = (spec.kh, spec.kw, spec.stride_h, spec.stride_w)
        rest = (spec.dilation_h, spec.dilation_w, spec.pad_top, spec.pad_left, spec.multiplier)
        key = kernels.specialisation(*geo)
        if spec.op == "depthwise":
            kern = kernels.depthwise_kernel(*key, dtype)
            # grid x: one thread per DEPTHWISE_JB pixels of a row and one channel; grid y: rows
            # (at most 65535 blocks in y; the kernel strides over the rest)
            per_row = -(-spec.out_w // kernels.DEPTHWISE_JB) * spec.c_mid
            threads = _config.CUDA_THREADS
            bx = max(1, min(math.ceil(per_row / threads), _config.CUDA_MAX_BLOCKS))
            by = max(1, min(spec.n * spec.out_h, 65535, _config.CUDA_MAX_BLOCKS // bx))
            blocks = (bx, by)
            ints = (*geo, *rest, spec.activation)
        else:
            tile = knobs[0]
            mode = {
                "separable": kernels.SEPARABLE,
                "pointwise": kernels.POINTWISE,
                "conv2d": kernels.CONV2D,
            }[spec.op]
            if spec.op == "pointwise":
                key = kernels.GENERIC
            halo, ptiles = _pixel_tiles(spec, key, dtype, tile)
            kern = kernels.gemm_kernel(mode, *key, dtype, tile, halo, _config.CUDA_GEMM_REGISTERS)
            tp, tn, _, rp, rn = tile
            ntiles = ptiles * math.ceil(spec.c_out / tn)
            blocks = max(1, min(ntiles, _config.CUDA_MAX_BLOCKS))
            threads = (tp // rp) * (tn // rn)
            ints = (*geo, *rest, spec.mid_activation, spec.activation)
        plan = (kern, blocks, threads, ints)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.pop(next(iter(_PLANS), None), None)
        _PLANS[memo_key] = plan
        return plan

    def _launch(self, spec: ConvSpec, dtype: np.dtype, xd, weights, biases, target) -> None:
        kern, blocks, threads, ints = self._plan(spec, dtype)
        launch = kern[blocks, threads, self.stream]
        if spec.op == "depthwise":
            d = self._contiguous(weights[0], dtype)
            b = self._bias(biases[0], spec.c_mid, dtype)
            launch(xd, d, b, target, *ints)
            return
        if spec.op == "separable":
            d = self._contiguous(weights[0], dtype)
            dwb = self._bias(biases[0], spec.c_mid, dtype)
            bmat = self._contiguous(weights[1], dtype)
            bias = self._bias(biases[1], spec.c_out, dtype)
        else:
            d = self._bias(None, 1, dtype).reshape(1, 1, 1)  # unused by these modes
            dwb = self._bias(None, 1, dtype)
            w = self._contiguous(weights[0], dtype)
            bmat = w.reshape(spec.kh * spec.kw * spec.c_in, spec.c_out)
            bias = self._bias(biases[0], spec.c_out, dtype)
        launch(xd, d, dwb, bmat, bias, target, *ints)

    def run(self, spec: ConvSpec, dtype: np.dtype, x, weights, biases, out) -> Any:
        dtype = np.dtype(dtype)
        with self.context:
            return self._run(spec, dtype, x, weights, biases, out)

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
            self._launch(spec, dtype, xd, weights, biases, target)
        if out is not None:
            if host_out:
                host = target.copy_to_host(stream=stream)
                stream.synchronize()
                o4 = out if spec.batched else out[np.newaxis]
                (o4.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else o4)[...] = host
            elif not direct:
                _launch_1d(
                    kernels.copy4d(),
                    target.size,
                    stream,
                    target,
                    _nhwc_view(out, spec.out_nhwc, spec.batched, spec.layout),
                )
            return out
        if result is None:  # NCHW: convert into a result of the caller's type
            template = None if self.host_in else self.template
            shape4 = (spec.n, spec.c_out, spec.out_h, spec.out_w)
            result, res_nb = _interop.allocate(template, shape4, dtype, self.index, stream)
            view = _nhwc_view(res_nb, spec.out_nhwc, True, "NCHW")
            _launch_1d(kernels.copy4d(), target.size, stream, target, view)
        if self.host_in:
            host = result.copy_to_host(stream=stream)
            stream.synchronize()
            return host if spec.batched else host[0]
        return result if spec.batched else result[0]
