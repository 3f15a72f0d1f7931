"""Shared fixtures and helpers.

Tolerances
----------
The reference computes in float64 on the exact same input values (float32 converts to float64
exactly), so every difference is the library's own rounding. A dot product of ``n`` standard
normal products has magnitude ~sqrt(n), and a sequential (or blocked, FMA, reassociated) sum
accumulates one rounding per term on partial sums of that size, so the typical error grows like
``sqrt(n) * sqrt(n) * u``. We scale both tolerances by ``sqrt(n)``, with ``n`` the reduction
length ``K_h * K_w * C`` (for separable: ``K_h * K_w * C_in * M``; for pointwise: ``C``):

    float32:  rtol = 1.3e-6 * sqrt(n),  atol = 1e-5  * sqrt(n)
    float64:  rtol = 1e-12  * sqrt(n),  atol = 1e-12 * sqrt(n)

(at n = 7*7*64 the float32 atol is 5.6e-4, ~7 standard deviations of the expected error). The
result dtype decides the tolerance: a float64 result (including float32 x with float64 weights)
must be float64-accurate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

TOL = {
    np.dtype(np.float32): (1.3e-6, 1e-5),
    np.dtype(np.float64): (1e-12, 1e-12),
}


def tolerances(dtype, reduction_len: int) -> tuple[float, float]:
    """(rtol, atol) for a result of ``dtype`` summing ``reduction_len`` products."""
    rtol, atol = TOL[np.dtype(dtype)]
    scale = math.sqrt(max(1, int(reduction_len)))
    return rtol * scale, atol * scale


def to_numpy(a) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def assert_close(actual, expected, dtype, reduction_len: int) -> None:
    """Library result ``actual`` vs float64 reference ``expected``: shape, dtype and values.

    NaN must match NaN and +-Inf must match exactly (assert_allclose's equal_nan semantics).
    """
    actual = to_numpy(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    assert actual.dtype == np.dtype(dtype), f"dtype {actual.dtype} != expected {np.dtype(dtype)}"
    rtol, atol = tolerances(dtype, reduction_len)
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=rtol, atol=atol, equal_nan=True
    )


def randn(rng: np.random.Generator, shape, dtype=np.float64, scale: float = 1.0) -> np.ndarray:
    """Standard normal (never all zero) values of ``dtype``."""
    return (scale * rng.standard_normal(shape)).astype(dtype)


def x_shape(n, h, w, c, layout="NHWC", batched=True):
    shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
    return shape if batched else shape[1:]


def bitwise_equal(a, b) -> bool:
    a, b = to_numpy(a), to_numpy(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.fixture
def force_parallel(monkeypatch):
    """Drive small inputs down the library's parallel kernels (if it has that tunable)."""
    config = pytest.importorskip("numba_dsconv._config")
    if not hasattr(config, "SERIAL_MAX_MACS"):
        pytest.skip("numba_dsconv._config has no SERIAL_MAX_MACS")
    monkeypatch.setattr(config, "SERIAL_MAX_MACS", 0)


# ---------------------------------------------------------------------------------------------
# building one call: random inputs for an op, and the reduction length for its tolerance

GEOMETRY_OPS = ("conv2d", "depthwise", "separable")
ALL_OPS = ("conv2d", "depthwise", "pointwise", "separable")


def make_case(
    rng,
    op,
    *,
    n=2,
    h=5,
    w=5,
    c=3,
    kh=3,
    kw=3,
    mult=1,
    c_out=4,
    xdtype=np.float32,
    wdtype=None,
    layout="NHWC",
    batched=True,
    biases=False,
    scale=1.0,
    dw_4d=None,
):
    """Random inputs for ``op``: (x, weights tuple, bias kwargs, reduction length).

    dw is (K_h, K_w, C) when mult == 1 (unless ``dw_4d``) and (K_h, K_w, C, M) otherwise; pw
    is (C*M, C_out). Biases (when asked) have the weights' dtype.
    """
    wdtype = xdtype if wdtype is None else wdtype
    x = randn(rng, x_shape(n, h, w, c, layout, batched), xdtype, scale)
    dw_shape = (kh, kw, c, mult) if (mult != 1 or dw_4d) else (kh, kw, c)
    bias_kw = {}
    if op == "conv2d":
        weights = (randn(rng, (kh, kw, c, c_out), wdtype),)
        red = kh * kw * c
        if biases:
            bias_kw["bias"] = randn(rng, (c_out,), wdtype)
    elif op == "depthwise":
        weights = (randn(rng, dw_shape, wdtype),)
        red = kh * kw
        if biases:
            bias_kw["bias"] = randn(rng, (c * mult,), wdtype)
    elif op == "pointwise":
        weights = (randn(rng, (c, c_out), wdtype),)
        red = c
        if biases:
            bias_kw["bias"] = randn(rng, (c_out,), wdtype)
    elif op == "separable":
        weights = (randn(rng, dw_shape, wdtype), randn(rng, (c * mult, c_out), wdtype))
        red = kh * kw * c * mult
        if biases:
            bias_kw["dw_bias"] = randn(rng, (c * mult,), wdtype)
            bias_kw["bias"] = randn(rng, (c_out,), wdtype)
    else:
        raise AssertionError(op)
    return x, weights, bias_kw, red


def lib_fn(op):
    import numba_dsconv

    return getattr(numba_dsconv, op)


def ref_fn(op):
    import reference

    return getattr(reference, f"ref_{op}")


def geo_kwargs(op, **geo):
    """Geometry keywords (stride/padding/dilation) only for the ops that take them."""
    return {} if op == "pointwise" else geo


def check_against_reference(op, x, weights, red, *, device="cpu", **kwargs):
    """Run ``op`` in the library and the reference; compare; return the library result."""
    expected = ref_fn(op)(x, *weights, **kwargs)
    actual = lib_fn(op)(x, *weights, device=device, **kwargs)
    result_dtype = np.result_type(*(np.asarray(a).dtype for a in (x, *weights)))
    assert_close(actual, expected, result_dtype, red)
    return actual
