"""The behavioural contract: out=, untouched inputs, memory layouts, NaN/Inf, determinism,
threads, torch tensors."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from cases import make_case
from helpers import (
    ALL_OPS,
    assert_close,
    bitwise_equal,
    geo_kwargs,
    lib_fn,
    ref_fn,
)
from reference import geometry

import numba_dsconv as nd


def _case(rng, op, *, dtype=np.float32, layout="NHWC", batched=True, n=2, h=7, w=6, c=3):
    mult = 2 if op in ("depthwise", "separable") else 1
    x, weights, bias_kw, red = make_case(
        rng, op, n=n, h=h, w=w, c=c, kh=3, kw=2, mult=mult, c_out=5, xdtype=dtype,
        layout=layout, batched=batched, biases=True,
    )  # fmt: skip
    kwargs = dict(bias_kw, layout=layout, **geo_kwargs(op, stride=(2, 1), padding="same"))
    kwargs["activation"] = "relu6"
    if op == "separable":
        kwargs["mid_activation"] = "relu"
    return x, weights, kwargs, red


# ---------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_out_poisoned_is_overwritten_and_returned(op, dtype, layout, batched, rng):
    x, weights, kwargs, red = _case(rng, op, dtype=dtype, layout=layout, batched=batched)
    expected = lib_fn(op)(x, *weights, device="cpu", **kwargs)
    out = np.full(expected.shape, np.nan, dtype)
    res = lib_fn(op)(x, *weights, device="cpu", out=out, **kwargs)
    assert res is out
    assert not np.isnan(out).any()
    assert bitwise_equal(out, expected)
    assert_close(out, ref_fn(op)(x, *weights, **kwargs), dtype, red)


@pytest.mark.parametrize(("xdt", "wdt"), [(np.float32, np.float64), (np.float64, np.float32)])
@pytest.mark.parametrize("op", ALL_OPS)
def test_out_mixed_dtypes_is_float64(op, xdt, wdt, rng):
    x, weights, bias_kw, red = make_case(rng, op, n=1, h=6, w=5, xdtype=xdt, wdtype=wdt)
    geo = geo_kwargs(op, padding="same")
    expected = ref_fn(op)(x, *weights, **geo)
    out = np.full(expected.shape, np.nan, np.float64)
    assert lib_fn(op)(x, *weights, device="cpu", out=out, **geo) is out
    assert_close(out, expected, np.float64, red)


def _noncontiguous_outs(shape, dtype):
    """(name, out, the whole buffer it lives in, mask of out's elements in that buffer)."""
    big = np.full((*shape[:-1], 2 * shape[-1]), np.nan, dtype)
    mask = np.zeros(big.shape, bool)
    mask[..., ::2] = True
    yield "every-other-channel", big[..., ::2], big, mask
    big = np.full((shape[0] + 2, *shape[1:]), np.nan, dtype)
    mask = np.zeros(big.shape, bool)
    mask[1:-1] = True
    yield "offset-slice", big[1:-1], big, mask
    fort = np.asfortranarray(np.full(shape, np.nan, dtype))
    yield "fortran", fort, fort, np.ones(shape, bool)
    big = np.full(shape, np.nan, dtype)
    yield "negative-strides", big[::-1, ..., ::-1], big, np.ones(shape, bool)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_out_noncontiguous(op, layout, rng):
    x, weights, kwargs, red = _case(rng, op, layout=layout)
    expected = ref_fn(op)(x, *weights, **kwargs)
    for label, out, buf, mask in _noncontiguous_outs(expected.shape, np.float32):
        res = lib_fn(op)(x, *weights, device="cpu", out=out, **kwargs)
        assert res is out, label
        assert_close(out, expected, np.float32, red)
        assert np.isnan(buf[~mask]).all(), f"{label}: wrote outside out"


# ---------------------------------------------------------------------------------------------
# inputs: never written, any memory layout


def _layouts(a: np.ndarray):
    """The same logical array in several memory layouts: (name, array)."""
    yield "contiguous", a
    big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    yield "strided", view
    yield "fortran", np.asfortranarray(a)
    yield "negative-strides", np.flip(np.flip(a).copy())
    if a.ndim >= 2:
        yield "x[:, ::-1]", a[:, ::-1].copy()[:, ::-1]
    ro = a.copy()
    ro.setflags(write=False)
    yield "read-only", ro


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_input_memory_layouts(op, layout, rng):
    x0, weights0, kwargs0, red = _case(rng, op, layout=layout)
    expected = ref_fn(op)(x0, *weights0, **kwargs0)
    arrays = {"x": x0, **{f"w{i}": wt for i, wt in enumerate(weights0)}}
    arrays.update({k: v for k, v in kwargs0.items() if isinstance(v, np.ndarray)})
    for target, base in arrays.items():
        for label, variant in _layouts(base):
            np.testing.assert_array_equal(variant, base)
            copy = variant.copy()
            x = variant if target == "x" else x0
            weights = tuple(variant if target == f"w{i}" else wt for i, wt in enumerate(weights0))
            kwargs = {k: (variant if k == target else v) for k, v in kwargs0.items()}
            y = lib_fn(op)(x, *weights, device="cpu", **kwargs)
            assert_close(y, expected, np.float32, red)
            assert bitwise_equal(variant, copy), f"{target} ({label}) was written to"


@pytest.mark.parametrize("use_out", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_inputs_unchanged(op, dtype, use_out, rng):
    x, weights, kwargs, _ = _case(rng, op, dtype=dtype)
    arrays = [x, *weights, *(v for v in kwargs.values() if isinstance(v, np.ndarray))]
    copies = [a.copy() for a in arrays]
    if use_out:
        out = np.full(lib_fn(op)(x, *weights, **kwargs).shape, np.nan, dtype)
        lib_fn(op)(x, *weights, device="cpu", out=out, **kwargs)
    else:
        lib_fn(op)(x, *weights, device="cpu", **kwargs)
    for a, c in zip(arrays, copies, strict=True):
        assert bitwise_equal(a, c)


def test_inputs_unchanged_parallel_path(rng):
    # large enough for the library's parallel kernels
    x = rng.standard_normal((2, 20, 20, 32)).astype(np.float32)
    dw = rng.standard_normal((3, 3, 32, 2)).astype(np.float32)
    pw = rng.standard_normal((64, 48)).astype(np.float32)
    db = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    arrays = [x, dw, pw, db, b]
    copies = [a.copy() for a in arrays]
    nd.separable(x, dw, pw, dw_bias=db, bias=b, padding="same", mid_activation="relu")
    nd.depthwise(x, dw, bias=db, padding="same")
    nd.pointwise(x, pw[:32], bias=b)
    nd.conv2d(x, rng.standard_normal((3, 3, 32, 16)).astype(np.float32), padding="same")
    for a, c in zip(arrays, copies, strict=True):
        assert bitwise_equal(a, c)


# ---------------------------------------------------------------------------------------------
# NaN / Inf


def _affected_mask(op, x_shape_nhwc, khw, mult, c_out, geo, where):
    """Boolean NHWC output mask of the outputs that read input element ``where``."""
    n, h, w, c = x_shape_nhwc
    b0, h0, w0, c0 = where
    if op == "pointwise":
        mask = np.zeros((n, h, w, c_out), bool)
        mask[b0, h0, w0, :] = True
        return mask
    ((top, _), (left, _)), (oh, ow) = geometry((h, w), khw, **geo)
    s = geo["stride"] if isinstance(geo["stride"], tuple) else (geo["stride"],) * 2
    d = geo["dilation"] if isinstance(geo["dilation"], tuple) else (geo["dilation"],) * 2
    rows = {i for i in range(oh) for m in range(khw[0]) if i * s[0] + m * d[0] - top == h0}
    cols = {j for j in range(ow) for q in range(khw[1]) if j * s[1] + q * d[1] - left == w0}
    c_res = c * mult if op == "depthwise" else c_out
    mask = np.zeros((n, oh, ow, c_res), bool)
    chans = slice(c0 * mult, (c0 + 1) * mult) if op == "depthwise" else slice(None)
    for i in rows:
        for j in cols:
            mask[b0, i, j, chans] = True
    return mask


NONFINITE_GEOS = [
    {"stride": 1, "padding": "same", "dilation": 1},
    {"stride": 2, "padding": "valid", "dilation": 1},
    {"stride": (1, 2), "padding": ((0, 2), (1, 0)), "dilation": (2, 1)},
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("geo", NONFINITE_GEOS, ids=str)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_nonfinite_input_propagates_exactly(op, value, geo, rng):
    mult = 2 if op in ("depthwise", "separable") else 1
    x, weights, _, red = make_case(
        rng, op, n=2, h=8, w=9, c=3, kh=3, kw=3, mult=mult, c_out=4, xdtype=np.float32
    )
    where = (1, 4, 5, 2)
    x[where] = value
    g = geo_kwargs(op, **geo)
    y = lib_fn(op)(x, *weights, device="cpu", **g)
    expected = ref_fn(op)(x, *weights, **g)
    mask = _affected_mask(op, x.shape, (3, 3), mult, 4, geo, where)
    assert mask.any()
    np.testing.assert_array_equal(~np.isfinite(expected), mask)  # the reference agrees
    np.testing.assert_array_equal(~np.isfinite(y), mask)
    if value != value:  # NaN: every affected output is NaN
        assert np.isnan(y[mask]).all()
    assert_close(y, expected, np.float32, red)  # +-Inf signs and NaNs where the reference has them


@pytest.mark.parametrize("act", ["relu", "relu6"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_nan_survives_activations(op, act, rng):
    x, weights, bias_kw, red = make_case(
        rng, op, n=1, h=5, w=5, c=3, mult=1, c_out=3, xdtype=np.float32, biases=True
    )
    x[0, 2, 2, 1] = np.nan
    kwargs = dict(bias_kw, activation=act, **geo_kwargs(op, padding="same"))
    if op == "separable":
        kwargs["mid_activation"] = act
    y = lib_fn(op)(x, *weights, device="cpu", **kwargs)
    expected = ref_fn(op)(x, *weights, **kwargs)
    assert np.isnan(expected).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert_close(y, expected, np.float32, red)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_relu_of_nan_is_nan_single_value(act):
    # relu(NaN) = NaN, also when NaN is the only value (no max(0, NaN) -> 0 shortcut)
    x = np.full((1, 1, 1), np.nan, np.float32)
    one = np.ones((1, 1), np.float32)
    assert np.isnan(nd.pointwise(x, one, activation=act)).all()
    assert np.isnan(nd.depthwise(x, one[None], activation=act)).all()
    assert np.isnan(nd.separable(x, one[None], one, mid_activation=act)).all()
    assert np.isnan(nd.conv2d(x, one[None, None], activation=act)).all()
    assert nd.pointwise(np.full((1, 1, 1), -np.inf, np.float32), one, activation=act)[0, 0, 0] == (
        -np.inf if act is None else 0.0
    )


@pytest.mark.parametrize("op", ["conv2d", "depthwise", "separable"])
def test_nan_in_weights_propagates(op, rng):
    # 'valid' padding: every output reads every tap of real (non-padding) input
    mult = 1
    x, weights, _, red = make_case(rng, op, n=1, h=6, w=6, c=3, mult=mult, c_out=4)
    weights = tuple(w.copy() for w in weights)
    weights[0][1, 2, 1] = np.nan  # tap (1, 2) of input channel 1
    y = lib_fn(op)(x, *weights, device="cpu")
    expected = ref_fn(op)(x, *weights)
    if op == "depthwise":
        assert np.isnan(y[..., 1]).all() and not np.isnan(y[..., [0, 2]]).any()
    else:
        assert np.isnan(y).all()
    assert_close(y, expected, np.float32, red)


# ---------------------------------------------------------------------------------------------
# determinism and threads


@pytest.mark.parametrize("op", ALL_OPS)
def test_deterministic(op, rng):
    for n, h, w, c in [(1, 7, 6, 3), (2, 24, 24, 32)]:  # serial- and parallel-sized
        x, weights, kwargs, _ = _case(rng, op, n=n, h=h, w=w, c=c)
        a = lib_fn(op)(x, *weights, device="cpu", **kwargs)
        b = lib_fn(op)(x, *weights, device="cpu", **kwargs)
        assert bitwise_equal(a, b)


def test_threads_give_same_bits_as_serial():
    rngs = [np.random.default_rng(100 + i) for i in range(8)]
    jobs = []
    for i, r in enumerate(rngs):
        dtype = np.float32 if i % 2 == 0 else np.float64
        x = r.standard_normal((1, 56, 56, 64)).astype(dtype)
        dw = r.standard_normal((3, 3, 64)).astype(dtype)
        pw = r.standard_normal((64, 128)).astype(dtype)
        db = r.standard_normal(64).astype(dtype)
        b = r.standard_normal(128).astype(dtype)
        jobs.append((x, dw, pw, db, b))

    def call(job):
        x, dw, pw, db, b = job
        return nd.separable(
            x, dw, pw, padding="same", dw_bias=db, mid_activation="relu6", bias=b, device="cpu"
        )

    serial = [call(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            threaded = list(pool.map(call, jobs))
            for s, t in zip(serial, threaded, strict=True):
                assert bitwise_equal(s, t)
    # and the parallel kernel is right, not just consistent
    x, dw, pw, db, b = jobs[0]
    expected = ref_fn("separable")(
        x, dw, pw, padding="same", dw_bias=db, mid_activation="relu6", bias=b
    )
    assert_close(serial[0], expected, np.float32, 9 * 64)


def test_threads_mixed_ops():
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 28, 28, 32)).astype(np.float32)
    dw = r.standard_normal((3, 3, 32)).astype(np.float32)
    pw = r.standard_normal((32, 64)).astype(np.float32)
    w = r.standard_normal((3, 3, 32, 16)).astype(np.float32)
    calls = [
        lambda: nd.separable(x, dw, pw, padding="same"),
        lambda: nd.depthwise(x, dw, stride=2, padding="same"),
        lambda: nd.pointwise(x, pw, activation="relu"),
        lambda: nd.conv2d(x, w, padding="same"),
    ] * 4
    serial = [c() for c in calls]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda c: c(), calls))
    for s, t in zip(serial, threaded, strict=True):
        assert bitwise_equal(s, t)


# ---------------------------------------------------------------------------------------------
# torch tensors


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_torch_tensors_in_and_out(op, dtype, layout, rng):
    torch = pytest.importorskip("torch")
    x, weights, kwargs, red = _case(rng, op, dtype=dtype, layout=layout)
    expected = lib_fn(op)(x, *weights, device="cpu", **kwargs)
    tx = torch.from_numpy(x.copy())
    tw = tuple(torch.from_numpy(wt.copy()) for wt in weights)
    tk = {
        k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()
    }
    before = [t.clone() for t in (tx, *tw)]
    y = lib_fn(op)(tx, *tw, **tk)
    assert isinstance(y, torch.Tensor)
    assert y.device.type == "cpu"
    assert y.dtype == {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    assert tuple(y.shape) == expected.shape
    np.testing.assert_array_equal(y.numpy(), expected)
    for t, b in zip((tx, *tw), before, strict=True):
        assert torch.equal(t, b)


def test_torch_noncontiguous_tensor(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)  # NCHW storage
    dw = rng.standard_normal((3, 3, 3)).astype(np.float32)
    pw = rng.standard_normal((3, 4)).astype(np.float32)
    tx = torch.from_numpy(x).permute(0, 2, 3, 1)  # NHWC view, not contiguous
    assert not tx.is_contiguous()
    y = nd.separable(tx, torch.from_numpy(dw), torch.from_numpy(pw), padding="same")
    assert isinstance(y, torch.Tensor)
    expected = ref_fn("separable")(x.transpose(0, 2, 3, 1), dw, pw, padding="same")
    assert_close(y, expected, np.float32, 27)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("op", ["conv2d", "depthwise", "separable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 16, 40])  # scalar, whole vectors, an overlapping last one
def test_nonfinite_weight_times_padding_zero(op, value, dtype, c):
    # The formulas index the zero-padded input: a padded tap contributes 0 * D[m, n, c], and
    # 0 * NaN = 0 * Inf = NaN (IEEE 754), so border outputs are NaN too (torch agrees).
    x = np.ones((1, 4, 4, c), dtype)
    if op == "conv2d":
        weights = (np.ones((3, 3, c, 1), dtype),)
    elif op == "depthwise":
        weights = (np.ones((3, 3, c), dtype),)
    else:
        weights = (np.ones((3, 3, c), dtype), np.ones((c, 1), dtype))
    weights[0][0, 0] = value  # the top-left tap reads padding for the top row/left column
    y = lib_fn(op)(x, *weights, padding="same", device="cpu")
    expected = ref_fn(op)(x, *weights, padding="same")
    # every output of the top row and left column has the padded top-left tap: NaN there
    # (interior outputs are NaN for a NaN weight, +Inf for an Inf weight)
    assert np.isnan(expected[0, 0]).all() and np.isnan(expected[0, :, 0]).all()
    assert np.isnan(expected).all() == np.isnan(value)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
