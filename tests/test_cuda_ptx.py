"""Every shipped CUDA kernel specialisation compiles to PTX for compute capability 9.0.

This runs the real CUDA typing and code generation (which the simulator cannot) and needs no
GPU, only NVVM from the toolkit wheels (``pip install numba-dsconv[cuda12]``); it skips where
those are missing and under the simulator. The kernels must keep their accumulators and tiles
out of local memory (no spills).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")


def _nvvm_usable() -> str | None:
    if SIMULATOR:
        return "PTX compilation is not available under the simulator"
    try:
        import numba
        import numba_cuda  # noqa: F401  (numba's deprecated built-in target is not enough)
        from numba import cuda

        def probe(a):
            s = cuda.shared.array(4, numba.float32)
            s[0] = 1.0
            cuda.syncthreads()
            a[0] = s[0]

        sig = (numba.types.Array(numba.types.float32, 1, "C"),)
        cuda.compile_ptx(probe, sig, cc=(9, 0))
    except Exception as exc:  # no numba-cuda, no NVVM/toolkit wheels
        return f"CUDA PTX compilation unavailable: {type(exc).__name__}: {exc}"[:200]
    return None


_SKIP = _nvvm_usable()
needs_nvvm = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _cases():
    if _SKIP is not None:
        return []
    from numba_dsconv import _config
    from numba_dsconv.cuda import kernels

    return list(kernels.ptx_cases(tuple(_config.CUDA_GEMM_TILE)))


CASES = _cases()


@needs_nvvm
@pytest.mark.parametrize("name,fn,sig", CASES, ids=[c[0] for c in CASES])
def test_compiles_to_ptx_for_sm90(name, fn, sig):
    from numba import cuda

    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".entry" in ptx
    # tiles and accumulators must live in registers / shared memory, not local memory
    assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} uses local memory"
    if "separable" in name or "pointwise" in name or "conv2d" in name:
        assert ".shared" in ptx and "bar.sync" in ptx


@needs_nvvm
def test_every_specialisation_is_covered():
    from numba_dsconv.cuda import kernels

    names = {c[0] for c in CASES}
    for dt in ("float32", "float64"):
        for key in (*kernels.SPECIALISED, kernels.GENERIC):
            for op in ("depthwise", "separable", "conv2d"):
                assert f"{op} {key} {dt}" in names
        assert f"pointwise {dt}" in names
    assert len(CASES) == 2 * (8 + 3 * (len(kernels.SPECIALISED) + 1) + 1)


@pytest.mark.skipif(SIMULATOR, reason="the simulator always has a device")
def test_no_gpu_is_a_clear_error():
    """Without a usable GPU, device='cuda' says so and suggests the CPU."""
    from numba import cuda

    import numba_dsconv as nd

    if cuda.is_available():
        pytest.skip("a GPU is present")
    x = np.ones((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match=r"device='cuda'.*no usable CUDA GPU.*device='cpu'"):
        nd.separable(x, np.ones((3, 3, 3), np.float32), np.ones((3, 2), np.float32), device="cuda")
    with pytest.raises(ValueError, match="cuda:1"):
        nd.depthwise(x, np.ones((3, 3, 3), np.float32), device="cuda:1")


@needs_nvvm
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_unbatched_device_views_stay_contiguous(layout):
    """The NHWC view of an unbatched, contiguous device array is itself C-contiguous on the real
    CUDA target (a 0 stride for the added batch axis made numba call it non-contiguous and copy;
    the simulator, built on NumPy, cannot show this)."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    from numba_dsconv.cuda.backend import _as4d, _nhwc_view

    def fake(shape):  # a device array descriptor; no memory is touched
        a = np.zeros(shape, np.float32)
        return DeviceNDArray(a.shape, a.strides, a.dtype, gpu_data=object())

    x = fake((5, 6, 3) if layout == "NHWC" else (3, 5, 6))
    view = _nhwc_view(x, (1, 5, 6, 3), False, layout)
    assert view.shape == (1, 5, 6, 3)
    assert view.is_c_contiguous() == (layout == "NHWC")
    b = _as4d(fake((7,)), (1, 1, 1, 7))
    assert b.is_c_contiguous()


@needs_nvvm
def test_reshape_of_fortran_device_weights_is_not_a_reinterpretation():
    """numba's DeviceNDArray.reshape gives F-ordered memory C strides: the backend must copy
    non-C-contiguous weights before reshaping (checked on the descriptor, no GPU needed)."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    a = np.asfortranarray(np.zeros((1, 1, 3, 4), np.float32))
    d = DeviceNDArray(a.shape, a.strides, a.dtype, gpu_data=object())
    assert not d.is_c_contiguous()  # so CudaBackend.reshape takes its copying branch
    assert d.reshape(3, 4).strides != a.reshape(3, 4).strides  # the hazard it avoids
