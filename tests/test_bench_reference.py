"""The benchmarks' float64 reference (numba_dsconv.bench.reference, which every timed result is
checked against) against the test suite's judge (tests/reference.py), on every table case."""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, params
from helpers import ref_fn

from numba_dsconv._spec import Activation, make_spec
from numba_dsconv.bench import reference


def _nhwc_batched(a: np.ndarray, layout: str, batched: bool) -> np.ndarray:
    a = a if batched else a[None]
    return a.transpose(0, 2, 3, 1) if layout == "NCHW" else a


@pytest.mark.parametrize("case", params(CASES))
def test_bench_reference_agrees_with_the_judge(case, rng):
    x, weights, kwargs = case.make(rng)
    expected = _nhwc_batched(ref_fn(case.op)(x, *weights, **kwargs), case.layout, case.batched)
    kernels = list(weights)  # in the kernels' shapes: dw (K_h, K_w, C*M), pw (C*M, C_out)
    if case.op in ("depthwise", "separable"):
        kh, kw, c = weights[0].shape[:3]
        kernels[0] = weights[0].reshape(kh, kw, c * case.mult)
    spec = make_spec(
        case.op,
        x_shape=x.shape,
        layout=case.layout,
        kernel=(case.kh, case.kw),
        c_in_kernel=case.c,
        multiplier=case.mult,
        c_out=case.c * case.mult if case.op == "depthwise" else case.c_out,
        activation=Activation.parse(kwargs.get("activation"), "activation"),
        mid_activation=Activation.parse(kwargs.get("mid_activation"), "mid_activation"),
        **case.geometry(),
    )
    biases = (
        (kwargs.get("dw_bias"), kwargs.get("bias"))
        if case.op == "separable"
        else (kwargs.get("bias"),)
    )
    got = reference.compute(
        spec, _nhwc_batched(x, case.layout, case.batched), tuple(kernels), biases
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.sqrt(case.reduction_len))
