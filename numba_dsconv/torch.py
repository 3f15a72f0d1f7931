"""PyTorch front end: trainable ops in torch's conventions, and modules.

    import numba_dsconv.torch as ndt
    y = ndt.separable(x, dw_weight, pw_weight, padding=1, mid_activation="relu6")
    layer = ndt.SeparableConv2d(32, 64, 3, padding=1, activation="relu")

x is (N, C, H, W) (or (C, H, W)) in any memory format: channels_last is NHWC memory, which the
kernels read and write in place (no copy); the result keeps x's memory format. Weights have
torch's shapes: depthwise (C*M, 1, K_h, K_w), pointwise (C_out, C*M, 1, 1), conv2d
(C_out, C_in, K_h, K_w). Padding: an int, a pair, "valid", "same" (at any stride, TensorFlow's
rule: the odd extra row/column at the bottom/right) or ((top, bottom), (left, right)); 0 by
default, like torch. Tensors on the CPU or a CUDA device, float32 or float64.

Each op is a ``torch.library.custom_op`` (``torch.ops.numba_dsconv.separable``, ...) with a
fake kernel (torch.compile traces through it with fullgraph=True) and an autograd formula
whose backward is itself a custom op (``torch.ops.numba_dsconv.separable_backward``, ...)
running numba_dsconv's backward kernels. For the backward, autograd keeps x, the weights and,
where the final activation needs it, a one-byte mask of where it passes; never the depthwise
intermediate, which the backward recomputes tile by tile.

For inference on the CPU, ``prepack(model)`` packs the GEMM weights of its layers once (the
pointwise weights, conv2d's; numba_dsconv.pack), as inference runtimes do when they load a
model.

This module imports torch; ``import numba_dsconv`` alone never does.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import api, grad
from ._spec import padding_amounts, pair
from .cpu.layout import copy_transposed
from .packing import PackedWeights, pack

__all__ = [
    "Conv2d",
    "DepthwiseConv2d",
    "PointwiseConv2d",
    "SeparableConv2d",
    "conv2d",
    "depthwise",
    "pointwise",
    "prepack",
    "separable",
]

_NONE = "none"


# --------------------------------------------------------------------------------------------
# arguments in torch's conventions -> numba_dsconv's


def _padding(padding: Any) -> tuple[str, list[int]]:
    """("same" | "explicit", [top, bottom, left, right]); validated like the core API."""
    if isinstance(padding, str) and padding.lower() == "same":
        return "same", [0, 0, 0, 0]
    # explicit forms do not depend on the input's size: validate them now
    t, b, left, r = padding_amounts(padding, (1, 1), (1, 1), (1, 1), (1, 1))
    return "explicit", [t, b, left, r]


def _core_padding(mode: str, padding: list[int]) -> Any:
    return "same" if mode == "same" else ((padding[0], padding[1]), (padding[2], padding[3]))


def _activation(value: Any, name: str) -> str:
    if value is None:
        return _NONE
    if value not in ("relu", "relu6"):
        raise ValueError(f"{name} must be None, 'relu' or 'relu6'; got {value!r}")
    return value


def _act(code: str) -> str | None:
    return None if code == _NONE else code


def _result_format(x: Tensor) -> torch.memory_format:
    """The memory format of results: channels_last for an x in NHWC memory, else
    contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


# The weights' layouts, torch's <-> the core's: one mapping each, on torch tensors (the custom
# ops, CUDA) and on NumPy views of them (the CPU: torch's view ops cost ~5-10 us each)


def _permuted(a: Any, axes: tuple[int, ...]) -> Any:
    return a.permute(*axes) if isinstance(a, Tensor) else a.transpose(axes)


def _dense(a: Any) -> Any:
    return a.contiguous() if isinstance(a, Tensor) else np.ascontiguousarray(a)


def _depthwise_core(w: Any, c_in: int) -> Any:
    """(C*M, 1, K_h, K_w) -> (K_h, K_w, C, M) (a view)."""
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(
            f"the depthwise weight must be (C*M, 1, K_h, K_w); got shape {tuple(w.shape)}"
        )
    cm = w.shape[0]
    if c_in == 0 or cm % c_in != 0:
        raise ValueError(
            f"the depthwise weight has {cm} output channels, not a multiple of x's {c_in} "
            f"channels (it must be (C*M, 1, K_h, K_w))"
        )
    return _permuted(w.reshape(c_in, cm // c_in, w.shape[2], w.shape[3]), (2, 3, 0, 1))


def _depthwise_torch(g: Any) -> Any:
    """(K_h, K_w, C, M) -> (C*M, 1, K_h, K_w), C-contiguous."""
    kh, kw, c, m = g.shape
    return _dense(_permuted(g, (2, 3, 0, 1))).reshape(c * m, 1, kh, kw)


def _pointwise_core(w: Any) -> Any:
    """(C_out, C_in, 1, 1) -> (C_in, C_out) (a view)."""
    if w.ndim != 4 or w.shape[2] != 1 or w.shape[3] != 1:
        raise ValueError(
            f"the pointwise weight must be (C_out, C_in, 1, 1); got shape {tuple(w.shape)}"
        )
    return w[:, :, 0, 0].T


def _pointwise_torch(g: Any) -> Any:
    """(C_in, C_out) -> (C_out, C_in, 1, 1), C-contiguous (reshaped: NumPy's new axes have
    stride 0, which torch.from_numpy keeps and the strides check would then copy)."""
    c_in, c_out = g.shape
    if isinstance(g, Tensor) or g.T.flags.c_contiguous:
        return _dense(g.T).reshape(c_out, c_in, 1, 1)
    out = np.empty((c_out, c_in), g.dtype)
    copy_transposed(g[None], out[None])  # (NumPy's transposing copy: 4-16x as long)
    return out.reshape(c_out, c_in, 1, 1)


def _conv2d_core(w: Any) -> Any:
    """(C_out, C_in, K_h, K_w) -> (K_h, K_w, C_in, C_out) (a view)."""
    if w.ndim != 4:
        raise ValueError(
            f"the conv2d weight must be (C_out, C_in, K_h, K_w); got shape {tuple(w.shape)}"
        )
    return _permuted(w, (2, 3, 1, 0))


def _conv2d_torch(g: Any) -> Any:
    """(K_h, K_w, C_in, C_out) -> (C_out, C_in, K_h, K_w), C-contiguous: per input channel, its
    (K_h*K_w, C_out) slab transposed into place (NumPy's copy of the permuted view: 13x as long
    at 3 x 3 x 512 x 512)."""
    if isinstance(g, Tensor):
        return _dense(_permuted(g, (3, 2, 0, 1)))
    kh, kw, c_in, c_out = g.shape
    out = np.empty((c_out, c_in, kh, kw), g.dtype)
    taps = g.reshape(kh * kw, c_in, c_out).transpose(1, 0, 2)
    copy_transposed(taps, out.reshape(c_out, c_in, kh * kw).transpose(1, 0, 2))
    return out


def _core_weights(op: str, x: Any, weights: tuple) -> tuple:
    c_in = x.shape[-3]
    if op == "separable":
        return _depthwise_core(weights[0], c_in), _pointwise_core(weights[1])
    if op == "depthwise":
        return (_depthwise_core(weights[0], c_in),)
    if op == "pointwise":
        return (_pointwise_core(weights[0]),)
    return (_conv2d_core(weights[0]),)


_WEIGHTS = {"separable": 2, "depthwise": 1, "pointwise": 1, "conv2d": 1}
_BIAS_NAMES = {"separable": ("dw_bias", "bias"), "depthwise": ("bias",),
               "pointwise": ("bias",), "conv2d": ("bias",)}  # fmt: skip


def _core_kwargs(op: str, stride, mode, padding, dilation, mid, act, biases) -> dict[str, Any]:
    kw: dict[str, Any] = {"layout": "NCHW", "activation": _act(act)}
    if op != "pointwise":
        kw.update(stride=tuple(stride), padding=_core_padding(mode, padding),
                  dilation=tuple(dilation))  # fmt: skip
    if op == "separable":
        kw["mid_activation"] = _act(mid)
    kw.update(zip(_BIAS_NAMES[op], biases, strict=True))
    return kw


# --------------------------------------------------------------------------------------------
# output shapes (the fake kernels)


def _out_size(size, k, stride, dilation, before, after, same):
    if same:
        return -(-size // stride)
    return (size + before + after - dilation * (k - 1) - 1) // stride + 1


def _output_shape(op, x, weights, stride, mode, padding, dilation) -> list:
    *lead, _, h, w = x.shape
    if op == "pointwise":
        c_out = weights[0].shape[0]
        return [*lead, c_out, h, w]
    if op == "separable":
        c_out, (kh, kw) = weights[1].shape[0], weights[0].shape[2:]
    else:
        c_out, (kh, kw) = weights[0].shape[0], weights[0].shape[2:]
    same = mode == "same"
    oh = _out_size(h, kh, stride[0], dilation[0], padding[0], padding[1], same)
    ow = _out_size(w, kw, stride[1], dilation[1], padding[2], padding[3], same)
    return [*lead, c_out, oh, ow]


def _result_dtype(x: Tensor, weights: tuple[Tensor, ...]) -> torch.dtype:
    dt = x.dtype
    for w in weights:
        dt = torch.promote_types(dt, w.dtype)
    return dt


# --------------------------------------------------------------------------------------------
# the custom ops: one forward and one backward per operation

_FORWARD_SCHEMA = (
    "({tensors}, Tensor? {b1}, {b2}int[] stride, str padding_mode, int[] padding, "
    "int[] dilation, str mid_activation, str activation) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, {tensors}, Tensor? {b1}, {b2}Tensor? mask, int[] stride, str padding_mode, "
    "int[] padding, int[] dilation, str mid_activation, str activation, bool[] needs) -> "
    "({returns})"
)


def _schemas(op: str) -> tuple[str, str]:
    tensors = "Tensor x, " + ", ".join(
        f"Tensor {n}" for n in (("dw_weight", "pw_weight") if op == "separable" else ("weight",))
    )
    b1, b2 = ("dw_bias", "Tensor? bias, ") if op == "separable" else ("bias", "")
    nret = 1 + _WEIGHTS[op] + len(_BIAS_NAMES[op])
    fwd = _FORWARD_SCHEMA.format(tensors=tensors, b1=b1, b2=b2)
    bwd = _BACKWARD_SCHEMA.format(
        tensors=tensors, b1=b1, b2=b2, returns=", ".join(["Tensor"] * nret)
    )
    return fwd, bwd


def _split(op: str, args: tuple) -> tuple[Tensor, tuple, tuple, tuple]:
    """(x, weights, biases, the rest) of a forward op's positional arguments."""
    nw, nb = _WEIGHTS[op], len(_BIAS_NAMES[op])
    return args[0], tuple(args[1 : 1 + nw]), tuple(args[1 + nw : 1 + nw + nb]), args[1 + nw + nb :]


def _forward_impl(op: str):
    fn = getattr(api, op)
    nt = 1 + _WEIGHTS[op] + len(_BIAS_NAMES[op])

    def impl(*args):
        key = _signature(op, args, nt)
        run = _PREPARED.get(key)
        if run is None:  # (torch's checks raise here, before anything is remembered)
            run = _prepare_forward(op, fn, args)
            api.memo_put(_PREPARED, key, run)
        return run(args)

    return impl


# --------------------------------------------------------------------------------------------
# prepared calls: what a call of one signature (the tensors' shapes, strides, dtypes and
# devices, the other arguments' values) works out in torch's conventions (the checks, the
# result's shape, dtype and strides, the keywords, how each weight becomes the core's) is
# worked out by its first call and kept. A later call only converts its tensors (NumPy views
# on the CPU) and runs the core, whose own fast path serves it: torch's view and metadata ops
# cost ~5-10 us each, ~150 us of a small layer's forward and backward when each call worked
# them out again (and several times that between big kernels, with the caches cold).

_PREPARED: dict[tuple, Any] = {}


def _signature(op: str, args: tuple, ntensors: int) -> tuple:
    """The memo key of a call of ``op`` (forward or backward): its first ``ntensors``
    arguments are tensors or None, the others ints, strings, bools and lists of them."""
    key: list[Any] = [op]
    for t in args[:ntensors]:
        key.append(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.is_neg()))
    for v in args[ntensors:]:
        key.append(tuple(v) if type(v) is list else v)
    return tuple(key)


def _numpy(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _prepare_forward(op: str, fn: Any, args: tuple) -> Any:
    """``run(args)`` for the forward calls of the signature of ``args`` (checked here)."""
    x, weights, biases, (stride, mode, padding, dilation, mid, act) = _split(op, args)
    cw = _core_weights(op, x, weights)  # torch's shape checks, before anything is kept
    shape = _output_shape(op, x, weights, stride, mode, padding, dilation)
    dtype, fmt = _result_dtype(x, weights), _result_format(x)
    names = _BIAS_NAMES[op]
    nw, nb = len(weights), len(names)
    kw = _core_kwargs(op, stride, mode, padding, dilation, mid, act, (None,) * nb)
    for n in names:  # (the biases are given per call)
        del kw[n]
    if not _numpy_ready((x, *cw, *biases)):

        def run_tensors(args: tuple) -> Tensor:
            x, weights, biases, _ = _split(op, args)
            x = x.detach()
            cw = _core_weights(op, x, tuple(w.detach() for w in weights))
            bs = {n: _detached(b) for n, b in zip(names, biases, strict=True)}
            out = torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)
            fn(x, *cw, out=out, **kw, **bs)
            return out

        return run_tensors
    packable = op in ("separable", "pointwise", "conv2d")  # a prepack()ed layer's packed weights
    core = _conv2d_core if op == "conv2d" else _pointwise_core
    # the fake kernel's strides, exactly (NumPy's and torch's differ where a dimension is 1);
    # a negative size: the core raises its error on every call of this signature
    strides = (
        torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt).stride()
        if min(shape) >= 0
        else None
    )

    def run_numpy(args: tuple) -> Tensor:
        x = args[0].detach().numpy()
        ws = list(_core_weights(op, x, tuple(w.detach().numpy() for w in args[1 : 1 + nw])))
        if packable:
            ws[-1] = _prepacked(args[nw], core) or ws[-1]
        bs = {n: _numpy(b) for n, b in zip(names, args[1 + nw : 1 + nw + nb], strict=True)}
        out = torch.from_numpy(fn(x, *ws, **kw, **bs))
        if out.stride() != strides:
            out = torch.empty(shape, dtype=dtype, memory_format=fmt).copy_(out)
        return out

    return run_numpy


# prepack(): GEMM weight -> (its state when packed, its PackedWeights, the core's view of it),
# by identity
_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _pack_state(w: Tensor) -> tuple:
    """What a change torch tracks alters: the version counter (every in-place op, optimizer
    steps, load_state_dict), the storage (``.data =``), the dtype and the strides."""
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), tuple(w.stride()))


def _prepacked(w: Tensor, core: Callable[[Any], Any]) -> PackedWeights | None:
    """The packed weights of a prepack()ed weight ``w`` as ``core`` views it (pointwise or
    conv2d), packed again where torch saw it change (as a call without prepack packs torch's
    weight: a training step costs what it would); None where it was never prepacked, or
    packed for the other view (one parameter shared by a pointwise layer and a 1x1 Conv2d)."""
    hit = _PACKS.get(w)
    if hit is None or hit[2] is not core:
        return None
    if hit[0] == _pack_state(w):
        return hit[1]
    return _pack_into(w, hit[2])


def _pack_into(w: Tensor, core: Callable[[Any], Any] = _pointwise_core) -> PackedWeights | None:
    """Pack weight ``w`` as ``core`` gives it to the core API (``_pointwise_core`` or
    ``_conv2d_core``) and remember it with its state (None, and nothing kept, where NumPy
    cannot view it)."""
    _PACKS.pop(w, None)
    if not _numpy_ready((w,)):
        return None
    packed = pack(core(w.detach()).numpy())
    _PACKS[w] = (_pack_state(w), packed, core)
    return packed


def prepack(module: nn.Module) -> nn.Module:
    """Pack the GEMM weights of every SeparableConv2d, PointwiseConv2d (their pointwise
    weights) and Conv2d in ``module`` once (numba_dsconv.pack), for inference on the CPU: their
    forward then reads the packed copy instead of repacking the weights on every call, with
    the same results to the bit.

    A change torch tracks (an optimizer step, load_state_dict, any in-place op) packs again
    at the next call (costing what a call without prepack costs); writes through ``.data`` or
    a NumPy view are invisible to torch: call prepack again after those. Returns ``module``."""
    for m in module.modules():
        w = getattr(m, "pw_weight" if isinstance(m, SeparableConv2d) else "weight", None)
        if isinstance(m, (SeparableConv2d, PointwiseConv2d)) and w is not None:
            _pack_into(w)
        elif isinstance(m, Conv2d) and w is not None:
            _pack_into(w, _conv2d_core)
    return module


def _numpy_ready(tensors: tuple) -> bool:
    """Every tensor a CPU float32/float64 tensor NumPy can view (None skipped; a lazily
    negated view cannot be: the core's conversion resolves it)."""
    return all(
        t is None
        or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.is_neg())
        for t in tensors
    )


def _forward_fake(op: str):
    def fake(*args):
        x, weights, _, (stride, mode, padding, dilation, _, _) = _split(op, args)
        _core_weights(op, x, weights)  # the weights' shape errors at trace time too
        shape = _output_shape(op, x, weights, stride, mode, padding, dilation)
        out = x.new_empty(shape, dtype=_result_dtype(x, weights))
        return out.contiguous(memory_format=_result_format(x))

    return fake


def _backward_impl(op: str):
    fn = getattr(grad, f"{op}_grad")
    nt = 3 + _WEIGHTS[op] + len(_BIAS_NAMES[op])  # grad, x, the weights, the biases, mask

    def impl(g, *args):
        call = (g, *args)
        key = _signature(op + "_backward", call, nt)
        run = _PREPARED.get(key)
        if run is None:
            run = _prepare_backward(op, fn, call)
            api.memo_put(_PREPARED, key, run)
        return run(call)

    return impl


def _prepare_backward(op: str, fn: Any, call: tuple) -> Any:
    """``run(call)`` for the backward calls of the signature of ``call`` (g, then the backward
    op's arguments)."""
    g, args = call[0], call[1:]
    needs = args[-1]
    x, weights, biases, (mask, stride, mode, padding, dilation, mid, act) = _split(op, args[:-1])
    nw, nb = len(weights), len(biases)
    cw = _core_weights(op, x, weights)
    names = _BIAS_NAMES[op]
    kw = _core_kwargs(op, stride, mode, padding, dilation, mid, act, (None,) * nb)
    for n in names:  # (the biases are given per call)
        del kw[n]
    wanted = tuple(f for f, n in zip(grad.SLOTS[op], needs, strict=True) if n)
    fmt = _result_format(x)
    refs = (x, *weights, *biases)
    # the fake kernel's strides (empty_like's: ref's own where ref is dense) per gradient
    strides = [None if r is None else torch.empty_like(r, device="meta").stride() for r in refs]
    # NumPy views in on the CPU: the core's gradient fast path serves a call seen before
    numpy = _numpy_ready((x, g, *cw, *biases))
    view = _numpy if numpy else _detached

    def run(call: tuple) -> tuple:
        g, x = call[0].detach().contiguous(memory_format=fmt), call[1].detach()
        weights, biases, mask = call[2 : 2 + nw], call[2 + nw : 2 + nw + nb], call[2 + nw + nb]
        xv = view(x)
        cw = _core_weights(op, xv, tuple(view(w) for w in weights))
        bs = {n: view(b) for n, b in zip(names, biases, strict=True)}
        found = fn(view(g), xv, *cw, needs=wanted, mask=view(mask), **kw, **bs)
        result = []
        for i, (value, ref) in enumerate(zip(found, (x, *weights, *biases), strict=True)):
            if value is None:
                result.append(x.new_empty(0))
                continue
            if 1 <= i <= nw:  # a weight: back to torch's shape
                value = _torch_weight_grad(op, i - 1, value)
            if numpy:
                value = torch.from_numpy(value)
            if value.stride() != strides[i]:
                value = torch.empty_like(ref).copy_(value)
            result.append(value)
        return tuple(result)

    return run


def _torch_weight_grad(op: str, i: int, g: Any) -> Any:
    """The gradient of weight ``i`` of ``op`` (a tensor or NumPy array) from the core's shape
    to torch's."""
    if op == "separable":
        return _depthwise_torch(g) if i == 0 else _pointwise_torch(g)
    return {"depthwise": _depthwise_torch, "pointwise": _pointwise_torch,
            "conv2d": _conv2d_torch}[op](g)  # fmt: skip


def _backward_fake(op: str):
    def fake(g, *args):
        needs = args[-1]
        x, weights, biases, _ = _split(op, args[:-1])
        refs = (x, *weights, *biases)
        return tuple(torch.empty_like(r) if n and r is not None else x.new_empty(0)
                     for r, n in zip(refs, needs, strict=True))  # fmt: skip

    return fake


def _setup_context(op: str):
    def setup(ctx, inputs, output):
        x, weights, biases, rest = _split(op, inputs)
        act = rest[-1]
        mask = None
        if act != _NONE and any(ctx.needs_input_grad):
            mask = (output > 0) & (output < 6) if act == "relu6" else output > 0
        ctx.save_for_backward(x, *weights, *biases, mask)
        ctx.rest = rest

    return setup


def _backward(op: str, backward_op):
    nw, nb = _WEIGHTS[op], len(_BIAS_NAMES[op])

    def backward(ctx, g):
        saved = ctx.saved_tensors
        x, weights, biases, mask = (
            saved[0],
            saved[1 : 1 + nw],
            saved[1 + nw : 1 + nw + nb],
            saved[-1],
        )
        needs = [bool(n) for n in ctx.needs_input_grad[: 1 + nw + nb]]
        if not any(needs):
            return (None,) * (1 + nw + nb + len(ctx.rest))
        grads = backward_op(g, x, *weights, *biases, mask, *ctx.rest, needs)
        return (*(gr if n else None for gr, n in zip(grads, needs, strict=True)),
                *(None,) * len(ctx.rest))  # fmt: skip

    return backward


def _define(op: str):
    fwd_schema, bwd_schema = _schemas(op)
    bwd = torch.library.custom_op(
        f"numba_dsconv::{op}_backward", _backward_impl(op), mutates_args=(), schema=bwd_schema
    )
    bwd.register_fake(_backward_fake(op))
    fwd = torch.library.custom_op(
        f"numba_dsconv::{op}", _forward_impl(op), mutates_args=(), schema=fwd_schema
    )
    fwd.register_fake(_forward_fake(op))
    fwd.register_autograd(_backward(op, bwd), setup_context=_setup_context(op))
    return fwd, bwd


OPS = {op: _define(op) for op in ("separable", "depthwise", "pointwise", "conv2d")}


def _eager_function(op: str) -> type:
    """The same forward, autograd formula and backward as the custom op, as a plain
    ``torch.autograd.Function`` for eager calls: torch's custom-op dispatch cost ~40-90 us per
    call (forward and backward), most of a small layer's training step."""
    forward_impl, setup = _forward_impl(op), _setup_context(op)
    direct = _backward(op, _backward_impl(op))
    recorded = _backward(op, OPS[op][1])

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # noqa: ANN001, ANN205
            out = forward_impl(*args)
            setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            # under create_graph, the backward custom op: autograd records it, and a second
            # backward through it fails loudly (it has no formula) instead of treating the
            # gradients as constants
            return (recorded if torch.is_grad_enabled() else direct)(ctx, g)

    Eager.__name__ = Eager.__qualname__ = f"{op}_eager"
    return Eager


_EAGER = {op: _eager_function(op) for op in OPS}


def _plain_eager(tensors: tuple) -> bool:
    """Whether a call may skip the custom op: eager (not traced by torch.compile), no dispatch
    or torch-function mode active, and every tensor a plain CPU or CUDA tensor (not fake, meta,
    a subclass or a functorch wrapper). Anything else takes the custom op, which handles it."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if _current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and type(t) is not nn.Parameter:
            return False
        if t.device.type not in ("cpu", "cuda") or _functorch_wrapped(t):
            return False
    return True


def _current_dispatch_mode() -> Any:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


def _functorch_wrapped(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _call(op: str, *args: Any) -> Tensor:
    """Run ``op`` through the eager Function where possible, else its custom op (the same
    kernels and formulas: the same bits either way)."""
    nt = 1 + _WEIGHTS[op] + len(_BIAS_NAMES[op])
    if _plain_eager(args[:nt]):
        return _EAGER[op].apply(*args)
    return OPS[op][0](*args)


# --------------------------------------------------------------------------------------------
# the functional API


def _geometry(
    stride: Any, padding: Any, dilation: Any
) -> tuple[list[int], str, list[int], list[int]]:
    s = list(pair(stride, "stride", minimum=1))
    d = list(pair(dilation, "dilation", minimum=1))
    mode, pads = _padding(padding)
    return s, mode, pads, d


def separable(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    dw_bias: Tensor | None = None,
    mid_activation: str | None = None,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """``activation(pointwise(mid_activation(depthwise(x) + dw_bias)) + bias)``, fused, with
    autograd. dw_weight (C*M, 1, K_h, K_w), pw_weight (C_out, C*M, 1, 1)."""
    s, mode, pads, d = _geometry(stride, padding, dilation)
    return _call(
        "separable", x, dw_weight, pw_weight, dw_bias, bias, s, mode, pads, d,
        _activation(mid_activation, "mid_activation"), _activation(activation, "activation"),
    )  # fmt: skip


def depthwise(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    activation: str | None = None,
) -> Tensor:
    """Depthwise convolution (torch's Conv2d with groups=C), with autograd. weight
    (C*M, 1, K_h, K_w)."""
    s, mode, pads, d = _geometry(stride, padding, dilation)
    return _call(
        "depthwise", x, weight, bias, s, mode, pads, d, _NONE, _activation(activation, "activation")
    )


def pointwise(
    x: Tensor, weight: Tensor, *, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Pointwise (1x1) convolution, with autograd. weight (C_out, C_in, 1, 1)."""
    return _call(
        "pointwise", x, weight, bias, [1, 1], "explicit", [0, 0, 0, 0], [1, 1], _NONE,
        _activation(activation, "activation"),
    )  # fmt: skip


def conv2d(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    activation: str | None = None,
) -> Tensor:
    """Standard convolution, with autograd. weight (C_out, C_in, K_h, K_w)."""
    s, mode, pads, d = _geometry(stride, padding, dilation)
    return _call(
        "conv2d", x, weight, bias, s, mode, pads, d, _NONE, _activation(activation, "activation")
    )


# --------------------------------------------------------------------------------------------
# modules


def _init_conv(weight: Tensor, bias: Tensor | None) -> None:
    """torch.nn.Conv2d's default initialisation (reset_parameters)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _param(shape: tuple[int, ...], factory: dict) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, **factory))


def _check_zeros_padding(conv: nn.Conv2d, what: str) -> None:
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{what} has padding_mode={conv.padding_mode!r}; only 'zeros' is supported"
        )


def _torch_padding(conv: nn.Conv2d) -> Any:
    p = conv.padding
    if isinstance(p, str):
        if p == "same" and any(s != 1 for s in conv.stride):  # pragma: no cover - torch refuses
            raise ValueError("padding='same' with a stride: not a torch layer")
        return p
    return tuple(p)


def _copy_of(cls: type, sources: dict[str, Tensor | None], *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs)`` with its parameters copied from ``sources``, never initialised
    (torch's random number stream is left as it was)."""
    layer = nn.utils.skip_init(cls, *args, **kwargs)
    with torch.no_grad():
        for name, src in sources.items():
            if src is not None:
                getattr(layer, name).copy_(src)
    return layer


class _ConvBase(nn.Module):
    def _extra(self, **fields: Any) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)


class SeparableConv2d(_ConvBase):
    """Depthwise separable convolution (MobileNet) as one fused layer:
    ``activation(pointwise(mid_activation(depthwise(x) + dw_bias)) + bias)``.

    Parameters ``dw_weight`` (C*M, 1, K_h, K_w), ``pw_weight`` (C_out, C*M, 1, 1), ``dw_bias``
    (C*M) where ``dw_bias=True``, ``bias`` (C_out) where ``bias=True``; initialised as
    torch.nn.Conv2d initialises them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        depth_multiplier: int = 1,
        bias: bool = True,
        dw_bias: bool = False,
        mid_activation: str | None = None,
        activation: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        cm = in_channels * depth_multiplier
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.depth_multiplier = (kh, kw), depth_multiplier
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.mid_activation = _act(_activation(mid_activation, "mid_activation"))
        self.activation = _act(_activation(activation, "activation"))
        _geometry(stride, padding, dilation)  # validate now
        self.dw_weight = _param((cm, 1, kh, kw), f)
        self.pw_weight = _param((out_channels, cm, 1, 1), f)
        self.dw_bias = _param((cm,), f) if dw_bias else None
        self.bias = _param((out_channels,), f) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv(self.dw_weight, self.dw_bias)
        _init_conv(self.pw_weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return separable(
            x, self.dw_weight, self.pw_weight, stride=self.stride, padding=self.padding,
            dilation=self.dilation, dw_bias=self.dw_bias, mid_activation=self.mid_activation,
            bias=self.bias, activation=self.activation,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, " + self._extra(
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, depth_multiplier=self.depth_multiplier,
            mid_activation=self.mid_activation, activation=self.activation,
        )  # fmt: skip

    @classmethod
    def from_torch(
        cls,
        dw_conv: nn.Conv2d,
        pw_conv: nn.Conv2d,
        mid_activation: str | None = None,
        activation: str | None = None,
    ) -> "SeparableConv2d":
        """A layer computing ``pw_conv(mid_activation(dw_conv(x)))`` (then ``activation``),
        with copies of their weights and biases."""
        c = dw_conv.in_channels
        if dw_conv.groups != c or dw_conv.out_channels % c != 0:
            raise ValueError(
                f"dw_conv must be a depthwise Conv2d (groups == in_channels, out_channels a "
                f"multiple); got groups={dw_conv.groups}, in_channels={c}, "
                f"out_channels={dw_conv.out_channels}"
            )
        if pw_conv.kernel_size != (1, 1) or pw_conv.stride != (1, 1) or pw_conv.groups != 1:
            raise ValueError(
                f"pw_conv must be a 1x1 Conv2d with stride 1 and groups 1; got kernel_size="
                f"{pw_conv.kernel_size}, stride={pw_conv.stride}, groups={pw_conv.groups}"
            )
        if pw_conv.padding not in ((0, 0), "valid", "same"):  # (1x1: "same" pads nothing)
            raise ValueError(f"pw_conv must have no padding; got padding={pw_conv.padding}")
        if pw_conv.in_channels != dw_conv.out_channels:
            raise ValueError(
                f"pw_conv takes {pw_conv.in_channels} channels but dw_conv gives "
                f"{dw_conv.out_channels}"
            )
        _check_zeros_padding(dw_conv, "dw_conv")
        _check_zeros_padding(pw_conv, "pw_conv")
        w = dw_conv.weight
        sources = {"dw_weight": w, "pw_weight": pw_conv.weight, "dw_bias": dw_conv.bias,
                   "bias": pw_conv.bias}  # fmt: skip
        return _copy_of(
            cls, sources, c, pw_conv.out_channels, dw_conv.kernel_size, stride=dw_conv.stride,
            padding=_torch_padding(dw_conv), dilation=dw_conv.dilation,
            depth_multiplier=dw_conv.out_channels // c, bias=pw_conv.bias is not None,
            dw_bias=dw_conv.bias is not None, mid_activation=mid_activation,
            activation=activation, device=w.device, dtype=w.dtype,
        )  # fmt: skip


class _SingleConv(_ConvBase):
    """A layer of one weight (C_out, C_in / groups, K_h, K_w) and an optional bias."""

    _op = ""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.activation = _act(_activation(activation, "activation"))
        _geometry(stride, padding, dilation)
        per_group = 1 if self._op == "depthwise" else in_channels
        self.weight = _param((out_channels, per_group, kh, kw), f)
        self.bias = _param((out_channels,), f) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv(self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, " + self._extra(
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, activation=self.activation,
        )  # fmt: skip

    @classmethod
    def _from(cls, conv: nn.Conv2d, activation: str | None):
        _check_zeros_padding(conv, "conv")
        geometry = {"stride": conv.stride, "padding": _torch_padding(conv),
                    "dilation": conv.dilation}  # fmt: skip
        return _copy_of(
            cls, {"weight": conv.weight, "bias": conv.bias}, conv.in_channels, conv.out_channels,
            conv.kernel_size, bias=conv.bias is not None, activation=activation,
            device=conv.weight.device, dtype=conv.weight.dtype, **geometry,
        )  # fmt: skip


class DepthwiseConv2d(_SingleConv):
    """Depthwise convolution: weight (C*M, 1, K_h, K_w) (out_channels = C*M), bias (C*M)."""

    _op = "depthwise"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if out_channels % in_channels != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be a multiple of in_channels "
                f"({in_channels}): each input channel has out_channels / in_channels filters"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         activation, device, dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return depthwise(x, self.weight, bias=self.bias, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, activation=self.activation)  # fmt: skip

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, activation: str | None = None) -> "DepthwiseConv2d":
        if conv.groups != conv.in_channels:
            raise ValueError(
                f"conv must be depthwise (groups == in_channels); got groups={conv.groups}"
            )
        return cls._from(conv, activation)


class PointwiseConv2d(_SingleConv):
    """Pointwise (1x1) convolution: weight (C_out, C_in, 1, 1), bias (C_out)."""

    _op = "pointwise"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias, activation=activation,
                         device=device, dtype=dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return pointwise(x, self.weight, bias=self.bias, activation=self.activation)

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, activation: str | None = None) -> "PointwiseConv2d":
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError(
                f"conv must be a 1x1 Conv2d with stride 1 and groups 1; got kernel_size="
                f"{conv.kernel_size}, stride={conv.stride}, groups={conv.groups}"
            )
        if conv.padding not in ((0, 0), "valid", "same"):  # (1x1: "same" pads nothing)
            raise ValueError(f"conv must have no padding; got padding={conv.padding}")
        _check_zeros_padding(conv, "conv")
        w = conv.weight
        return _copy_of(
            cls, {"weight": w, "bias": conv.bias}, conv.in_channels, conv.out_channels,
            bias=conv.bias is not None, activation=activation, device=w.device, dtype=w.dtype,
        )  # fmt: skip


class Conv2d(_SingleConv):
    """Standard convolution: weight (C_out, C_in, K_h, K_w), bias (C_out)."""

    _op = "conv2d"

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight, bias=self.bias, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, activation=self.activation)  # fmt: skip

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, activation: str | None = None) -> "Conv2d":
        if conv.groups != 1:
            raise ValueError(f"conv must have groups=1; got groups={conv.groups}")
        return cls._from(conv, activation)
