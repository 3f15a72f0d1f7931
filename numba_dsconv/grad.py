"""The gradients of every operation, for training: the forward's validation, then the
backend's backward kernels.

``<op>_grad(grad, x, <weights>, **<the forward's keywords>)`` returns the gradient of a loss
with respect to each argument of ``<op>(x, <weights>, ...)``, given ``grad``, the gradient with
respect to the forward's result. Each gradient has its argument's shape, layout, dtype and
array type; a field is None where its argument was None or ``needs`` leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import api
from ._spec import Activation, plain_value

__all__ = [
    "Conv2dGrads",
    "DepthwiseGrads",
    "PointwiseGrads",
    "SeparableGrads",
    "conv2d_grad",
    "depthwise_grad",
    "pointwise_grad",
    "separable_grad",
]


class SeparableGrads(NamedTuple):
    x: Any
    dw: Any
    pw: Any
    dw_bias: Any
    bias: Any


class DepthwiseGrads(NamedTuple):
    x: Any
    dw: Any
    bias: Any


class PointwiseGrads(NamedTuple):
    x: Any
    pw: Any
    bias: Any


class Conv2dGrads(NamedTuple):
    x: Any
    w: Any
    bias: Any


# Each op's gradient fields and the backward kernels' slot each one fills: "db" is the
# depthwise stage's bias, "b" the bias after the GEMM (see cpu/backward.py).
SLOTS = {
    "separable": {"x": "x", "dw": "dw", "pw": "pw", "dw_bias": "db", "bias": "b"},
    "depthwise": {"x": "x", "dw": "dw", "bias": "db"},
    "pointwise": {"x": "x", "pw": "pw", "bias": "b"},
    "conv2d": {"x": "x", "w": "w", "bias": "b"},
}
RESULTS = {"separable": SeparableGrads, "depthwise": DepthwiseGrads,
           "pointwise": PointwiseGrads, "conv2d": Conv2dGrads}  # fmt: skip


def parse_needs(op: str, needs: object, given: dict[str, bool]) -> dict[str, bool]:
    """{field: wanted} from ``needs`` (None: every field whose argument was given; a name or
    an iterable of names). Raises, naming ``needs``."""
    fields = tuple(SLOTS[op])
    if needs is None:
        return {f: given[f] for f in fields}
    names = (needs,) if isinstance(needs, str) else needs
    try:
        names = tuple(names)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"needs must be None, a field name or an iterable of them ({', '.join(fields)}); "
            f"got {needs!r}"
        ) from None
    for name in names:
        if name not in fields:
            raise ValueError(
                f"needs names {name!r}, which is not a gradient of {op}_grad; the fields are "
                f"{', '.join(fields)}"
            )
        if not given[name]:
            raise ValueError(f"needs names {name!r}, but {name} is None: it has no gradient")
    return {f: f in names for f in fields}


# --------------------------------------------------------------------------------------------
# the NumPy fast path, as the forward's (api._FAST): a gradient call whose arrays have the
# types, shapes, strides and dtypes, and whose keywords (needs included) the values, of a call
# validated before goes straight to the CPU backend with what that call worked out (a training
# step's backward is one such call per layer; validation was ~100-250 us of a small layer's)

_FAST_GRAD: dict[tuple, tuple] = {}


def _grad_key(op: str, extra: tuple, arrays: tuple, options: tuple, needs: object) -> tuple | None:
    """The memo key of a NumPy gradient call on the CPU, or None (see api._fast_key)."""
    if needs is not None and not plain_value(needs):
        return None
    return api._fast_key(f"{op}_grad", (*extra, *arrays), (*options, needs), None)


def _grad_call(op: str, extra: tuple, arrays: tuple, nweights: int, options: tuple, needs: object,
               setup: Callable[[], api._Setup]) -> Any:  # fmt: skip
    """A public gradient call: from the fast path where it was seen before, else validated by
    ``setup()`` (and remembered). ``extra``: grad, output, mask; ``arrays``: x, the weights
    as given, the biases."""
    key = _grad_key(op, extra, arrays, options, needs)
    hit = None if key is None else _FAST_GRAD.get(key)
    if hit is not None:
        spec, dtype, shapes, output_index, need, dtypes, given, cpu = hit
        weights = api.kernel_shapes(arrays[1 : 1 + nweights], shapes)
        output = None if output_index is None else extra[output_index]
        found = cpu.run_grad(spec, dtype, extra[0], arrays[0], weights, arrays[1 + nweights :],
                             output, need, dtypes)  # fmt: skip
        return _result(op, found, need, given)
    s = setup()
    done, memo = _grads(op, s, needs)
    from .cpu.backend import CPU

    if key is not None and s.call.be is CPU:
        shapes = api.remembered_shapes(s.weights, arrays[1 : 1 + nweights])
        api.memo_put(_FAST_GRAD, key, (s.spec, s.call.dtype, shapes, *memo, CPU))
    return done


def _result(op: str, found: dict, need: dict, given: dict) -> Any:
    """The op's named tuple from the backend's gradients by slot, each weight's reshaped to
    its argument's shape as given (``given``: field -> shape, for dw and pw)."""
    slots = SLOTS[op]
    fields = {}
    for f in slots:
        r = found.get(slots[f]) if need[slots[f]] else None
        if r is not None and f in given and tuple(r.shape) != given[f]:
            r = r.reshape(given[f])
        fields[f] = r
    return RESULTS[op](**fields)


def _grads(op: str, setup: api._Setup, needs: object) -> tuple[Any, tuple]:
    """Run the backward of a validated call (``setup``: its grad and output are in
    ``setup.call.extra``): the op's named tuple, and what the fast path needs to repeat the
    call (the index of the output argument used in (grad, output, mask), the slots needed,
    their dtypes, the weights' shapes as given)."""
    call, spec = setup.call, setup.spec
    extra = call.extra
    if extra.get("output") is not None and extra.get("mask") is not None:
        raise ValueError("pass output or mask (the activation's mask), not both")
    for name in ("grad", "output", "mask"):
        a = extra.get(name)
        if a is not None and tuple(a.shape) != spec.output_shape:
            raise ValueError(
                f"{name} must have the forward result's shape {spec.output_shape}; got shape "
                f"{tuple(a.shape)}"
            )
    if extra["grad"] is None:
        raise TypeError("grad must be an array (the gradient of the forward's result); got None")
    arrays = {**call.arrays, **setup.biases}
    wanted = parse_needs(op, needs, {f: arrays.get(f) is not None for f in SLOTS[op]})
    slots = SLOTS[op]
    need = {slots[f]: w for f, w in wanted.items()}
    dtypes = {slots[f]: np.dtype(arrays[f].dtype) for f, w in wanted.items() if w}
    # the final activation's mask: from mask, else from output (their index in the fast path's
    # (grad, output, mask)), else recomputed
    output_index = None
    if spec.activation != Activation.NONE:
        if extra.get("mask") is not None:
            output_index = 2
        elif extra.get("output") is not None:
            output_index = 1
    output = None if output_index is None else extra[("grad", "output", "mask")[output_index]]
    found = call.be.run_grad(
        spec, call.dtype, extra["grad"], call.arrays["x"], setup.weights,
        tuple(setup.biases.values()), output, need, dtypes,
    )  # fmt: skip
    # as given: dw 3-D or 4-D, pw 2-D or 4-D
    given = {f: tuple(arrays[f].shape) for f in ("dw", "pw") if f in slots}
    result = _result(op, found, need, given)
    wrapped = RESULTS[op](*(r if r is None else call.be.wrap(r, call.x_raw) for r in result))
    return wrapped, (output_index, need, dtypes, given)


def _no_dask(x: Any, op: str) -> None:
    if type(x).__module__[:5] == "dask.":
        raise TypeError(
            f"{op}_grad takes in-memory arrays; x is a dask array: compute() the blocks you "
            f"train on first"
        )


_DOC = """

    Parameters
    ----------
    grad : array, the gradient of the loss with respect to the forward's result (its shape
        and layout).
    x, {weights}, and every keyword: as for :func:`numba_dsconv.{op}` (``out`` excepted).
    needs : None (every gradient whose argument was given), or the names of the gradients
        wanted, e.g. ``needs=("dw", "pw")``: the others are not computed and come back None.
    output : optional, the forward's result. With an activation, its mask (relu: y > 0,
        relu6: 0 < y < 6) is read from it; without, the forward is recomputed.
    mask : optional, instead of output: a bool array of the result's shape, True where the
        final activation passes the gradient (relu: y > 0, relu6: 0 < y < 6); one byte per
        element to keep between the passes instead of the result.

    Returns
    -------
    {result}: each gradient in its argument's shape, layout, dtype and array type (None where
    the argument was None or not in ``needs``).

    Determinism: the same inputs give the same bits run after run, at any thread count.
    """


def separable_grad(
    grad: Any,
    x: Any,
    dw: Any,
    pw: Any,
    *,
    stride: api.IntPair = 1,
    padding: api.Padding = "valid",
    dilation: api.IntPair = 1,
    dw_bias: Any = None,
    mid_activation: api.ActivationName = None,
    bias: Any = None,
    activation: api.ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    needs: Any = None,
    output: Any = None,
    mask: Any = None,
) -> SeparableGrads:
    _no_dask(x, "separable")
    return _grad_call(
        "separable", (grad, output, mask), (x, dw, pw, dw_bias, bias), 2,
        (stride, padding, dilation, mid_activation, activation, layout, device), needs,
        lambda: api._separable_setup(
            x, dw, pw, stride, padding, dilation, dw_bias, mid_activation, bias, activation,
            layout, device, {"grad": grad, "output": output, "mask": mask},
        ),
    )  # fmt: skip


separable_grad.__doc__ = (
    """Gradients of :func:`numba_dsconv.separable`: (x, dw, pw, dw_bias, bias).

    The backward is fused as the forward is: the depthwise intermediate is recomputed tile by
    tile from x and used at once; it is never stored, in either pass."""
    + _DOC.format(weights="dw, pw", op="separable", result="SeparableGrads")
    + """
    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    >>> dw = rng.standard_normal((3, 3, 4), dtype=np.float32)
    >>> pw = rng.standard_normal((4, 6), dtype=np.float32)
    >>> y = nd.separable(x, dw, pw, padding=1, activation="relu")
    >>> g = nd.separable_grad(np.ones_like(y), x, dw, pw, padding=1, activation="relu", output=y)
    >>> g.x.shape, g.dw.shape, g.pw.shape, g.bias
    ((2, 8, 8, 4), (3, 3, 4), (4, 6), None)
    """
)


def depthwise_grad(
    grad: Any,
    x: Any,
    dw: Any,
    *,
    stride: api.IntPair = 1,
    padding: api.Padding = "valid",
    dilation: api.IntPair = 1,
    bias: Any = None,
    activation: api.ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    needs: Any = None,
    output: Any = None,
    mask: Any = None,
) -> DepthwiseGrads:
    _no_dask(x, "depthwise")
    return _grad_call(
        "depthwise", (grad, output, mask), (x, dw, bias), 1,
        (stride, padding, dilation, activation, layout, device), needs,
        lambda: api._depthwise_setup(
            x, dw, stride, padding, dilation, bias, activation, layout, device,
            {"grad": grad, "output": output, "mask": mask},
        ),
    )  # fmt: skip


depthwise_grad.__doc__ = (
    """Gradients of :func:`numba_dsconv.depthwise`: (x, dw, bias)."""
    + _DOC.format(weights="dw", op="depthwise", result="DepthwiseGrads")
    + """
    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((1, 5, 5, 2), np.float32)
    >>> dw = np.ones((3, 3, 2), np.float32)
    >>> g = nd.depthwise_grad(np.ones((1, 3, 3, 2), np.float32), x, dw, needs="dw")
    >>> g.x, float(g.dw[0, 0, 0])
    (None, 9.0)
    """
)


def pointwise_grad(
    grad: Any,
    x: Any,
    pw: Any,
    *,
    bias: Any = None,
    activation: api.ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    needs: Any = None,
    output: Any = None,
    mask: Any = None,
) -> PointwiseGrads:
    _no_dask(x, "pointwise")
    return _grad_call(
        "pointwise", (grad, output, mask), (x, pw, bias), 1, (activation, layout, device), needs,
        lambda: api._pointwise_setup(
            x, pw, bias, activation, layout, device, {"grad": grad, "output": output, "mask": mask}
        ),
    )  # fmt: skip


pointwise_grad.__doc__ = (
    """Gradients of :func:`numba_dsconv.pointwise`: (x, pw, bias)."""
    + _DOC.format(weights="pw", op="pointwise", result="PointwiseGrads")
    + """
    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((1, 2, 2, 3), np.float32)
    >>> pw = np.ones((3, 4), np.float32)
    >>> g = nd.pointwise_grad(np.ones((1, 2, 2, 4), np.float32), x, pw, bias=np.zeros(4))
    >>> float(g.x[0, 0, 0, 0]), float(g.pw[0, 0]), g.bias.tolist()
    (4.0, 4.0, [4.0, 4.0, 4.0, 4.0])
    """
)


def conv2d_grad(
    grad: Any,
    x: Any,
    w: Any,
    *,
    stride: api.IntPair = 1,
    padding: api.Padding = "valid",
    dilation: api.IntPair = 1,
    bias: Any = None,
    activation: api.ActivationName = None,
    layout: str = "NHWC",
    device: str | None = None,
    needs: Any = None,
    output: Any = None,
    mask: Any = None,
) -> Conv2dGrads:
    _no_dask(x, "conv2d")
    return _grad_call(
        "conv2d", (grad, output, mask), (x, w, bias), 1,
        (stride, padding, dilation, activation, layout, device), needs,
        lambda: api._conv2d_setup(
            x, w, stride, padding, dilation, bias, activation, layout, device,
            {"grad": grad, "output": output, "mask": mask},
        ),
    )  # fmt: skip


conv2d_grad.__doc__ = (
    """Gradients of :func:`numba_dsconv.conv2d`: (x, w, bias)."""
    + _DOC.format(weights="w", op="conv2d", result="Conv2dGrads")
    + """
    Examples
    --------
    >>> import numpy as np, numba_dsconv as nd
    >>> x = np.ones((1, 4, 4, 2), np.float32)
    >>> w = np.ones((3, 3, 2, 5), np.float32)
    >>> g = nd.conv2d_grad(np.ones((1, 2, 2, 5), np.float32), x, w)
    >>> g.w.shape, float(g.w[1, 1, 0, 0]), float(g.x[0, 0, 0, 0])
    ((3, 3, 2, 5), 4.0, 5.0)
    """
)
