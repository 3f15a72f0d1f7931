"""Helpers shared by the test modules (fixtures live in conftest.py, the case table in cases.py).

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
import os

import numpy as np

ALL_OPS = ("conv2d", "depthwise", "pointwise", "separable")

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")

# (threads per block for 1-D kernels, GEMM tile (TP, TN, TK, RP, RN), max blocks)
SMALL_CUDA_BLOCKS = (8, (4, 4, 2, 2, 2), 3)


def cuda_usable() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


def device_params() -> list[str]:
    if not cuda_usable():
        return ["cpu"]
    return ["cpu", "cuda"] if SIMULATOR else ["cpu", "cuda", "cuda-default"]


def skip_slow_under_simulator(case, device: str) -> None:
    """Under the CUDA simulator (Python-speed kernels) only the table's ``sim`` cases run on
    device='cuda'; a GPU runs them all."""
    if device == "cuda" and SIMULATOR and not case.sim:
        import pytest

        pytest.skip("too slow under the CUDA simulator (a GPU runs every case)")


def small_cuda_blocks(monkeypatch) -> None:
    from numba_dsconv import _config

    threads, tile, blocks = SMALL_CUDA_BLOCKS
    monkeypatch.setattr(_config, "CUDA_THREADS", threads)
    monkeypatch.setattr(_config, "CUDA_GEMM_TILE", tile)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", blocks)
    # the backward: small tiles, a few pixels per sum range, bands of a few rows
    monkeypatch.setattr(_config, "CUDA_BACKWARD_TILE", tile)
    monkeypatch.setattr(_config, "CUDA_BACKWARD_SPLIT_PIXELS", 7)
    monkeypatch.setattr(_config, "CUDA_BACKWARD_BAND_BYTES", 256)


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
    """A library result (NumPy, torch, numba device array, CuPy) as a host NumPy array."""
    mod = type(a).__module__
    if mod.startswith("torch"):
        return a.detach().cpu().numpy()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if mod.startswith("cupy"):
        return a.get()
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


# ---------------------------------------------------------------------------------------------
# The worked example of the first issue: 4x4x3 input, 3x3x3 depthwise kernel, 1x1x3x2
# pointwise, 'valid' (hand-computed in test_reference.py).
#
#   X[h, w, c] = 12*h + 3*w + c                (np.arange(48).reshape(4, 4, 3))
#   D[m, n, c] = c + 1                          (every tap of channel c weighs c+1)
#   P = [[1, 1], [0, 1], [-1, 1]]               (Z0 = Y0 - Y2, Z1 = Y0 + Y1 + Y2)

X_EX = np.arange(48, dtype=np.float64).reshape(4, 4, 3)
D_EX = np.broadcast_to(np.array([1.0, 2.0, 3.0]), (3, 3, 3)).copy()
P_EX = np.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
Y_EX = np.array([[[135, 288, 459], [162, 342, 540]], [[243, 504, 783], [270, 558, 864]]], float)
Z_EX = np.array([[[-324, 882], [-378, 1044]], [[-540, 1530], [-594, 1692]]], float)
