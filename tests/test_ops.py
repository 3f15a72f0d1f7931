"""Every case of the table (cases.py) on every device against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, params
from helpers import check_against_reference, skip_slow_under_simulator


@pytest.mark.parametrize("case", params(CASES))
def test_against_reference(case, device, rng, monkeypatch):
    skip_slow_under_simulator(case, device)
    if "parallel" in case.tags:
        from numba_dsconv import _config

        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)  # the parallel CPU kernels
    x, weights, kwargs = case.make(rng)
    y = check_against_reference(case.op, x, weights, case.reduction_len, device=device, **kwargs)
    assert isinstance(y, np.ndarray)  # NumPy in, NumPy out, whatever the device
    if "clips" in case.tags and case.activation is not None:
        assert (y == 0).any() and (y >= 0).all()
        if case.activation == "relu6":
            assert (y == 6).any() and (y <= 6).all()
