"""The Examples sections of the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["numba_dsconv.api", "numba_dsconv.grad", "numba_dsconv.cost", "numba_dsconv.packing",
           "numba_dsconv.bench.work"]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def test_every_public_function_has_examples():
    import numba_dsconv as nd

    for name in ("conv2d", "depthwise", "pointwise", "separable", "cost", "conv2d_grad",
                 "depthwise_grad", "pointwise_grad", "separable_grad", "pack"):  # fmt: skip
        assert "Examples\n    --------" in getattr(nd, name).__doc__, name
