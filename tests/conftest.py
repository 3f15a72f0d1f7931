"""Fixtures. Helpers are in helpers.py, the case table in cases.py, the float64 judge in
reference.py.

``device``: every test that takes it runs on each backend this machine can run: "cpu" always;
"cuda" where a GPU is usable or under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before
Python starts), with blocks and tiles patched small so tiny inputs span several blocks and every
grid-stride loop turns more than once; on a real GPU also "cuda-default" (the shipped tiles).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import device_params, small_cuda_blocks

DEVICES = device_params()


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """The backend to run on: 'cpu' or 'cuda' (see the module docstring)."""
    if request.param == "cuda":
        small_cuda_blocks(monkeypatch)
    return "cuda" if request.param.startswith("cuda") else "cpu"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)
