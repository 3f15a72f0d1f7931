"""Every shipped CUDA kernel specialisation compiles to PTX for compute capability 9.0.

This runs the real CUDA typing and code generation (which the simulator cannot) and needs no
GPU, only NVVM from the toolkit wheels (``pip install numba-dsconv[cuda12]``); it skips where
those are missing and under the simulator. The kernels must keep their accumulators and tiles
out of local memory; where ``ptxas`` is found (the ``nvidia-cuda-nvcc`` wheel of the extra),
every build is also assembled for sm_90 and must not spill registers.
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


def _ptxas() -> str | None:
    if _SKIP is not None:
        return None
    from numba_dsconv.cuda._resources import find_ptxas

    return find_ptxas()


PTXAS = _ptxas()  # the assembler's register/spill report, where the toolkit wheel brings it


def _cases():
    if _SKIP is not None:
        return []
    from numba_dsconv import _config
    from numba_dsconv.cuda._ptx import ptx_cases

    tile = tuple(_config.CUDA_GEMM_TILE)
    return list(ptx_cases(tile, _config.CUDA_GEMM_REGISTERS))


CASES = _cases()
IDS = [c[0] for c in CASES]
_PTX: dict[str, str] = {}  # PTX by case name, shared by the compile and the assemble tests


def _ptx(name, fn, sig, opts) -> str:
    if name not in _PTX:
        from numba import cuda

        _PTX[name] = cuda.compile_ptx(fn, sig, cc=(9, 0), **opts)[0]
    return _PTX[name]


def _is_gemm(name: str) -> bool:
    return name.startswith(("separable", "pointwise", "conv2d"))


@needs_nvvm
@pytest.mark.parametrize("name,fn,sig,opts", CASES, ids=IDS)
def test_compiles_to_ptx_for_sm90(name, fn, sig, opts):
    from numba_dsconv import _config
    from numba_dsconv.cuda._jit import launch_bounds

    ptx = _ptx(name, fn, sig, opts)
    assert ".target sm_90" in ptx
    assert ".entry" in ptx
    # tiles and accumulators must live in registers / shared memory, not local memory
    assert "ld.local" not in ptx and "st.local" not in ptx, f"{name} uses local memory"
    if name.startswith(("backward pw_grad", "backward gm ", "backward dw_band")):
        assert ".shared" in ptx and "bar.sync" in ptx  # tiles staged in shared memory
    if _is_gemm(name):
        assert ".shared" in ptx and "bar.sync" in ptx
        # the inner product step reads a thread's 4 pixels and 4 channels from the shared
        # tiles with 16-byte vector loads (two per step, not eight scalar loads)
        vector = "ld.shared.v4.f32" if "float32" in name else "ld.shared.v2.f64"
        assert ptx.count(vector) >= (2 if "float32" in name else 4), name
        # the register budget reaches the PTX as launch bounds
        tile = _config.CUDA_GEMM_TILE
        threads = (tile[0] // tile[3]) * (tile[1] // tile[4])
        bounds = launch_bounds(threads, _config.CUDA_GEMM_REGISTERS)
        assert bounds == (256, 2)  # the shipped tile and budget
        assert f".maxntid {threads}" in ptx and f".minnctapersm {bounds[1]}" in ptx, name


@needs_nvvm
@pytest.mark.skipif(PTXAS is None, reason="ptxas not found (the cuda12 extra brings it)")
@pytest.mark.parametrize("name,fn,sig,opts", CASES, ids=IDS)
def test_assembles_without_spills(name, fn, sig, opts):
    """After register allocation: no spills within the register budget, and the promised
    blocks per multiprocessor fit in registers and shared memory."""
    from numba_dsconv import _config
    from numba_dsconv.cuda._resources import assemble, blocks_per_sm

    r = assemble(_ptx(name, fn, sig, opts), PTXAS)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name} spills: {r}"
    if _is_gemm(name):
        assert r["registers"] <= _config.CUDA_GEMM_REGISTERS, f"{name}: {r}"
        tile = _config.CUDA_GEMM_TILE
        threads = (tile[0] // tile[3]) * (tile[1] // tile[4])
        fits = blocks_per_sm(r["registers"], r["shared"], threads)
        assert fits >= 2, f"{name}: {r}, {fits} blocks per SM"


@needs_nvvm
def test_every_specialisation_is_covered():
    from numba_dsconv import _config
    from numba_dsconv.cuda import depthwise as kernels
    from numba_dsconv.cuda.gemm import halo_possible

    tile = tuple(_config.CUDA_GEMM_TILE)
    names = {c[0] for c in CASES}
    halos = 0
    for dt in ("float32", "float64"):
        for key in (*kernels.SPECIALISED, kernels.GENERIC):
            for op in ("depthwise", "separable", "conv2d"):
                assert f"{op} {key} {dt}" in names
            if halo_possible(key, np.dtype(dt), tile):
                assert f"separable halo {key} {dt}" in names
                halos += 1
        assert f"pointwise {dt}" in names
    # every float32 specialisation has a halo build (float64 has none)
    assert halos == len(kernels.SPECIALISED)
    # the backward: per dtype and way of reading the final activation's mask (3), pw_grad and
    # gm with and without a depthwise stage, the depthwise op's gm, conv2d's dx and dw, the
    # bias sums; then dx_band, dw_band, combine and fill
    backward = [n for n in names if n.startswith("backward")]
    assert len(backward) == 2 * (3 * 8 + 4)
    assert len(CASES) == 2 * (8 + 3 * (len(kernels.SPECIALISED) + 1) + 1) + halos + len(backward)


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

    from numba_dsconv.cuda.layout import as4d as _as4d
    from numba_dsconv.cuda.layout import nhwc_view as _nhwc_view

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


def _suite_spec(number: int, batch: int, dilation: int = 1):
    from numba_dsconv._spec import make_spec
    from numba_dsconv.bench.suite import layer

    lay = layer(number)
    return make_spec(
        "separable",
        x_shape=(batch, lay.hw, lay.hw, lay.c_in),
        layout="NHWC",
        kernel=(3, 3),
        c_in_kernel=lay.c_in,
        multiplier=1,
        c_out=lay.c_out,
        stride=lay.stride,
        padding=dilation,
        dilation=dilation,
    )


@pytest.mark.skipif(SIMULATOR, reason="needs the shipped tile, not the simulator's")
def test_halo_tiles_where_rectangles_cover_the_output(monkeypatch):
    """'auto' takes halo tiles on the 112/56-pixel MobileNet layers (8 x 8 rectangles tile
    them exactly) and flat tiles where rectangles would leave slots idle (28, 14, 7)."""
    pytest.importorskip("numba.cuda")
    from numba_dsconv import _config
    from numba_dsconv.cuda import depthwise as kernels
    from numba_dsconv.cuda import gemm

    tile = (64, 64, 16, 4, 4)
    f32 = np.dtype(np.float32)
    key = (3, 3, 1, 1)

    def choose(number, batch=64, dilation=1, dtype=f32):
        spec = _suite_spec(number, batch, dilation)
        k = kernels.specialisation(3, 3, spec.stride_h, spec.stride_w)
        return gemm.pixel_tiles(spec, k, dtype, tile)

    # (halo shape, pixel tiles): layer 1 is 64 x 112 x 112 outputs = 64 * 196 rectangles
    assert choose(1) == ((8, 8), 64 * 196)
    assert choose(2) == ((8, 8), 64 * 49)  # stride 2: 56 x 56 outputs
    assert choose(3) == ((8, 8), 64 * 49)
    for number in (4, 5, 6, 7):
        halo, tiles = choose(number)
        spec = _suite_spec(number, 64)
        assert halo == (0, 0) and tiles == -(-64 * spec.out_h * spec.out_w // 64)
    assert choose(1, dilation=2)[0] == (0, 0)
    assert choose(1, dtype=np.dtype(np.float64))[0] == (0, 0)
    monkeypatch.setattr(_config, "CUDA_HALO", "always")
    assert choose(5) == ((8, 8), 64 * 4)  # 14 x 14 outputs: 2 x 2 rectangles per image
    monkeypatch.setattr(_config, "CUDA_HALO", "never")
    assert choose(1)[0] == (0, 0)
    monkeypatch.setattr(_config, "CUDA_HALO", "sometimes")
    with pytest.raises(ValueError, match="CUDA_HALO"):
        choose(1)
    assert gemm.halo_possible(key, f32, tile) and not gemm.halo_possible(kernels.GENERIC, f32, tile)
