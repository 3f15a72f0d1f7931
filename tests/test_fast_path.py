"""The NumPy fast path (api._FAST): a call with the types, shapes, strides, dtypes and keywords
of a call validated before skips validation. It must give what the full path gives, on new
values, and never let a call through that validation would stop."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case
from helpers import ALL_OPS, bitwise_equal, check_against_reference, geo_kwargs, lib_fn

from numba_dsconv import api


def _case(rng, op, layout="NHWC", dtype=np.float32):
    mult = 2 if op in ("depthwise", "separable") else 1
    x, weights, bias_kw, red = make_case(
        rng, op, n=2, h=7, w=6, c=3, kh=3, kw=2, mult=mult, c_out=5, xdtype=dtype,
        layout=layout, batched=True, biases=True,
    )  # fmt: skip
    kwargs = dict(bias_kw, layout=layout, **geo_kwargs(op, stride=(2, 1), padding="same"))
    kwargs["activation"] = "relu6"
    return x, weights, kwargs, red


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_remembered_call_computes_new_values(op, layout):
    rng = np.random.default_rng(7)
    x, weights, kwargs, red = _case(rng, op, layout)
    check_against_reference(op, x, weights, red, **kwargs)
    assert any(k[0] == op for k in api._FAST)  # the first call was remembered
    # new values, same shapes: the fast path runs them, and agrees with the reference
    x2, weights2, kwargs2, _ = _case(np.random.default_rng(8), op, layout)
    first = check_against_reference(op, x2, weights2, red, **kwargs2)
    # ... and with the full path (the memo emptied) to the bit
    saved = dict(api._FAST)
    api._FAST.clear()
    try:
        full = lib_fn(op)(x2, *weights2, **kwargs2)
    finally:
        api._FAST.update(saved)
    assert bitwise_equal(first, full)


@pytest.mark.parametrize("op", ALL_OPS)
def test_other_strides_and_dtypes_are_other_calls(op):
    rng = np.random.default_rng(9)
    x, weights, kwargs, red = _case(rng, op)
    check_against_reference(op, x, weights, red, **kwargs)
    # the same shape in another memory order, a strided view, float64: each checked afresh
    check_against_reference(op, np.asfortranarray(x), weights, red, **kwargs)
    wide = np.zeros((*x.shape[:3], 2 * x.shape[3]), x.dtype)
    wide[..., ::2] = x
    check_against_reference(op, wide[..., ::2], weights, red, **kwargs)
    x64, w64, kw64, _ = _case(rng, op, dtype=np.float64)
    out = check_against_reference(op, x64, w64, red, **kw64)
    assert out.dtype == np.float64


@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_calls_after_a_good_one_still_fail(op):
    rng = np.random.default_rng(10)
    x, weights, kwargs, _ = _case(rng, op)
    fn = lib_fn(op)
    fn(x, *weights, **kwargs)
    fn(x, *weights, **kwargs)  # now from the memo
    bias = kwargs["bias"]
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(x, *weights, **{**kwargs, "bias": np.concatenate([bias, bias])})
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(x.astype(np.int32), *weights, **kwargs)
    with pytest.raises(ValueError, match="activation"):
        fn(x, *weights, **{**kwargs, "activation": "gelu"})
    if op != "pointwise":
        with pytest.raises(ValueError, match="stride"):
            fn(x, *weights, **{**kwargs, "stride": 0})
    # a list is not a memo key (True == 1 but only 1 is a valid stride): validated each time
    assert api._fast_key(op, (x,), ([1, 1],), None) is None
    assert api._fast_key(op, (x,), (True,), None) is None
    assert api._fast_key(op, (x.view(np.ma.MaskedArray),), (), None) is None
    assert api._fast_key(op, (x.astype(x.dtype.newbyteorder()),), (), None) is None
    assert api._fast_key(op, (x,), (), np.empty(1)) is None


def test_inputs_are_not_modified_on_the_fast_path():
    rng = np.random.default_rng(11)
    x, weights, kwargs, _ = _case(rng, "separable")
    copies = [a.copy() for a in (x, *weights)]
    for _ in range(3):
        lib_fn("separable")(x, *weights, **kwargs)
    for a, c in zip((x, *weights), copies, strict=True):
        assert bitwise_equal(a, c)
