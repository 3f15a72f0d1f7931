"""Every op on device='cpu' against the float64 reference, over the geometry/dtype/layout space."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    ALL_OPS,
    assert_close,
    check_against_reference,
    geo_kwargs,
    lib_fn,
    make_case,
    ref_fn,
    x_shape,
)
from reference import ref_cost, ref_separable
from test_reference import D_EX, P_EX, X_EX, Y_EX, Z_EX

import numba_dsconv as nd

# ---------------------------------------------------------------------------------------------
# the worked example, exactly (integer-valued, so every dtype must give the exact numbers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worked_example_exact(dtype):
    x, d, p = X_EX.astype(dtype), D_EX.astype(dtype), P_EX.astype(dtype)
    y = nd.depthwise(x, d, device="cpu")
    assert y.shape == (2, 2, 3) and y.dtype == dtype
    np.testing.assert_array_equal(y, Y_EX)
    z = nd.separable(x, d, p, device="cpu")
    assert z.shape == (2, 2, 2) and z.dtype == dtype
    np.testing.assert_array_equal(z, Z_EX)
    np.testing.assert_array_equal(nd.pointwise(Y_EX.astype(dtype), p, device="cpu"), Z_EX)
    w = (D_EX[..., None] * P_EX[None, None]).astype(dtype)
    np.testing.assert_array_equal(nd.conv2d(x, w, device="cpu"), Z_EX)
    z = nd.separable(
        x,
        d,
        p,
        dw_bias=np.array([-140.0, 0.0, 0.0], dtype),
        mid_activation="relu6",
        bias=np.array([3.0, -15.0], dtype),
        activation="relu",
        device="cpu",
    )
    np.testing.assert_array_equal(z, [[[0, 0], [3, 3]], [[3, 3], [3, 3]]])


COST_INT_FIELDS = (
    "standard_macs",
    "depthwise_macs",
    "pointwise_macs",
    "separable_macs",
    "standard_params",
    "separable_params",
)


def test_cost_worked_example():
    c = nd.cost((4, 4, 3), 3, 2)
    assert tuple(c.output_shape) == (2, 2, 2)
    assert (c.standard_macs, c.depthwise_macs, c.pointwise_macs) == (216, 108, 24)
    assert c.separable_macs == 132
    assert (c.standard_params, c.separable_params) == (54, 33)
    for field in COST_INT_FIELDS:
        assert isinstance(getattr(c, field), int), field
    assert float(c.mac_ratio) == pytest.approx(132 / 216)
    assert float(c.param_ratio) == pytest.approx(33 / 54)


# ---------------------------------------------------------------------------------------------
# geometry sweep

GEOMS = [
    # (h, w, kh, kw, stride, padding, dilation)
    (5, 5, 3, 3, 1, "valid", 1),
    (7, 9, 3, 3, 1, "same", 1),
    (7, 9, 3, 3, 2, "same", 1),
    (8, 8, 3, 3, 2, "same", 1),
    (8, 8, 2, 2, 1, "same", 1),
    (8, 7, 4, 4, 1, "same", 1),
    (9, 8, 4, 4, 2, "same", 1),
    (7, 7, 2, 2, 2, "same", 1),
    (10, 11, 3, 3, 3, "valid", 1),
    (9, 9, 3, 3, 3, "same", 1),
    (7, 9, 3, 3, (1, 2), "valid", 1),
    (7, 9, 3, 3, (1, 2), "same", 1),
    (6, 6, 3, 3, 1, 1, 1),
    (6, 7, 3, 5, 1, (1, 2), 1),
    (6, 7, 3, 3, 1, ((0, 2), (1, 0)), 1),
    (6, 7, 3, 3, 2, ((0, 2), (1, 0)), 1),
    (9, 9, 3, 3, 1, "valid", 2),
    (9, 9, 3, 3, 1, "same", 2),
    (9, 10, 3, 3, 2, "same", 2),
    (9, 9, 3, 3, 1, "valid", (2, 1)),
    (9, 9, 3, 2, 1, "same", (2, 1)),
    (4, 4, 1, 1, 1, "valid", 1),
    (5, 6, 1, 1, 2, "valid", 1),
    (6, 6, 2, 2, 1, "valid", 1),
    (7, 7, 5, 5, 1, "same", 1),
    (7, 8, 6, 6, 1, "same", 1),
    (8, 8, 7, 7, 1, "same", 1),
    (7, 7, 7, 7, 1, "valid", 1),
    (7, 9, 1, 3, 1, "same", 1),
    (7, 9, 3, 1, 2, "same", 1),
    (8, 9, 2, 5, (2, 1), 2, (1, 2)),
    (3, 3, 3, 3, 1, "valid", 1),  # 1x1 output
    (1, 1, 1, 1, 1, "valid", 1),
    (1, 1, 3, 3, 1, "same", 1),  # every tap but the centre reads padding
    (1, 9, 1, 3, 1, "same", 1),
    (5, 5, 3, 3, 1, 4, 1),  # padding wider than the kernel: all-zero border outputs
    (4, 5, 3, 3, 2, ((3, 0), (0, 3)), 1),
    (5, 5, 3, 3, 7, "same", 1),  # stride larger than the kernel
]

OP_MULTS = [("conv2d", 1), ("depthwise", 1), ("depthwise", 2), ("separable", 1), ("separable", 2)]


@pytest.mark.parametrize("geom", GEOMS, ids=str)
@pytest.mark.parametrize(("op", "mult"), OP_MULTS, ids=lambda v: str(v))
def test_geometry(op, mult, geom, rng):
    h, w, kh, kw, stride, padding, dilation = geom
    x, weights, _, red = make_case(
        rng, op, n=2, h=h, w=w, c=3, kh=kh, kw=kw, mult=mult, c_out=4, xdtype=np.float32
    )
    check_against_reference(op, x, weights, red, stride=stride, padding=padding, dilation=dilation)


# ---------------------------------------------------------------------------------------------
# dtypes x layouts x batchedness

DTYPES = [
    (np.float32, np.float32),
    (np.float64, np.float64),
    (np.float32, np.float64),  # -> float64, float64-accurate
    (np.float64, np.float32),  # -> float64
]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0].__name__}x{d[1].__name__}")
@pytest.mark.parametrize("op", ALL_OPS)
def test_dtypes_layouts(op, dtypes, layout, batched, rng):
    xdt, wdt = dtypes
    x, weights, bias_kw, red = make_case(
        rng, op, n=2, h=7, w=6, c=3, kh=3, kw=2, mult=2 if op in ("depthwise", "separable") else 1,
        c_out=5, xdtype=xdt, wdtype=wdt, layout=layout, batched=batched, biases=True,
    )  # fmt: skip
    geo = geo_kwargs(op, stride=(2, 1), padding="same", dilation=1)
    y = check_against_reference(op, x, weights, red, layout=layout, **geo, **bias_kw)
    assert y.dtype == np.result_type(xdt, wdt)
    assert isinstance(y, np.ndarray)


@pytest.mark.parametrize(("xdt", "bdt"), [(np.float32, np.float64), (np.float64, np.float32)])
@pytest.mark.parametrize("op", ALL_OPS)
def test_bias_dtype_does_not_change_result_dtype(op, xdt, bdt, rng):
    x, weights, bias_kw, red = make_case(rng, op, n=1, h=5, w=5, xdtype=xdt, biases=True)
    bias_kw = {k: v.astype(bdt) for k, v in bias_kw.items()}
    geo = geo_kwargs(op, padding="same")
    expected = ref_fn(op)(x, *weights, **geo, **bias_kw)
    y = lib_fn(op)(x, *weights, device="cpu", **geo, **bias_kw)
    assert y.dtype == xdt
    assert_close(y, expected, xdt, red)


# ---------------------------------------------------------------------------------------------
# channels (exercise vector widths and their remainders)


@pytest.mark.parametrize(
    ("c", "mult", "c_out"), [(1, 1, 1), (1, 3, 2), (5, 1, 7), (8, 2, 16), (17, 1, 33), (32, 1, 8)]
)
@pytest.mark.parametrize("op", ALL_OPS)
def test_channel_counts(op, c, mult, c_out, rng):
    if op == "conv2d":
        mult = 1
    if op == "pointwise":
        mult = 1
    x, weights, bias_kw, red = make_case(
        rng, op, n=1, h=6, w=5, c=c, mult=mult, c_out=c_out, xdtype=np.float32, biases=True
    )
    geo = geo_kwargs(op, stride=1, padding="same")
    check_against_reference(op, x, weights, red, **geo, **bias_kw)


# ---------------------------------------------------------------------------------------------
# biases and activations

ACTS = [None, "relu", "relu6"]


@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("op", ["conv2d", "depthwise", "pointwise"])
def test_bias_activation(op, activation, biases, rng):
    # scale 3 so that relu6 really clips on both sides
    x, weights, bias_kw, red = make_case(
        rng, op, n=2, h=6, w=6, c=4, mult=1, c_out=4, xdtype=np.float32, biases=biases, scale=3.0
    )
    geo = geo_kwargs(op, padding="same")
    y = check_against_reference(op, x, weights, red, activation=activation, **geo, **bias_kw)
    if activation is not None:
        assert (y == 0).any()
        assert (y >= 0).all()
    if activation == "relu6":
        assert (y == 6).any()
        assert (y <= 6).all()


@pytest.mark.parametrize("biases", ["none", "dw_bias", "bias", "both"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("mid_activation", ACTS)
def test_separable_bias_activation(mid_activation, activation, biases, rng):
    x, weights, bias_kw, red = make_case(
        rng, "separable", n=2, h=6, w=6, c=4, mult=2, c_out=5, xdtype=np.float32, biases=True,
        scale=3.0,
    )  # fmt: skip
    if biases in ("none", "bias"):
        del bias_kw["dw_bias"]
    if biases in ("none", "dw_bias"):
        del bias_kw["bias"]
    check_against_reference(
        "separable", x, weights, red, padding="same", mid_activation=mid_activation,
        activation=activation, **bias_kw,
    )  # fmt: skip


def test_mid_activation_is_applied_before_pointwise(rng):
    # A negative depthwise intermediate killed by mid relu changes the result; a post relu can't
    # fake that (this pins the order: mid_activation(depthwise + dw_bias), then pointwise).
    x = np.ones((1, 1, 2), np.float64)
    dw = np.array([[[1.0, -1.0]]])
    pw = np.array([[1.0], [1.0]])
    assert nd.separable(x, dw, pw, device="cpu")[0, 0, 0] == 0.0
    assert nd.separable(x, dw, pw, mid_activation="relu", device="cpu")[0, 0, 0] == 1.0
    out = nd.separable(x, dw, pw, dw_bias=np.array([0.0, 3.0]), mid_activation="relu6")
    assert out[0, 0, 0] == 3.0
    np.testing.assert_array_equal(
        out, ref_separable(x, dw, pw, dw_bias=np.array([0.0, 3.0]), mid_activation="relu6")
    )


# ---------------------------------------------------------------------------------------------
# weight spellings, empty batch, default device


def test_weight_spellings_agree(rng):
    x = rng.standard_normal((2, 6, 5, 3))
    dw4 = rng.standard_normal((3, 3, 3, 1))
    pw2 = rng.standard_normal((3, 4))
    a = nd.depthwise(x, dw4, padding="same", device="cpu")
    b = nd.depthwise(x, dw4[..., 0], padding="same", device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.pointwise(x, pw2, device="cpu")
    b = nd.pointwise(x, pw2.reshape(1, 1, 3, 4), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.separable(x, dw4, pw2.reshape(1, 1, 3, 4), padding="same", device="cpu")
    b = nd.separable(x, dw4[..., 0], pw2, padding="same", device="cpu")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref_separable(x, dw4, pw2, padding="same"), rtol=1e-12)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_empty_batch(op, dtype, layout, rng):
    x, weights, bias_kw, _ = make_case(
        rng, op, n=0, h=7, w=6, c=3, mult=2 if op in ("depthwise", "separable") else 1,
        c_out=5, xdtype=dtype, layout=layout, biases=True,
    )  # fmt: skip
    geo = geo_kwargs(op, stride=2, padding="same")
    y = lib_fn(op)(x, *weights, layout=layout, device="cpu", **geo, **bias_kw)
    c_res = 5 if op != "depthwise" else 6
    oh, ow = (4, 3) if op != "pointwise" else (7, 6)
    assert y.shape == x_shape(0, oh, ow, c_res, layout)
    assert y.dtype == dtype


@pytest.mark.parametrize("op", ALL_OPS)
def test_default_device_is_cpu(op, rng):
    x, weights, bias_kw, _ = make_case(rng, op, n=1, h=5, w=5, xdtype=np.float32, biases=True)
    a = lib_fn(op)(x, *weights, **bias_kw)
    b = lib_fn(op)(x, *weights, device="cpu", **bias_kw)
    np.testing.assert_array_equal(a, b)


def test_padding_spellings_agree(rng):
    # 'same' at stride 2 on 7x8 with a 4x3 kernel is ((1, 2), (0, 1)) by the TF rule:
    # rows: out 4, total 3*2 + 3 + 1 - 7 = 3; columns: out 4, total 3*2 + 2 + 1 - 8 = 1.
    x = rng.standard_normal((1, 7, 8, 2))
    dw = rng.standard_normal((4, 3, 2))
    pw = rng.standard_normal((2, 3))
    a = nd.separable(x, dw, pw, stride=2, padding="same", device="cpu")
    b = nd.separable(x, dw, pw, stride=2, padding=((1, 2), (0, 1)), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.depthwise(x, dw, padding=(1, 2), device="cpu")
    b = nd.depthwise(x, dw, padding=((1, 1), (2, 2)), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.depthwise(x, dw, padding=1, stride=(2, 2), dilation=(1, 1), device="cpu")
    b = nd.depthwise(x, dw, padding=(1, 1), stride=2, dilation=1, device="cpu")
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the parallel kernels on small inputs (the library's serial/parallel threshold patched to 0)

PARALLEL_GEOMS = [
    (2, 7, 9, 3, 3, 3, 1, "same", 1, 2, 5),
    (1, 9, 8, 4, 4, 4, 2, "same", 1, 1, 3),
    (1, 8, 9, 3, 2, 5, (2, 1), ((0, 2), (1, 0)), (1, 2), 2, 4),
    (3, 6, 6, 8, 3, 3, 1, "valid", 2, 1, 16),
    (0, 6, 6, 3, 3, 3, 1, "valid", 1, 1, 2),
]


@pytest.mark.parametrize("cfg", PARALLEL_GEOMS, ids=str)
@pytest.mark.parametrize("op", ALL_OPS)
def test_parallel_kernels(op, cfg, force_parallel, rng):
    n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out = cfg
    if op in ("conv2d", "pointwise"):
        mult = 1
    for dtype in (np.float32, np.float64):
        x, weights, bias_kw, red = make_case(
            rng, op, n=n, h=h, w=w, c=c, kh=kh, kw=kw, mult=mult, c_out=c_out, xdtype=dtype,
            biases=True,
        )  # fmt: skip
        geo = geo_kwargs(op, stride=stride, padding=padding, dilation=dilation)
        kw_act = {"mid_activation": "relu6"} if op == "separable" else {}
        check_against_reference(op, x, weights, red, activation="relu", **geo, **bias_kw, **kw_act)


# ---------------------------------------------------------------------------------------------
# cost


COST_CASES = [
    ((4, 4, 3), 3, 2, {}),
    ((224, 224, 3), 3, 32, {"stride": 2, "padding": "same"}),
    ((112, 112, 32), 3, 64, {"padding": "same"}),
    ((7, 9, 5), (3, 5), 4, {"padding": ((0, 2), (1, 0)), "dilation": (2, 1)}),
    ((8, 8, 4), 3, 6, {"padding": 1, "depth_multiplier": 2}),
    ((9, 9, 2), (2, 3), 3, {"stride": (1, 2), "padding": (1, 2), "dilation": 2}),
    ((5, 5, 3), 1, 7, {"stride": 3}),
    ((2, 4, 4, 3), 3, 2, {}),  # batched: MACs scale with N, params do not
    ((3, 10, 10, 8), 3, 16, {"stride": 2, "padding": "same", "depth_multiplier": 3}),
]


@pytest.mark.parametrize(("shape", "k", "c_out", "kw"), COST_CASES, ids=str)
def test_cost_matches_reference(shape, k, c_out, kw):
    got = nd.cost(shape, k, c_out, **kw)
    want = ref_cost(shape, k, c_out, **kw)
    assert tuple(got.output_shape) == want.output_shape
    for field in COST_INT_FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    assert float(got.mac_ratio) == pytest.approx(want.mac_ratio, rel=1e-12)
    assert float(got.param_ratio) == pytest.approx(want.param_ratio, rel=1e-12)


def test_cost_output_shape_matches_separable(rng):
    x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
    dw = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    pw = rng.standard_normal((6, 5)).astype(np.float32)
    geo = {"stride": (2, 1), "padding": "same", "dilation": (1, 2)}
    y = nd.separable(x, dw, pw, device="cpu", **geo)
    c = nd.cost(x.shape, (3, 2), 5, depth_multiplier=2, **geo)
    assert tuple(c.output_shape) == y.shape


# ---------------------------------------------------------------------------------------------
# medium sizes: many channels (fused-separable tiles of several pixel counts), long reductions

MEDIUM = [
    # (op, n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out)
    ("separable", 1, 13, 11, 96, 3, 3, 2, ((0, 2), (1, 0)), 1, 2, 40),
    ("separable", 3, 10, 9, 40, 5, 5, 1, "same", 1, 1, 72),
    ("separable", 1, 17, 19, 24, 3, 3, (1, 2), "same", (2, 1), 3, 33),
    ("depthwise", 2, 15, 14, 70, 3, 3, 2, "same", 1, 2, 0),
    # 3x3, multiplier 1: the vectorised interior path, with a channel tail, dilated/strided
    ("depthwise", 2, 11, 13, 35, 3, 3, (2, 1), "same", (1, 2), 1, 0),
    ("separable", 1, 9, 12, 48, 3, 3, (1, 2), ((2, 0), (1, 1)), (2, 1), 1, 24),
    # stride == dilation: two output pixels per step, odd interior widths
    ("depthwise", 2, 9, 12, 37, 3, 3, 1, "same", 1, 1, 0),
    ("separable", 1, 13, 15, 33, 3, 3, 2, "same", 2, 1, 20),
    ("conv2d", 1, 9, 9, 64, 7, 7, 1, "same", 1, 1, 64),  # reduction 3136
    ("conv2d", 2, 12, 11, 20, 3, 3, 2, "same", 1, 1, 36),
    ("pointwise", 3, 9, 10, 130, 1, 1, 1, "valid", 1, 1, 67),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", MEDIUM, ids=str)
def test_medium_sizes(cfg, dtype, rng):
    op, n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out = cfg
    x, weights, bias_kw, red = make_case(
        rng, op, n=n, h=h, w=w, c=c, kh=kh, kw=kw, mult=mult, c_out=c_out, xdtype=dtype,
        biases=True,
    )  # fmt: skip
    geo = geo_kwargs(op, stride=stride, padding=padding, dilation=dilation)
    check_against_reference(op, x, weights, red, **geo, **bias_kw)
    # and through the activations (applied in registers on the vector paths)
    acts = {"activation": "relu6"}
    if op == "separable":
        acts["mid_activation"] = "relu"
    check_against_reference(op, x, weights, red, **geo, **bias_kw, **acts)


@pytest.mark.parametrize(
    ("xdt", "dwdt", "pwdt"),
    [(np.float32, np.float64, np.float32), (np.float32, np.float32, np.float64)],
)
def test_separable_mixed_weight_dtypes(xdt, dwdt, pwdt, rng):
    x = rng.standard_normal((2, 7, 6, 3)).astype(xdt)
    dw = rng.standard_normal((3, 3, 3, 2)).astype(dwdt)
    pw = rng.standard_normal((6, 4)).astype(pwdt)
    y = nd.separable(x, dw, pw, padding="same", device="cpu")
    assert_close(y, ref_separable(x, dw, pw, padding="same"), np.float64, 9 * 6)


# ---------------------------------------------------------------------------------------------
# the GEMM micro-kernel's blocking: reduction blocks (partial sums between them), panels of
# output channels cut by C_out, pixel groups cut by the tile, channel blocks split across tasks


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kc", [1, 8, 256])
@pytest.mark.parametrize(("op", "c", "mult", "c_out"), [
    ("pointwise", 37, 1, 70), ("pointwise", 16, 1, 1), ("separable", 13, 3, 33),
    ("separable", 20, 1, 64),
])  # fmt: skip
def test_gemm_blocking(op, c, mult, c_out, kc, parallel, monkeypatch, rng):
    config = pytest.importorskip("numba_dsconv._config")
    monkeypatch.setattr(config, "CPU_GEMM_KC", kc)
    monkeypatch.setattr(config, "CPU_TILE_MAX_PIXELS", 12)
    if parallel:
        monkeypatch.setattr(config, "SERIAL_MAX_MACS", 0)
    for dtype in (np.float32, np.float64):
        x, weights, bias_kw, red = make_case(
            rng, op, n=2, h=5, w=7, c=c, kh=3, kw=3, mult=mult, c_out=c_out, xdtype=dtype,
            biases=True,
        )  # fmt: skip
        geo = geo_kwargs(op, stride=1, padding="same", dilation=1)
        check_against_reference(op, x, weights, red, activation="relu6", **geo, **bias_kw)


# ---------------------------------------------------------------------------------------------
# the 32-byte vector build (AVX2 and other hosts without AVX-512), forced on an AVX-512 host


def test_32_byte_vector_build():
    llvm = pytest.importorskip("llvmlite.binding")
    feats = llvm.get_host_cpu_features().flatten().split(",")
    if "+avx512f" not in feats:
        pytest.skip("this host runs the 32-byte build in the rest of the suite already")
    no512 = ",".join("-" + f[1:] if "avx512" in f else f for f in feats)
    env = dict(os.environ, NUMBA_CPU_FEATURES=no512, NUMBA_DSCONV_NO_CACHE="1")
    probe = "from numba_dsconv.cpu._simd import VEC_BYTES; assert VEC_BYTES == 32, VEC_BYTES"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    select = "gemm_blocking or medium_sizes or worked_example or parallel_kernels"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    r = subprocess.run([*cmd, "-k", select], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
