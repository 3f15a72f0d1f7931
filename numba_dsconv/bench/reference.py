"""A float64 NumPy formulation of the four operations, for the demo and the benchmarks'
self-checks (every timed result is compared with it).

Written independently of the kernels (zero-pad, then one strided slice per tap); the test
suite's own loop reference (tests/reference.py) remains the judge and checks this one over the
shared case table (tests/test_bench_reference.py). Inputs and outputs are NHWC, batched;
geometry comes from a ConvSpec.
"""

from __future__ import annotations

import numpy as np

from .._spec import Activation, ConvSpec


def _taps(x: np.ndarray, spec: ConvSpec):
    xp = np.pad(
        np.asarray(x, np.float64),
        ((0, 0), (spec.pad_top, spec.pad_bottom), (spec.pad_left, spec.pad_right), (0, 0)),
    )
    for m in range(spec.kh):
        for q in range(spec.kw):
            h0, w0 = m * spec.dilation_h, q * spec.dilation_w
            yield (
                m,
                q,
                xp[
                    :,
                    h0 : h0 + (spec.out_h - 1) * spec.stride_h + 1 : spec.stride_h,
                    w0 : w0 + (spec.out_w - 1) * spec.stride_w + 1 : spec.stride_w,
                    :,
                ],
            )


def _act(y: np.ndarray, code: int) -> np.ndarray:
    if code == Activation.NONE:
        return y
    y = np.where(y < 0, 0.0, y)
    return np.where(y > 6, 6.0, y) if code == Activation.RELU6 else y


def conv2d(x, w, bias, spec: ConvSpec) -> np.ndarray:
    """w: (KH, KW, C_in, C_out)."""
    y = np.zeros(spec.out_nhwc)
    w64 = np.asarray(w, np.float64)
    for i, j, tap in _taps(x, spec):
        y += tap @ w64[i, j]
    if bias is not None:
        y += bias
    return _act(y, spec.activation)


def depthwise(x, d3, bias, spec: ConvSpec, act: int = Activation.NONE) -> np.ndarray:
    """d3: (KH, KW, C*M)."""
    m = spec.multiplier
    y = np.zeros(spec.mid_nhwc)
    for i, j, tap in _taps(x, spec):
        y += np.repeat(tap, m, axis=3) * np.asarray(d3[i, j], np.float64)
    if bias is not None:
        y += bias
    return _act(y, act)


def pointwise(y, p, bias, act: int = Activation.NONE) -> np.ndarray:
    z = np.asarray(y, np.float64) @ np.asarray(p, np.float64)
    if bias is not None:
        z += bias
    return _act(z, act)


def separable(x, d3, p, dw_bias, bias, spec: ConvSpec) -> np.ndarray:
    mid = depthwise(x, d3, dw_bias, spec, spec.mid_activation)
    return pointwise(mid, p, bias, spec.activation)


def compute(spec: ConvSpec, x, weights: tuple, biases: tuple) -> np.ndarray:
    """The float64 NHWC result of ``spec.op`` on batched NHWC ``x``, with the weights in the
    kernels' shapes (conv2d w (KH,KW,C,C_out); depthwise (KH,KW,C*M); pointwise (C,C_out);
    separable both) and the biases in the op's order (separable: dw_bias, bias)."""
    if spec.op == "conv2d":
        return conv2d(x, weights[0], biases[0], spec)
    if spec.op == "depthwise":
        return depthwise(x, weights[0], biases[0], spec, spec.activation)
    if spec.op == "pointwise":
        return pointwise(x, weights[0], biases[0], spec.activation)
    return separable(x, weights[0], weights[1], biases[0], biases[1], spec)
