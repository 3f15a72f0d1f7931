"""Library ops against torch.nn.functional.conv2d directly, on every device, over the table's
"torch" cases (skips cleanly without torch)."""

from __future__ import annotations

import pytest
from cases import params, select
from helpers import assert_close, skip_slow_under_simulator

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


@pytest.mark.parametrize("case", params(select("torch")))
def test_against_torch(case, device, rng):
    skip_slow_under_simulator(case, device)
    x, weights, kwargs = case.make(rng)
    assert kwargs.pop("layout") == "NHWC"  # the oracle speaks NHWC
    expected = TORCH[case.op](x, *weights, **kwargs)
    actual = getattr(nd, case.op)(x, *weights, device=device, **kwargs)
    assert_close(actual, expected, case.result_dtype, case.reduction_len)
