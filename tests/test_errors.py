"""Bad inputs: the exception type AND that the message names the argument at fault.

Type of the error follows the contract: a bad value or shape is a ValueError, a bad type or
dtype is a TypeError. Where the contract leaves it open (a padding tuple of the wrong
structure) either is accepted, but the message must still name the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

import numba_dsconv as nd

F32 = np.float32
RNG = np.random.default_rng(7)


def _r(*shape, dtype=F32):
    return RNG.standard_normal(shape).astype(dtype)


X = _r(1, 5, 5, 3)  # NHWC, C = 3
DW = _r(3, 3, 3)
DW2 = _r(3, 3, 3, 2)  # multiplier 2 -> 6 channels
PW = _r(3, 4)
W = _r(3, 3, 3, 4)


def name(arg: str) -> str:
    """Regex: the argument's name as a whole word."""
    return rf"\b{arg}\b"


VE, TE = ValueError, TypeError
EITHER = (ValueError, TypeError)

# (id, call, expected exception(s), regex the message must match)
CASES = [
    # --- channel / shape mismatches
    ("x-vs-dw-channels", lambda: nd.depthwise(X, _r(3, 3, 4)), VE, r"\b(x|dw)\b"),
    ("x-vs-dw-channels-sep", lambda: nd.separable(X, _r(3, 3, 4), PW), VE, r"\b(x|dw)\b"),
    ("dw-vs-pw-channels", lambda: nd.separable(X, DW, _r(5, 4)), VE, name("pw")),
    ("dw-mult-vs-pw-channels", lambda: nd.separable(X, DW2, PW), VE, name("pw")),
    ("x-vs-w-channels", lambda: nd.conv2d(X, _r(3, 3, 2, 4)), VE, r"\b(x|w)\b"),
    ("x-vs-pw-channels", lambda: nd.pointwise(X, _r(5, 4)), VE, r"\b(x|pw)\b"),
    ("x-nchw-vs-dw", lambda: nd.depthwise(_r(1, 5, 5, 3), DW, layout="NCHW"), VE, r"\b(x|dw)\b"),
    ("pw-4d-not-1x1", lambda: nd.pointwise(X, _r(3, 3, 3, 4)), VE, name("pw")),
    ("sep-pw-4d-not-1x1", lambda: nd.separable(X, DW, _r(2, 1, 3, 4)), VE, name("pw")),
    # --- kernel does not fit
    (
        "kernel-larger-than-input",
        lambda: nd.depthwise(_r(1, 2, 2, 3), DW),
        VE,
        r"\b(x|dw|kernel|padding|empty|output)\b",
    ),
    (
        "dilated-kernel-larger-than-input",
        lambda: nd.separable(_r(1, 4, 4, 3), DW, PW, dilation=2),
        VE,
        r"\b(x|dw|kernel|padding|dilation|empty|output)\b",
    ),
    (
        "conv-kernel-larger-than-padded",
        lambda: nd.conv2d(_r(1, 1, 5, 3), _r(4, 1, 3, 2), padding=((1, 1), (0, 0))),
        VE,
        r"\b(x|w|kernel|padding|empty|output)\b",
    ),
    # --- stride
    ("stride-0", lambda: nd.depthwise(X, DW, stride=0), VE, name("stride")),
    ("stride-negative", lambda: nd.separable(X, DW, PW, stride=-1), VE, name("stride")),
    ("stride-pair-0", lambda: nd.conv2d(X, W, stride=(1, 0)), VE, name("stride")),
    ("stride-float", lambda: nd.depthwise(X, DW, stride=1.5), TE, name("stride")),
    ("stride-float-integral", lambda: nd.depthwise(X, DW, stride=2.0), TE, name("stride")),
    ("stride-bool", lambda: nd.depthwise(X, DW, stride=True), TE, name("stride")),
    ("stride-str", lambda: nd.separable(X, DW, PW, stride="2"), TE, name("stride")),
    ("stride-triple", lambda: nd.depthwise(X, DW, stride=(1, 1, 1)), EITHER, name("stride")),
    # --- dilation
    ("dilation-0", lambda: nd.depthwise(X, DW, dilation=0), VE, name("dilation")),
    ("dilation-negative", lambda: nd.conv2d(X, W, dilation=(1, -2)), VE, name("dilation")),
    ("dilation-float", lambda: nd.separable(X, DW, PW, dilation=1.0), TE, name("dilation")),
    ("dilation-bool", lambda: nd.separable(X, DW, PW, dilation=False), TE, name("dilation")),
    # --- padding
    ("padding-unknown-string", lambda: nd.depthwise(X, DW, padding="full"), VE, name("padding")),
    ("padding-negative", lambda: nd.depthwise(X, DW, padding=-1), VE, name("padding")),
    ("padding-pair-negative", lambda: nd.conv2d(X, W, padding=(0, -1)), VE, name("padding")),
    (
        "padding-asym-negative",
        lambda: nd.separable(X, DW, PW, padding=((0, -1), (0, 0))),
        VE,
        name("padding"),
    ),
    ("padding-triple", lambda: nd.depthwise(X, DW, padding=(1, 2, 3)), EITHER, name("padding")),
    (
        "padding-ragged",
        lambda: nd.depthwise(X, DW, padding=((1, 2), (3,))),
        EITHER,
        name("padding"),
    ),
    ("padding-float", lambda: nd.depthwise(X, DW, padding=1.5), TE, name("padding")),
    ("padding-none", lambda: nd.separable(X, DW, PW, padding=None), TE, name("padding")),
    ("padding-bool", lambda: nd.depthwise(X, DW, padding=True), TE, name("padding")),
    # --- dtypes of x
    ("x-int32", lambda: nd.depthwise(X.astype(np.int32), DW), TE, name("x")),
    ("x-int64", lambda: nd.separable(X.astype(np.int64), DW, PW), TE, name("x")),
    ("x-bool", lambda: nd.conv2d(X > 0, W), TE, name("x")),
    ("x-complex", lambda: nd.pointwise(X.astype(np.complex64), PW), TE, name("x")),
    ("x-float16", lambda: nd.separable(X.astype(np.float16), DW, PW), TE, name("x")),
    ("x-object", lambda: nd.depthwise(X.astype(object), DW), TE, name("x")),
    # --- dtypes of weights
    ("dw-int", lambda: nd.depthwise(X, DW.astype(np.int32)), TE, name("dw")),
    ("dw-bool-sep", lambda: nd.separable(X, DW > 0, PW), TE, name("dw")),
    ("pw-complex", lambda: nd.separable(X, DW, PW.astype(np.complex128)), TE, name("pw")),
    ("pw-float16", lambda: nd.pointwise(X, PW.astype(np.float16)), TE, name("pw")),
    ("pw-object", lambda: nd.pointwise(X, PW.astype(object)), TE, name("pw")),
    ("w-float16", lambda: nd.conv2d(X, W.astype(np.float16)), TE, name("w")),
    ("w-int", lambda: nd.conv2d(X, W.astype(np.int64)), TE, name("w")),
    # --- ndim
    ("x-2d", lambda: nd.depthwise(X[0, :, :, 0], DW), VE, name("x")),
    ("x-5d", lambda: nd.separable(X[None], DW, PW), VE, name("x")),
    ("x-1d-pointwise", lambda: nd.pointwise(X[0, 0, 0], PW), VE, name("x")),
    ("dw-2d", lambda: nd.depthwise(X, DW[:, :, 0]), VE, name("dw")),
    ("dw-5d", lambda: nd.separable(X, DW2[None], PW), VE, name("dw")),
    ("pw-1d", lambda: nd.separable(X, DW, PW[:, 0]), VE, name("pw")),
    ("pw-3d", lambda: nd.pointwise(X, PW[None]), VE, name("pw")),
    ("w-3d", lambda: nd.conv2d(X, W[..., 0]), VE, name("w")),
    ("w-5d", lambda: nd.conv2d(X, W[None]), VE, name("w")),
    # --- biases
    ("conv-bias-length", lambda: nd.conv2d(X, W, bias=_r(3)), VE, name("bias")),
    ("dw-bias-length-mult", lambda: nd.depthwise(X, DW2, bias=_r(3)), VE, name("bias")),
    ("pw-bias-length", lambda: nd.pointwise(X, PW, bias=_r(5)), VE, name("bias")),
    ("sep-bias-length", lambda: nd.separable(X, DW, PW, bias=_r(3)), VE, name("bias")),
    ("sep-dw_bias-length", lambda: nd.separable(X, DW2, _r(6, 4), dw_bias=_r(3)), VE, "dw_bias"),
    ("sep-dw_bias-length-2", lambda: nd.separable(X, DW, PW, dw_bias=_r(4)), VE, "dw_bias"),
    ("bias-2d", lambda: nd.conv2d(X, W, bias=_r(4, 1)), VE, name("bias")),
    ("bias-0d", lambda: nd.pointwise(X, PW, bias=np.float32(1.0)), VE, name("bias")),
    ("dw_bias-2d", lambda: nd.separable(X, DW, PW, dw_bias=_r(1, 3)), VE, "dw_bias"),
    # --- activations
    ("activation-unknown", lambda: nd.depthwise(X, DW, activation="gelu"), VE, "activation"),
    ("activation-int", lambda: nd.conv2d(X, W, activation=1), TE, "activation"),
    ("activation-callable", lambda: nd.pointwise(X, PW, activation=abs), TE, "activation"),
    (
        "mid_activation-unknown",
        lambda: nd.separable(X, DW, PW, mid_activation="tanh"),
        VE,
        "mid_activation",
    ),
    ("mid_activation-int", lambda: nd.separable(X, DW, PW, mid_activation=6), TE, "mid_activation"),
    # --- layout / device
    ("layout-unknown", lambda: nd.depthwise(X, DW, layout="NWHC"), VE, name("layout")),
    ("layout-int", lambda: nd.separable(X, DW, PW, layout=0), TE, name("layout")),
    ("device-tpu", lambda: nd.depthwise(X, DW, device="tpu"), VE, name("device")),
    ("device-cuda-x", lambda: nd.separable(X, DW, PW, device="cuda:x"), VE, name("device")),
    ("device-gpu", lambda: nd.pointwise(X, PW, device="gpu"), VE, name("device")),
    # --- cost
    ("cost-kernel-0", lambda: nd.cost((8, 8, 3), 0, 4), VE, "kernel_size"),
    ("cost-kernel-float", lambda: nd.cost((8, 8, 3), 2.5, 4), TE, "kernel_size"),
    ("cost-c_out-0", lambda: nd.cost((8, 8, 3), 3, 0), VE, "c_out"),
    ("cost-input-2d", lambda: nd.cost((8, 8), 3, 4), VE, "input_shape"),
    ("cost-input-5d", lambda: nd.cost((1, 1, 8, 8, 3), 3, 4), VE, "input_shape"),
    ("cost-input-zero", lambda: nd.cost((0, 8, 3), 3, 4), VE, "input_shape"),
    ("cost-stride-0", lambda: nd.cost((8, 8, 3), 3, 4, stride=0), VE, name("stride")),
    ("cost-padding", lambda: nd.cost((8, 8, 3), 3, 4, padding="full"), VE, name("padding")),
    ("cost-dilation", lambda: nd.cost((8, 8, 3), 3, 4, dilation=0), VE, name("dilation")),
    ("cost-mult-0", lambda: nd.cost((8, 8, 3), 3, 4, depth_multiplier=0), VE, "depth_multiplier"),
    ("cost-empty", lambda: nd.cost((2, 2, 3), 3, 4), VE, r"\w"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_case_count():
    assert len(CASES) >= 30


# ---------------------------------------------------------------------------------------------
# out=


def _out_cases():
    x = _r(1, 5, 5, 4)
    pw = _r(4, 4)
    dw = _r(3, 3, 4)
    good = np.empty((1, 5, 5, 4), F32)

    ro = good.copy()
    ro.setflags(write=False)
    # pw and out carved from the same buffer, sharing 8 elements
    buf = np.empty(16 + 100 - 8, F32)
    pw_shared = buf[:16].reshape(4, 4)
    pw_shared[...] = pw
    out_shared = buf[8:].reshape(1, 5, 5, 4)
    assert np.shares_memory(pw_shared, out_shared)
    big = np.empty((1, 6, 6, 4), F32)
    big[:, :5, :5] = x
    x_view = big[:, :5, :5]
    out_view = big[:, 1:, 1:]  # overlaps x_view (partially)
    return [
        ("shape", lambda: nd.pointwise(x, pw, out=np.empty((1, 5, 5, 3), F32)), VE),
        ("shape-unbatched", lambda: nd.pointwise(x, pw, out=np.empty((5, 5, 4), F32)), VE),
        ("shape-nchw-for-nhwc", lambda: nd.depthwise(x, dw, padding=1, out=_r(1, 4, 5, 5)), VE),
        ("shape-sep", lambda: nd.separable(x, dw, pw, out=np.empty((1, 5, 5, 4), F32)), VE),
        ("dtype", lambda: nd.pointwise(x, pw, out=np.empty((1, 5, 5, 4), np.float64)), TE),
        ("dtype-f32-for-f64", lambda: nd.pointwise(x, pw.astype(np.float64), out=good), TE),
        ("dtype-int", lambda: nd.pointwise(x, pw, out=np.empty((1, 5, 5, 4), np.int32)), TE),
        ("is-x", lambda: nd.pointwise(x, pw, out=x), VE),
        ("is-x-depthwise", lambda: nd.depthwise(x, dw, padding="same", out=x), VE),
        ("overlaps-x", lambda: nd.depthwise(x_view, dw, padding="same", out=out_view), VE),
        ("overlaps-pw", lambda: nd.pointwise(x, pw_shared, out=out_shared), VE),
        ("read-only", lambda: nd.pointwise(x, pw, out=ro), VE),
        ("not-an-array", lambda: nd.pointwise(x, pw, out=[[0.0]]), EITHER),
    ]


OUT_CASES = _out_cases()


@pytest.mark.parametrize(("call", "exc"), [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_bad_out(call, exc):
    with pytest.raises(exc, match=name("out")):
        call()


# ---------------------------------------------------------------------------------------------
# CUDA without a GPU


def _cuda_available() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(_cuda_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("op", ["conv2d", "depthwise", "pointwise", "separable"])
def test_cuda_without_gpu_suggests_cpu(op, device):
    weights = {"conv2d": (W,), "depthwise": (DW,), "pointwise": (PW,), "separable": (DW, PW)}[op]
    with pytest.raises((RuntimeError, ValueError), match="cpu"):
        getattr(nd, op)(X, *weights, device=device)


def test_errors_do_not_write_inputs():
    x, dw, pw = X.copy(), DW.copy(), _r(5, 4)
    with pytest.raises(ValueError):
        nd.separable(x, dw, pw)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(dw, DW)


def test_spec_memo_never_skips_validation():
    """A geometry that validated once (and is memoised) must not let an equal-comparing bad
    value through: True == 1 and hash(True) == hash(1), but stride=True is still an error."""
    x = _r(1, 7, 7, 3)
    nd.depthwise(x, DW, stride=1, padding=(1, 1))
    nd.depthwise(x, DW, stride=(1, 1), padding=(1, 1))
    with pytest.raises(TypeError, match=name("stride")):
        nd.depthwise(x, DW, stride=True, padding=(1, 1))
    with pytest.raises(TypeError, match=name("stride")):
        nd.depthwise(x, DW, stride=(1, True), padding=(1, 1))
    with pytest.raises(TypeError, match=name("padding")):
        nd.depthwise(x, DW, stride=1, padding=(True, 1))
    # and the memoised spec still gives the right answer for a different input of that shape
    a = nd.depthwise(x, DW, stride=1, padding=(1, 1))
    b = nd.depthwise(x.copy() * 2, DW, stride=1, padding=(1, 1))
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6, atol=1e-6)
