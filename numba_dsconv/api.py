"""The public functions: normalise arguments -> build a spec -> dispatch to a backend."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _dispatch
from ._spec import ConvSpec, activation_code, check_layout, make_spec

__all__ = ["conv2d", "depthwise", "pointwise", "separable"]

Activation = Literal["relu", "relu6"] | None
Padding = str | int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]
IntPair = int | tuple[int, int]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# Docstring fragments shared by the four functions (as torch/nn/modules/conv.py does).
_NOTES = {
    "x": """x : array, (N, H, W, C_in) or (H, W, C_in) for layout="NHWC";
        (N, C_in, H, W) or (C_in, H, W) for layout="NCHW". NumPy (or array-like), a PyTorch
        tensor, or, with the CUDA backend, any CUDA array (CuPy, numba, torch).""",
    "geometry": """stride : int or (int, int), >= 1
    padding : "valid" | "same" | int | (ph, pw) | ((top, bottom), (left, right))
        Zero padding. "same" follows TensorFlow at any stride and kernel size:
        out = ceil(in / stride), total = max(0, (out - 1) * stride + (K - 1) * dilation + 1 - in),
        the odd extra row/column at the bottom/right.
    dilation : int or (int, int), >= 1""",
    "common": """activation : None | "relu" | "relu6"
        Applied last, fused into the kernel. NaN stays NaN.
    layout : "NHWC" (default) or "NCHW"; the result has the same layout and batchedness as x.
    device : None (where x lives), "cpu", "cuda" or "cuda:N".
    out : optional preallocated result of exactly the result's shape and dtype; it must not
        overlap any input. It is filled and returned.""",
    "shape": """Output size (per spatial dimension)::

        H_out = floor((H + pad_top + pad_bottom - dilation * (K_h - 1) - 1) / stride) + 1

    The result dtype is ``numpy.result_type`` of x and the weights (float32 or float64).""",
}


def _doc(text: str) -> str:
    for key, val in _NOTES.items():
        text = text.replace("{" + key + "}", val)
    return text


# --------------------------------------------------------------------------------------------
# validation helpers (every message names the argument)


def _backend(device: object, x: object) -> Any:
    dev = _dispatch.resolve_device(device, x)
    if dev.kind == "cpu":
        return _CpuBackend()
    from .cuda import get_backend

    return get_backend(dev, x)


def _check_float(arr: Any, name: str) -> None:
    dt = getattr(arr, "dtype", None)
    if dt is None or np.dtype(dt) not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64; got dtype {dt}")


def _check_ndim(arr: Any, name: str, ndims: tuple[int, ...], expected: str) -> None:
    if len(arr.shape) not in ndims:
        raise ValueError(f"{name} must be {expected}; got shape {tuple(arr.shape)}")


def _pointwise_matrix(pw: Any, name: str, be: Any) -> Any:
    """(C_in, C_out) or (1, 1, C_in, C_out) -> (C_in, C_out)."""
    _check_ndim(pw, name, (2, 4), "2-D (C_in, C_out) or 4-D (1, 1, C_in, C_out)")
    if len(pw.shape) == 4:
        if pw.shape[0] != 1 or pw.shape[1] != 1:
            raise ValueError(
                f"{name} as a 4-D kernel must be (1, 1, C_in, C_out); got shape {tuple(pw.shape)}"
            )
        pw = be.reshape(pw, (pw.shape[2], pw.shape[3]), name)
    if pw.shape[0] == 0 or pw.shape[1] == 0:
        raise ValueError(f"{name} must have non-zero channels; got shape {tuple(pw.shape)}")
    return pw


def _depthwise_kernel(dw: Any, name: str, be: Any) -> tuple[Any, int]:
    """(KH, KW, C) or (KH, KW, C, M) -> ((KH, KW, C*M), M)."""
    _check_ndim(dw, name, (3, 4), "3-D (K_h, K_w, C_in) or 4-D (K_h, K_w, C_in, M)")
    if min(dw.shape) == 0:
        raise ValueError(f"{name} must have no zero-sized dimension; got shape {tuple(dw.shape)}")
    m = 1 if len(dw.shape) == 3 else int(dw.shape[3])
    kh, kw, c = (int(s) for s in dw.shape[:3])
    return be.reshape(dw, (kh, kw, c * m), name), m


def _bias(b: Any, name: str, size: int, be: Any) -> Any:
    if b is None:
        return None
    arr = be.asarray(b, name)
    _check_float(arr, name)
    if len(arr.shape) != 1 or arr.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},); got shape {tuple(arr.shape)}")
    return arr


def _result_dtype(**arrays: Any) -> np.dtype:
    for name, arr in arrays.items():
        _check_float(arr, name)
    return np.result_type(*(np.dtype(a.dtype) for a in arrays.values()))


def _check_out(out: Any, spec: ConvSpec, dtype: np.dtype, be: Any, inputs: dict) -> Any:
    if out is None:
        return None
    arr = be.out_array(out)
    if tuple(arr.shape) != spec.output_shape:
        raise ValueError(
            f"out must have shape {spec.output_shape} (the result's shape); "
            f"got shape {tuple(arr.shape)}"
        )
    if np.dtype(arr.dtype) != dtype:
        raise TypeError(f"out must have dtype {dtype} (the result's dtype); got {arr.dtype}")
    for name, a in inputs.items():
        if a is not None and be.overlaps(arr, a):
            raise ValueError(f"out overlaps the memory of {name}; pass a separate buffer")
    return arr


class _CpuBackend:
    """Host arrays (NumPy, torch CPU tensors) on the Numba CPU kernels."""

    @staticmethod
    def asarray(a: Any, name: str) -> np.ndarray:
        return _dispatch.as_host_array(a, name)

    @staticmethod
    def out_array(out: Any) -> np.ndarray:
        if not isinstance(out, np.ndarray) and not _dispatch._is_torch(out):
            raise TypeError(
                f"out must be a NumPy array (or torch CPU tensor) for the CPU backend; "
                f"got {type(out).__name__}"
            )
        arr = _dispatch.as_host_array(out, "out")
        if not arr.flags.writeable:
            raise ValueError("out is read-only; pass a writeable array")
        return arr

    @staticmethod
    def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
        return _dispatch.host_overlap(a, b)

    @staticmethod
    def reshape(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
        return a.reshape(shape)  # copies when a view is impossible; never writes to a

    @staticmethod
    def run(spec, dtype, x, weights, biases, out):  # noqa: ANN001, ANN205
        from . import cpu

        return cpu.run(spec, dtype, x, weights, biases, out)

    @staticmethod
    def wrap(result: np.ndarray, template: Any) -> Any:
        return _dispatch.wrap_like(result, template)


def _finish(be: Any, spec, dtype, x_raw, xa, weights, biases, out, out_arr) -> Any:  # noqa: ANN001
    result = be.run(spec, dtype, xa, weights, biases, out_arr)
    if out is not None:
        return out
    return be.wrap(result, x_raw)


# --------------------------------------------------------------------------------------------
# public functions


def conv2d(
    x: Any,
    w: Any,
    *,
    stride: IntPair = 1,
    padding: Padding = "valid",
    dilation: IntPair = 1,
    bias: Any = None,
    activation: Activation = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    be = _backend(device, x)
    layout = check_layout(layout)
    act = activation_code(activation, "activation")
    xa, wa = be.asarray(x, "x"), be.asarray(w, "w")
    dtype = _result_dtype(x=xa, w=wa)
    _check_ndim(wa, "w", (4,), "4-D (K_h, K_w, C_in, C_out)")
    if min(wa.shape) == 0:
        raise ValueError(f"w must have no zero-sized dimension; got shape {tuple(wa.shape)}")
    kh, kw, c_in, c_out = (int(s) for s in wa.shape)
    spec = make_spec(
        "conv2d",
        x_shape=tuple(xa.shape),
        layout=layout,
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=1,
        c_out=c_out,
        stride=stride,
        padding=padding,
        dilation=dilation,
        activation=act,
        kernel_name="w",
    )
    ba = _bias(bias, "bias", c_out, be)
    out_arr = _check_out(out, spec, dtype, be, {"x": xa, "w": wa, "bias": ba})
    return _finish(be, spec, dtype, x, xa, (wa,), (ba,), out, out_arr)


conv2d.__doc__ = _doc(
    """Standard 2-D convolution (cross-correlation, as in every deep-learning framework).

    ``Y[n,i,j,k] = act(bias[k] + sum_{m,q,c} X[n, i*s+m*d, j*s+q*d, c] * W[m,q,c,k])``
    with X zero-padded.

    Parameters
    ----------
    {x}
    w : array, (K_h, K_w, C_in, C_out)
    {geometry}
    bias : optional array, (C_out,)
    {common}

    Returns
    -------
    array, (N, H_out, W_out, C_out) (NHWC) or (N, C_out, H_out, W_out) (NCHW).

    {shape}
    """
)


def depthwise(
    x: Any,
    dw: Any,
    *,
    stride: IntPair = 1,
    padding: Padding = "valid",
    dilation: IntPair = 1,
    bias: Any = None,
    activation: Activation = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    be = _backend(device, x)
    layout = check_layout(layout)
    act = activation_code(activation, "activation")
    xa, dwa = be.asarray(x, "x"), be.asarray(dw, "dw")
    dtype = _result_dtype(x=xa, dw=dwa)
    d3, m = _depthwise_kernel(dwa, "dw", be)
    kh, kw, c_in = (int(s) for s in dwa.shape[:3])
    spec = make_spec(
        "depthwise",
        x_shape=tuple(xa.shape),
        layout=layout,
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=m,
        c_out=c_in * m,
        stride=stride,
        padding=padding,
        dilation=dilation,
        activation=act,
        kernel_name="dw",
    )
    ba = _bias(bias, "bias", spec.c_mid, be)
    out_arr = _check_out(out, spec, dtype, be, {"x": xa, "dw": dwa, "bias": ba})
    return _finish(be, spec, dtype, x, xa, (d3,), (ba,), out, out_arr)


depthwise.__doc__ = _doc(
    """Depthwise convolution: each input channel filtered by its own M kernels.

    ``Y[n,i,j,c*M+q] = act(bias[c*M+q] + sum_{m,n'} X[n, i*s+m*d, j*s+n'*d, c] * D[m,n',c,q])``
    (output channel c*M+q, TensorFlow's and PyTorch's order).

    Parameters
    ----------
    {x}
    dw : array, (K_h, K_w, C_in) or (K_h, K_w, C_in, M) (depth multiplier M)
    {geometry}
    bias : optional array, (C_in*M,)
    {common}

    Returns
    -------
    array, (N, H_out, W_out, C_in*M) (NHWC) or (N, C_in*M, H_out, W_out) (NCHW).

    {shape}
    """
)


def pointwise(
    x: Any,
    pw: Any,
    *,
    bias: Any = None,
    activation: Activation = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    be = _backend(device, x)
    layout = check_layout(layout)
    act = activation_code(activation, "activation")
    xa, pwa = be.asarray(x, "x"), be.asarray(pw, "pw")
    dtype = _result_dtype(x=xa, pw=pwa)
    p2 = _pointwise_matrix(pwa, "pw", be)
    c_in, c_out = (int(s) for s in p2.shape)
    spec = make_spec(
        "pointwise",
        x_shape=tuple(xa.shape),
        layout=layout,
        kernel=(1, 1),
        c_in_kernel=c_in,
        multiplier=1,
        c_out=c_out,
        activation=act,
        kernel_name="pw",
    )
    ba = _bias(bias, "bias", c_out, be)
    out_arr = _check_out(out, spec, dtype, be, {"x": xa, "pw": pwa, "bias": ba})
    return _finish(be, spec, dtype, x, xa, (p2,), (ba,), out, out_arr)


pointwise.__doc__ = _doc(
    """Pointwise (1x1) convolution: a matrix product over the channel axis at every pixel.

    ``Z[n,i,j,k] = act(bias[k] + sum_c Y[n,i,j,c] * P[c,k])``

    Parameters
    ----------
    {x}
    pw : array, (C_in, C_out) or (1, 1, C_in, C_out)
    bias : optional array, (C_out,)
    {common}

    Returns
    -------
    array, (N, H, W, C_out) (NHWC) or (N, C_out, H, W) (NCHW).
    """
)


def separable(
    x: Any,
    dw: Any,
    pw: Any,
    *,
    stride: IntPair = 1,
    padding: Padding = "valid",
    dilation: IntPair = 1,
    dw_bias: Any = None,
    mid_activation: Activation = None,
    bias: Any = None,
    activation: Activation = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    be = _backend(device, x)
    layout = check_layout(layout)
    act = activation_code(activation, "activation")
    mid = activation_code(mid_activation, "mid_activation")
    xa, dwa, pwa = be.asarray(x, "x"), be.asarray(dw, "dw"), be.asarray(pw, "pw")
    dtype = _result_dtype(x=xa, dw=dwa, pw=pwa)
    d3, m = _depthwise_kernel(dwa, "dw", be)
    p2 = _pointwise_matrix(pwa, "pw", be)
    kh, kw, c_in = (int(s) for s in dwa.shape[:3])
    if p2.shape[0] != c_in * m:
        raise ValueError(
            f"pw expects {p2.shape[0]} input channels but the depthwise stage (dw shape "
            f"{tuple(dwa.shape)}) produces C_in*M = {c_in * m}"
        )
    spec = make_spec(
        "separable",
        x_shape=tuple(xa.shape),
        layout=layout,
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=m,
        c_out=int(p2.shape[1]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        activation=act,
        mid_activation=mid,
        kernel_name="dw",
    )
    dwb = _bias(dw_bias, "dw_bias", spec.c_mid, be)
    ba = _bias(bias, "bias", spec.c_out, be)
    inputs = {"x": xa, "dw": dwa, "pw": pwa, "dw_bias": dwb, "bias": ba}
    out_arr = _check_out(out, spec, dtype, be, inputs)
    return _finish(be, spec, dtype, x, xa, (d3, p2), (dwb, ba), out, out_arr)


separable.__doc__ = _doc(
    """Depthwise separable convolution (MobileNet), fused into one kernel.

    ``activation(pointwise(mid_activation(depthwise(X) + dw_bias), pw) + bias)``

    The depthwise result is produced tile by tile in fast memory (a cache-sized buffer on the
    CPU, shared memory on CUDA) and consumed there by the pointwise step: the full intermediate
    tensor is never written to main memory.

    Parameters
    ----------
    {x}
    dw : array, (K_h, K_w, C_in) or (K_h, K_w, C_in, M)
    pw : array, (C_in*M, C_out) or (1, 1, C_in*M, C_out)
    {geometry}
    dw_bias : optional array, (C_in*M,), added to the depthwise result
    mid_activation : None | "relu" | "relu6", applied to the depthwise result
    bias : optional array, (C_out,), added to the pointwise result
    {common}

    Returns
    -------
    array, (N, H_out, W_out, C_out) (NHWC) or (N, C_out, H_out, W_out) (NCHW).

    {shape}
    """
)
