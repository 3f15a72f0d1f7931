"""Library ops against torch.nn.functional.conv2d directly (skips cleanly without torch)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, make_case

import numba_dsconv as nd

pytest.importorskip("torch")

from torch_helpers import (  # noqa: E402
    torch_conv2d,
    torch_depthwise,
    torch_pointwise,
    torch_separable,
)

TORCH = {
    "conv2d": torch_conv2d,
    "depthwise": torch_depthwise,
    "pointwise": torch_pointwise,
    "separable": torch_separable,
}

# (op, n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out)
CONFIGS = [
    # MobileNet v1-ish blocks at small spatial size
    ("conv2d", 1, 32, 32, 3, 3, 3, 2, "same", 1, 1, 32),  # stem
    ("separable", 1, 16, 16, 32, 3, 3, 1, "same", 1, 1, 64),
    ("separable", 1, 16, 16, 64, 3, 3, 2, "same", 1, 1, 128),
    ("separable", 2, 8, 8, 128, 3, 3, 1, "same", 1, 1, 128),
    ("separable", 1, 7, 7, 256, 3, 3, 2, "same", 1, 1, 512),
    ("separable", 1, 4, 4, 512, 3, 3, 1, "same", 1, 1, 512),
    ("depthwise", 1, 15, 15, 32, 3, 3, 2, "same", 1, 1, 32),
    ("pointwise", 1, 7, 7, 256, 1, 1, 1, "valid", 1, 1, 256),
    # MobileNet v2-ish: expansion pointwise, stride-2 depthwise, projection
    ("pointwise", 1, 14, 14, 16, 1, 1, 1, "valid", 1, 1, 96),
    ("depthwise", 1, 14, 14, 96, 3, 3, 2, "same", 1, 1, 96),
    ("pointwise", 1, 7, 7, 96, 1, 1, 1, "valid", 1, 1, 24),
    # Xception/EfficientNet-like odd ones
    ("separable", 1, 11, 13, 24, 5, 5, 2, "same", 1, 1, 40),
    ("depthwise", 2, 9, 9, 16, 7, 7, 1, "same", 1, 2, 32),
    ("separable", 1, 12, 10, 8, 3, 3, 1, "same", 2, 3, 16),
    ("conv2d", 2, 9, 11, 5, 4, 2, (2, 1), ((0, 2), (1, 0)), (1, 2), 1, 7),
    ("separable", 1, 9, 11, 6, 2, 4, (1, 2), (1, 2), (2, 1), 2, 9),
    ("conv2d", 1, 10, 10, 16, 1, 1, 2, "valid", 1, 1, 24),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_against_torch(cfg, dtype, rng):
    op, n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out = cfg
    x, weights, bias_kw, red = make_case(
        rng, op, n=n, h=h, w=w, c=c, kh=kh, kw=kw, mult=mult, c_out=c_out, xdtype=dtype,
        biases=True, dw_4d=mult == 1 and op == "separable",
    )  # fmt: skip
    kwargs = dict(bias_kw)
    if op != "pointwise":
        kwargs.update(stride=stride, padding=padding, dilation=dilation)
    if op == "separable":
        kwargs["mid_activation"] = "relu6"
    expected = TORCH[op](x, *weights, activation="relu", **kwargs)
    actual = getattr(nd, op)(x, *weights, activation="relu", device="cpu", **kwargs)
    assert_close(actual, expected, dtype, red)
