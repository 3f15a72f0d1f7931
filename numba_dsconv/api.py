"""The public functions: normalise arguments -> build a spec -> dispatch to a backend."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._dispatch import Backend, resolve_device
from ._spec import Activation, ConvSpec, check_layout, make_spec, plain_value
from .packing import PackedWeights

__all__ = ["conv2d", "depthwise", "pointwise", "separable"]

ActivationName = Literal["relu", "relu6"] | None
Padding = str | int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]
IntPair = int | tuple[int, int]

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_FLOATS = (_F32, _F64)

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
# the prologue every public function shares (every message names the argument)


def backend_for(device: object, x: object) -> Backend:
    """The backend of one call: device ``device``, or where ``x`` lives."""
    dev = resolve_device(device, x)
    if dev.kind == "cpu":
        from .cpu.backend import CPU  # here, not in _dispatch: the backends import _dispatch

        return CPU
    from .cuda import get_backend

    return get_backend(dev, x)


def _check_float(arr: Any, name: str) -> None:
    dt = getattr(arr, "dtype", None)
    if dt is _F32 or dt is _F64:  # the common case, without constructing a dtype
        return
    if dt is None or np.dtype(dt) not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64; got dtype {dt}")


def _check_ndim(arr: Any, name: str, ndims: tuple[int, ...], expected: str) -> None:
    if len(arr.shape) not in ndims:
        raise ValueError(f"{name} must be {expected}; got shape {tuple(arr.shape)}")


def pointwise_matrix(pw: Any, name: str, reshape: Callable[[Any, tuple, str], Any]) -> Any:
    """Pointwise weights (C_in, C_out) or (1, 1, C_in, C_out) checked and seen as
    (C_in, C_out) (``reshape(a, shape, name)``: the backend's); raises, naming ``name``."""
    _check_ndim(pw, name, (2, 4), "2-D (C_in, C_out) or 4-D (1, 1, C_in, C_out)")
    given = tuple(pw.shape)
    if len(pw.shape) == 4:
        if pw.shape[0] != 1 or pw.shape[1] != 1:
            raise ValueError(
                f"{name} as a 4-D kernel must be (1, 1, C_in, C_out); got shape {tuple(pw.shape)}"
            )
        pw = reshape(pw, (pw.shape[2], pw.shape[3]), name)
    if pw.shape[0] == 0 or pw.shape[1] == 0:
        raise ValueError(f"{name} must have non-zero channels; got shape {given}")
    return pw


class _Call:
    """One public call: its backend, activations, arrays and result dtype (the prologue), then
    the spec, biases and ``out=`` checks and the run (``finish``)."""

    def __init__(
        self, device: object, layout: object, activations: dict, arrays: dict, extra=None
    ) -> None:
        self.x_raw = arrays["x"]
        self.be: Backend = backend_for(device, self.x_raw)
        self.layout = check_layout(layout)
        self.acts = {name: Activation.parse(v, name) for name, v in activations.items()}
        # every array converted first, then every dtype checked (the order errors come in);
        # ``extra`` arrays (a gradient's grad and output) are converted and checked too, but
        # do not take part in the result dtype
        self.arrays = {name: self.be.asarray(a, name) for name, a in arrays.items()}
        self.extra = {
            k: None if a is None else self.be.asarray(a, k) for k, a in (extra or {}).items()
        }
        dtypes = set()
        for name, arr in self.arrays.items():
            _check_float(arr, name)
            dtypes.add(arr.dtype)
        for name, arr in self.extra.items():
            if arr is None:
                continue
            if name == "mask":
                if np.dtype(arr.dtype) != np.bool_:
                    raise TypeError(f"mask must be a bool array; got dtype {arr.dtype}")
            else:
                _check_float(arr, name)
        self.dtype = dtypes.pop() if len(dtypes) == 1 else np.result_type(*dtypes)

    def spec(self, op: str, **kwargs: Any) -> ConvSpec:
        return make_spec(
            op, x_shape=tuple(self.arrays["x"].shape), layout=self.layout, **self.acts, **kwargs
        )

    def depthwise_kernel(self, name: str = "dw") -> tuple[Any, int]:
        """(K_h, K_w, C) or (K_h, K_w, C, M) -> ((K_h, K_w, C*M), M)."""
        dw = self.arrays[name]
        _check_ndim(dw, name, (3, 4), "3-D (K_h, K_w, C_in) or 4-D (K_h, K_w, C_in, M)")
        if min(dw.shape) == 0:
            raise ValueError(
                f"{name} must have no zero-sized dimension; got shape {tuple(dw.shape)}"
            )
        m = 1 if len(dw.shape) == 3 else int(dw.shape[3])
        kh, kw, c = (int(s) for s in dw.shape[:3])
        return self.be.reshape(dw, (kh, kw, c * m), name), m

    def pointwise_matrix(self, name: str = "pw") -> Any:
        """(C_in, C_out) or (1, 1, C_in, C_out) -> (C_in, C_out)."""
        return pointwise_matrix(self.arrays[name], name, self.be.reshape)

    def _bias(self, name: str, b: Any, size: int) -> Any:
        if b is None:
            return None
        arr = self.be.asarray(b, name)
        _check_float(arr, name)
        if len(arr.shape) != 1 or arr.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size},); got shape {tuple(arr.shape)}")
        return arr

    def _out(self, out: Any, spec: ConvSpec, inputs: dict) -> Any:
        arr = self.be.out_array(out)
        if tuple(arr.shape) != spec.output_shape:
            raise ValueError(
                f"out must have shape {spec.output_shape} (the result's shape); "
                f"got shape {tuple(arr.shape)}"
            )
        dt = arr.dtype
        if dt is not self.dtype and np.dtype(dt).newbyteorder("=") != self.dtype:  # any order
            raise TypeError(
                f"out must have dtype {self.dtype} (the result's dtype); got {arr.dtype}"
            )
        for name, a in inputs.items():
            if a is not None and self.be.overlaps(arr, a):
                raise ValueError(f"out overlaps the memory of {name}; pass a separate buffer")
        return arr

    def setup(self, spec: ConvSpec, weights: tuple, biases: dict) -> _Setup:
        """Check the biases ({name: (value, size)}): the validated call, ready to run."""
        bs = {name: self._bias(name, b, size) for name, (b, size) in biases.items()}
        return _Setup(self, spec, weights, bs)


@dataclass(slots=True)
class _Setup:
    """One validated call: what the forward runs (``run``) and the gradient (grad.py)."""

    call: _Call
    spec: ConvSpec
    weights: tuple
    biases: dict

    def run(self, out: Any) -> Any:
        """Check out=, run, return the caller's type."""
        call, spec = self.call, self.spec
        out_arr = None
        if out is not None:
            out_arr = call._out(out, spec, {**call.arrays, **self.biases})
        if _PLAN_ONLY.get():
            return Plan(spec, call.dtype)
        result = call.be.run(
            spec, call.dtype, call.arrays["x"], self.weights, tuple(self.biases.values()), out_arr
        )
        return out if out is not None else call.be.wrap(result, call.x_raw)


# --------------------------------------------------------------------------------------------
# the NumPy fast path: a call whose arguments have the types, shapes, strides, dtypes and
# keywords of a call validated before would pass validation again (nothing it checks is in the
# values), so it goes straight to the CPU backend with that call's spec: validation, the
# keywords' parsing and the spec cost ~15 us of a small call's ~25.

_FAST: dict[tuple, tuple[ConvSpec, np.dtype, tuple | None, Backend, Callable | None]] = {}
_FAST_MAX = 1024
_NDARRAY = np.ndarray


def _fast_key(op: str, arrays: tuple, options: tuple, out: Any) -> tuple | None:
    """The memo key of a NumPy call of ``op`` on the CPU, or None where the call cannot take
    the fast path (another array type, a non-native byte order, a read-only out=, keywords
    that are not plain ints, strings and tuples of them). An out= passes validation again if
    its shape, strides and dtype did and it overlaps no input (``_forward`` checks)."""
    for v in options:
        t = type(v)  # the common values first: this runs on every call
        if t is not int and t is not str and v is not None and not plain_value(v):
            return None
    key: list[Any] = [op]
    if out is not None:
        if type(out) is not _NDARRAY or not out.dtype.isnative or not out.flags.writeable:
            return None
        key.append(("out", out.shape, out.strides, out.dtype))
    for a in arrays:
        t = type(a)
        if t is _NDARRAY:
            dt = a.dtype  # (NumPy's own float dtypes first: an attribute less per array)
            if dt is not _F32 and dt is not _F64 and not dt.isnative:
                return None
            key.append((a.shape, a.strides, dt))
        elif a is None:
            key.append(None)
        elif t is PackedWeights:  # only pw or conv2d's w may be one (as_host_array)
            key.append(a._signature)  # (shape, PackedWeights, dtype)
        else:
            return None
    key.append(options)
    return tuple(key)


def kernel_shapes(weights: tuple, shapes: tuple | None) -> tuple:
    """The weights of a remembered call reshaped as its validation reshaped them (dw to
    (K_h, K_w, C*M), pw to 2-D): views of NumPy arrays of the remembered strides; ``shapes``
    None (``remembered_shapes``): the weights as they are."""
    if shapes is None:
        return weights
    return tuple(w if w.shape == s else w.reshape(s) for w, s in zip(weights, shapes, strict=True))


def remembered_shapes(validated: tuple, given: tuple) -> tuple | None:
    """What a memo keeps for ``kernel_shapes``: the validated weights' shapes, or None where
    the weights as given have them all (the common case: no reshape to try per call)."""
    shapes = tuple(w.shape for w in validated)
    return None if shapes == tuple(getattr(g, "shape", None) for g in given) else shapes


def _forward(
    op: str, arrays: tuple, nweights: int, options: tuple, out: Any,
    setup: Callable[..., _Setup], *args: Any,
) -> Any:  # fmt: skip
    """A public forward call: from the fast path where it was seen before (the memo's prepared
    launch, else ``cpu.run`` with the remembered spec), else validated by ``setup(*args)`` (and
    remembered), then run. ``arrays``: x, the weights as given, then the biases. (The setup and
    its arguments, not a closure over them: a closure makes every argument of the public
    function a cell, on every call. One frame for the whole fast path: between two kernels the
    interpreter runs from cold caches, where every Python call costs several times its warm
    time.)"""
    key = _fast_key(op, arrays, options, out)
    hit = None if key is None else _FAST.get(key)
    # not where only plans are wanted, nor where out= may overlap an input (bounds only, cheap:
    # where they meet, the full path's exact test decides)
    planning = _PLANS and _PLAN_ONLY.get()
    if hit is not None and not planning and (out is None or _apart(out, arrays)):
        spec, dtype, shapes, cpu, launch = hit
        weights = arrays[1 : 1 + nweights]
        if shapes is not None:
            weights = kernel_shapes(weights, shapes)
        if launch is not None:  # the common case: no conversion (cpu.backend.prepared_launch)
            return launch(arrays[0], weights, arrays[1 + nweights :], out)
        result = cpu.run(spec, dtype, arrays[0], weights, arrays[1 + nweights :], out)
        return result if out is None else out
    validated = setup(*args)
    result = validated.run(out)  # (out= checked here: remembered only once it passed)
    _remember(key, validated, arrays, nweights, out)
    return result


def _apart(out: np.ndarray, arrays: tuple) -> bool:
    """Whether out's memory bounds meet none of the NumPy ``arrays``' (np.may_share_memory)."""
    return not any(type(a) is _NDARRAY and np.may_share_memory(out, a) for a in arrays)


def _remember(key: tuple | None, setup: _Setup, arrays: tuple, nweights: int, out: Any) -> None:
    """Remember a validated call that can take the fast path (NumPy arrays on the CPU), with
    its launch prepared where it needs no conversion; ``arrays``: x, the weights and the
    biases as passed."""
    if key is not None:
        from .cpu.backend import CPU, prepared_launch

        if setup.call.be is CPU:
            shapes = remembered_shapes(setup.weights, arrays[1 : 1 + nweights])
            spec, dtype = setup.spec, setup.call.dtype
            launch = prepared_launch(spec, dtype, arrays[0], setup.weights, out)
            memo_put(_FAST, key, (spec, dtype, shapes, CPU, launch))


def memo_put(memo: dict, key: tuple, value: Any) -> None:
    """memo[key] = value, the oldest entry dropped first where the memo holds _FAST_MAX (a
    process that meets more call signatures keeps the recent ones fast, not the first ones)."""
    if len(memo) >= _FAST_MAX:
        try:
            del memo[next(iter(memo))]
        except (StopIteration, KeyError, RuntimeError):  # another thread changed it meanwhile
            pass
    memo[key] = value


@dataclass(frozen=True)
class Plan:
    """What a call would compute: its validated spec and result dtype (``plan``)."""

    spec: ConvSpec
    dtype: np.dtype


_PLAN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("plan_only", default=False)
# plan() calls running in any thread: the fast path asks _PLAN_ONLY only while there are some
# (a context copied inside plan() and run after it would then compute a remembered call: the
# library copies none)
_PLANS = 0
_PLANS_LOCK = threading.Lock()


def plan(fn: Callable[..., Any], x: Any, args: tuple, kwargs: dict) -> Plan:
    """Validate ``fn(x, *args, **kwargs)`` exactly as the call would, and return its Plan
    without computing anything (x may be a zero-strided stand-in: it is never read)."""
    global _PLANS
    with _PLANS_LOCK:
        _PLANS += 1
    token = _PLAN_ONLY.set(True)
    try:
        return fn(x, *args, **kwargs)
    finally:
        _PLAN_ONLY.reset(token)
        with _PLANS_LOCK:
            _PLANS -= 1


# Each public function's positional weights and bias keywords, by name (the dask path).
WEIGHT_PARAMS = {"conv2d": ("w",), "depthwise": ("dw",), "pointwise": ("pw",),
                 "separable": ("dw", "pw")}  # fmt: skip
BIAS_PARAMS = {"conv2d": ("bias",), "depthwise": ("bias",), "pointwise": ("bias",),
               "separable": ("dw_bias", "bias")}  # fmt: skip


def _lazy(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    """``fn`` for a dask array x (``params``: the call's arguments by name): a lazy dask array
    (``_dask.lazy``: the same call per block). Public functions test ``type(x).__module__``
    first, so other calls pay one string comparison, not a wrapper."""
    from ._dask import is_dask, lazy

    x = params["x"]
    if not is_dask(x):
        raise TypeError(f"x must be an array; got a {type(x).__name__} from {type(x).__module__}")
    names = WEIGHT_PARAMS[fn.__name__]
    kwargs = {k: v for k, v in params.items() if k != "x" and k not in names}
    return lazy(fn, x, tuple(params[n] for n in names), kwargs)


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
    activation: ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    if type(x).__module__[:5] == "dask.":  # a lazy result (numba_dsconv/_dask.py)
        return _lazy(conv2d, locals())
    return _forward(
        "conv2d", (x, w, bias), 1, (stride, padding, dilation, activation, layout, device), out,
        _conv2d_setup, x, w, stride, padding, dilation, bias, activation, layout, device,
    )  # fmt: skip


def _conv2d_setup(x, w, stride, padding, dilation, bias, activation, layout, device, extra=None):
    call = _Call(device, layout, {"activation": activation}, {"x": x, "w": w}, extra)
    wa = call.arrays["w"]
    _check_ndim(wa, "w", (4,), "4-D (K_h, K_w, C_in, C_out)")
    if min(wa.shape) == 0:
        raise ValueError(f"w must have no zero-sized dimension; got shape {tuple(wa.shape)}")
    kh, kw, c_in, c_out = (int(s) for s in wa.shape)
    spec = call.spec(
        "conv2d",
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=1,
        c_out=c_out,
        stride=stride,
        padding=padding,
        dilation=dilation,
        kernel_name="w",
    )
    return call.setup(spec, (wa,), {"bias": (bias, c_out)})


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

    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((1, 8, 8, 3), np.float32)
    >>> w = np.ones((3, 3, 3, 16), np.float32)
    >>> y = nd.conv2d(x, w, stride=2, padding="same", activation="relu6")
    >>> y.shape, float(y[0, 1, 1, 0])
    ((1, 4, 4, 16), 6.0)
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
    activation: ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    if type(x).__module__[:5] == "dask.":  # a lazy result (numba_dsconv/_dask.py)
        return _lazy(depthwise, locals())
    return _forward(
        "depthwise", (x, dw, bias), 1, (stride, padding, dilation, activation, layout, device),
        out,
        _depthwise_setup, x, dw, stride, padding, dilation, bias, activation, layout, device,
    )  # fmt: skip


def _depthwise_setup(
    x, dw, stride, padding, dilation, bias, activation, layout, device, extra=None
):
    call = _Call(device, layout, {"activation": activation}, {"x": x, "dw": dw}, extra)
    d3, m = call.depthwise_kernel()
    kh, kw, c_in = (int(s) for s in call.arrays["dw"].shape[:3])
    spec = call.spec(
        "depthwise",
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=m,
        c_out=c_in * m,
        stride=stride,
        padding=padding,
        dilation=dilation,
        kernel_name="dw",
    )
    return call.setup(spec, (d3,), {"bias": (bias, spec.c_mid)})


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

    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((2, 7, 7, 4), np.float32)
    >>> dw = np.ones((3, 3, 4, 2), np.float32)  # depth multiplier 2
    >>> y = nd.depthwise(x, dw, padding=1)
    >>> y.shape, float(y[0, 0, 0, 0]), float(y[0, 3, 3, 0])
    ((2, 7, 7, 8), 4.0, 9.0)
    """
)


def pointwise(
    x: Any,
    pw: Any,
    *,
    bias: Any = None,
    activation: ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    if type(x).__module__[:5] == "dask.":  # a lazy result (numba_dsconv/_dask.py)
        return _lazy(pointwise, locals())
    return _forward(
        "pointwise", (x, pw, bias), 1, (activation, layout, device), out,
        _pointwise_setup, x, pw, bias, activation, layout, device,
    )  # fmt: skip


def _pointwise_setup(x, pw, bias, activation, layout, device, extra=None):
    call = _Call(device, layout, {"activation": activation}, {"x": x, "pw": pw}, extra)
    p2 = call.pointwise_matrix()
    c_in, c_out = (int(s) for s in p2.shape)
    spec = call.spec(
        "pointwise", kernel=(1, 1), c_in_kernel=c_in, multiplier=1, c_out=c_out, kernel_name="pw"
    )
    return call.setup(spec, (p2,), {"bias": (bias, c_out)})


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

    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> y = np.ones((1, 4, 4, 8), np.float32)
    >>> z = nd.pointwise(y, np.full((8, 3), 0.5, np.float32), bias=np.ones(3, np.float32))
    >>> z.shape, float(z[0, 0, 0, 0])
    ((1, 4, 4, 3), 5.0)
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
    mid_activation: ActivationName = None,
    bias: Any = None,
    activation: ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    out: Any = None,
) -> Any:
    if type(x).__module__[:5] == "dask.":  # a lazy result (numba_dsconv/_dask.py)
        return _lazy(separable, locals())
    return _forward(
        "separable", (x, dw, pw, dw_bias, bias), 2,
        (stride, padding, dilation, mid_activation, activation, layout, device), out,
        _separable_setup, x, dw, pw, stride, padding, dilation, dw_bias, mid_activation, bias,
        activation, layout, device,
    )  # fmt: skip


def _separable_setup(
    x, dw, pw, stride, padding, dilation, dw_bias, mid_activation, bias, activation, layout,
    device, extra=None,
):  # fmt: skip
    acts = {"activation": activation, "mid_activation": mid_activation}
    call = _Call(device, layout, acts, {"x": x, "dw": dw, "pw": pw}, extra)
    d3, m = call.depthwise_kernel()
    p2 = call.pointwise_matrix()
    dwa = call.arrays["dw"]
    kh, kw, c_in = (int(s) for s in dwa.shape[:3])
    if p2.shape[0] != c_in * m:
        raise ValueError(
            f"pw expects {p2.shape[0]} input channels but the depthwise stage (dw shape "
            f"{tuple(dwa.shape)}) produces C_in*M = {c_in * m}"
        )
    spec = call.spec(
        "separable",
        kernel=(kh, kw),
        c_in_kernel=c_in,
        multiplier=m,
        c_out=int(p2.shape[1]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        kernel_name="dw",
    )
    biases = {"dw_bias": (dw_bias, spec.c_mid), "bias": (bias, spec.c_out)}
    return call.setup(spec, (d3, p2), biases)


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

    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 56, 56, 32), dtype=np.float32)
    >>> dw = rng.standard_normal((3, 3, 32), dtype=np.float32)
    >>> pw = rng.standard_normal((32, 64), dtype=np.float32)
    >>> y = nd.separable(x, dw, pw, stride=2, padding="same", mid_activation="relu6")
    >>> y.shape
    (1, 28, 28, 64)
    >>> t = nd.separable(x.transpose(0, 3, 1, 2), dw, pw, stride=2, padding="same",
    ...                  mid_activation="relu6", layout="NCHW")
    >>> bool(np.allclose(t.transpose(0, 2, 3, 1), y, atol=1e-5))
    True
    """
)
